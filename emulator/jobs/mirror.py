"""The mirror job (block/mirror.c, QEMU 7.2): mirror_start_job, mirror_run, completion.

The job puts a mirror_top filter above the source (bdrv_append) and tracks what is still to
copy in an anonymous dirty bitmap on the source, which guest writes keep marking. Its loop
copies the next dirty run in chunks of ``granularity`` (at most ``buf-size`` per iteration,
at most MAX_IN_FLIGHT operations and ``buf-size`` bytes in flight), rate-limited by the block
job's speed; once the bitmap is clean and nothing is in flight it flushes the target and
becomes READY, then idles (100 ms sleeps) until job-complete (pivot: the target replaces the
source) or a cancel (in READY a soft cancel completes without pivot).

Each copy operation is a coroutine of its own, as in QEMU: it reads, yields until the read
"completes", writes, yields again, and ends (mirror_iteration_done). I/O on a file-backed
node completes from the event loop (file-posix's thread pool); other I/O (null-co) without
yielding. The emulator performs the I/O itself when it is submitted. Coroutines woken from a
coroutine run when that one yields (aio_co_wake's queueing), see :meth:`MirrorJob._wake`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from emulator.block import io as blockio
from emulator.block import perm as P
from emulator.block.backend import BlockBackend
from emulator.block.dirty_bitmap import BdrvDirtyBitmap
from emulator.block.drivers.mirror_top import (
    METHOD_COPY,
    METHOD_DISCARD,
    METHOD_ZERO,
    MirrorTopNode,
    new_mirror_top,
)
from emulator.block.errors import GenericError
from emulator.block.node import (
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_ZERO,
    BDRV_REQ_MAY_UNMAP,
    BlockDriverState,
)
from emulator.jobs.blockjob import BLOCK_JOB_SLICE_TIME, BlockJob
from emulator.jobs.job import Co, Job, JobTxn
from emulator.jobs.ratelimit import now_ns

if TYPE_CHECKING:
    from emulator.jobs.manager import JobManager, Scheduled

log = logging.getLogger("emulator.mirror")

MAX_IN_FLIGHT = 16
MAX_IO_BYTES = 1 << 20
DEFAULT_MIRROR_BUF_SIZE = MAX_IN_FLIGHT * MAX_IO_BYTES
MAX_IOV = 1024           # IOV_MAX: bl.max_iov of every node the emulator has
INT_MAX = 2**31 - 1
BDRV_SECTOR_SIZE = 512

# BlockMirrorBackingMode
SOURCE_BACKING_CHAIN = "source-backing-chain"   # drive-mirror mode=absolute-paths
OPEN_BACKING_CHAIN = "open-backing-chain"       # drive-mirror mode=existing
LEAVE_BACKING_CHAIN = "leave-backing-chain"     # blockdev-mirror

Resume = Callable[[], None]


@dataclass(eq=False)
class MirrorOp:
    """struct MirrorOp: one copy/zero/discard, a pseudo op, or an active (guest) write."""

    offset: int
    bytes: int
    is_pseudo_op: bool = False
    is_active_write: bool = False
    is_in_flight: bool = False
    waiting_for_op: MirrorOp | None = None
    waiters: list[Resume] = field(default_factory=list)   # waiting_requests
    bytes_handled: int = -1
    nb_bufs: int = 0                                      # qiov.niov: buffers it holds
    gen: Generator[None, None, None] | None = None       # op->co


# -- small block-layer helpers (block.c / block/io.c functions mirror.c calls) --------------
def skip_filters(bs: BlockDriverState | None) -> BlockDriverState | None:
    """bdrv_skip_filters."""
    while bs is not None and bs.is_filter:
        c = bs.filter_child()
        bs = c.bs if c is not None else None
    return bs


def backing_chain_next(bs: BlockDriverState | None) -> BlockDriverState | None:
    """bdrv_backing_chain_next."""
    top = skip_filters(bs)
    cow = top.cow_child() if top is not None else None
    return skip_filters(cow.bs if cow is not None else None)


def chain_contains(top: BlockDriverState, bs: BlockDriverState | None) -> bool:
    """bdrv_chain_contains: bs is top or in its filter/COW chain (never for bs None)."""
    p: BlockDriverState | None = top
    while p is not None:
        if p is bs:
            return True
        p = p.filter_or_cow_bs()
    return False


def find_overlay(active: BlockDriverState, bs: BlockDriverState | None) -> BlockDriverState | None:
    """bdrv_find_overlay: the node in active's chain whose backing is bs (bs None: the
    bottom of the chain)."""
    bs = skip_filters(bs)
    cur = skip_filters(active)
    while cur is not None:
        nxt = backing_chain_next(cur)
        if nxt is bs:
            return cur
        cur = nxt
    return None


def recurse_can_replace(bs: BlockDriverState, to_replace: BlockDriverState) -> bool:
    """bdrv_recurse_can_replace (no driver here has its own hook)."""
    p: BlockDriverState | None = bs
    while p is not None:
        if p is to_replace:
            return True
        c = p.filter_child()
        p = c.bs if c is not None else None
    return False


def _leaf(bs: BlockDriverState | None) -> BlockDriverState | None:
    while bs is not None:
        c = bs.primary_child() or bs.filter_child()
        if c is None or c.bs is None:
            return bs
        bs = c.bs
    return None


def io_yields(bs: BlockDriverState | None) -> bool:
    """Does I/O on bs leave the coroutine in QEMU? file-posix completes it in a thread;
    null-co only with a latency."""
    leaf = _leaf(bs)
    if leaf is None:
        return False
    return leaf.format_name == "file" or bool(getattr(leaf, "latency_ns", 0))


def supports_unmap_zeroes(bs: BlockDriverState) -> bool:
    """BDRV_REQ_MAY_UNMAP in bs->supported_zero_flags (qcow2 v3, file, and the drivers
    that pass their file's flags on)."""
    name = bs.format_name
    if name == "qcow2":
        image = getattr(bs, "image", None)
        return image is not None and int(image.header.version) >= 3
    if name == "file":
        return True
    if name in ("raw", "blkdebug", "copy-before-write"):
        f = bs.file
        return f is not None and f.bs is not None and supports_unmap_zeroes(f.bs)
    return False


def can_write_zeroes_with_unmap(bs: BlockDriverState) -> bool:
    """bdrv_can_write_zeroes_with_unmap: BDRV_O_UNMAP and a driver that can unmap."""
    return bs.discard == "unmap" and supports_unmap_zeroes(bs)


def has_zero_init(bs: BlockDriverState) -> bool:
    """bdrv_has_zero_init."""
    if bs.cow_child() is not None:
        return False
    name = bs.format_name
    if name == "qcow2":
        image = getattr(bs, "image", None)
        l1 = image.tables.l1 if image is not None else []
        if not l1 or not l1[0]:
            return True
        if bs.encrypted:
            return False
        f = bs.file
        return f is not None and f.bs is not None and has_zero_init(f.bs)
    if name == "file":
        return True
    if name == "raw":
        f = bs.file
        return f is not None and f.bs is not None and has_zero_init(f.bs)
    f = bs.filter_child()
    return f is not None and f.bs is not None and has_zero_init(f.bs)


def round_to_clusters(bs: BlockDriverState, offset: int, nbytes: int) -> tuple[int, int]:
    """bdrv_round_to_clusters."""
    info = bs.get_info()
    cluster = int(info.get("cluster_size") or 0) if info else 0
    if cluster <= 0:
        return offset, nbytes
    start = offset // cluster * cluster
    end = -(-(offset + nbytes) // cluster) * cluster
    return start, end - start


def _errno(e: OSError) -> int:
    return -(e.errno or errno.EIO)


class MirrorJob(BlockJob):
    """struct MirrorBlockJob with mirror_job_driver's hooks."""

    job_type = "mirror"
    has_complete = True

    def __init__(self, manager: JobManager, job_id: str | None, graph: Any, *,
                 manual_finalize: bool = False, manual_dismiss: bool = False,
                 layer: Any = None) -> None:
        super().__init__(manager, job_id, graph, manual_finalize=manual_finalize,
                         manual_dismiss=manual_dismiss)
        self.layer = layer
        self.target_blk: BlockBackend | None = None
        self.mirror_top_bs: MirrorTopNode | None = None
        self.base: BlockDriverState | None = None
        self.base_overlay: BlockDriverState | None = None
        self.replaces: str | None = None
        self.to_replace: BlockDriverState | None = None
        self.replace_blocker: str | None = None
        self.is_none_mode = False
        self.backing_mode = LEAVE_BACKING_CHAIN
        self.zero_target = False
        self.copy_mode = "background"
        self.on_source_error = "report"
        self.on_target_error = "report"
        self.actively_synced = False
        self.should_complete = False
        self.granularity = 0
        self.buf_size = 0
        self.bdev_length = 0
        self.cow_bitmap: set[int] | None = None
        self.dirty_bitmap: BdrvDirtyBitmap | None = None
        self.dbi_pos = 0                  # the dirty iterator's next granule
        self.buf_free_count = 0
        self.last_pause_ns = 0
        self.in_flight_bitmap: set[int] = set()
        self.in_flight = 0
        self.bytes_in_flight = 0
        self.ops_in_flight: list[MirrorOp] = []
        self.op_ret = 0                   # s->ret (JobInfo's ret is Job.ret)
        self.unmap = True
        self.target_cluster_size = BDRV_SECTOR_SIZE
        self.max_iov = MAX_IOV
        self.initial_zeroing_ongoing = False
        self.in_active_write_counter = 0
        self.active_write_bytes_in_flight = 0
        self.prepared = False
        self.in_drain = False
        self._drained: list[BlockDriverState] = []
        # coroutine bookkeeping: nesting depth of coroutine code, coroutines to wake when
        # it returns to the main loop, and I/O completions not yet delivered
        self._depth = 0
        self._wakeups: list[Resume] = []
        self._io_pending: list[Scheduled] = []    # deferred completions and BHs
        self._resume_job: Resume = functools.partial(Job._step, self)

    # -- coroutines -----------------------------------------------------------------------
    def _co_run(self, fn: Resume) -> None:
        """Run one coroutine step; what it woke runs once the outermost step is done."""
        self._depth += 1
        try:
            fn()
        finally:
            self._depth -= 1
        if self._depth == 0:
            while self._wakeups:
                self._co_run(self._wakeups.pop(0))

    def _wake(self, fn: Resume) -> None:
        """aio_co_wake: from a coroutine, the woken one is queued until that one yields;
        from the main loop it is entered at once."""
        if self._depth:
            self._wakeups.append(fn)
        else:
            self._co_run(fn)

    def _step(self) -> None:
        """Entering the job coroutine (job_enter, job_start) goes through _wake."""
        self._wake(self._resume_job)

    def _restart_all(self, op: MirrorOp) -> None:
        """qemu_co_queue_restart_all(&op->waiting_requests)."""
        waiters, op.waiters = op.waiters, []
        for w in waiters:
            self._wake(w)

    def _queue_wait(self, op: MirrorOp, resume: Resume) -> Generator[None, None, None]:
        """qemu_co_queue_wait(&op->waiting_requests): the caller stays busy meanwhile."""
        op.waiters.append(resume)
        yield

    def _io_wait(self, bs: BlockDriverState | None, resume: Resume) -> Generator[None, None, None]:
        """Wait for the completion of I/O just submitted on bs (see the module docstring)."""
        if not io_yields(bs):
            return

        self._defer(lambda: self._co_run(resume))
        yield

    def _defer(self, fn: Resume) -> None:
        """Run fn from the event loop (a thread-pool completion, a bottom half); poll()
        runs it at once when the job must finish synchronously (cancel at quit)."""

        def run() -> None:
            if handle in self._io_pending:
                self._io_pending.remove(handle)
            fn()

        handle = self.manager.call_soon(run)
        self._io_pending.append(handle)

    def poll(self) -> None:
        """AIO_WAIT_WHILE round: deliver a pending I/O completion first."""
        if self._io_pending:
            self._io_pending[0].run_now()
            return
        super().poll()

    def _co_drained_begin(self, bs: BlockDriverState) -> Co:
        """bdrv_drained_begin from the job coroutine: bdrv_co_yield_to_drain drains in a
        bottom half and re-enters the coroutine from there."""

        def bh() -> None:
            self._drained_begin(bs)
            self._co_run(self._resume_job)

        self._defer(bh)
        yield

    def _drained_begin(self, bs: BlockDriverState) -> None:
        self.manager.drained_begin(bs)

    def _drained_end(self, bs: BlockDriverState) -> None:
        self.manager.drained_end(bs)

    # -- accessors ------------------------------------------------------------------------
    @property
    def source(self) -> BlockDriverState:
        """mirror_top_bs->backing->bs."""
        assert self.mirror_top_bs is not None and self.mirror_top_bs.backing is not None
        bs = self.mirror_top_bs.backing.bs
        assert bs is not None
        return bs

    @property
    def target_bs(self) -> BlockDriverState:
        assert self.target_blk is not None and self.target_blk.bs is not None
        return self.target_blk.bs

    @property
    def bitmap(self) -> BdrvDirtyBitmap:
        assert self.dirty_bitmap is not None
        return self.dirty_bitmap

    def _chunks(self, offset: int, nbytes: int) -> range:
        g = self.granularity
        return range(offset // g, -(-(offset + nbytes) // g))

    # -- errors ---------------------------------------------------------------------------
    def mirror_error_action(self, read: bool, error: int) -> str:
        """mirror_error_action."""
        self.actively_synced = False
        policy = self.on_source_error if read else self.on_target_error
        return self.error_action(policy, read, error)

    # -- operations -----------------------------------------------------------------------
    def _wait_on_conflicts(self, me: MirrorOp | None, offset: int, nbytes: int,
                           resume: Resume) -> Generator[None, None, None]:
        """mirror_wait_on_conflicts."""
        mine = self._chunks(offset, nbytes)
        while any(c in self.in_flight_bitmap for c in mine) and self.op_ret >= 0:
            for op in list(self.ops_in_flight):
                if op is me:
                    continue
                theirs = self._chunks(op.offset, op.bytes)
                if mine.start < theirs.stop and theirs.start < mine.stop:
                    if me is not None:
                        if op.waiting_for_op is not None:
                            continue
                        me.waiting_for_op = op
                    yield from self._queue_wait(op, resume)
                    if me is not None:
                        me.waiting_for_op = None
                    break
            else:
                return

    def _iteration_done(self, op: MirrorOp, ret: int) -> None:
        """mirror_iteration_done."""
        self.in_flight -= 1
        self.bytes_in_flight -= op.bytes
        self.buf_free_count += op.nb_bufs
        chunks = self._chunks(op.offset, op.bytes)
        self.in_flight_bitmap.difference_update(chunks)
        self.ops_in_flight.remove(op)
        if ret >= 0:
            if self.cow_bitmap is not None:
                self.cow_bitmap.update(chunks)
            if not self.initial_zeroing_ongoing:
                self.progress.work_done(op.bytes)
        self._restart_all(op)

    def _write_complete(self, op: MirrorOp, ret: int) -> None:
        """mirror_write_complete."""
        if ret < 0:
            self.bitmap.set_dirty(op.offset, op.bytes)
            action = self.mirror_error_action(False, -ret)
            if action == "report" and self.op_ret >= 0:
                self.op_ret = ret
        self._iteration_done(op, ret)

    def _wait_for_free_in_flight_slot(self, resume: Resume) -> Generator[None, None, None]:
        """mirror_wait_for_free_in_flight_slot: wait for the first real background op."""
        for op in self.ops_in_flight:
            if not op.is_pseudo_op and op.is_in_flight and not op.is_active_write:
                yield from self._queue_wait(op, resume)
                return
        raise AssertionError("mirror: no operation in flight to wait for")

    def _cow_align(self, op: MirrorOp) -> int:
        """mirror_cow_align: round to target clusters where the target lacks them."""
        assert self.cow_bitmap is not None
        g = self.granularity
        offset, nbytes = op.offset, op.bytes
        need_cow = (offset // g not in self.cow_bitmap
                    or (offset + nbytes - 1) // g not in self.cow_bitmap)
        align_offset, align_bytes = offset, nbytes
        if need_cow:
            align_offset, align_bytes = round_to_clusters(self.target_bs, offset, nbytes)
        max_bytes = g * self.max_iov
        if align_bytes > max_bytes:
            align_bytes = max_bytes
            if need_cow:
                align_bytes = align_bytes // self.target_cluster_size * self.target_cluster_size
        align_bytes = min(align_bytes, self.bdev_length - align_offset)
        ret = align_offset + align_bytes - (offset + nbytes)
        op.offset, op.bytes = align_offset, align_bytes
        assert ret >= 0
        return ret

    def _co_read(self, op: MirrorOp, resume: Resume) -> Generator[None, None, None]:
        """mirror_co_read: take buffers, read the source, write the target."""
        max_bytes = self.granularity * self.max_iov
        op.bytes = min(self.buf_size, max_bytes, op.bytes)
        assert op.bytes
        op.bytes_handled = op.bytes
        if self.cow_bitmap is not None:
            op.bytes_handled += self._cow_align(op)
        nb_chunks = -(-op.bytes // self.granularity)
        while self.buf_free_count < nb_chunks:
            yield from self._wait_for_free_in_flight_slot(resume)
        self.buf_free_count -= nb_chunks
        op.nb_bufs = nb_chunks
        self.in_flight += 1
        self.bytes_in_flight += op.bytes
        op.is_in_flight = True
        assert self.mirror_top_bs is not None and self.mirror_top_bs.backing is not None
        data = b""
        try:
            data = self.mirror_top_bs.backing.pread(op.offset, op.bytes)
            ret = 0
        except OSError as e:
            ret = _errno(e)
        yield from self._io_wait(self.source, resume)
        # mirror_read_complete
        if ret < 0:
            self.bitmap.set_dirty(op.offset, op.bytes)
            action = self.mirror_error_action(True, -ret)
            if action == "report" and self.op_ret >= 0:
                self.op_ret = ret
            self._iteration_done(op, ret)
            return
        ret = self._target_io(lambda blk: blk.pwrite(op.offset, data))
        yield from self._io_wait(self.target_blk.bs if self.target_blk else None, resume)
        self._write_complete(op, ret)

    def _target_io(self, fn: Callable[[BlockBackend], None]) -> int:
        try:
            assert self.target_blk is not None
            fn(self.target_blk)
        except OSError as e:
            return _errno(e)
        return 0

    def _co_zero_or_discard(self, op: MirrorOp, method: str,
                            resume: Resume) -> Generator[None, None, None]:
        """mirror_co_zero / mirror_co_discard."""
        self.in_flight += 1
        self.bytes_in_flight += op.bytes
        op.bytes_handled = op.bytes
        op.is_in_flight = True
        if method == METHOD_ZERO:
            flags = BDRV_REQ_MAY_UNMAP if self.unmap else 0
            ret = self._target_io(lambda blk: blk.pwrite_zeroes(op.offset, op.bytes, flags))
        else:
            ret = self._target_io(lambda blk: blk.pdiscard(op.offset, op.bytes))
        yield from self._io_wait(self.target_blk.bs if self.target_blk else None, resume)
        self._write_complete(op, ret)

    def _perform(self, offset: int, nbytes: int, method: str) -> int:
        """mirror_perform: start the operation's coroutine; the bytes it handles."""
        op = MirrorOp(offset, nbytes)

        def resume() -> None:
            assert op.gen is not None
            with contextlib.suppress(StopIteration):
                next(op.gen)

        if method == METHOD_COPY:
            op.gen = self._co_read(op, resume)
        else:
            op.gen = self._co_zero_or_discard(op, method, resume)
        self.ops_in_flight.append(op)
        self._depth += 1        # qemu_coroutine_enter: nested, wakeups wait for us
        try:
            resume()
        finally:
            self._depth -= 1
        assert op.bytes_handled >= 0
        return op.bytes_handled

    # -- the dirty iterator (BdrvDirtyBitmapIter) -----------------------------------------
    def _iter_next(self) -> int:
        """bdrv_dirty_iter_next: the next dirty granule at or after the iterator, or -1."""
        start = self.dbi_pos * self.granularity
        off = self.bitmap.next_dirty(start, self.bdev_length - start) if start < \
            self.bdev_length else -1
        if off < 0:
            self.dbi_pos = -(-self.bdev_length // self.granularity)
            return -1
        self.dbi_pos = off // self.granularity + 1
        return off

    def _set_iter(self, offset: int) -> None:
        self.dbi_pos = offset // self.granularity

    # -- the loop -------------------------------------------------------------------------
    def _iteration(self) -> Generator[None, None, int]:
        """mirror_iteration: copy the next dirty run; returns the rate-limit delay."""
        source = self.source
        g = self.granularity
        nb_chunks = 1
        assert self.target_blk is not None
        write_zeroes_ok = can_write_zeroes_with_unmap(self.target_bs)
        max_io_bytes = max(self.buf_size // MAX_IN_FLIGHT, MAX_IO_BYTES)
        offset = self._iter_next()
        if offset < 0:
            self._set_iter(0)
            offset = self._iter_next()
            assert offset >= 0
        yield from self._wait_on_conflicts(None, offset, 1, self._resume_job)
        yield from self.pause_point()
        while nb_chunks * g < self.buf_size:
            next_offset = offset + nb_chunks * g
            if next_offset >= self.bdev_length or not self.bitmap.get(next_offset):
                break
            if next_offset // g in self.in_flight_bitmap:
                break
            next_dirty = self._iter_next()
            if next_dirty > next_offset or next_dirty < 0:
                self._set_iter(next_offset)
                next_dirty = self._iter_next()
            assert next_dirty == next_offset
            nb_chunks += 1
        self.bitmap.reset_dirty(offset, nb_chunks * g)
        pseudo = MirrorOp(offset, nb_chunks * g, is_pseudo_op=True)
        self.ops_in_flight.append(pseudo)
        self.in_flight_bitmap.update(range(offset // g, offset // g + nb_chunks))
        delay_ns = 0
        ret = 0
        while nb_chunks > 0 and offset < self.bdev_length:
            method = METHOD_COPY
            try:
                status, io_bytes = blockio.block_status_above(source, None, offset,
                                                              nb_chunks * g)
            except OSError:
                status, io_bytes = -1, 0
            if status < 0:
                io_bytes = min(nb_chunks * g, max_io_bytes)
            elif status & BDRV_BLOCK_DATA:
                io_bytes = min(io_bytes, max_io_bytes)
            io_bytes -= io_bytes % g
            if io_bytes < g:
                io_bytes = g
            elif status >= 0 and not status & BDRV_BLOCK_DATA:
                t_off, t_bytes = round_to_clusters(self.target_bs, offset, io_bytes)
                if t_off == offset and t_bytes == io_bytes:
                    method = METHOD_ZERO if status & BDRV_BLOCK_ZERO else METHOD_DISCARD
            while self.in_flight >= MAX_IN_FLIGHT:
                yield from self._wait_for_free_in_flight_slot(self._resume_job)
            if self.op_ret < 0:
                ret = 0
                break
            io_bytes = min(io_bytes, self.bdev_length - offset)
            io_bytes = self._perform(offset, io_bytes, method)
            acct = 0 if method != METHOD_COPY and write_zeroes_ok else io_bytes
            assert io_bytes
            offset += io_bytes
            nb_chunks -= -(-io_bytes // g)
            delay_ns = self.limit.calculate_delay(acct)
            ret = delay_ns
        self.ops_in_flight.remove(pseudo)
        self._restart_all(pseudo)
        return ret

    def _free_init(self) -> None:
        """mirror_free_init: buf_size / granularity buffers."""
        self.buf_free_count = self.buf_size // self.granularity

    def _wait_for_all_io(self) -> Co:
        """mirror_wait_for_all_io (also the .pause hook)."""
        while self.in_flight > 0:
            yield from self._wait_for_free_in_flight_slot(self._resume_job)

    def driver_pause(self) -> Co:
        """mirror_pause."""
        yield from self._wait_for_all_io()

    def _throttle(self) -> Co:
        """mirror_throttle: a pause point, and a real yield once per slice."""
        now = now_ns()
        if now - self.last_pause_ns > BLOCK_JOB_SLICE_TIME:
            self.last_pause_ns = now
            yield from self.sleep_ns(0)
        else:
            yield from self.pause_point()

    def _dirty_init(self) -> Generator[None, None, int]:
        """mirror_dirty_init: zero the target if needed, then mark what is allocated."""
        bs = self.source
        if self.zero_target:
            if not can_write_zeroes_with_unmap(self.target_bs):
                self.bitmap.set_dirty(0, self.bdev_length)
                return 0
            self.initial_zeroing_ongoing = True
            offset = 0
            while offset < self.bdev_length:
                nbytes = min(self.bdev_length - offset, INT_MAX // self.granularity
                             * self.granularity)
                yield from self._throttle()
                if self.is_cancelled():
                    self.initial_zeroing_ongoing = False
                    return 0
                if self.in_flight >= MAX_IN_FLIGHT:
                    yield from self._wait_for_free_in_flight_slot(self._resume_job)
                    continue
                self._perform(offset, nbytes, METHOD_ZERO)
                offset += nbytes
            yield from self._wait_for_all_io()
            self.initial_zeroing_ongoing = False
        first = True
        offset = 0
        while offset < self.bdev_length:
            nbytes = min(self.bdev_length - offset, INT_MAX // self.granularity
                         * self.granularity)
            yield from self._throttle()
            if self.is_cancelled():
                return 0
            if first and _status_yields(bs):
                # qcow2's first block status reads refcounts (metadata preallocation check)
                yield from self.io_yield()
            first = False
            try:
                allocated, count = bs.is_allocated_above(self.base_overlay, offset, nbytes,
                                                         include_base=True)
            except OSError as e:
                return _errno(e)
            assert count
            if allocated:
                self.bitmap.set_dirty(offset, count)
            offset += count
        return 0

    def _flush(self) -> int:
        """mirror_flush: flush the target; a failure goes through the error policy."""
        ret = self._target_io(lambda blk: blk.flush())
        if ret < 0 and self.mirror_error_action(False, -ret) == "report":
            self.op_ret = ret
        return ret

    def run(self) -> Co:
        """mirror_run."""
        ret = yield from self._run_body()
        yield from self._immediate_exit(ret)
        return ret

    def _run_body(self) -> Generator[None, None, int]:
        if self.is_cancelled():
            return 0
        bs = self.source
        self.bdev_length = bs.getlength()
        assert self.target_blk is not None
        try:
            target_length = self.target_blk.length()
        except OSError as e:
            return _errno(e)
        if self.base is self.target_bs:
            if self.bdev_length > target_length:
                return -errno.ENOTSUP    # active commit's resize: not emulated
        elif self.bdev_length != target_length:
            self.err = "Source and target image have different sizes"
            return -errno.EINVAL
        if self.bdev_length == 0:
            self.transition_to_ready()
            self.actively_synced = True
            while not self.cancel_requested() and not self.should_complete:
                yield from self.job_yield()
            return 0
        target_bs = self.target_bs
        info = target_bs.get_info()
        cluster = int(info.get("cluster_size") or 0) if info else 0
        self.target_cluster_size = cluster or BDRV_SECTOR_SIZE
        if (target_bs.backing_file and backing_chain_next(target_bs) is None
                and self.granularity < self.target_cluster_size):
            self.buf_size = max(self.buf_size, self.target_cluster_size)
            self.cow_bitmap = set()
        self._free_init()
        self.last_pause_ns = now_ns()
        if not self.is_none_mode:
            ret = yield from self._dirty_init()
            if ret < 0 or self.is_cancelled():
                return ret
        self.dbi_pos = 0
        while True:
            delay_ns = 0
            if self.op_ret < 0:
                return self.op_ret
            yield from self.pause_point()
            if self.is_cancelled():
                return 0
            cnt = self.bitmap.count()
            self.progress.set_remaining(self.bytes_in_flight + cnt
                                        + self.active_write_bytes_in_flight)
            delta = now_ns() - self.last_pause_ns
            if delta < BLOCK_JOB_SLICE_TIME and self.iostatus == "ok":
                if (self.in_flight >= MAX_IN_FLIGHT or self.buf_free_count == 0
                        or (cnt == 0 and self.in_flight > 0)):
                    yield from self._wait_for_free_in_flight_slot(self._resume_job)
                    continue
                if cnt != 0:
                    delay_ns = yield from self._iteration()
            should_complete = False
            if self.in_flight == 0 and cnt == 0:
                if not self.is_ready():
                    if self._flush() < 0:
                        continue
                    self.transition_to_ready()
                    if self.copy_mode != "background":
                        self.actively_synced = True
                should_complete = self.should_complete or self.cancel_requested()
                cnt = self.bitmap.count()
            if cnt == 0 and should_complete:
                self.in_drain = True
                yield from self._co_drained_begin(bs)
                self._drained.append(bs)
                cnt = self.bitmap.count()
                if cnt > 0 or self._flush() < 0:
                    self._drained.remove(bs)
                    self._drained_end(bs)
                    self.in_drain = False
                    continue
                return 0
            if self.is_ready() and not should_complete:
                delay_ns = BLOCK_JOB_SLICE_TIME if self.in_flight == 0 and cnt == 0 else 0
            yield from self.sleep_ns(delay_ns)
            self.last_pause_ns = now_ns()

    def _immediate_exit(self, ret: int) -> Co:
        """mirror_run's immediate_exit: wait for what is in flight, drain the source."""
        if self.in_flight > 0:
            assert ret < 0 or self.is_cancelled()
            yield from self._wait_for_all_io()
        assert self.in_flight == 0
        if not self._drained and self.mirror_top_bs is not None:
            bs = self.source
            self.in_drain = True
            yield from self._co_drained_begin(bs)
            self._drained.append(bs)

    # -- completion -----------------------------------------------------------------------
    def _exit_common(self) -> int:
        """mirror_exit_common: pivot (if completing), drop the filter, leave the drain."""
        if self.prepared:
            return 0
        self.prepared = True
        graph = self.graph
        mtop = self.mirror_top_bs
        assert mtop is not None and self.target_blk is not None
        src = self.source
        target_bs = self.target_bs
        abort = self.ret < 0
        ret = 0
        if self.dirty_bitmap is not None:
            src.release_dirty_bitmap(self.dirty_bitmap)
            self.dirty_bitmap = None
        for bs in (src, mtop, target_bs):
            bs.refcnt += 1
        self.target_blk.unref()
        self.target_blk = None
        self._drained_begin(mtop)
        mtop.stop = True
        assert mtop.backing is not None
        graph.child_refresh_perms(mtop, mtop.backing)
        if not abort and self.backing_mode == SOURCE_BACKING_CHAIN:
            backing = src if self.is_none_mode else self.base
            unfiltered = skip_filters(target_bs)
            assert unfiltered is not None
            cow = unfiltered.cow_child()
            if (cow.bs if cow is not None else None) is not backing:
                try:
                    graph.set_backing_hd(unfiltered, backing)
                except GenericError as e:
                    log.error("%s", e.desc)
                    ret = -errno.EPERM
        elif not abort and self.backing_mode == OPEN_BACKING_CHAIN:
            assert backing_chain_next(target_bs) is None
            unfiltered = skip_filters(target_bs)
            assert unfiltered is not None
            try:
                _open_backing_file(self.layer, unfiltered)
            except GenericError as e:
                log.error("%s", e.desc)
        if self.should_complete and not abort:
            to_replace = self.to_replace or src
            if to_replace.read_only and not target_bs.read_only:
                self.layer.reopen_read_only(target_bs)
            self._drained_begin(target_bs)
            err: str | None = None
            if recurse_can_replace(src, to_replace):
                try:
                    graph.replace_node(to_replace, target_bs)
                except GenericError as e:
                    err = e.desc
            else:
                err = (f"Can no longer replace '{to_replace.node_name}' by "
                       f"'{target_bs.node_name}', because it can no longer be guaranteed "
                       "that doing so would not lead to an abrupt change of visible data")
            self._drained_end(target_bs)
            if err is not None:
                log.error("%s", err)
                ret = -errno.EPERM
        if self.to_replace is not None:
            assert self.replace_blocker is not None
            graph.op_unblock_all(self.to_replace, self.replace_blocker)
            graph.unref(self.to_replace)
            self.to_replace = None
        graph.unref(target_bs)
        self.remove_all_bdrv()
        assert mtop.backing is not None and mtop.backing.bs is not None
        graph.replace_node(mtop, mtop.backing.bs)
        mtop.job = None
        for bs in self._drained:
            self._drained_end(bs)
        self._drained.clear()
        self._drained_end(mtop)
        self.in_drain = False
        graph.unref(mtop)
        graph.unref(src)
        return ret

    def prepare(self) -> int:
        return self._exit_common()

    def abort(self) -> None:
        ret = self._exit_common()
        assert ret == 0

    # -- verbs ----------------------------------------------------------------------------
    def driver_complete(self) -> None:
        """mirror_complete: block the node to replace, then let the loop finish."""
        if not self.is_ready():
            raise GenericError(f"The active block job '{self.id}' cannot be completed")
        if self.replaces is not None:
            to_replace = self.graph.find_node(self.replaces)
            if to_replace is None:
                raise GenericError(f"Node name '{self.replaces}' not found")
            from emulator.block.node import OpBlocker
            self.replace_blocker = OpBlocker("block device is in use by block-job-complete")
            self.graph.op_block_all(to_replace, self.replace_blocker)
            to_replace.refcnt += 1
            self.to_replace = to_replace
        self.should_complete = True
        if not self.paused:
            self.enter_cond()

    def driver_cancel(self, force: bool) -> bool:
        """mirror_cancel: before READY every cancel is a forced one."""
        return force or not self.is_ready()

    # -- write-blocking mode (the filter calls these for guest writes) --------------------
    def copies_guest_writes(self) -> bool:
        return (self.op_ret >= 0 and not self.is_cancelled()
                and self.copy_mode == "write-blocking")

    def active_write_prepare(self, offset: int, nbytes: int) -> MirrorOp:
        """active_write_prepare: the guest request waits until no background copy of the
        range is in flight (the emulator completes those copies first)."""
        op = MirrorOp(offset, nbytes, is_active_write=True, is_in_flight=True)
        self.ops_in_flight.append(op)
        self.in_active_write_counter += 1
        mine = self._chunks(offset, nbytes)
        for _ in range(10000):
            if not any(c in self.in_flight_bitmap for c in mine) or not self._io_pending:
                break
            self._io_pending[0].run_now()
        self.in_flight_bitmap.update(mine)
        return op

    def sync_target_write(self, method: str, offset: int, nbytes: int, data: bytes | None,
                          flags: int) -> None:
        """do_sync_target_write: the guest's write goes to the target as well."""
        g = self.granularity
        qiov_offset = 0
        if offset % g and self.bitmap.get(offset):
            qiov_offset = -(-offset // g) * g - offset
            if nbytes <= qiov_offset:
                return
            offset += qiov_offset
            nbytes -= qiov_offset
        if (offset + nbytes) % g and self.bitmap.get(offset + nbytes - 1):
            tail = (offset + nbytes) % g
            if nbytes <= tail:
                return
            nbytes -= tail
        start, end = -(-offset // g) * g, (offset + nbytes) // g * g
        if start < end:
            self.bitmap.reset_dirty(start, end - start)
        self.progress.increase_remaining(nbytes)
        self.active_write_bytes_in_flight += nbytes
        if method == METHOD_COPY:
            assert data is not None
            chunk = data[qiov_offset:qiov_offset + nbytes]
            ret = self._target_io(lambda blk: blk.pwrite(offset, chunk, flags))
        elif method == METHOD_ZERO:
            ret = self._target_io(lambda blk: blk.pwrite_zeroes(offset, nbytes, flags))
        else:
            ret = self._target_io(lambda blk: blk.pdiscard(offset, nbytes))
        self.active_write_bytes_in_flight -= nbytes
        if ret >= 0:
            self.progress.work_done(nbytes)
            return
        start, end = offset // g * g, -(-(offset + nbytes) // g) * g
        self.bitmap.set_dirty(start, end - start)
        self.actively_synced = False
        if self.mirror_error_action(False, -ret) == "report" and not self.op_ret:
            self.op_ret = ret

    def active_write_settle(self, op: MirrorOp) -> None:
        """active_write_settle."""
        self.in_active_write_counter -= 1
        self.in_flight_bitmap.difference_update(self._chunks(op.offset, op.bytes))
        self.ops_in_flight.remove(op)
        self._restart_all(op)


def _status_yields(bs: BlockDriverState) -> bool:
    """The first block status of a qcow2 node over a file reads its refcounts
    (qcow2_detect_metadata_preallocation), which goes to the thread pool."""
    top = skip_filters(bs)
    return top is not None and top.format_name == "qcow2" and io_yields(top)


def _open_backing_file(layer: Any, bs: BlockDriverState) -> None:
    """bdrv_open_backing_file(bs, NULL, "backing"): the backing file its header names."""
    from emulator.block.open import Opener
    Opener(layer)._open_backing(bs, {"cache": {"direct": bs.cache_direct,
                                               "no-flush": bs.no_flush}})


# -- creation -------------------------------------------------------------------------------
def _drop_filter(layer: Any, mtop: MirrorTopNode) -> None:
    """mirror_start_job's failure path for the filter: stop, step aside, unref."""
    graph = layer.graph
    mtop.stop = True
    if mtop.backing is not None and mtop.backing.bs is not None:
        graph.child_refresh_perms(mtop, mtop.backing)
        graph.replace_node(mtop, mtop.backing.bs)
    graph.unref(mtop)


def mirror_start_job(manager: JobManager, layer: Any, job_id: str | None,
                     bs: BlockDriverState, target: BlockDriverState, *,
                     replaces: str | None = None, speed: int = 0, granularity: int = 0,
                     buf_size: int = 0, backing_mode: str = LEAVE_BACKING_CHAIN,
                     zero_target: bool = False, on_source_error: str = "report",
                     on_target_error: str = "report", unmap: bool = True,
                     is_none_mode: bool = False, base: BlockDriverState | None = None,
                     filter_node_name: str | None = None, copy_mode: str = "background",
                     manual_finalize: bool = False, manual_dismiss: bool = False,
                     txn: JobTxn | None = None) -> MirrorJob:
    """mirror_start_job: QEMU's checks and graph changes in QEMU's order, undone on failure."""
    graph = layer.graph
    if granularity == 0:
        granularity = target.default_bitmap_granularity()
    assert granularity & (granularity - 1) == 0
    if buf_size < 0:
        raise GenericError("Invalid parameter 'buf-size'")
    if buf_size == 0:
        buf_size = DEFAULT_MIRROR_BUF_SIZE
    if skip_filters(bs) is skip_filters(target):
        raise GenericError("Can't mirror node into itself")
    target_is_backing = chain_contains(bs, target)
    mtop = new_mirror_top(layer, bs, filter_node_name)
    mtop.is_commit = target_is_backing
    manager.drained_begin(bs)
    try:
        graph.append(mtop, bs)
    except GenericError:
        manager.drained_end(bs)
        graph.unref(mtop)
        raise
    manager.drained_end(bs)
    mtop.refresh_limits()
    try:
        job = MirrorJob.create(manager, job_id, txn, mtop, P.CONSISTENT_READ,
                               P.CONSISTENT_READ | P.WRITE_UNCHANGED | P.WRITE, speed,
                               manual_finalize=manual_finalize,
                               manual_dismiss=manual_dismiss, layer=layer)
    except GenericError:
        _drop_filter(layer, mtop)
        raise
    assert isinstance(job, MirrorJob)
    mtop.job = job
    graph.unref(mtop)    # the job's "main node" edge holds it now
    job.mirror_top_bs = mtop
    try:
        _setup(job, bs, target, target_is_backing, replaces=replaces,
               on_source_error=on_source_error, on_target_error=on_target_error,
               is_none_mode=is_none_mode, backing_mode=backing_mode,
               zero_target=zero_target, copy_mode=copy_mode, base=base,
               granularity=granularity, buf_size=buf_size, unmap=unmap)
    except GenericError:
        mtop.refcnt += 1
        if job.target_blk is not None:
            job.target_blk.unref()
            job.target_blk = None
        mtop.job = None
        if job.dirty_bitmap is not None:
            bs.release_dirty_bitmap(job.dirty_bitmap)
            job.dirty_bitmap = None
        job.early_fail()
        _drop_filter(layer, mtop)
        raise
    job.start()
    return job


def _setup(job: MirrorJob, bs: BlockDriverState, target: BlockDriverState,
           target_is_backing: bool, *, replaces: str | None, on_source_error: str,
           on_target_error: str, is_none_mode: bool, backing_mode: str, zero_target: bool,
           copy_mode: str, base: BlockDriverState | None, granularity: int, buf_size: int,
           unmap: bool) -> None:
    """The part of mirror_start_job after block_job_create: target BlockBackend, fields,
    dirty bitmap, the job's "source" and "target" edges (and commit's intermediate ones)."""
    target_perms = P.WRITE
    target_shared = P.WRITE_UNCHANGED
    if target_is_backing:
        if target.getlength() < bs.getlength():
            target_perms |= P.RESIZE
        target_shared |= P.CONSISTENT_READ | P.WRITE
    elif chain_contains(bs, skip_filters(target)):
        raise GenericError("Cannot mirror to a filter on top of a node in the source's "
                           "backing chain")
    blk = BlockBackend(job.graph, perm=target_perms, shared_perm=target_shared)
    blk.insert_bs(target)
    job.target_blk = blk
    job.replaces = replaces
    job.on_source_error = on_source_error
    job.on_target_error = on_target_error
    job.is_none_mode = is_none_mode
    job.backing_mode = backing_mode
    job.zero_target = zero_target
    job.copy_mode = copy_mode
    job.base = base
    job.base_overlay = find_overlay(bs, base)
    job.granularity = granularity
    job.buf_size = -(-buf_size // granularity) * granularity
    job.unmap = unmap
    job.dirty_bitmap = bs.create_dirty_bitmap(granularity, None)
    if copy_mode == "write-blocking":
        job.dirty_bitmap.disabled = True
    job.add_bdrv("source", bs, 0, P.WRITE_UNCHANGED | P.WRITE | P.CONSISTENT_READ)
    job.add_bdrv("target", target, 0, P.ALL)
    if target_is_backing:
        shared = P.WRITE_UNCHANGED | P.WRITE
        overlay = find_overlay(bs, target)
        cow = overlay.cow_child() if overlay is not None else None
        filtered_target = cow.bs if cow is not None else None
        it = bs.filter_or_cow_bs()
        while it is not None and it is not target:
            if it is filtered_target:
                shared |= P.CONSISTENT_READ
            job.add_bdrv("intermediate node", it, 0, shared)
            it = it.filter_or_cow_bs()


def mirror_start(manager: JobManager, layer: Any, job_id: str | None, bs: BlockDriverState,
                 target: BlockDriverState, *, sync: str, **kw: Any) -> MirrorJob:
    """mirror_start: sync mode → none-mode and base, then mirror_start_job."""
    if sync in ("incremental", "bitmap"):
        raise GenericError(f"Sync mode '{sync}' not supported")
    base = backing_chain_next(bs) if sync == "top" else None
    return mirror_start_job(manager, layer, job_id, bs, target, is_none_mode=sync == "none",
                            base=base, **kw)
