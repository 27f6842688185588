"""The backup job (block/backup.c, QEMU 7.2) and its creation (backup_job_create).

Creation inserts a copy-before-write filter above the source (named by filter-node-name or
automatically), then creates the job on that filter; the job owns no data path of its own:
block-copy does the copying, the filter protects not-yet-copied data from guest writes.
With a sync bitmap the bitmap gets a successor first (recording writes made during the job);
at the end the bitmap mode decides between abdicate and reclaim (backup_cleanup_sync_bitmap).
"""

from __future__ import annotations

import errno
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from emulator.block import perm as P
from emulator.block.dirty_bitmap import BDRV_BITMAP_DEFAULT, BdrvDirtyBitmap
from emulator.block.drivers.copy_before_write import CopyBeforeWriteNode, cbw_append, cbw_drop
from emulator.block.errors import GenericError
from emulator.block.node import BlockDriverState
from emulator.jobs.block_copy import (
    BlockCopyCallState,
    BlockCopyState,
    supports_compressed_writes,
)
from emulator.jobs.blockjob import BlockJob, device_name
from emulator.jobs.job import Co, JobTxn

if TYPE_CHECKING:
    from emulator.jobs.manager import JobManager

INT_MAX = 2**31 - 1


@dataclass
class BackupPerf:
    """BackupPerf (x-perf), with do_backup_common's defaults."""

    use_copy_range: bool = False
    max_workers: int = 64
    max_chunk: int = 0


