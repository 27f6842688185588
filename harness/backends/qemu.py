"""The real-QEMU backend: Debian's ``qemu-system-x86_64`` driven with qemu.qmp.

One process per section, started with no guest at all. Debian builds QEMU without the qtest
accelerator that QEMU's own iotests runner uses, and a plain ``-accel tcg`` VM is not
deterministic: SeaBIOS runs, finds no disk behind the virtio-scsi controller and resets it;
the reset drains every block device, which pauses a running backup job, and a paused job
retries the copy whose one-shot injected error was already spent — 257 then lost its
BLOCK_JOB_ERROR in 4 of 20 runs. ``-machine none`` has no firmware and no devices and ``-S``
keeps any vCPU from starting, so, as with qtest, no guest code ever runs (measured with QEMU's
runner: 20/20 and 40/40 identical runs; see tests/harness/test_qemu_backend.py for ours).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from harness.backends.base import Backend, ToolResult, VmConfig, wait_process
from harness.errors import BackendError
from harness.orphans import die_with_parent

Json = Any

LAUNCH = ("-machine", "none", "-accel", "tcg", "-S", "-nodefaults", "-display", "none",
          "-no-user-config")
START_TIMEOUT = 15.0
QUIT_TIMEOUT = 10.0
LOG_NAME = "qemu.log"   # QEMU's output, kept in the test directory
DEBIAN_HINT = "install Debian's packages: apt-get install -y qemu-system-x86 qemu-utils"


def find_tool(explicit: str | None, name: str, package: str) -> str:
    """The tool to run: an explicit path that must exist, or ``name`` from PATH."""
    if explicit:
        path = shutil.which(explicit) or (explicit if os.access(explicit, os.X_OK) else None)
        if not path:
            raise BackendError(f"{explicit}: not found or not executable; {DEBIAN_HINT}")
        return path
    found = shutil.which(name)
    if not found:
        raise BackendError(f"{name} not found in PATH ({package}); {DEBIAN_HINT}, "
                           f"or pass --{'qemu-binary' if 'system' in name else name} PATH")
    return found


def preflight(binary: str) -> None:
    """Fail early, in one line, if the binary cannot even print its version."""
    import subprocess
    try:
        proc = subprocess.run([binary, "--version"], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"{binary}: does not run ({exc}); {DEBIAN_HINT}") from None
    if proc.returncode != 0 or "QEMU" not in proc.stdout:
        first = (proc.stderr or proc.stdout).strip().splitlines()
        raise BackendError(f"{binary}: does not run as QEMU (--version exited "
                           f"{proc.returncode}{': ' + first[0] if first else ''}); {DEBIAN_HINT}")


def option_string(options: dict[str, Json]) -> str:
    """``key=value,…`` for -drive, with QEMU's comma escaping."""
    def text(v: Json) -> str:
        return ("on" if v else "off") if isinstance(v, bool) else str(v).replace(",", ",,")
    return ",".join(f"{k}={text(v)}" for k, v in options.items())


class QemuBackend(Backend):
    name = "qemu"

    def __init__(self, test_dir: Path, qemu_binary: str | None = None,
                 qemu_img: str | None = None) -> None:
        super().__init__(test_dir)
        self.binary = find_tool(qemu_binary, "qemu-system-x86_64", "qemu-system-x86")
        self.img_tool = find_tool(qemu_img, "qemu-img", "qemu-utils")
        self.proc: asyncio.subprocess.Process | None = None
        self.sock_dir: str | None = None
        self.log_path = test_dir / LOG_NAME

    def command_line(self, vm: VmConfig, sock: str) -> list[str]:
        argv = [self.binary, *LAUNCH, "-chardev", f"socket,id=mon,path={sock}",
                "-mon", "chardev=mon,mode=control"]
        for drive in vm.drives:
            argv += ["-drive", option_string({"if": "none", **drive})]
        for blockdev in vm.blockdevs:
            argv += ["-blockdev", json.dumps(blockdev)]
        return argv

    async def start(self, vm: VmConfig) -> None:
        # A short private directory: UNIX socket paths are limited to 108 bytes.
        self.sock_dir = tempfile.mkdtemp(prefix="qmpreplay-")
        sock = os.path.join(self.sock_dir, "qmp.sock")
        qmp = QMPClient(f"qemu-{self.test_dir.name}")
        await qmp.start_server(sock)
        with open(self.log_path, "wb") as log:
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.command_line(vm, sock), stdin=asyncio.subprocess.DEVNULL,
                    stdout=log, stderr=asyncio.subprocess.STDOUT,
                    preexec_fn=die_with_parent())
            except OSError as exc:
                raise BackendError(f"{self.binary}: cannot start: {exc.strerror}; "
                                   f"{DEBIAN_HINT}") from None
        accept = asyncio.ensure_future(qmp.accept())
        exited = asyncio.ensure_future(self.proc.wait())
        done, _ = await asyncio.wait({accept, exited}, timeout=START_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        if accept not in done:
            accept.cancel()
            with contextlib.suppress(BaseException):
                await accept
            reason = (f"exited with status {self.proc.returncode}" if exited in done
                      else f"did not connect within {START_TIMEOUT:.0f} s")
            exited.cancel()
            raise BackendError(f"{self.binary} {reason}{self.last_output()}")
        exited.cancel()
        accept.result()
        await self.connect(qmp)

    def last_output(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return f": {lines[-1]}" if lines else ""

    async def crash_details(self) -> str:
        """The exit status and last words of a QEMU that went away (waiting briefly for
        the kernel to report its death: the socket closes a moment before)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 2.0)
        if self.proc is not None and self.proc.returncode is not None:
            return f" (QEMU exited with status {self.proc.returncode}{self.last_output()})"
        return ""

    async def wait_stopped(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await wait_process(self.proc, QUIT_TIMEOUT)

    async def close(self) -> None:
        self.running = False
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        if self.sock_dir:
            shutil.rmtree(self.sock_dir, ignore_errors=True)
            self.sock_dir = None

    async def run_tool(self, *argv: str) -> ToolResult:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, preexec_fn=die_with_parent())
        out, _ = await proc.communicate()
        return ToolResult(proc.returncode or 0, out.decode(errors="replace"), tuple(argv))

    async def qemu_img(self, *argv: str) -> ToolResult:
        return await self.run_tool(self.img_tool, *argv)

    async def qemu_io(self, fmt: str, path: str, *commands: str) -> ToolResult:
        qemu_io = shutil.which("qemu-io", path=str(Path(self.img_tool).parent)) or \
            find_tool(None, "qemu-io", "qemu-utils")
        argv = [qemu_io, "-f", fmt]
        for c in commands:
            argv += ["-c", c]
        return await self.run_tool(*argv, path)
