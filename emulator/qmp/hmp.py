"""HMP behind ``human-monitor-command``: a command table and QEMU's command-line parsing.

Register an HMP command with ``@hmp_command``.  Two handler styles::

    @hmp_command("qemu-io")                      # args_type=None: the raw argument text
    def hmp_qemu_io(vm, args: str) -> str: ...

    @hmp_command("status", args_type="", params="", help="show the current VM status ...",
                 info=True)                      # parsed like monitor_parse_arguments()
    def hmp_info_status(vm) -> str: ...

A handler returns the text the monitor would print, lines ending in "\\n" (None for none);
the reply carries them with "\\r\\n", as QEMU's monitor_puts() writes them.  A QMPError raised
by a handler prints "Error: <desc>", as hmp_handle_error() does.  Lookup, sub-commands
("info ..."), "unknown command: '...'" and the parse errors follow monitor/hmp.c.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from emulator.qmp.errors import QMPError

HMPHandler = Callable[..., Any]
_SPACE = " \t\n\v\f\r"
_SPACES = re.compile(r"[ \t\n\v\f\r]*")
_WORD = re.compile(r"[^ \t\n\v\f\r]*")


@dataclass
class HMPCommand:
    name: str                    # "help|?": aliases separated by "|"
    handler: HMPHandler | None
    args_type: str | None = None
    params: str = ""
    help: str = ""
    sub_table: list[HMPCommand] | None = None

    def matches(self, name: str) -> bool:
        """hmp_compare_cmd()."""
        return name in self.name.split("|")


# QEMU 7.2's hmp-commands.hx text, for commands registered without their own
QEMU_HELP = {
    "qemu-io": ('[-d] [device] "[command]"', "run a qemu-io command on a block device\n\t\t\t"
                "-d: [device] is a device ID rather than a drive ID or node name"),
}

INFO_COMMANDS: list[HMPCommand] = []
HMP_COMMANDS: list[HMPCommand] = [
    HMPCommand("info", None, "item:s?", "[subcommand]", "show various information about the "
               "system state", sub_table=INFO_COMMANDS),
]


def hmp_command(name: str, args_type: str | None = None, params: str = "", help: str = "",
                *, info: bool = False) -> Callable[[HMPHandler], HMPHandler]:
    """Register an HMP command (``info=True``: an "info" sub-command); replaces any command
    of the same name."""

    def register(fn: HMPHandler) -> HMPHandler:
        table = INFO_COMMANDS if info else HMP_COMMANDS
        table[:] = [c for c in table if c.name != name]
        p, h = (params, help) if params or help else QEMU_HELP.get(name, ("", ""))
        table.append(HMPCommand(name, fn, args_type, p, h))
        if name == "info" and not info:
            table[-1].sub_table = INFO_COMMANDS
        return fn

    return register


class HMPArgError(Exception):
    """monitor_parse_arguments() failed; the message has been printed."""


def _skip_space(line: str, p: int) -> int:
    return _SPACES.match(line, p).end()  # type: ignore[union-attr]


def get_str(line: str, p: int) -> tuple[str | None, int]:
    """monitor/hmp.c get_str(): a word or a double-quoted string with \\n \\r \\\\ \\' \\"
    escapes; (None, position) on failure."""
    p = _skip_space(line, p)
    if p >= len(line):
        return None, p
    if line[p] != '"':
        word = _WORD.match(line, p)
        assert word is not None
        return word.group(), word.end()
    close = line.find('"', p + 1)
    if close >= 0 and "\\" not in line[p + 1:close]:
        return line[p + 1:close], close + 1   # no escapes: the text between the quotes
    out = []
    p += 1
    while p < len(line) and line[p] != '"':
        if line[p] == "\\":
            p += 1
            c = line[p] if p < len(line) else ""
            p += 1
            mapped = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}.get(c)
            if mapped is None:  # QEMU prints "unsupported escape code" on its stdout
                return None, p
            out.append(mapped)
        else:
            out.append(line[p])
            p += 1
    if p >= len(line):  # "unterminated string", on QEMU's stdout
        return None, p
    return "".join(out), p + 1


def _parse_int(line: str, p: int) -> tuple[int | None, int]:
    """A plain integer (QEMU's get_expr() also takes expressions; none are needed here)."""
    p = _skip_space(line, p)
    start = p
    while p < len(line) and line[p] not in _SPACE:
        p += 1
    try:
        return int(line[start:p], 0), p
    except ValueError:
        return None, p


def parse_arguments(out: list[str], cmd: HMPCommand, line: str, p: int) -> dict[str, Any]:
    """monitor_parse_arguments() for the types s B F S i l b and -x flags."""
    args: dict[str, Any] = {}
    spec = [part for part in (cmd.args_type or "").split(",") if part]
    i = 0
    while i < len(spec):
        key, _, typ = spec[i].partition(":")
        i += 1
        c, rest = typ[:1], typ[1:]
        if c in ("s", "B", "F"):
            p = _skip_space(line, p)
            if rest.startswith("?") and p >= len(line):
                continue
            value, p = get_str(line, p)
            if value is None:
                what = {"F": "filename", "B": "block device name"}.get(c, "string")
                out.append(f"{cmd.name}: {what} expected\n")
                raise HMPArgError
            args[key] = value
        elif c == "S":
            p = _skip_space(line, p)
            if rest.startswith("?") and p >= len(line):
                continue
            if p >= len(line):
                out.append(f"{cmd.name}: string expected\n")
                raise HMPArgError
            args[key], p = line[p:], len(line)
        elif c in ("i", "l"):
            p = _skip_space(line, p)
            if rest.startswith("?") and p >= len(line):
                continue
            number, p = _parse_int(line, p)
            if number is None:
                out.append("invalid char in expression\n")
                raise HMPArgError
            args[key] = number
        elif c == "b":
            p = _skip_space(line, p)
            start = p
            while p < len(line) and line[p].isprintable() and line[p] not in _SPACE:
                p += 1
            word = line[start:p]
            if word not in ("on", "off"):
                out.append("Expected 'on' or 'off'\n")
                raise HMPArgError
            args[key] = word == "on"
        elif c == "-":
            flag = rest[:1]
            tmp = p
            p = _skip_space(line, p)
            if p < len(line) and line[p] == "-":
                p += 1
                given = line[p] if p < len(line) else ""
                if given != flag:
                    remaining = ",".join(spec[i:])
                    if f"-{given}" not in remaining:
                        out.append(f"{cmd.name}: unsupported option -{given}\n")
                        raise HMPArgError
                    p = tmp
                else:
                    p += 1
                    args[key] = True
        else:
            out.append(f"{cmd.name}: unknown type '{c}'\n")
            raise HMPArgError
    p = _skip_space(line, p)
    if p < len(line):
        out.append(f"{cmd.name}: extraneous characters at the end of line\n")
        raise HMPArgError
    return args


def _find(table: list[HMPCommand], name: str) -> HMPCommand | None:
    return next((c for c in table if c.matches(name)), None)


def _parse_command(out: list[str], line: str, p: int,
                   table: list[HMPCommand]) -> tuple[HMPCommand | None, int]:
    """monitor_parse_command(): the command (recursing into sub-tables) and where its
    arguments start."""
    p = _skip_space(line, p)
    if p >= len(line):
        return None, p
    start = p
    while p < len(line) and line[p] != "/" and line[p] not in _SPACE:
        p += 1
    cmd = _find(table, line[start:p][:255])
    if cmd is None:
        out.append(f"unknown command: '{line[:p]}'\n")
        return None, p
    p = _skip_space(line, p)
    if cmd.sub_table is not None and p < len(line):
        return _parse_command(out, line, p, cmd.sub_table)
    return cmd, p


def help_text(table: list[HMPCommand], words: list[str], prefix: list[str]) -> str:
    """help_cmd_dump(): one line per command, or "unknown command"."""
    if not words:
        return "".join(_help_line(c, prefix) for c in table)
    cmd = _find(table, words[0])
    if cmd is None:
        return f"unknown command: '{' '.join([*prefix, words[0]])}'\n"
    if cmd.sub_table is not None:
        return help_text(cmd.sub_table, words[1:], [*prefix, words[0]])
    return _help_line(cmd, prefix)


def _help_line(cmd: HMPCommand, prefix: list[str]) -> str:
    return "".join(f"{w} " for w in prefix) + f"{cmd.name} {cmd.params} -- {cmd.help}\n"


async def handle_hmp_command(vm: Any, cmdline: str) -> str:
    """handle_hmp_command(): run one command line; returns the monitor output ("\\r\\n")."""
    out: list[str] = []
    cmd, p = _parse_command(out, cmdline, 0, HMP_COMMANDS)
    if cmd is not None:
        await _execute(out, vm, cmd, cmdline, p)
    return "".join(out).replace("\n", "\r\n")


async def _execute(out: list[str], vm: Any, cmd: HMPCommand, cmdline: str, p: int) -> None:
    if cmd.name == "info" and cmd.handler is None:  # "info" alone: help for "info"
        out.append(help_text(HMP_COMMANDS, ["info"], []))
        return
    if cmd.handler is None:
        out.append(f'Command "{cmdline[:p]}" is not available.\n')
        return
    try:
        if cmd.args_type is None:
            result = cmd.handler(vm, cmdline[p:])
        else:
            try:
                args = parse_arguments(out, cmd, cmdline, p)
            except HMPArgError:
                end = p
                while end > 0 and cmdline[end - 1] in _SPACE:
                    end -= 1
                out.append(f'Try "help {cmdline[:end]}" for more information\n')
                return
            result = cmd.handler(vm, **{k.replace("-", "_"): v for k, v in args.items()})
        if inspect.isawaitable(result):
            result = await result
    except QMPError as err:
        out.append(f"Error: {err.desc}\n")
        return
    if result:
        out.append(result)


def split_words(line: str) -> list[str] | None:
    """parse_cmdline(): the words of a help query (None if one is malformed)."""
    words: list[str] = []
    p = 0
    while True:
        p = _skip_space(line, p)
        if p >= len(line):
            return words
        if len(words) >= 16:
            return None
        word, p = get_str(line, p)
        if word is None:
            return None
        words.append(word)
