"""HMP behind human-monitor-command: the command table and monitor/hmp.c's parsing.

The texts for built-in commands and qemu-io's argument errors are checked against QEMU in
test_qmp_wire.py; these exercise the registry and the parser with test-only commands.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emulator.machine import Machine
from emulator.qmp import hmp
from emulator.qmp.errors import GenericError
from emulator.qmp.hmp import get_str, handle_hmp_command, hmp_command


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[Machine]:
    import emulator.commands  # noqa: F401

    saved = list(hmp.HMP_COMMANDS), list(hmp.INFO_COMMANDS)
    yield Machine(tmp_path)
    hmp.HMP_COMMANDS[:], hmp.INFO_COMMANDS[:] = saved


def hmp_run(vm: Machine, line: str) -> str:
    return asyncio.run(handle_hmp_command(vm, line))


@pytest.mark.parametrize(("line", "value", "rest"), [
    ("  word rest", "word", " rest"),
    ('"a b" rest', "a b", " rest"),
    ('"a\\"b\\n\\r\\\\\\\'"', "a\"b\n\r\\'", ""),
    ('"unterminated', None, ""),
    ('"bad \\x"', None, '"'),
    ("", None, ""),
])
def test_get_str(line: str, value: str | None, rest: str) -> None:
    got, pos = get_str(line, 0)
    assert got == value
    if value is not None:
        assert line[pos:] == rest


def test_parsed_arguments(vm: Machine) -> None:
    calls: list[dict[str, Any]] = []

    @hmp_command("x-test", args_type="force:-f,device:B,count:i?,rest:S?",
                 params="[-f] device [count] [rest]", help="a test command")
    def handler(vm: Machine, **args: Any) -> str:
        calls.append(args)
        return "done\n"

    assert hmp_run(vm, "x-test -f dev 3 the rest") == "done\r\n"
    assert calls[-1] == {"force": True, "device": "dev", "count": 3, "rest": "the rest"}
    assert hmp_run(vm, "x-test dev") == "done\r\n"
    assert calls[-1] == {"device": "dev"}
    assert hmp_run(vm, "x-test") == (
        "x-test: block device name expected\r\nTry \"help x-test\" for more information\r\n")
    assert hmp_run(vm, "  x-test  -g dev") == (
        "x-test: unsupported option -g\r\nTry \"help   x-test\" for more information\r\n")
    assert hmp_run(vm, "help x-test") == \
        "x-test [-f] device [count] [rest] -- a test command\r\n"


def test_raw_handlers_errors_and_aliases(vm: Machine) -> None:
    @hmp_command("x-raw|xr")
    def raw(vm: Machine, args: str) -> str:
        return f"got [{args}]\n"

    @hmp_command("x-fail", args_type="")
    def fail(vm: Machine) -> None:
        raise GenericError("it broke")

    @hmp_command("x-async", args_type="")
    async def later(vm: Machine) -> str:
        await asyncio.sleep(0)
        return "later\nand more\n"

    assert hmp_run(vm, "x-raw  a \"b\"") == 'got [a "b"]\r\n'
    assert hmp_run(vm, "xr") == "got []\r\n"
    assert hmp_run(vm, "x-fail") == "Error: it broke\r\n"
    assert hmp_run(vm, "x-fail extra") == (
        "x-fail: extraneous characters at the end of line\r\n"
        "Try \"help x-fail\" for more information\r\n")
    assert hmp_run(vm, "x-async") == "later\r\nand more\r\n"


def test_info_subcommands(vm: Machine) -> None:
    @hmp_command("x-thing", args_type="", help="show the thing", info=True)
    def thing(vm: Machine) -> str:
        return "thing\n"

    assert hmp_run(vm, "info x-thing") == "thing\r\n"
    assert hmp_run(vm, "info nothing") == "unknown command: 'info nothing'\r\n"
    assert "info x-thing  -- show the thing\r\n" in hmp_run(vm, "info")
    assert hmp_run(vm, "info status") == "VM status: paused (prelaunch)\r\n"
    vm.cont()
    assert hmp_run(vm, "info status") == "VM status: running\r\n"
    vm.stop()
    assert hmp_run(vm, "info status") == "VM status: paused\r\n"


def test_unknown_and_empty(vm: Machine) -> None:
    assert hmp_run(vm, "") == ""
    assert hmp_run(vm, "  \t") == ""
    assert hmp_run(vm, "  nope/x y") == "unknown command: '  nope'\r\n"
