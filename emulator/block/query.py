"""query-block and query-named-block-nodes output (block/qapi.c).

Members come out in QAPI declaration order; optional members only when QEMU sets them
(``dirty-bitmaps`` only for nodes with bitmaps, ``backing_file`` only with a COW child,
``dirty-flag`` only when the driver answers bdrv_get_info, ``actual-size`` only when it is
known). ``actual-size`` is the host's allocation and ``#blockNNN`` names carry QEMU's random
digits: a replay must not depend on either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emulator.block.open import full_backing_filename

if TYPE_CHECKING:
    from emulator.block.backend import BlockBackend
    from emulator.block.node import BlockDriverState


def image_info(bs: BlockDriverState) -> dict[str, Any]:
    """bdrv_query_image_info: one level of ImageInfo."""
    size = bs.getlength()
    bs.refresh_filename()
    info: dict[str, Any] = {"filename": bs.filename, "format": bs.format_name,
                            "virtual-size": size}
    actual = bs.get_allocated_file_size()
    if actual is not None and actual >= 0:
        info["actual-size"] = actual
    if bs.encrypted:
        info["encrypted"] = True
    bdi = bs.get_info()
    if bdi is not None:
        if bdi.get("cluster_size"):
            info["cluster-size"] = bdi["cluster_size"]
        info["dirty-flag"] = bool(bdi.get("is_dirty", False))
    if bs.backing_file:
        info["backing-filename"] = bs.backing_file
        full = full_backing_filename(bs)
        if full:
            info["full-backing-filename"] = full
        if bs.backing_format:
            info["backing-filename-format"] = bs.backing_format
    spec = bs.get_specific_info()
    if spec is not None:
        info["format-specific"] = spec
    return info


def block_device_info(blk: BlockBackend | None, bs: BlockDriverState, flat: bool) -> dict[str, Any]:
    """bdrv_block_device_info: BlockDeviceInfo for one node (and its chain unless flat)."""
    bs.refresh_filename()
    info: dict[str, Any] = {"file": bs.filename}
    if bs.node_name:
        info["node-name"] = bs.node_name
    info["ro"] = bs.read_only
    info["drv"] = bs.format_name
    cow = bs.cow_child()
    if cow is not None and cow.bs is not None:
        info["backing_file"] = cow.bs.filename
    info["backing_file_depth"] = 0
    info["encrypted"] = bs.encrypted
    info["detect_zeroes"] = bs.detect_zeroes
    for key in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"):
        info[key] = 0
    chain = image_info(bs)
    info["image"] = chain
    depth = 0
    bs0 = bs
    while not flat:
        nxt = bs0.filter_or_cow_bs()
        if nxt is None:
            break
        depth += 1
        bs0 = nxt
        if blk is not None:
            bs0 = bs0.skip_implicit_filters()
        sub = image_info(bs0)
        chain["backing-image"] = sub
        chain = sub
    info["backing_file_depth"] = depth
    info["cache"] = {"writeback": blk.enable_write_cache if blk is not None else True,
                     "direct": bs.cache_direct, "no-flush": bs.no_flush}
    info["write_threshold"] = bs.write_threshold
    if bs.dirty_bitmaps:
        info["dirty-bitmaps"] = bs.query_dirty_bitmaps()
    return info


def block_info(blk: BlockBackend) -> dict[str, Any]:
    """bdrv_query_info: one BlockInfo of query-block."""
    info: dict[str, Any] = {"device": blk.name or "", "locked": blk.locked,
                            "removable": blk.removable}
    if blk.dev_id:
        info["qdev"] = blk.dev_id
    bs = blk.bs
    if bs is not None:
        info["inserted"] = block_device_info(blk, bs.skip_implicit_filters(), False)
    info["type"] = "unknown"
    return info
