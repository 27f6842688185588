"""block-copy (block/block-copy.c, QEMU 7.2): copy the dirty clusters of a source to a target.

The copy bitmap (anonymous, disabled, cluster granularity) lives on the *source* node, as in
7.2. A call walks the bitmap in ascending order: each BlockCopyTask takes the next dirty run
(capped at the chunk size), asks the source's block status and shrinks to that extent (clipped
clusters are re-dirtied), skips unallocated extents in sync=top's first phase, writes zero
extents as zeroes without reading, and otherwise reads and writes. Progress follows QEMU:
``current`` grows by each successful task, and at every task end ``total`` is current + dirty
+ in-flight bytes. A failed task re-dirties its range and the call's first error is kept.

Tasks run one after another (the I/O of the emulator is synchronous). QEMU's task pool keeps
up to max-workers tasks in flight: when one fails, the tasks started before its failure is
known still complete, so after a failure up to max-workers - 1 more tasks run. With one
worker (257) this gives QEMU's requests, events and numbers exactly. A call is a generator so that
rate-limit delays can sleep in the job coroutine.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from emulator.block import io as blockio
from emulator.block.dirty_bitmap import BdrvDirtyBitmap
from emulator.block.errors import GenericError
from emulator.block.node import (
    BDRV_BLOCK_ALLOCATED,
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_ZERO,
    BdrvChild,
    BlockDriverState,
)
from emulator.block.subtree import subtree
from emulator.jobs.mirror_graph import (
    backing_chain_next,
    chain_contains,
    leaf,
    skip_filters,
)
from emulator.jobs.progress import ProgressMeter
from emulator.jobs.ratelimit import RateLimit
from emulator.jobs.zero_run import ZeroRun

if TYPE_CHECKING:
    pass

log = logging.getLogger("emulator.block_copy")

BLOCK_COPY_MAX_COPY_RANGE = 16 << 20
BLOCK_COPY_MAX_BUFFER = 1 << 20
BLOCK_COPY_MAX_WORKERS = 64
BLOCK_COPY_SLICE_TIME = 100_000_000  # ns
BLOCK_COPY_CLUSTER_SIZE_DEFAULT = 1 << 16
INT_MAX = 2**31 - 1
BDRV_REQ_WRITE_COMPRESSED = 0x20

# BlockCopyMethod
COPY_READ_WRITE_CLUSTER = "read-write-cluster"
COPY_READ_WRITE = "read-write"
COPY_WRITE_ZEROES = "write-zeroes"
COPY_RANGE_SMALL = "range-small"
COPY_RANGE_FULL = "range-full"

Co = Generator[None, None, int]
Sleep = Callable[[int], Generator[None, None, Any]]
Hook = Callable[[], Generator[None, None, Any]]


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _align_down(x: int, a: int) -> int:
    return x // a * a


def _min_non_zero(a: int, b: int) -> int:
    if a == 0:
        return b
    if b == 0:
        return a
    return min(a, b)


def _no_sleep(ns: int) -> Generator[None, None, None]:
    return
    yield  # pragma: no cover


def _nothing() -> Generator[None, None, None]:
    return
    yield  # pragma: no cover


def supports_compressed_writes(bs: BlockDriverState) -> bool:
    """bdrv_supports_compressed_writes: below filters, a qcow2 node."""
    top = skip_filters(bs)
    return top is not None and top.format_name == "qcow2"


def _leaf_is_file(bs: BlockDriverState | None) -> bool:
    bottom = leaf(bs)
    return bottom is not None and bottom.format_name == "file"


@dataclass(eq=False)
class BlockCopyTask:
    offset: int
    bytes: int
    method: str

    @property
    def end(self) -> int:
        return self.offset + self.bytes


@dataclass(eq=False)
class BlockCopyCallState:
    """One block_copy()/block_copy_async() call."""

    offset: int
    bytes: int
    max_workers: int = BLOCK_COPY_MAX_WORKERS
    max_chunk: int = 0
    ignore_ratelimit: bool = False
    finished: bool = False
    cancelled: bool = False
    ret: int = 0
    error_is_read: bool = False

    def succeeded(self) -> bool:
        return self.finished and not self.cancelled and self.ret == 0

    def failed(self) -> bool:
        return self.finished and not self.cancelled and self.ret < 0


class BlockCopyState:
    """struct BlockCopyState (block_copy_state_new)."""

    def __init__(self, source: BdrvChild, target: BdrvChild,
                 bitmap: BdrvDirtyBitmap | None = None) -> None:
        assert source.bs is not None and target.bs is not None
        self.source = source
        self.target = target
        self.cluster_size = self._cluster_size(target.bs)
        src = source.bs
        self.copy_bitmap = src.create_dirty_bitmap(self.cluster_size, None)
        self.copy_bitmap.disabled = True
        if bitmap is not None:
            try:
                self.copy_bitmap.merge(bitmap)
            except GenericError as e:
                src.release_dirty_bitmap(self.copy_bitmap)
                raise e.prepend(f"Failed to merge bitmap '{bitmap.name}' to internal "
                                "copy-bitmap: ") from None
        else:
            self.copy_bitmap.set_dirty(0, self.copy_bitmap.size)
        self.len = self.copy_bitmap.size
        fleecing = chain_contains(target.bs, src)
        self.write_flags = 0x80 if fleecing else 0   # BDRV_REQ_SERIALISING
        mt = _min_non_zero(INT_MAX, _min_non_zero(src.max_transfer, target.bs.max_transfer))
        self.max_transfer = _align_down(mt, self.cluster_size)
        self.in_flight_bytes = 0
        self.method = COPY_READ_WRITE
        self.failed_at_once = False   # the last task failed without waiting (see below)
        self.use_copy_range = False
        self.skip_unallocated = False
        self.progress: ProgressMeter | None = None
        self.rate_limit = RateLimit()
        # does the next wait of a request still matter (see Job.wait_for_io)? Then
        # the fast paths must not move a request's wait past a yield point
        self.waits_matter: Callable[[], bool] = lambda: False
        self.set_copy_opts(False, False)

    @staticmethod
    def _cluster_size(target: BlockDriverState) -> int:
        """block_copy_calculate_cluster_size."""
        info = target.get_info()
        if info is None:
            if backing_chain_next(target) is None:
                log.info("The target block device doesn't provide information about the "
                            "block size and it doesn't have a backing file. The default "
                            "block size of %u bytes is used. If the actual block size of the "
                            "target exceeds this default, the backup may be unusable",
                            BLOCK_COPY_CLUSTER_SIZE_DEFAULT)
            return BLOCK_COPY_CLUSTER_SIZE_DEFAULT
        return max(BLOCK_COPY_CLUSTER_SIZE_DEFAULT, int(info.get("cluster_size") or 0))

    def free(self) -> None:
        """block_copy_state_free: the copy bitmap leaves the source node."""
        bm = self.copy_bitmap
        if bm in bm.bs.dirty_bitmaps:
            bm.bs.release_dirty_bitmap(bm)

    # -- options --------------------------------------------------------------------------
    def set_copy_opts(self, use_copy_range: bool, compress: bool) -> None:
        """block_copy_set_copy_opts."""
        self.write_flags = (self.write_flags & 0x80) | (BDRV_REQ_WRITE_COMPRESSED
                                                        if compress else 0)
        if self.max_transfer < self.cluster_size or compress:
            self.method = COPY_READ_WRITE_CLUSTER
        else:
            self.method = COPY_RANGE_SMALL if use_copy_range else COPY_READ_WRITE

    def set_speed(self, speed: int) -> None:
        self.rate_limit.set_speed(speed, BLOCK_COPY_SLICE_TIME)

    def chunk_size(self) -> int:
        """block_copy_chunk_size."""
        if self.method == COPY_READ_WRITE_CLUSTER:
            return self.cluster_size
        if self.method in (COPY_READ_WRITE, COPY_RANGE_SMALL):
            return min(max(self.cluster_size, BLOCK_COPY_MAX_BUFFER), self.max_transfer)
        return min(max(self.cluster_size, BLOCK_COPY_MAX_COPY_RANGE), self.max_transfer)

    # -- tasks ----------------------------------------------------------------------------
    def _update_remaining(self) -> None:
        if self.progress is not None:
            self.progress.set_remaining(self.copy_bitmap.count() + self.in_flight_bytes)

    def task_create(self, cs: BlockCopyCallState, offset: int,
                    nbytes: int) -> BlockCopyTask | None:
        """block_copy_task_create: the next dirty run, taken out of the bitmap."""
        max_chunk = _min_non_zero(self.chunk_size(), cs.max_chunk)
        area = self.copy_bitmap.next_dirty_area(offset, offset + nbytes, max_chunk)
        if area is None:
            return None
        off, n = area
        n = _align_up(n, self.cluster_size)
        self.copy_bitmap.reset_dirty(off, n)
        self.in_flight_bytes += n
        return BlockCopyTask(off, n, self.method)

    def task_shrink(self, task: BlockCopyTask, new_bytes: int) -> None:
        """block_copy_task_shrink: the clipped tail is dirty again."""
        if new_bytes == task.bytes:
            return
        self.in_flight_bytes -= task.bytes - new_bytes
        self.copy_bitmap.set_dirty(task.offset + new_bytes, task.bytes - new_bytes)
        task.bytes = new_bytes

    def task_end(self, task: BlockCopyTask, ret: int) -> None:
        """block_copy_task_end: a failed task's range is dirty again."""
        self.in_flight_bytes -= task.bytes
        if ret < 0:
            self.copy_bitmap.set_dirty(task.offset, task.bytes)
        self._update_remaining()

    def block_status(self, offset: int, nbytes: int) -> tuple[int, int]:
        """block_copy_block_status: whole clusters; on error or a short answer, one
        cluster of data."""
        base = backing_chain_next(self.source_bs) if self.skip_unallocated else None
        try:
            ret, num = blockio.block_status_above(self.source_bs, base, offset, nbytes)
        except OSError:
            ret, num = -1, 0
        if ret < 0 or num < self.cluster_size:
            return BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_DATA, self.cluster_size
        if offset + num == self.len:
            return ret, _align_up(num, self.cluster_size)
        return ret, _align_down(num, self.cluster_size)

    def zero_extent_end(self, offset: int) -> int:
        """Where the source's zero extent at ``offset`` ends (0: not zero there), from one
        block-status query to the end of the disk. Only for a source whose status queries
        have no effects (``pure_block_status``): block status reports uniform runs, so the
        status of any request inside the extent is this one, cut at the extent's end."""
        if not all(bs.pure_block_status() for bs in subtree(self.source_bs)):
            return 0
        try:
            ret, num = blockio.block_status_above(self.source_bs, None, offset, self.len - offset)
        except OSError:
            return 0
        if not ret & BDRV_BLOCK_ZERO or ret & BDRV_BLOCK_DATA:
            return 0
        return offset + num

    def fast_forward_zeroes(self, cs: BlockCopyCallState, offset: int, end: int, stop: int,
                            zeroes: ZeroRun) -> int:
        """The tasks from ``offset`` that lie inside the source's zero extent ending at
        ``stop``, taken at once: each would read that extent's status, need no shrinking and
        have its write deferred, so only the copy bitmap, the deferred run and progress
        change. The caller makes sure nothing else could happen between them (no pause
        point would yield, no rate limit). Returns where the next task starts."""
        # the tasks of a dirty run [a, b) are [a, a + step), [a + step, a + 2 step), ... up
        # to b rounded up to a cluster: a task's length is the run's rest, at most max_chunk,
        # rounded up to a cluster
        step = _align_up(_min_non_zero(self.chunk_size(), cs.max_chunk), self.cluster_size)
        done = 0
        while True:
            run = self.copy_bitmap.next_dirty_area(offset, end, 1 << 62)
            if run is None:
                break
            start, nbytes = run
            run_end = _align_up(start + nbytes, self.cluster_size)
            fits = run_end if run_end <= stop else start + (stop - start) // step * step
            if fits > start:
                self.copy_bitmap.reset_dirty(start, fits - start)
                zeroes.add(start, fits)
                done += fits - start
                offset = fits
            if fits < run_end:
                break   # the next task reaches past the zero extent
        if done:
            if self.progress is not None:
                self.progress.work_done(done)
            self._update_remaining()
        return offset

    @property
    def source_bs(self) -> BlockDriverState:
        assert self.source.bs is not None
        return self.source.bs

    def do_copy(self, offset: int, nbytes: int, method: str) -> tuple[int, bool, str]:
        """block_copy_do_copy: (ret, error_is_read, method for the next tasks)."""
        n = min(offset + nbytes, self.len) - offset
        if method == COPY_WRITE_ZEROES:
            try:
                self.target.pwrite_zeroes(offset, n, self.write_flags
                                          & ~BDRV_REQ_WRITE_COMPRESSED & ~0x80)
            except OSError as e:
                self.failed_at_once = getattr(e, "immediate", False)
                return -(e.errno or errno.EIO), False, method
            return 0, False, method
        if method in (COPY_RANGE_SMALL, COPY_RANGE_FULL):
            # bdrv_co_copy_range: between file-backed nodes it works (copy_file_range),
            # which the emulator performs as a read and a write; elsewhere -ENOTSUP.
            if _leaf_is_file(self.source.bs) and _leaf_is_file(self.target.bs):
                ret, is_read = self._read_write(offset, n)
                return ret, is_read, (COPY_RANGE_FULL if ret >= 0 else COPY_READ_WRITE)
            method = COPY_READ_WRITE
        ret, is_read = self._read_write(offset, n)
        return ret, is_read, method

    def _read_write(self, offset: int, n: int) -> tuple[int, bool]:
        try:
            data = self.source.pread(offset, n)
        except OSError as e:   # the task's first request: QEMU's task may fail at once
            self.failed_at_once = getattr(e, "immediate", False)
            return -(e.errno or errno.EIO), True
        try:
            self.target.pwrite(offset, data, self.write_flags & ~0x80
                               & ~BDRV_REQ_WRITE_COMPRESSED)
        except OSError as e:
            return -(e.errno or errno.EIO), False
        return 0, False

    def task_entry(self, task: BlockCopyTask, cs: BlockCopyCallState) -> int:
        """block_copy_task_entry."""
        ret, is_read, method = self.do_copy(task.offset, task.bytes, task.method)
        if self.method == task.method:
            self.method = method
        if ret < 0 and not cs.ret:
            cs.ret = ret
            cs.error_is_read = is_read
        self.task_done(task, ret)
        return ret

    def task_done(self, task: BlockCopyTask, ret: int) -> None:
        """The end of block_copy_task_entry: progress for a success, then the task ends."""
        if ret >= 0 and self.progress is not None:
            self.progress.work_done(task.bytes)
        self.task_end(task, ret)

    def undo_done(self, offset: int, nbytes: int) -> None:
        """Tasks counted as done whose (deferred) write failed: dirty again, no progress."""
        if self.progress is not None:
            self.progress.current -= nbytes
        self.copy_bitmap.set_dirty(offset, nbytes)
        self._update_remaining()

    # -- calls ----------------------------------------------------------------------------
    def dirty_clusters(self, cs: BlockCopyCallState, sleep: Sleep,
                       cancelled: Callable[[], bool], before_task: Hook = _nothing) -> Co:
        """block_copy_dirty_clusters: < 0 error, 1 something was dirty, 0 nothing.

        Write-zeroes tasks may have their writes deferred and merged (see zero_run); the
        hooks must not do I/O before they yield."""
        offset, nbytes = cs.offset, cs.bytes
        end = offset + nbytes
        found_dirty = False
        status = 0
        in_flight = 0   # tasks QEMU's pool had started before the failure was known
        zeroes = ZeroRun(self)

        def failed(ret: int) -> None:
            """A deferred run failed: as if its task had (the first error is kept)."""
            nonlocal status, in_flight
            if not cs.ret:
                cs.ret = ret
                cs.error_is_read = False
            if status == 0:
                status = ret
                in_flight = cs.max_workers - 1

        while nbytes and (status == 0 or in_flight > 0) and not cs.cancelled \
                and not cancelled():
            in_flight -= 1
            if self.copy_bitmap.next_dirty(offset, nbytes) < 0:
                break   # no task to create: QEMU's loop ends here without yielding
            yield from zeroes.before_yield(before_task, failed)
            if cs.cancelled or cancelled():
                break
            task = self.task_create(cs, offset, nbytes)
            if task is None:
                break
            found_dirty = True
            ret, status_bytes = self.block_status(task.offset, task.bytes)
            if status_bytes < task.bytes:
                self.task_shrink(task, status_bytes)
            if self.skip_unallocated and not ret & BDRV_BLOCK_ALLOCATED:
                self.task_end(task, 0)
                offset = task.end
                nbytes = end - offset
                continue
            if ret & BDRV_BLOCK_ZERO:
                task.method = COPY_WRITE_ZEROES
            if not cs.ignore_ratelimit:
                ns = self.rate_limit.calculate_delay(0)
                if ns > 0:
                    self.task_end(task, -errno.EAGAIN)
                    yield from zeroes.before_yield(functools.partial(sleep, ns), failed)
                    continue
            self.rate_limit.calculate_delay(task.bytes)
            offset = task.end
            nbytes = end - offset
            if task.method == COPY_WRITE_ZEROES and zeroes.defer(task):
                if (not zeroes.hook_yielded and not self.rate_limit.slice_quota
                        and not self.skip_unallocated and not self.waits_matter()):
                    stop = self.zero_extent_end(task.offset)
                    if stop > offset:
                        offset = self.fast_forward_zeroes(cs, offset, end, stop, zeroes)
                        nbytes = end - offset
                continue
            if zeroes.ranges:
                ret = zeroes.issue()
                if ret < 0:
                    failed(ret)
                    if in_flight <= 0:
                        self.task_end(task, -errno.ECANCELED)   # never started
                        break
            self.failed_at_once = False
            ret = self.task_entry(task, cs)
            if ret < 0 and status == 0:
                status = ret
                # a task that failed without waiting (blkdebug immediately=on, on its first
                # request) stops the loop at once; else QEMU's loop had gone on starting tasks
                in_flight = 0 if self.failed_at_once else cs.max_workers - 1
        if zeroes.ranges:
            ret = zeroes.issue()
            if ret < 0:
                failed(ret)
        if status < 0:
            return status
        return 1 if found_dirty else 0

    def run_call(self, cs: BlockCopyCallState, sleep: Sleep = _no_sleep,
                 cancelled: Callable[[], bool] = lambda: False,
                 before_task: Hook = _nothing) -> Co:
        """block_copy_common: repeat while something was copied and the bitmap is dirty.
        ``before_task`` runs before each task is taken (the job's pause point)."""
        while True:
            ret = yield from self.dirty_clusters(cs, sleep, cancelled, before_task)
            if ret == 0 and not cs.cancelled:
                ret = int(self.copy_bitmap.next_dirty(cs.offset, cs.bytes) >= 0)
            if not (ret > 0 and not cs.cancelled and not cancelled()):
                break
        cs.finished = True
        return ret

    def block_copy(self, offset: int, nbytes: int, *, ignore_ratelimit: bool = True) -> int:
        """block_copy(): a synchronous call (copy-before-write); its first task error."""
        cs = BlockCopyCallState(offset, nbytes, ignore_ratelimit=ignore_ratelimit)
        gen = self.run_call(cs)
        try:
            while True:
                next(gen)
        except StopIteration:
            pass
        return cs.ret

    # -- sync=top's first phase --------------------------------------------------------------
    def is_cluster_allocated(self, offset: int) -> tuple[int, int]:
        """block_copy_is_cluster_allocated: (allocated?, clusters)."""
        bs = self.source_bs
        total = 0
        nbytes = self.len - offset
        while True:
            ret, count = bs.is_allocated(offset, nbytes)
            total += count
            if ret or count == 0:
                return int(ret), -(-total // self.cluster_size)
            if total >= self.cluster_size:
                return 0, total // self.cluster_size
            offset += count
            nbytes -= count

    def reset(self, offset: int, nbytes: int) -> None:
        """block_copy_reset."""
        self.copy_bitmap.reset_dirty(offset, nbytes)
        self._update_remaining()

    def reset_unallocated(self, offset: int) -> tuple[int, int]:
        """block_copy_reset_unallocated: (allocated?, bytes looked at)."""
        ret, clusters = self.is_cluster_allocated(offset)
        nbytes = clusters * self.cluster_size
        if not ret:
            self.reset(offset, nbytes)
        return ret, nbytes
