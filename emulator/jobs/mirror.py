"""The mirror job (block/mirror.c, QEMU 7.2): mirror_run, READY, completion and pivot.

The job (created by emulator.jobs.mirror_start) has a mirror_top filter above the source and
tracks what is still to copy in an anonymous dirty bitmap on the source, which guest writes
keep marking. Its loop copies the next dirty run in chunks of ``granularity`` (at most
``buf-size`` per iteration, at most MAX_IN_FLIGHT operations and ``buf-size`` bytes in
flight, see emulator.jobs.mirror_ops), rate-limited by the block job's speed; once the bitmap
is clean and nothing is in flight it flushes the target and becomes READY, then idles (100 ms
sleeps) until job-complete (pivot: the target replaces the source) or a cancel (in READY a
soft cancel completes without pivot).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Generator
from typing import Any

from emulator.block import io as blockio
from emulator.block import waits
from emulator.block.drivers.mirror_top import METHOD_COPY, METHOD_DISCARD, METHOD_ZERO
from emulator.block.errors import GenericError
from emulator.block.node import BDRV_BLOCK_DATA, BDRV_BLOCK_ZERO, BlockDriverState
from emulator.jobs.blockjob import BLOCK_JOB_SLICE_TIME
from emulator.jobs.job import Co
from emulator.jobs.mirror_graph import (
    backing_chain_next,
    can_write_zeroes_with_unmap,
    recurse_can_replace,
    round_to_clusters,
    skip_filters,
)
from emulator.jobs.mirror_ops import (
    BDRV_SECTOR_SIZE,
    INT_MAX,
    LEAVE_BACKING_CHAIN,
    MAX_IN_FLIGHT,
    MAX_IO_BYTES,
    OPEN_BACKING_CHAIN,
    SOURCE_BACKING_CHAIN,
    MirrorOp,
    MirrorOps,
    neg_errno,
)
from emulator.jobs.ratelimit import now_ns

__all__ = ["LEAVE_BACKING_CHAIN", "OPEN_BACKING_CHAIN", "SOURCE_BACKING_CHAIN", "MirrorJob"]

log = logging.getLogger("emulator.mirror")


class MirrorJob(MirrorOps):
    """mirror_job_driver: run, prepare, abort, pause, complete, cancel."""

    job_type = "mirror"
    has_complete = True

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
        offset = 0
        while offset < self.bdev_length:
            nbytes = min(self.bdev_length - offset, INT_MAX // self.granularity
                         * self.granularity)
            yield from self._throttle()
            if self.is_cancelled():
                return 0
            waits.take()
            try:
                allocated, count = bs.is_allocated_above(self.base_overlay, offset, nbytes,
                                                         include_base=True)
            except OSError as e:
                yield from self.wait_for_io()
                return neg_errno(e)
            # the first block status of a qcow2 node over a file reads refcounts (metadata
            # preallocation check): the scan's first wait lets the command reply
            yield from self.wait_for_io()
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
            return neg_errno(e)
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
            except GenericError as e:   # the job fails ("Invalid argument"), pivot or not
                log.error("%s", e.desc)
                ret = -errno.EINVAL
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


def _open_backing_file(layer: Any, bs: BlockDriverState) -> None:
    """bdrv_open_backing_file(bs, NULL, "backing"): the backing file its header names."""
    from emulator.block.open import Opener
    Opener(layer)._open_backing(bs, {"cache": {"direct": bs.cache_direct,
                                               "no-flush": bs.no_flush}})
