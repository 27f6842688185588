"""Mirror's operations (block/mirror.c, QEMU 7.2): the state of a MirrorBlockJob and the
coroutines that copy, zero or discard one range each.

Each operation is a coroutine of its own, as in QEMU: it takes buffers, reads, yields until
the read "completes", writes, yields again and ends (mirror_iteration_done). I/O on a
file-backed node completes from the event loop (file-posix's thread pool); other I/O (null-co)
without yielding. The emulator performs the I/O itself when it is submitted; the completions
of one round come newest first, as thread_pool_completion_bh takes them. Coroutines woken
from a coroutine run when that one yields (aio_co_wake's queueing, :meth:`MirrorOps._wake`);
a coroutine waiting for an operation keeps the job busy (qemu_co_queue_wait). Guest writes in
write-blocking mode are copied here too.
"""

from __future__ import annotations

import contextlib
import errno
import functools
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from emulator.block import waits
from emulator.block.backend import BlockBackend
from emulator.block.dirty_bitmap import BdrvDirtyBitmap
from emulator.block.drivers.mirror_top import METHOD_COPY, METHOD_ZERO, MirrorTopNode
from emulator.block.node import BDRV_REQ_MAY_UNMAP, BlockDriverState
from emulator.jobs.blockjob import BlockJob
from emulator.jobs.job import Co, Job
from emulator.jobs.mirror_graph import io_yields, round_to_clusters

if TYPE_CHECKING:
    from emulator.jobs.manager import Scheduled

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


def neg_errno(e: OSError) -> int:
    """-errno of a failed request (EIO when the OSError carries none)."""
    return -(e.errno or errno.EIO)


class MirrorOps(BlockJob):
    """struct MirrorBlockJob: its fields, its operations and their coroutines."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
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
        self._pool_done: list[Resume] = []        # thread-pool requests done, oldest first
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
        """Wait for the completion of I/O just submitted on bs (see the module docstring):
        from a bottom half if blkdebug failed it before it reached the thread pool."""
        if waits.take() == waits.BH:
            self._defer(functools.partial(self._co_run, resume), bottom_half=True)
            yield
            return
        if not io_yields(bs):
            return
        self._pool_done.append(resume)
        if len(self._pool_done) == 1:
            self._defer(self._pool_completion_bh)
        yield

    def _pool_completion_bh(self) -> None:
        """thread_pool_completion_bh: the requests done by now, newest first (the pool's
        list takes each new request at its head); what their coroutines submit meanwhile
        completes in a later round."""
        done, self._pool_done = self._pool_done, []
        for resume in reversed(done):
            self._co_run(resume)

    def _defer(self, fn: Resume, bottom_half: bool = False) -> None:
        """Run fn from the event loop (a thread-pool completion, a bottom half); poll()
        runs it at once when the job must finish synchronously (cancel at quit)."""

        def run() -> None:
            if handle in self._io_pending:
                self._io_pending.remove(handle)
            fn()

        handle = (self.manager.bh if bottom_half else self.manager.call_soon)(run)
        self._io_pending.append(handle)

    def driver_drained_poll(self) -> bool:
        """mirror_drained_poll: running, not cancelled and not in one of its own drained
        sections, the job may still issue requests; otherwise what is in flight counts."""
        if not self.paused and not self.is_cancelled() and not self.in_drain:
            return True
        return bool(self.in_flight)

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

    def _io_complete(self, op: MirrorOp, ret: int, is_read: bool) -> None:
        """mirror_read_complete's and mirror_write_complete's error path (the range is
        dirty again; a "report" error becomes the job's), then the iteration ends."""
        if ret < 0:
            self.bitmap.set_dirty(op.offset, op.bytes)
            action = self.mirror_error_action(is_read, -ret)
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
            waits.take()
            data = self.mirror_top_bs.backing.pread(op.offset, op.bytes)
            ret = 0
        except OSError as e:
            ret = neg_errno(e)
        yield from self._io_wait(self.source, resume)
        if ret < 0:   # mirror_read_complete
            self._io_complete(op, ret, True)
            return
        ret = self._target_io(lambda blk: blk.pwrite(op.offset, data))
        yield from self._io_wait(self.target_blk.bs if self.target_blk else None, resume)
        self._io_complete(op, ret, False)   # mirror_write_complete

    def _target_io(self, fn: Callable[[BlockBackend], None]) -> int:
        waits.take()
        try:
            assert self.target_blk is not None
            fn(self.target_blk)
        except OSError as e:
            return neg_errno(e)
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
        self._io_complete(op, ret, False)   # mirror_write_complete

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

    def _wait_for_all_io(self) -> Co:
        """mirror_wait_for_all_io (also the .pause hook)."""
        while self.in_flight > 0:
            yield from self._wait_for_free_in_flight_slot(self._resume_job)

    def driver_pause(self) -> Co:
        """mirror_pause."""
        yield from self._wait_for_all_io()

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
