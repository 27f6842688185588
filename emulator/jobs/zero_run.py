"""Deferred zero writes of block-copy: a run of write-zeroes tasks issued as one request.

A backup of a mostly empty disk is a long run of write-zeroes tasks, one per chunk, each a
full trip through the request layer and qcow2. When nothing can tell the requests apart, the
tasks keep their bookkeeping (copy bitmap, progress) but their writes are merged and issued
when the run ends. That is exact when

- every node below the target is a plain driver (``plain_io``: no blkdebug counting requests
  or events), so the target's data, metadata layout and dirty bitmaps come out the same (zero
  writes are per cluster and idempotent; a merged request allocates L2 tables in the same
  ascending order);
- the source's subtree shares no node and no host file with the target's, so the block
  status the next tasks ask of the source is what it would have been;

and the run is issued before any other task's I/O, before the job can give up the CPU (pause
point, rate-limit sleep) and when the call ends: the requests reach the target in the same
order and nobody else can look in between. A host I/O error (plain drivers fail only that
way) fails the merged run as one task.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from emulator.block import waits
from emulator.block.subtree import subtree

if TYPE_CHECKING:
    from emulator.block.node import BlockDriverState
    from emulator.jobs.block_copy import BlockCopyState, BlockCopyTask


def can_merge_writes(source: BlockDriverState, target: BlockDriverState) -> bool:
    """Are requests to ``target`` unobservable one by one, and independent of ``source``?"""
    targets = subtree(target)
    if not all(bs.plain_io for bs in targets):
        return False
    sources = subtree(source)
    if any(bs in targets for bs in sources):
        return False
    paths = {getattr(bs, "host_path", None) for bs in targets} - {None}
    return not any(getattr(bs, "host_path", None) in paths for bs in sources)


class ZeroRun:
    """The write-zeroes tasks of one block-copy call whose writes are still to be issued."""

    def __init__(self, bcs: BlockCopyState) -> None:
        self.bcs = bcs
        self.ranges: list[list[int]] = []   # [start, end) of adjacent deferred tasks
        self.hook_yielded = False   # did the last before_yield() give up the CPU?

    def defer(self, task: BlockCopyTask) -> bool:
        """Take a write-zeroes task whose write may wait (its bookkeeping is done now, as
        for a task that succeeded); False when its write must be issued at once."""
        bcs = self.bcs
        if bcs.waits_matter() and waits.pending() is None:
            return False   # its write may be the first to wait: where it waits is seen
        if not self.ranges:
            assert bcs.source.bs is not None and bcs.target.bs is not None
            if not can_merge_writes(bcs.source.bs, bcs.target.bs):
                return False
        self.add(task.offset, task.end)
        bcs.task_done(task, 0)
        return True

    def add(self, start: int, end: int) -> None:
        """Defer the write of [start, end) (the caller did the tasks' bookkeeping)."""
        if self.ranges and self.ranges[-1][1] == start:
            self.ranges[-1][1] = end
        else:
            self.ranges.append([start, end])

    def issue(self) -> int:
        """Write the deferred runs; 0, or the first error (its run is dirty again and its
        progress taken back, like a failed task)."""
        ranges, self.ranges = self.ranges, []
        first_error = 0
        for start, end in ranges:
            ret, _, _ = self.bcs.do_copy(start, end - start, "write-zeroes")
            if ret < 0:
                self.bcs.undo_done(start, end - start)
                first_error = first_error or ret
        return first_error

    def before_yield(self, hook: Callable[[], Generator[None, None, Any]],
                     on_error: Callable[[int], None]) -> Generator[None, None, Any]:
        """Run ``hook()`` (a pause point); if it is about to give up the CPU, the deferred
        writes are issued first."""
        it = hook()
        try:
            value = next(it)
        except StopIteration as stop:
            self.hook_yielded = False
            return stop.value
        self.hook_yielded = True
        if self.ranges:
            ret = self.issue()
            if ret < 0:
                on_error(ret)
        while True:
            sent = yield value
            try:
                value = it.send(sent)
            except StopIteration as stop:
                return stop.value
