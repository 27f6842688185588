"""qemu.qmp's QMPClient, unchanged, against the emulator's server over real UNIX sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from emulator.machine import Machine
from emulator.qmp.errors import GenericError
from emulator.qmp.registry import COMMANDS, command
from emulator.qmp.server import QMPServer, in_process_client

TEST_COMMANDS = ("x-test-emit", "x-test-slow", "x-test-oob", "x-test-bug")


@pytest.fixture
def test_commands() -> Iterator[None]:
    """Commands that exist only for these tests (removed afterwards)."""

    @command("x-test-emit", data={"count": "int"})
    def emit(vm: Machine, count: int) -> dict[str, int]:
        for i in range(count):
            vm.emit("X_TEST_EVENT", {"n": i})
        return {"emitted": count}

    @command("x-test-slow", data={"*seconds": "number", "*fail": "bool"})
    async def slow(vm: Machine, seconds: float = 0.2, fail: bool = False) -> str:
        await asyncio.sleep(seconds)
        vm.emit("X_TEST_SLOW_DONE")
        if fail:
            raise GenericError("slow failure")
        return "slow"

    @command("x-test-oob", allow_oob=True)
    def oob(vm: Machine) -> str:
        return "oob"

    @command("x-test-bug")
    def bug(vm: Machine) -> None:
        raise RuntimeError("a bug in the emulator")

    yield
    for name in TEST_COMMANDS:
        COMMANDS.pop(name, None)


def run(coro_fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(*args), 30))


async def _serving(tmp_path: Path) -> tuple[Machine, QMPServer, str]:
    machine = Machine(tmp_path)
    server = QMPServer(machine)
    path = str(tmp_path / "qmp.sock")
    await server.start_unix(path)
    return machine, server, path


def test_greeting_negotiation_and_commands(tmp_path: Path) -> None:
    async def go() -> None:
        _, server, path = await _serving(tmp_path)
        client = QMPClient("t")
        await client.connect(path)
        try:
            assert client.greeting is not None
            assert client.greeting.QMP.version["qemu"] == {"major": 7, "minor": 2, "micro": 22}
            assert client.greeting.QMP.capabilities == ["oob"]
            version = await client.execute("query-version")
            assert version == {"qemu": {"major": 7, "minor": 2, "micro": 22},
                               "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}
            assert await client.execute("query-status") == {
                "running": False, "singlestep": False, "status": "prelaunch"}
            commands: Any = await client.execute("query-commands")
            names = [c["name"] for c in commands]
            assert {"qmp_capabilities", "query-version", "quit"} <= set(names)
        finally:
            await client.disconnect()
            await server.close()
        assert not (tmp_path / "qmp.sock").exists()

    run(go)


@pytest.mark.parametrize(("cmd", "args", "cls", "desc"), [
    ("nonexistent", None, "CommandNotFound", "The command nonexistent has not been found"),
    ("qmp_capabilities", None, "CommandNotFound",
     "Capabilities negotiation is already complete, command ignored"),
    ("query-status", {"x": 1}, "GenericError", "Parameter 'x' is unexpected"),
    ("human-monitor-command", {}, "GenericError", "Parameter 'command-line' is missing"),
    ("human-monitor-command", {"command-line": 1}, "GenericError",
     "Invalid parameter type for 'command-line', expected: string"),
    ("human-monitor-command", {"command-line": "x", "cpu-index": 0}, "GenericError",
     "Parameter 'cpu-index' expects a CPU number"),
    ("block-dirty-bitmap-add", {"node": "n", "name": "b", "granularity": -1}, "GenericError",
     "Parameter 'granularity' expects uint32_t"),
    ("transaction", {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "a"}}]},
     "GenericError", "Parameter 'actions[0].data.name' is missing"),
    ("x-test-bug", None, "GenericError",
     "internal error in the emulator's x-test-bug: a bug in the emulator"),
])
def test_execute_errors(tmp_path: Path, test_commands: None, cmd: str,
                        args: dict[str, Any] | None, cls: str, desc: str) -> None:
    async def go() -> None:
        _, server, path = await _serving(tmp_path)
        client = QMPClient("t")
        await client.connect(path)
        try:
            with pytest.raises(ExecuteError) as info:
                await client.execute(cmd, args)
            assert info.value.error_class == cls
            assert info.value.error.error.desc == desc
            # the session goes on
            status: Any = await client.execute("query-status")
            assert status["status"] == "prelaunch"
        finally:
            await client.disconnect()
            await server.close()

    run(go)


def test_hmp_through_client(tmp_path: Path) -> None:
    async def go() -> None:
        async with in_process_client(Machine(tmp_path)) as client:
            out = await client.execute("human-monitor-command", {"command-line": "foo"})
            assert out == "unknown command: 'foo'\r\n"
            out = await client.execute("human-monitor-command",
                                       {"command-line": "info status"})
            assert out == "VM status: paused (prelaunch)\r\n"

    run(go)


def test_events_precede_the_reply(tmp_path: Path, test_commands: None) -> None:
    async def go() -> None:
        machine = Machine(tmp_path)
        async with in_process_client(machine) as client:
            seen: list[dict[str, Any]] = []
            with client.listener() as listener:
                before = time.time()
                reply = await client.execute("x-test-emit", {"count": 3})
                assert reply == {"emitted": 3}
                # the events were read before the reply, so they are queued already
                while not listener.empty():
                    seen.append(dict(await listener.get()))
            assert [e["data"]["n"] for e in seen] == [0, 1, 2]
            for e in seen:
                assert e["event"] == "X_TEST_EVENT"
                stamp = e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
                assert before - 1 <= stamp <= time.time() + 1
                assert 0 <= e["timestamp"]["microseconds"] < 1_000_000

    run(go)


def test_events_need_negotiation(tmp_path: Path) -> None:
    async def go() -> None:
        machine = Machine(tmp_path)
        server = QMPServer(machine)
        reader, writer = await asyncio.open_unix_connection(sock=server.socketpair())
        await reader.readline()  # greeting
        machine.emit("BEFORE")
        writer.write(b'{"execute": "qmp_capabilities"}\n')
        assert await reader.readline() == b'{"return": {}}\r\n'
        machine.emit("AFTER", {"k": "v"})
        line = await reader.readline()
        assert line.startswith(b'{"timestamp": {"seconds": ')
        assert line.endswith(b'"event": "AFTER", "data": {"k": "v"}}\r\n')
        writer.close()
        await server.close()

    run(go)


def test_out_of_band_overtakes_in_band(tmp_path: Path, test_commands: None) -> None:
    async def go() -> None:
        async with in_process_client(Machine(tmp_path)) as client:
            slow = asyncio.ensure_future(client.execute("x-test-slow", {"seconds": 0.5}))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            assert await client.execute("x-test-oob", oob=True) == "oob"
            assert time.monotonic() - started < 0.4
            assert not slow.done()
            assert await slow == "slow"
            with pytest.raises(ExecuteError) as info:
                await client.execute("query-status", oob=True)
            assert info.value.error.error.desc == "The command query-status does not support OOB"

    run(go)


def test_async_handler_failure(tmp_path: Path, test_commands: None) -> None:
    async def go() -> None:
        async with in_process_client(Machine(tmp_path)) as client:
            with pytest.raises(ExecuteError) as info:
                await client.execute("x-test-slow", {"seconds": 0.01, "fail": True})
            assert info.value.error.error.desc == "slow failure"

    run(go)


def test_quit_shutdown_event_then_eof(tmp_path: Path) -> None:
    async def go() -> None:
        machine, server, path = await _serving(tmp_path)
        client = QMPClient("t")
        await client.connect(path)
        with client.listener() as listener:
            assert await client.execute("quit") == {}
            event = await asyncio.wait_for(listener.get(), 5)
        assert event["event"] == "SHUTDOWN"
        assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}
        await asyncio.wait_for(server.wait_closed(), 5)
        with pytest.raises(EOFError):  # as with QEMU: the server hung up after the reply
            await client.disconnect()
        await server.close()
        assert machine.shutdown_requested
        assert not Path(path).exists()

    run(go)


def test_disconnect_during_a_command(tmp_path: Path, test_commands: None) -> None:
    async def go() -> None:
        machine, server, path = await _serving(tmp_path)
        reader, writer = await asyncio.open_unix_connection(path)
        await reader.readline()
        writer.write(b'{"execute": "qmp_capabilities"}\n'
                     b'{"execute": "x-test-slow", "arguments": {"seconds": 0.3}}\n'
                     b'{"execute": "x-test-emit", "arguments": {"count": 1}}\n')
        await reader.readline()
        writer.close()  # leave while x-test-slow runs; x-test-emit is dropped
        emitted: list[str] = []
        machine.add_event_listener(lambda e: emitted.append(e["event"]))
        client = QMPClient("second")
        await client.connect(path)  # served once the first session has ended
        status: Any = await client.execute("query-status")
        assert status["status"] == "prelaunch"
        assert emitted == ["X_TEST_SLOW_DONE"]
        await client.disconnect()
        await server.close()

    run(go)


def test_one_client_at_a_time(tmp_path: Path) -> None:
    async def go() -> None:
        _, server, path = await _serving(tmp_path)
        first_r, first_w = await asyncio.open_unix_connection(path)
        assert (await first_r.readline()).startswith(b'{"QMP"')
        second_r, second_w = await asyncio.open_unix_connection(path)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(second_r.readline(), 0.3)
        first_w.close()
        assert (await asyncio.wait_for(second_r.readline(), 5)).startswith(b'{"QMP"')
        second_w.close()
        await server.close()

    run(go)


def test_socket_is_private(tmp_path: Path) -> None:
    async def go() -> None:
        _, server, path = await _serving(tmp_path)
        assert Path(path).stat().st_mode & 0o777 == 0o600
        await server.close()

    run(go)


def test_serve_in_process_streams(tmp_path: Path) -> None:
    from emulator.qmp.server import serve_in_process

    async def go() -> None:
        async with serve_in_process(Machine(tmp_path)) as (reader, writer):
            assert (await reader.readline()).startswith(b'{"QMP": ')
            writer.write(b'{"execute": "qmp_capabilities", "id": "a"}\n')
            assert await reader.readline() == b'{"return": {}, "id": "a"}\r\n'

    run(go)
