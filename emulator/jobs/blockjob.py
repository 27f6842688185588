"""Block jobs (blockjob.c): nodes held by a job, speed, error actions, BLOCK_JOB_* events.

A block job is a parent in the node graph ("backup job 'j'" in permission errors): it holds
its nodes through root edges (block_job_add_bdrv) and blocks every operation on them with
"block device is in use by block job: <type>". Its finalize notifiers become the
BLOCK_JOB_COMPLETED / _CANCELLED / _PENDING / _READY events, with the progress meter as
``offset`` / ``len``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from emulator.block.node import BdrvChild, BlockDriverState, OpBlocker
from emulator.jobs.job import Job, JobTxn, strerror
from emulator.jobs.ratelimit import RateLimit
from emulator.qmp.errors import GenericError

if TYPE_CHECKING:
    from emulator.block.graph import BlockGraph
    from emulator.jobs.manager import JobManager

BLOCK_JOB_SLICE_TIME = 100_000_000  # ns


def device_name(bs: BlockDriverState) -> str:
    """bdrv_get_device_name: the name of a BlockBackend above the node, else ""."""
    for c in bs.parents:
        if getattr(c.parent, "is_block_backend", False) and getattr(c.parent, "name", None):
            return str(getattr(c.parent, "name", ""))
    return ""


class BlockJob(Job):
    """struct BlockJob."""

    stay_at_node = True   # child_job.stay_at_node: bdrv_replace_node leaves job edges

    def __init__(self, manager: JobManager, job_id: str | None, graph: BlockGraph, *,
                 manual_finalize: bool = False, manual_dismiss: bool = False,
                 layer: Any = None) -> None:
        super().__init__(manager, job_id, manual_finalize=manual_finalize,
                         manual_dismiss=manual_dismiss)
        self.graph = graph
        self.layer = layer                   # the BlockLayer (graph changes at the end)
        self.nodes: list[BdrvChild] = []     # newest first (g_slist_prepend)
        self.speed = 0
        self.limit = RateLimit()
        self.iostatus = "ok"
        self.blocker = OpBlocker(f"block device is in use by block job: {self.job_type}")

    def parent_desc(self) -> str:
        """child_job_get_parent_desc."""
        return f"{self.job_type} job '{self.id}'"

    # -- creation (block_job_create) -------------------------------------------------------
    @classmethod
    def create(cls, manager: JobManager, job_id: str | None, txn: JobTxn | None,
               bs: BlockDriverState, perm: int, shared: int, speed: int, *,
               manual_finalize: bool = False, manual_dismiss: bool = False,
               **kwargs: Any) -> BlockJob:
        """block_job_create: job_create, then the "main node" edge, then the speed."""
        if job_id is None:
            job_id = device_name(bs)
        manager.check_new_id(job_id)
        job = cls(manager, job_id, bs.graph, manual_finalize=manual_finalize,
                  manual_dismiss=manual_dismiss, **kwargs)
        manager.register(job, txn)
        try:
            job.add_bdrv("main node", bs, perm, shared)
            job.graph.op_unblock(bs, "dataplane", job.blocker)
            job.set_speed(speed)
        except GenericError:
            job.early_fail()
            raise
        return job

    def add_bdrv(self, name: str, bs: BlockDriverState, perm: int, shared: int) -> None:
        """block_job_add_bdrv: a root edge from the job; all operations on bs blocked."""
        c = self.graph.root_attach_child(self, bs, name, 0, perm, shared)
        self.nodes.insert(0, c)
        self.graph.op_block_all(bs, self.blocker)

    def child_cb_drained_begin(self, c: BdrvChild) -> None:
        """child_job_drained_begin: a drained section reaching one of the job's nodes
        pauses it (once per edge; an edge to an already drained node pauses it on attach),
        and bdrv_drained_begin polls until the job has stopped: a job busy with I/O goes
        on to its pause point now, not after the section has ended."""
        self.pause()
        self.wait_while(self.drained_poll)

    def drained_poll(self) -> bool:
        """child_job_drained_poll: an idle or completed job has nothing in flight; a busy
        one may still issue requests unless its driver knows better."""
        if not self.busy or self.is_completed():
            return False
        return self.driver_drained_poll()

    def driver_drained_poll(self) -> bool:
        """BlockJobDriver.drained_poll (none: assume requests may still come)."""
        return True

    def child_cb_drained_end(self, c: BdrvChild) -> None:
        """child_job_drained_end."""
        self.resume()

    def remove_all_bdrv(self) -> None:
        """block_job_remove_all_bdrv."""
        while self.nodes:
            c = self.nodes.pop(0)
            if c.bs is not None:
                self.graph.op_unblock_all(c.bs, self.blocker)
            self.graph.detach_child(c)

    def free(self) -> None:
        """block_job_free."""
        self.remove_all_bdrv()

    # -- speed ------------------------------------------------------------------------------
    def set_speed(self, speed: int) -> None:
        """block_job_set_speed_locked."""
        self.apply_verb("set-speed")
        if speed < 0:
            raise GenericError("Parameter 'speed' expects a non-negative value")
        old = self.speed
        self.limit.set_speed(speed, BLOCK_JOB_SLICE_TIME)
        self.speed = speed
        self.driver_set_speed(speed)
        if speed and speed <= old:
            return
        self.enter_cond(self.timer_pending)

    def driver_set_speed(self, speed: int) -> None:
        """BlockJobDriver.set_speed."""

    # -- errors -----------------------------------------------------------------------------
    def error_action(self, on_err: str, is_read: bool, error: int) -> str:
        """block_job_error_action: BLOCK_JOB_ERROR, and for "stop" a user-visible pause."""
        if on_err in ("enospc", "auto"):
            action = "stop" if error == errno.ENOSPC else "report"
        elif on_err == "stop":
            action = "stop"
        elif on_err == "ignore":
            action = "ignore"
        else:
            action = "report"
        if not self.is_internal:
            self.manager.emit("BLOCK_JOB_ERROR", {
                "device": self.id, "operation": "read" if is_read else "write",
                "action": action})
        if action == "stop":
            if not self.user_paused:
                self.pause()
                self.user_paused = True
            if self.iostatus == "ok":
                self.iostatus = "nospace" if error == errno.ENOSPC else "failed"
        return action

    def driver_user_resume(self) -> None:
        """block_job_user_resume: the I/O status goes back to ok."""
        if self.iostatus == "ok":
            return
        assert self.user_paused and self.pause_count > 0
        self.iostatus = "ok"

    # -- events -----------------------------------------------------------------------------
    def _progress(self) -> tuple[int, int]:
        return self.progress.total, self.progress.current

    def event_cancelled(self) -> None:
        if self.is_internal:
            return
        total, current = self._progress()
        self.manager.emit("BLOCK_JOB_CANCELLED", {
            "type": self.job_type, "device": self.id, "len": total, "offset": current,
            "speed": self.speed})

    def event_completed(self) -> None:
        if self.is_internal:
            return
        total, current = self._progress()
        data: dict[str, Any] = {"type": self.job_type, "device": self.id, "len": total,
                                "offset": current, "speed": self.speed}
        if self.ret < 0:
            data["error"] = self.err
        self.manager.emit("BLOCK_JOB_COMPLETED", data)

    def event_pending(self) -> None:
        if not self.is_internal:
            self.manager.emit("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})

    def event_ready(self) -> None:
        if self.is_internal:
            return
        total, current = self._progress()
        self.manager.emit("BLOCK_JOB_READY", {
            "type": self.job_type, "device": self.id, "len": total, "offset": current,
            "speed": self.speed})

    # -- queries ----------------------------------------------------------------------------
    def block_info(self) -> dict[str, Any]:
        """BlockJobInfo (block_job_query_locked), members in QAPI order."""
        if self.is_internal:
            raise GenericError("Cannot query QEMU internal jobs")
        out: dict[str, Any] = {
            "type": self.job_type, "device": self.id, "len": self.progress.total,
            "offset": self.progress.current, "busy": self.busy,
            "paused": self.pause_count > 0, "speed": self.speed, "io-status": self.iostatus,
            "ready": self.is_ready(), "status": self.status,
            "auto-finalize": self.auto_finalize, "auto-dismiss": self.auto_dismiss}
        if self.ret:
            out["error"] = self.err if self.err is not None else strerror(self.ret)
        return out

