"""JobManager (``Machine.jobs``): the job list, lookups, scheduling on the event loop.

The list is newest first (job_create's QLIST_INSERT_HEAD), which is the order of query-jobs
and query-block-jobs. Bottom halves and timers go to the running asyncio loop; without one
(unit tests that drive the block layer directly) they queue until :meth:`run_pending`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from emulator.block import io as blockio
from emulator.block.node import BlockDriverState, node_name_is_valid
from emulator.jobs.job import Job, JobTxn
from emulator.qmp.errors import DeviceNotActive, GenericError

if TYPE_CHECKING:
    from emulator.machine import Machine

log = logging.getLogger("emulator.jobs")

BLOCK_JOB_TYPES = frozenset({"backup", "commit", "mirror", "stream"})


class Scheduled:
    """A bottom half or timer that can be cancelled or run at once (aio_poll)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.handle: asyncio.Handle | None = None
        self.done = False

    def cancel(self) -> None:
        self.done = True
        if self.handle is not None:
            self.handle.cancel()

    def run_now(self) -> None:
        self.cancel()
        self.fn()

    def fire(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            self.fn()
        except Exception:
            log.exception("job callback failed")


def flushing(fn: Callable[..., Any]) -> Callable[..., Any]:
    """For a command handler ``fn(vm, ...)``: run the job bottom halves it scheduled before
    its reply goes out, as QEMU's main loop does (see JobManager.bh)."""

    @functools.wraps(fn)
    def wrapper(vm: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(vm, *args, **kwargs)
        finally:
            vm.jobs.flush_bhs()

    return wrapper


class JobManager:
    def __init__(self, vm: Machine | None) -> None:
        self.vm = vm
        self.jobs: list[Job] = []
        self._queue: list[Scheduled] = []
        self._bhs: list[Scheduled] = []
        if vm is not None and getattr(vm, "block", None) is not None:
            vm.block.before_close_all = self.cancel_sync_all

    # -- events and scheduling -------------------------------------------------------------
    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        if self.vm is not None:
            self.vm.emit(event, data)

    @staticmethod
    def _loop() -> asyncio.AbstractEventLoop | None:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return None

    def call_soon(self, fn: Callable[[], None]) -> Scheduled:
        """aio_bh_schedule_oneshot on the main loop."""
        s = Scheduled(fn)
        loop = self._loop()
        if loop is None:
            self._queue.append(s)
        else:
            s.handle = loop.call_soon(s.fire)
        return s

    def bh(self, fn: Callable[[], None]) -> Scheduled:
        """aio_bh_schedule_oneshot(qemu_aio_context): in QEMU such a bottom half runs before
        the reply of the command that scheduled it (the monitor answers from the iohandler
        context, later in the same main-loop round); job commands call flush_bhs() before
        they return. Otherwise it runs from the event loop."""
        s = self.call_soon(fn)
        self._bhs.append(s)
        return s

    def flush_bhs(self) -> None:
        """Run the bottom halves scheduled so far: the main loop's next aio_bh_poll, which
        comes before the monitor's reply. Those they schedule go to the poll after it (after
        the reply): aio_bh_poll runs a slice of the list taken when it starts."""
        pending, self._bhs = self._bhs, []
        for s in pending:
            if not s.done:
                s.run_now()
        self._bhs.clear()

    def call_later(self, delay: float, fn: Callable[[], None]) -> Scheduled:
        """A QEMU_CLOCK_REALTIME timer."""
        s = Scheduled(fn)
        loop = self._loop()
        if loop is None:
            self._queue.append(s)
        else:
            s.handle = loop.call_later(max(delay, 0.0), s.fire)
        return s

    # -- drained sections ------------------------------------------------------------------
    # bdrv_drained_begin/end live in the block layer (emulator.block.io): nodes count their
    # drained sections and pass them on to their parents; a job is a parent that pauses
    # (BlockJob.child_cb_drained_begin). These are the entry points the jobs code uses.
    @staticmethod
    def drained_begin(bs: BlockDriverState) -> None:
        """bdrv_drained_begin(bs): every job above bs pauses (once per edge), and so does
        a job that attaches above bs before drained_end."""
        blockio.drained_begin(bs)

    @staticmethod
    def drained_end(bs: BlockDriverState) -> None:
        """bdrv_drained_end(bs): the jobs above bs now resume, in the order the graph
        reaches them (newest parent first, depth first)."""
        blockio.drained_end(bs)

    def _all_nodes(self) -> list[BlockDriverState]:
        block = getattr(self.vm, "block", None)
        return list(block.graph.all_nodes) if block is not None else []

    def drain_all_begin(self) -> None:
        """bdrv_drain_all_begin: each job's edge to a node pauses the job (job_pause per
        edge). At quit, QEMU 7.2 never ends this section: job_cancel_sync_all re-enters
        the paused jobs to cancel them."""
        blockio.drain_all_begin(self._all_nodes())

    def drain_all(self) -> None:
        """bdrv_drain_all (begin, then end): every job with a node pauses and resumes; a
        job that is not at rest says so with a paused and a running JOB_STATUS_CHANGE."""
        nodes = self._all_nodes()
        blockio.drain_all_begin(nodes)
        blockio.drain_all_end(nodes)

    def run_pending(self) -> None:
        """Run queued callbacks (only used without a running loop)."""
        while self._queue:
            self._queue.pop(0).fire()

    # -- the job list ---------------------------------------------------------------------
    def check_new_id(self, job_id: str | None, *, internal: bool = False) -> None:
        """job_create's checks, in QEMU's order."""
        if job_id is not None:
            if internal:
                raise GenericError("Cannot specify job ID for internal job")
            if not node_name_is_valid(job_id):
                raise GenericError(f"Invalid job ID '{job_id}'")
            if self.get(job_id) is not None:
                raise GenericError(f"Job ID '{job_id}' already in use")
        elif not internal:
            raise GenericError("An explicit job ID is required")

    def register(self, job: Job, txn: JobTxn | None) -> None:
        """The rest of job_create: CREATED, head of the list, a transaction of its own."""
        job.transition("created")
        self.jobs.insert(0, job)
        (txn or JobTxn()).add(job)

    def forget(self, job: Job) -> None:
        if job in self.jobs:
            self.jobs.remove(job)

    def get(self, job_id: str) -> Job | None:
        """job_get_locked."""
        for job in self.jobs:
            if job.id is not None and job.id == job_id:
                return job
        return None

    def find(self, job_id: str) -> Job:
        """find_job_locked (job-* commands)."""
        job = self.get(job_id)
        if job is None:
            raise GenericError("Job not found")
        return job

    def find_block_job(self, job_id: str) -> Job:
        """find_block_job_locked (block-job-* commands)."""
        job = self.get(job_id)
        if job is None or job.job_type not in BLOCK_JOB_TYPES:
            raise DeviceNotActive(f"Block job '{job_id}' not found")
        return job

    def block_jobs(self) -> list[Job]:
        return [j for j in self.jobs if j.job_type in BLOCK_JOB_TYPES]

    def query_jobs(self) -> list[dict[str, Any]]:
        return [j.info() for j in self.jobs if not j.is_internal]

    def cancel_sync_all(self) -> None:
        """job_cancel_sync_all (at quit): force-cancel every job until none is left (a
        concluded job with manual dismiss goes on the second round)."""
        for _ in range(4 * len(self.jobs) + 4):
            if not self.jobs:
                return
            job = self.jobs[0]
            job.ref()
            try:
                job.cancel_sync(True)
            finally:
                job.unref()
        for job in list(self.jobs):   # defensive: nothing may outlive the VM
            log.warning("job %s did not go away at quit", job.id)
            self.jobs.remove(job)
