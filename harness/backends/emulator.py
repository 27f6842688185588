"""The emulator backend: the built-in QMP monitor, in this process.

Two transports reach the same monitor code (the session, dispatch, argument checking,
handlers, and events emitted before the reply as in QEMU):

* ``socket``: qemu.qmp's QMPClient over a socket pair — the bytes on the wire, QEMU's JSON
  lexer and key order, exactly what ``qmpreplay serve`` gives any client;
* ``direct`` (the default): a copy of the request (its own dicts and lists, as the wire
  would give it) goes straight to the monitor's dispatch and the reply comes back as the
  monitor built it, with no framing, no JSON and no event-loop hops. The replayer only reads
  replies and normalizes them (a copy) before the emulator runs again, so it needs no copy
  of its own. It is an order of magnitude faster; tests replay every golden both ways and
  require identical transcripts.

No process starts and no socket file exists. Offline image work goes to :mod:`emulator.img`
and :mod:`emulator.qemu_io` (no QEMU needed at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shlex
from pathlib import Path
from typing import Any

from harness.backends.base import Backend, ToolResult, VmConfig
from harness.errors import BackendError

TRANSPORTS = ("direct", "socket")
CONTAINERS = (dict, list, tuple)   # for isinstance: faster than the union dict | list | tuple


def wire_copy(value: Any) -> Any:
    """What the monitor would parse from ``value`` sent as JSON: a copy of its own, which it
    may keep or change, with tuples as lists (a walk is cheaper than a JSON round trip;
    scalars are taken as they are, with no call each)."""
    if isinstance(value, dict):
        return {k: wire_copy(v) if isinstance(v, CONTAINERS) else v
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [wire_copy(v) if isinstance(v, CONTAINERS) else v for v in value]
    return value


class EmulatorBackend(Backend):
    name = "emulator"

    def __init__(self, test_dir: Path, transport: str = "direct") -> None:
        super().__init__(test_dir)
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown emulator transport {transport!r}")
        self.transport = transport
        from emulator.sandbox import Sandbox
        self.sandbox = Sandbox(test_dir)
        self.machine: Any = None   # emulator.machine.Machine, imported when the VM starts
        self.session: Any = None   # the monitor session of the direct transport
        self.server: Any = None    # the QMPServer of the socket transport

    @staticmethod
    def preload() -> None:
        """Import the emulator once in a parent, so forked workers start warm (an import
        in a worker costs twice as much: it competes for the CPUs and copies the pages it
        touches)."""
        import emulator.block.graph
        import emulator.block.open
        import emulator.block.query
        import emulator.commands
        import emulator.img
        import emulator.machine
        import emulator.qemu_io
        import emulator.qmp.dispatch  # noqa: F401

    async def start(self, vm: VmConfig) -> None:
        import emulator.commands  # noqa: F401  (registers every command family)
        from emulator.machine import Machine
        from emulator.qmp.errors import QMPError

        machine = Machine(sandbox=self.sandbox)
        try:
            for drive in vm.drives:
                machine.block.add_drive(dict(drive))
            for blockdev in vm.blockdevs:
                machine.block.add_blockdev(dict(blockdev))
        except QMPError as exc:
            raise BackendError(f"emulator: cannot start the VM: {exc.desc}") from None
        self.machine = machine
        if self.transport == "direct":
            from emulator.qmp.protocol import QMPSession
            self.session = QMPSession(machine)
            self.session.negotiate([])
            # the engine only needs empty() and get(): an asyncio.Queue fed at emit time
            self.events = asyncio.Queue()
            machine.add_event_listener(self.events.put_nowait)
            self.running = True
            return
        from qemu.qmp import QMPClient

        from emulator.qmp.server import QMPServer
        self.server = QMPServer(machine)
        qmp = QMPClient(f"emulator-{self.test_dir.name}")
        await qmp.connect(self.server.socketpair())
        await self.connect(qmp)

    async def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        if self.transport == "socket":
            return await super().execute(name, arguments)
        from emulator.qmp.dispatch import dispatch
        if self.session is None or not self.running:
            raise BackendError("emulator: the VM is not running (shut down)")
        request = {"execute": name, **({"arguments": wire_copy(arguments)} if arguments else {})}
        reply = await dispatch(self.machine, request, allow_oob=False, negotiating=False,
                               session=self.session)
        if self.machine.shutdown_requested:
            self.running = False
        return reply if reply is not None else {"return": {}}

    async def shutdown(self) -> None:
        if self.transport == "socket":
            await super().shutdown()
            return
        if self.running:
            await self.execute("quit")
        self.running = False
        await self.wait_stopped()

    async def wait_stopped(self) -> None:
        """QEMU closes every block device when it quits (bdrv_close_all): so does this."""
        if self.machine is not None:
            self.machine.block.close_all()
            self.machine = None

    async def close(self) -> None:
        self.running = False
        if self.machine is not None and self.session is not None:
            self.machine.remove_event_listener(self.events.put_nowait)
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            self.qmp = None
        if self.server is not None:
            await self.server.close()
            self.server = None
        await self.wait_stopped()

    async def qemu_img(self, *argv: str) -> ToolResult:
        from emulator import img
        out, err = io.StringIO(), io.StringIO()
        status = img.main(list(argv), sandbox=self.sandbox, stdout=out, stderr=err)
        return ToolResult(status, out.getvalue() + err.getvalue(), ("qemu-img", *argv))

    async def qemu_io(self, fmt: str, path: str, *commands: str) -> ToolResult:
        from emulator import qemu_io
        status, output = qemu_io.offline(self.sandbox, path, fmt, commands)
        argv = ("qemu-io", "-f", fmt, *(a for c in commands for a in ("-c", shlex.quote(c))))
        return ToolResult(status, output, (*argv, path))
