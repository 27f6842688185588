"""mirror_top: the filter a mirror job puts above its source (block/mirror.c, QEMU 7.2).

QEMU opens it with bdrv_new_open_driver (it is not a BlockdevDriver, so it is not
registered here either) and bdrv_append()s it above the source: its only child is the
source as "backing" (filtered_child_is_backing). Reads and writes pass through, so guest
writes reach the source and mark the job's dirty bitmap there; in write-blocking copy mode
the job also copies each write to the target before the write completes. Its length is fixed
at creation (total_sectors copied from the source); it answers no block status of its own
(everything reads as data) and forwards bdrv_get_info, so queries show the source's cluster
size. Once the job stops (``stop``), it asks nothing of the source any more.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from emulator.block import perm as P
from emulator.block.drivers.source_filter import SourceFilter
from emulator.block.node import BdrvChild, BlockDriverState

# MirrorMethod
METHOD_COPY = "copy"
METHOD_ZERO = "zero"
METHOD_DISCARD = "discard"


class ActiveMirror(Protocol):
    """What the filter needs of its job for write-blocking mode (mirror.c's active writes)."""

    def copies_guest_writes(self) -> bool: ...

    def active_write_prepare(self, offset: int, length: int) -> Any: ...

    def sync_target_write(self, method: str, offset: int, length: int,
                          data: bytes | None, flags: int) -> None: ...

    def active_write_settle(self, op: Any) -> None: ...


class MirrorTopNode(SourceFilter):
    """bdrv_mirror_top, with MirrorBDSOpaque's fields (job, stop, is_commit)."""

    format_name: ClassVar[str] = "mirror_top"
    filtered_child_is_backing: ClassVar[bool] = True

    def __init__(self, graph: Any) -> None:
        super().__init__(graph)
        self.job: ActiveMirror | None = None
        self.stop = False
        self.is_commit = False
        self.total_length = 0

    # -- permissions ----------------------------------------------------------------------
    def child_perm(self, child: BdrvChild | None, role: int, perm: int,
                   shared: int) -> tuple[int, int]:
        """bdrv_mirror_top_child_perm."""
        if self.stop:
            return 0, P.ALL
        nperm, nshared = super().child_perm(child, role, perm, shared)
        if self.is_commit:
            nperm &= ~P.CONSISTENT_READ
            nshared |= P.WRITE
        return nperm, nshared

    # -- I/O ------------------------------------------------------------------------------
    def drv_getlength(self) -> int:
        return self.total_length

    def _do_write(self, method: str, offset: int, length: int, data: bytes | None,
                  flags: int) -> None:
        """bdrv_mirror_top_do_write: the source first; in write-blocking mode the target
        too, with the range held against background copies meanwhile."""
        job = self.job
        copy_to_target = job is not None and job.copies_guest_writes()
        op = job.active_write_prepare(offset, length) if job and copy_to_target else None
        try:
            backing = self._source()
            if method == METHOD_COPY:
                assert data is not None
                backing.pwrite(offset, data, flags)
            elif method == METHOD_ZERO:
                backing.pwrite_zeroes(offset, length, flags)
            else:
                backing.pdiscard(offset, length)
            if job is not None and copy_to_target:
                job.sync_target_write(method, offset, length, data, flags)
        finally:
            if job is not None and copy_to_target:
                job.active_write_settle(op)

    def drv_pwritev(self, offset: int, data: bytes, flags: int) -> None:
        self._do_write(METHOD_COPY, offset, len(data), bytes(data), flags)

    def drv_pwrite_zeroes(self, offset: int, length: int, flags: int) -> None:
        self._do_write(METHOD_ZERO, offset, length, None, flags)

    def drv_pdiscard(self, offset: int, length: int) -> None:
        self._do_write(METHOD_DISCARD, offset, length, None, 0)


def new_mirror_top(layer: Any, source: BlockDriverState,
                   node_name: str | None) -> MirrorTopNode:
    """bdrv_new_open_driver(&bdrv_mirror_top, filter_node_name, BDRV_O_RDWR): a named,
    opened node without children; implicit unless the user named it. Raises the node-name
    errors of bdrv_assign_node_name unprefixed."""
    graph = layer.graph
    bs = MirrorTopNode(graph)
    graph.assign_node_name(bs, node_name)
    graph.all_nodes.append(bs)
    bs.opened = True
    bs.implicit = node_name is None
    bs.total_length = source.getlength()
    return bs
