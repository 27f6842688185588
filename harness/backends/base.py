"""The Backend interface: one VM and its image tools, driven over QMP with qemu.qmp.

Both backends speak real QMP through :class:`qemu.qmp.QMPClient`; they differ only in what
answers (a ``qemu-system-x86_64`` process, or the emulator's server in this process) and in
which tool does offline image work (``qemu-img``/``qemu-io`` or :mod:`emulator.img`). The
replayer never needs to know which one it drives.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import BackendError

if TYPE_CHECKING:   # imported when a VM is connected: the direct emulator never needs it
    from qemu.qmp import QMPClient

Json = Any


@dataclass(frozen=True)
class VmConfig:
    """What the VM is started with, as QEMU option dictionaries (paths already real)."""

    drives: tuple[dict[str, Json], ...] = ()     # -drive if=none,id=…,file=…,format=…
    blockdevs: tuple[dict[str, Json], ...] = ()  # -blockdev {…}


@dataclass(frozen=True)
class ToolResult:
    """The outcome of an offline image tool run (qemu-img / qemu-io or the emulator's)."""

    status: int
    output: str
    argv: tuple[str, ...] = field(default=())


class Backend(abc.ABC):
    """One VM (a QMP peer) for one section, plus offline image tools.

    Lifecycle: ``await start(vm)``, any number of ``execute``/events, ``await shutdown()``
    (graceful: images flushed and closed, as iotests' ``vm.shutdown()``), ``await close()``
    (always; kills what is left). Image tools work any time on files in ``test_dir``.
    """

    name: str = "backend"

    def __init__(self, test_dir: Path) -> None:
        self.test_dir = test_dir
        self.qmp: QMPClient | None = None
        self.events: Any = asyncio.Queue()   # anything with empty() and async get()
        self.running = False

    # -- the VM ------------------------------------------------------------------------------
    @abc.abstractmethod
    async def start(self, vm: VmConfig) -> None:
        """Start the VM and connect ``self.qmp`` (capabilities negotiated)."""

    async def execute(self, name: str, arguments: dict[str, Json] | None = None) -> Json:
        """Send one command; return the whole reply (``{"return": …}`` or ``{"error": …}``)."""
        from qemu.qmp import ExecuteError, QMPError
        from qemu.qmp.message import Message
        if self.qmp is None or not self.running:
            raise BackendError(f"{self.name}: the VM is not running (shut down or crashed)")
        msg = Message({"execute": name, **({"arguments": arguments} if arguments else {})})
        try:
            value = await self.qmp.execute_msg(msg)
        except ExecuteError as exc:
            error: dict[str, Json] = exc.received["error"]  # type: ignore[assignment]
            return {"error": dict(error)}
        except (QMPError, EOFError, OSError) as exc:
            self.running = False
            raise BackendError(f"{self.name}: connection lost during {name!r}: "
                               f"{exc or type(exc).__name__}{await self.crash_details()}"
                               ) from None
        return {"return": value}

    async def shutdown(self) -> None:
        """Quit the VM gracefully, so its images are complete on disk."""
        if self.qmp is not None and self.running:
            self.running = False
            with contextlib.suppress(Exception):
                await self.qmp.execute("quit")
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
        await self.wait_stopped()

    @abc.abstractmethod
    async def wait_stopped(self) -> None:
        """Wait for the VM to be gone after ``quit`` (a process exits, a server closes)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release everything, whatever state the VM is in. Safe to call twice."""

    async def crash_details(self) -> str:
        """Extra words for an error message when the VM died (exit status, last output)."""
        return ""

    async def connect(self, qmp: QMPClient) -> None:
        from qemu.qmp import EventListener
        self.events = EventListener()
        qmp.register_listener(self.events)
        self.qmp = qmp
        self.running = True

    # -- offline image tools -----------------------------------------------------------------
    @abc.abstractmethod
    async def qemu_img(self, *argv: str) -> ToolResult:
        """Run ``qemu-img argv…`` (create, compare, rebase, check, info, map)."""

    @abc.abstractmethod
    async def qemu_io(self, fmt: str, path: str, *commands: str) -> ToolResult:
        """Run ``qemu-io -f fmt -c cmd … path`` on an image that no VM has open."""


async def wait_process(proc: asyncio.subprocess.Process, timeout: float) -> int | None:
    """Wait for a process to exit; kill it after ``timeout`` seconds. Returns its status."""
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        return await proc.wait()
