"""Dirty bitmap commands (block/monitor/bitmap-qmp-cmds.c, blockdev.c).

The helpers (:func:`bitmap_add`, :func:`bitmap_lookup`, :func:`bitmap_remove`,
:func:`bitmap_merge`) are what the transaction actions and the backup job reuse; each
performs QEMU's checks in QEMU's order with QEMU's texts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emulator.block.dirty_bitmap import (
    BDRV_BITMAP_ALLOW_RO,
    BDRV_BITMAP_BUSY,
    BDRV_BITMAP_DEFAULT,
    BDRV_BITMAP_RO,
    BdrvDirtyBitmap,
    HBitmap,
)
from emulator.block.errors import GenericError
from emulator.qmp import schema
from emulator.qmp.registry import command

if TYPE_CHECKING:
    from emulator.block.layer import BlockLayer
    from emulator.block.node import BlockDriverState
    from emulator.machine import Machine

schema.struct("BlockDirtyBitmap", {"node": "str", "name": "str"})
schema.struct("BlockDirtyBitmapAdd", {"node": "str", "name": "str", "*granularity": "uint32",
                                      "*persistent": "bool", "*disabled": "bool"})
schema.alternate("BlockDirtyBitmapOrStr", {"local": "str", "external": "BlockDirtyBitmap"})
schema.struct("BlockDirtyBitmapMerge", {"node": "str", "target": "str",
                                        "bitmaps": ["BlockDirtyBitmapOrStr"]})


# -- the shared implementation -------------------------------------------------------------
def bitmap_add(block: BlockLayer, node: str, name: str, granularity: int | None = None,
               persistent: bool | None = None, disabled: bool | None = None) -> BdrvDirtyBitmap:
    """qmp_block_dirty_bitmap_add."""
    if not name:
        raise GenericError("Bitmap name cannot be empty")
    bs = block.lookup_bs(node, node)
    if granularity is not None:
        if granularity < 512 or granularity & (granularity - 1):
            raise GenericError("Granularity must be power of 2 and at least 512")
    else:
        granularity = bs.default_bitmap_granularity()
    if persistent:
        bs.can_store_new_dirty_bitmap(name, granularity)
    bm = bs.create_dirty_bitmap(granularity, name)
    if disabled:
        bm.disabled = True
    bm.persistent = bool(persistent)
    return bm


def bitmap_lookup(block: BlockLayer, node: str,
                  name: str) -> tuple[BdrvDirtyBitmap, BlockDriverState]:
    """block_dirty_bitmap_lookup: "Node '%s' not found" / "Dirty bitmap '%s' not found"."""
    try:
        bs = block.lookup_bs(node, node)
    except GenericError:
        raise GenericError(f"Node '{node}' not found") from None
    bm = bs.find_dirty_bitmap(name)
    if bm is None:
        raise GenericError(f"Dirty bitmap '{name}' not found")
    return bm, bs


def bitmap_remove(block: BlockLayer, node: str, name: str, *, release: bool) -> BdrvDirtyBitmap:
    """block_dirty_bitmap_remove: checks busy/readonly, drops the stored copy, releases."""
    bm, bs = bitmap_lookup(block, node, name)
    bm.check(BDRV_BITMAP_BUSY | BDRV_BITMAP_RO)
    if bm.get_persistence():
        bs.remove_persistent_dirty_bitmap(name)
    if release:
        bs.release_dirty_bitmap(bm)
    return bm


def bitmap_merge(block: BlockLayer, node: str, target: str, bitmaps: list[Any], *,
                 keep_backup: bool = False) -> tuple[BdrvDirtyBitmap, HBitmap | None]:
    """block_dirty_bitmap_merge: sources are names on ``node`` or {node, name}; the target
    is restored if any source fails. Returns the target and (if asked) its old bits."""
    dst, bs = bitmap_lookup(block, node, target)
    backup: HBitmap | None = None
    try:
        for src_ref in bitmaps:
            if isinstance(src_ref, str):
                src = bs.find_dirty_bitmap(src_ref)
                if src is None:
                    raise GenericError(f"Dirty bitmap '{src_ref}' not found")
            else:
                src, _ = bitmap_lookup(block, src_ref["node"], src_ref["name"])
            saved = dst.merge(src, keep_backup=backup is None)
            if backup is None:
                backup = saved
    except GenericError:
        if backup is not None:
            dst.restore(backup)
        raise
    return dst, (backup if keep_backup else None)


def bitmap_clear(block: BlockLayer, node: str, name: str) -> None:
    """qmp_block_dirty_bitmap_clear."""
    bm, _ = bitmap_lookup(block, node, name)
    bm.check(BDRV_BITMAP_DEFAULT)
    bm.clear()


def bitmap_enable(block: BlockLayer, node: str, name: str, enabled: bool) -> None:
    """qmp_block_dirty_bitmap_enable / _disable."""
    bm, _ = bitmap_lookup(block, node, name)
    bm.check(BDRV_BITMAP_ALLOW_RO)
    bm.disabled = not enabled


# -- commands ---------------------------------------------------------------------------------
@command("block-dirty-bitmap-add", data="BlockDirtyBitmapAdd")
def block_dirty_bitmap_add(vm: Machine, node: str, name: str, granularity: int | None = None,
                           persistent: bool | None = None, disabled: bool | None = None) -> None:
    bitmap_add(vm.block, node, name, granularity, persistent, disabled)


@command("block-dirty-bitmap-remove", data="BlockDirtyBitmap")
def block_dirty_bitmap_remove(vm: Machine, node: str, name: str) -> None:
    bitmap_remove(vm.block, node, name, release=True)


@command("block-dirty-bitmap-clear", data="BlockDirtyBitmap")
def block_dirty_bitmap_clear(vm: Machine, node: str, name: str) -> None:
    bitmap_clear(vm.block, node, name)


@command("block-dirty-bitmap-enable", data="BlockDirtyBitmap")
def block_dirty_bitmap_enable(vm: Machine, node: str, name: str) -> None:
    bitmap_enable(vm.block, node, name, True)


@command("block-dirty-bitmap-disable", data="BlockDirtyBitmap")
def block_dirty_bitmap_disable(vm: Machine, node: str, name: str) -> None:
    bitmap_enable(vm.block, node, name, False)


@command("block-dirty-bitmap-merge", data="BlockDirtyBitmapMerge")
def block_dirty_bitmap_merge(vm: Machine, node: str, target: str, bitmaps: list[Any]) -> None:
    bitmap_merge(vm.block, node, target, bitmaps)


@command("x-debug-block-dirty-bitmap-sha256", data="BlockDirtyBitmap")
def x_debug_block_dirty_bitmap_sha256(vm: Machine, node: str, name: str) -> dict[str, str]:
    bm, _ = bitmap_lookup(vm.block, node, name)
    return {"sha256": bm.sha256()}
