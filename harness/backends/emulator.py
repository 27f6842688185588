"""The emulator backend: the built-in QMP server, in this process, over a socket pair.

The replayer talks to it through qemu.qmp exactly as to QEMU — same framing, same server code
path as ``qmpreplay serve`` — but no process starts and no socket file exists. Offline image
work goes to :mod:`emulator.img` and :mod:`emulator.qemu_io` (no QEMU needed at all).
"""

from __future__ import annotations

import contextlib
import io
import shlex
from pathlib import Path

from qemu.qmp import QMPClient

from harness.backends.base import Backend, ToolResult, VmConfig
from harness.errors import BackendError


class EmulatorBackend(Backend):
    name = "emulator"

    def __init__(self, test_dir: Path) -> None:
        super().__init__(test_dir)
        from emulator.sandbox import Sandbox
        self.sandbox = Sandbox(test_dir)
        self.machine: object | None = None
        self.server: object | None = None

    async def start(self, vm: VmConfig) -> None:
        import emulator.commands  # noqa: F401  (registers every command family)
        from emulator.machine import Machine
        from emulator.qmp.errors import QMPError
        from emulator.qmp.server import QMPServer

        machine = Machine(sandbox=self.sandbox)
        try:
            for drive in vm.drives:
                machine.block.add_drive(dict(drive))
            for blockdev in vm.blockdevs:
                machine.block.add_blockdev(dict(blockdev))
        except QMPError as exc:
            raise BackendError(f"emulator: cannot start the VM: {exc.desc}") from None
        self.machine = machine
        self.server = QMPServer(machine)
        qmp = QMPClient(f"emulator-{self.test_dir.name}")
        await qmp.connect(self.server.socketpair())
        await self.connect(qmp)

    async def wait_stopped(self) -> None:
        """QEMU closes every block device when it quits (bdrv_close_all): so does this."""
        if self.machine is not None:
            self.machine.block.close_all()  # type: ignore[attr-defined]
            self.machine = None

    async def close(self) -> None:
        self.running = False
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            self.qmp = None
        if self.server is not None:
            await self.server.close()  # type: ignore[attr-defined]
            self.server = None
        await self.wait_stopped()

    async def qemu_img(self, *argv: str) -> ToolResult:
        from emulator import img
        out, err = io.StringIO(), io.StringIO()
        status = img.main(list(argv), sandbox=self.sandbox, stdout=out, stderr=err)
        return ToolResult(status, out.getvalue() + err.getvalue(), ("qemu-img", *argv))

    async def qemu_io(self, fmt: str, path: str, *commands: str) -> ToolResult:
        from emulator import img, qemu_io
        output = []
        try:
            with img.opened(self.sandbox, path, fmt, writable=True) as image:
                for command in commands:
                    output.append(qemu_io.run(image, command))
        except img.ImgError as exc:
            return ToolResult(1, f"qemu-io: {exc}", ("qemu-io", "-f", fmt, path))
        argv = ("qemu-io", "-f", fmt, *(a for c in commands for a in ("-c", shlex.quote(c))))
        return ToolResult(0, "".join(output), (*argv, path))
