"""Machine: the emulated VM behind one QMP server.

It holds what outlives a QMP connection: the sandbox (the only files the emulator may touch),
the run state of a VM started with ``-S``, the event bus that every negotiated QMP session
listens to, and — attached below — the block layer (``self.block``) and the job manager
(``self.jobs``), which the block and jobs parts of the emulator provide.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from emulator.sandbox import Sandbox

log = logging.getLogger("emulator.machine")

EventListener = Callable[[dict[str, Any]], None]


def event_message(event: str, data: dict[str, Any] | None = None,
                  now_us: int | None = None) -> dict[str, Any]:
    """A QMP event as QEMU builds it (qmp_event_build_dict): real-time timestamp; "data" only
    for events that have data."""
    if now_us is None:
        now_us = time.time_ns() // 1000
    msg: dict[str, Any] = {
        "event": event,
        "timestamp": {"seconds": now_us // 1_000_000, "microseconds": now_us % 1_000_000},
    }
    if data is not None:
        msg["data"] = data
    return msg


def _attach(module: str, cls: str, *args: Any, **kwargs: Any) -> Any:
    """Construct ``module.cls(*args, **kwargs)`` if that part of the emulator is present."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            return None
        raise
    return getattr(mod, cls)(*args, **kwargs)


class Machine:
    """The emulated VM: ``qemu-system-x86_64 -machine none -nodefaults -S`` plus -blockdev."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *,
                 sandbox: Sandbox | None = None) -> None:
        if sandbox is None:
            if root is None:
                raise ValueError("a Machine needs a test directory (root) or a Sandbox")
            sandbox = Sandbox(root)
        self.sandbox = sandbox
        self.runstate = "prelaunch"
        self._listeners: list[EventListener] = []
        self.shutdown_reason: str | None = None
        self._shutdown: asyncio.Event | None = None

        # --- attached parts: the block layer (emulator/block) and jobs (emulator/jobs) ------
        self.block: Any = _attach("emulator.block.layer", "BlockLayer",
                                  sandbox=self.sandbox, emit=self.emit)
        self.jobs: Any = _attach("emulator.jobs.manager", "JobManager", self)
        # --- end of attached parts ---------------------------------------------------------

    # -- events ----------------------------------------------------------------------------
    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Send a timestamped QMP event to every listener (each negotiated session), now,
        so that events raised while a command runs precede its reply, as in QEMU."""
        msg = event_message(event, data)
        for listener in list(self._listeners):
            try:
                listener(msg)
            except Exception:  # a broken connection must not break the emitter
                log.exception("event listener failed for %s", event)

    def add_event_listener(self, fn: EventListener) -> None:
        self._listeners.append(fn)

    def remove_event_listener(self, fn: EventListener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    # -- run state ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.runstate == "running"

    def stop(self) -> None:
        """vm_stop(RUN_STATE_PAUSED): only a running VM stops (and says STOP)."""
        if self.running:
            self.runstate = "paused"
            self.emit("STOP")

    def cont(self) -> None:
        """vm_start(): a stopped VM resumes (and says RESUME)."""
        if not self.running:
            self.runstate = "running"
            self.emit("RESUME")

    # -- shutdown ---------------------------------------------------------------------------
    def request_shutdown(self, reason: str = "host-qmp-quit", guest: bool = False) -> None:
        """qemu_system_shutdown_request(), and the main loop's exit at once: SHUTDOWN, then
        qemu_cleanup's block-layer part — bdrv_drain_all_begin (jobs pause),
        job_cancel_sync_all, bdrv_close_all — whose events, as in QEMU, all go out before
        quit's reply; servers close once the reply is out."""
        if self.shutdown_reason is None:
            self.shutdown_reason = reason
            self.emit("SHUTDOWN", {"guest": guest, "reason": reason})
            if self.jobs is not None:
                self.jobs.drain_all_begin()
            if self.block is not None:
                self.block.close_all()      # job_cancel_sync_all first (JobManager's hook)
            if self._shutdown is not None:
                self._shutdown.set()

    @property
    def shutdown_requested(self) -> bool:
        return self.shutdown_reason is not None

    async def wait_shutdown(self) -> str:
        """Wait until a shutdown was requested; returns its reason."""
        if self._shutdown is None:
            self._shutdown = asyncio.Event()
            if self.shutdown_reason is not None:
                self._shutdown.set()
        await self._shutdown.wait()
        assert self.shutdown_reason is not None
        return self.shutdown_reason
