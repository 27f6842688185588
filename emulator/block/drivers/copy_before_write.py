"""copy-before-write: the filter a backup job puts above its source (block/copy-before-write.c).

Guest writes (and zero writes, discards) through the filter first copy the old data of the
touched clusters to the target with block-copy, mark them in the filter's done-bitmap — even
when nothing was left to copy — and then pass through. Reads pass straight through.
The filter owns the BlockCopyState; its copy bitmap lives on the source node, its done- and
access-bitmaps on the filter (7.2). Once the filter has a parent it unshares WRITE and RESIZE
on its source (cbw_child_perm), which is how a backup conflicts with other writers (283).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from emulator.block.drivers import register
from emulator.block.drivers.source_filter import SourceFilter
from emulator.block.errors import GenericError
from emulator.block.node import BDRV_REQ_WRITE_UNCHANGED, BdrvChild, BlockDriverState
from emulator.block.perm import ALL, CONSISTENT_READ, RESIZE, WRITE, Role
from emulator.jobs.block_copy import BlockCopyState


@register
class CopyBeforeWriteNode(SourceFilter):
    fua_support: ClassVar[str | None] = "file"
    format_name: ClassVar[str] = "copy-before-write"

    bcs: BlockCopyState | None = None
    target: BdrvChild | None = None

    def drv_open(self, options: dict[str, Any], open_child: Any) -> None:
        """cbw_open: its options parsed as BlockdevOptionsCbw (a json:{...} name may lack
        a child), then file, target, the optional bitmap, block-copy state, two bitmaps."""
        for member in ("file", "target"):
            if member not in options:
                raise GenericError(f"Parameter '{member}' is missing")
        open_child(options.get("file"), "file", Role.FILTERED | Role.PRIMARY)
        self.target = open_child(options.get("target"), "target", Role.DATA)
        bitmap = None
        if "bitmap" in options:
            from emulator.commands.bitmap import bitmap_lookup
            ref = options["bitmap"]
            bitmap, _ = bitmap_lookup(open_child.layer, ref["node"], ref["name"])
        self.on_cbw_error = options.get("on-cbw-error", "break-guest-write")
        self.cbw_timeout_ns = int(options.get("cbw-timeout", 0)) * 1_000_000_000
        self.snapshot_error = 0
        assert self.file is not None and self.file.bs is not None
        self.length = self.file.bs.getlength()
        try:
            self.bcs = BlockCopyState(self.file, self.target, bitmap)
        except GenericError as e:
            raise e.prepend("Cannot create block-copy-state: ") from None
        cluster = self.bcs.cluster_size
        self.done_bitmap = self.create_dirty_bitmap(cluster, None)
        self.done_bitmap.disabled = True
        self.access_bitmap = self.create_dirty_bitmap(cluster, None)
        self.access_bitmap.disabled = True
        self.access_bitmap.merge_internal(self.bcs.copy_bitmap)

    # -- permissions ------------------------------------------------------------------------
    def child_perm(self, child: BdrvChild | None, role: int, perm: int,
                   shared: int) -> tuple[int, int]:
        """cbw_child_perm: the target is written; the source is no longer written by
        anyone else once the filter has parents."""
        if not role & Role.FILTERED:
            return WRITE, ALL & ~RESIZE
        nperm, nshared = super().child_perm(child, role, perm, shared)
        if self.parents:
            if perm & WRITE:
                nperm |= CONSISTENT_READ
            nshared &= ~(WRITE | RESIZE)
        return nperm, nshared

    # -- I/O --------------------------------------------------------------------------------
    def drv_getlength(self) -> int:
        if self.file is not None and self.file.bs is not None:
            return self.file.bs.getlength()
        return self.length

    def _copy_before_write(self, offset: int, length: int, flags: int) -> None:
        """cbw_do_copy_before_write."""
        if flags & BDRV_REQ_WRITE_UNCHANGED or self.snapshot_error or self.bcs is None:
            return
        cluster = self.bcs.cluster_size
        off = offset // cluster * cluster
        end = -(-(offset + length) // cluster) * cluster
        ret = self.bcs.block_copy(off, end - off, ignore_ratelimit=True)
        if ret < 0 and self.on_cbw_error == "break-guest-write":
            raise OSError(-ret, os.strerror(-ret))
        if ret < 0:
            self.snapshot_error = self.snapshot_error or ret
        else:
            self.done_bitmap.set_dirty(off, end - off)

    def drv_pwritev(self, offset: int, data: bytes, flags: int) -> None:
        self._copy_before_write(offset, len(data), flags)
        self._source().pwrite(offset, data, flags)

    def drv_pwrite_zeroes(self, offset: int, length: int, flags: int) -> None:
        self._copy_before_write(offset, length, flags)
        self._source().pwrite_zeroes(offset, length, flags)

    def drv_pdiscard(self, offset: int, length: int) -> None:
        self._copy_before_write(offset, length, 0)
        self._source().pdiscard(offset, length)

    def drv_close(self) -> None:
        """cbw_close: the filter's bitmaps and the block-copy state go."""
        for bm in (getattr(self, "access_bitmap", None), getattr(self, "done_bitmap", None)):
            if bm is not None and bm in self.dirty_bitmaps:
                self.release_dirty_bitmap(bm)
        if self.bcs is not None:
            self.bcs.free()
            self.bcs = None


def cbw_append(layer: Any, source: BlockDriverState, target: BlockDriverState,
               filter_node_name: str | None) -> CopyBeforeWriteNode:
    """bdrv_cbw_append = bdrv_insert_node: open the filter over source (with target) and
    put it in source's place for all of source's parents. The caller owns one reference."""
    opts: dict[str, Any] = {"driver": "copy-before-write"}
    if filter_node_name is not None:
        opts["node-name"] = filter_node_name
    opts["file"] = source.node_name
    opts["target"] = target.node_name
    try:
        top = layer.open_node(opts)
    except GenericError as e:
        raise e.prepend("Could not create node: ") from None
    try:
        layer.graph.replace_node(source, top)
    except GenericError as e:
        layer.graph.unref(top)
        raise e.prepend("Could not replace node: ") from None
    assert isinstance(top, CopyBeforeWriteNode)
    return top


def cbw_drop(layer: Any, cbw: CopyBeforeWriteNode) -> None:
    """bdrv_cbw_drop: the source takes the filter's place again (its file edge goes in the
    same step, bdrv_drop_filter's detach_subchain), then the filter is unreferenced."""
    graph = layer.graph
    child = cbw.file
    source = child.bs if child is not None else None
    if source is not None:
        graph.replace_node(cbw, source)
        assert child is not None
        graph.detach_child(child)
    graph.unref(cbw)