class BackupJob(BlockJob):
    """struct BackupBlockJob."""

    job_type = "backup"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cbw: CopyBeforeWriteNode | None = None
        self.source_bs: BlockDriverState | None = None
        self.target_bs: BlockDriverState | None = None
        self.sync_bitmap: BdrvDirtyBitmap | None = None
        self.sync_mode = "full"
        self.bitmap_mode = "on-success"
        self.on_source_error = "report"
        self.on_target_error = "report"
        self.len = 0
        self.cluster_size = 0
        self.perf = BackupPerf()
        self.bcs: BlockCopyState | None = None
        self.bg_call: BlockCopyCallState | None = None

    # -- the run ----------------------------------------------------------------------------
    def _init_bcs_bitmap(self) -> None:
        """backup_init_bcs_bitmap: what is to be copied, and the first progress total."""
        assert self.bcs is not None
        bm = self.bcs.copy_bitmap
        if self.sync_mode == "bitmap":
            assert self.sync_bitmap is not None
            bm.clear()
            bm.merge_internal(self.sync_bitmap)
        elif self.sync_mode == "top":
            self.bcs.skip_unallocated = True
        self.progress.set_remaining(bm.count())

    def run(self) -> Co:
        """backup_run."""
        assert self.bcs is not None
        self.bcs.waits_matter = lambda: not self._io_started
        self._init_bcs_bitmap()
        if self.sync_mode == "top":
            offset = 0
            while offset < self.len:
                if self.is_cancelled():
                    return -errno.ECANCELED
                yield from self.wait_for_io()
                yield from self.pause_point()
                if self.is_cancelled():
                    return -errno.ECANCELED
                try:
                    _, count = self.bcs.reset_unallocated(offset)
                except OSError as e:
                    return -(e.errno or errno.EIO)
                offset += max(count, self.bcs.cluster_size)
            self.bcs.skip_unallocated = False
        if self.sync_mode == "none":
            # copy-before-write does the work; wait until cancelled
            while not self.is_cancelled():
                yield from self.job_yield()
            return 0
        return (yield from self._backup_loop())

    def _sleep(self, ns: int) -> Co:
        """The rate-limit delay of block-copy, as a job sleep (pausable, kickable)."""
        yield from self.sleep_ns(ns)
        return 0

    def _before_task(self) -> Co:
        """Between block-copy tasks: the wait of the task before, then a pause point."""
        yield from self.wait_for_io()
        yield from self.pause_point()
        return 0

    def _backup_loop(self) -> Co:
        """backup_loop: block-copy the whole disk; on failure act on the error policy."""
        assert self.bcs is not None
        ret = 0
        while True:
            cs = self._new_call()
            yield from self.bcs.run_call(cs, self._sleep, self.is_cancelled,
                                         self._before_task)
            yield from self.wait_for_io()
            if self.is_cancelled() or cs.succeeded():
                ret = 0
                break
            if cs.cancelled:
                continue
            ret = cs.ret
            is_read = cs.error_is_read
            policy = self.on_source_error if is_read else self.on_target_error
            action = self.error_action(policy, is_read, -ret)
            if action == "report":
                break
            if action == "stop":
                yield from self.pause_point()
                if self.is_cancelled():
                    yield from self._last_call()
                    ret = 0
                    break
            else:
                yield from self.io_yield()
        self.bg_call = None
        return ret

    def _new_call(self) -> BlockCopyCallState:
        """block_copy_async over the whole disk (job->bg_bcs_call)."""
        self.bg_call = BlockCopyCallState(
            0, -(-self.len // self.cluster_size) * self.cluster_size,
            max_workers=self.perf.max_workers, max_chunk=self.perf.max_chunk)
        return self.bg_call

    def _last_call(self) -> Co:
        """Cancelled while stopped on an error: backup_loop starts its next block-copy call
        before it looks at the job again, so the tasks that call starts before it first
        waits run to the end: one per dirty chunk, up to max-workers, and the one that then
        waits for a free worker (it starts when one is free); then it is cancelled."""
        assert self.bcs is not None
        cs = self._new_call()
        started = 0

        def count_task() -> Generator[None, None, None]:
            nonlocal started
            started += 1
            yield from ()

        yield from self.bcs.dirty_clusters(cs, self._sleep,
                                           lambda: started > cs.max_workers + 1, count_task)
        return 0

    # -- driver hooks -------------------------------------------------------------------
    def _cleanup_sync_bitmap(self, ret: int) -> None:
        """backup_cleanup_sync_bitmap."""
        assert self.sync_bitmap is not None and self.bcs is not None
        sync = (ret == 0 or self.bitmap_mode == "always") and self.bitmap_mode != "never"
        bm = self.sync_bitmap.abdicate() if sync else self.sync_bitmap.reclaim()
        if ret < 0 and self.bitmap_mode == "always":
            bm.merge_internal(self.bcs.copy_bitmap)

    def commit(self) -> None:
        if self.sync_bitmap is not None:
            self._cleanup_sync_bitmap(0)

    def abort(self) -> None:
        if self.sync_bitmap is not None:
            self._cleanup_sync_bitmap(-1)

    def clean(self) -> None:
        """backup_clean: the job lets go of its nodes, the filter leaves the graph."""
        self.remove_all_bdrv()
        if self.cbw is not None:
            cbw, self.cbw = self.cbw, None
            cbw_drop(self.layer, cbw)

    def driver_cancel(self, force: bool) -> bool:
        """backup_cancel: in-flight requests on the target are cancelled; always forced."""
        return True

    def driver_set_speed(self, speed: int) -> None:
        """backup_set_speed: block-copy's limit; a sleeping copy is kicked."""
        if self.bcs is not None:
            self.bcs.set_speed(speed)
            if self.bg_call is not None:
                self.enter_cond(self.timer_pending)


def backup_job_create(manager: JobManager, layer: Any, job_id: str | None,
                      bs: BlockDriverState, target: BlockDriverState, *, speed: int = 0,
                      sync_mode: str = "full", sync_bitmap: BdrvDirtyBitmap | None = None,
                      bitmap_mode: str = "on-success", compress: bool = False,
                      filter_node_name: str | None = None, perf: BackupPerf | None = None,
                      on_source_error: str = "report", on_target_error: str = "report",
                      manual_finalize: bool = False, manual_dismiss: bool = False,
                      txn: JobTxn | None = None) -> BackupJob:
    """backup_job_create: QEMU's checks in QEMU's order; undone completely on failure."""
    perf = perf or BackupPerf()
    graph = layer.graph
    assert sync_mode != "incremental"
    if bs is target:
        raise GenericError("Source and target cannot be the same")
    if bs.closed:
        raise GenericError(f"Device is not inserted: {device_name(bs)}")
    if target.closed:
        raise GenericError(f"Device is not inserted: {device_name(target)}")
    if compress and not supports_compressed_writes(target):
        raise GenericError(f"Compression is not supported for this drive "
                           f"{device_name(target)}")
    graph.op_check_blocked(bs, "backup-source")
    graph.op_check_blocked(target, "backup-target")
    if perf.max_workers < 1 or perf.max_workers > INT_MAX:
        raise GenericError(f"max-workers must be between 1 and {INT_MAX}")
    if perf.max_chunk < 0:
        raise GenericError("max-chunk must be zero (which means no limit) or positive")
    if sync_bitmap is not None:
        if bitmap_mode != "never":
            sync_bitmap.check(BDRV_BITMAP_DEFAULT)
        sync_bitmap.create_successor()
    cbw: CopyBeforeWriteNode | None = None
    try:
        length = bs.getlength()
        if target.getlength() != length:
            raise GenericError("Source and target image have different sizes")
        cbw = cbw_append(layer, bs, target, filter_node_name)
        bcs = cbw.bcs
        assert bcs is not None
        cluster_size = bcs.cluster_size
        if perf.max_chunk and perf.max_chunk < cluster_size:
            raise GenericError(f"Required max-chunk ({perf.max_chunk}) is less than backup "
                               f"cluster size ({cluster_size})")
        job = BackupJob.create(manager, job_id, txn, cbw, 0, P.ALL, speed,
                               manual_finalize=manual_finalize,
                               manual_dismiss=manual_dismiss, layer=layer)
    except GenericError:
        if sync_bitmap is not None:
            sync_bitmap.reclaim()
        if cbw is not None:
            cbw_drop(layer, cbw)
        raise
    assert isinstance(job, BackupJob)
    job.cbw = cbw
    job.source_bs = bs
    job.target_bs = target
    job.on_source_error = on_source_error
    job.on_target_error = on_target_error
    job.sync_mode = sync_mode
    job.sync_bitmap = sync_bitmap
    job.bitmap_mode = bitmap_mode
    job.bcs = bcs
    job.cluster_size = cluster_size
    job.len = length
    job.perf = perf
    bcs.set_copy_opts(perf.use_copy_range, compress)
    bcs.progress = job.progress
    bcs.set_speed(speed)
    job.add_bdrv("target", target, 0, P.ALL)
    return job
