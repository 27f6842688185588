"""Block-layer questions the jobs ask (block.c / block/io.c functions of the same names):
mirror, and block-copy for backup.

They follow QEMU's definitions for the drivers the emulator has: which node a filter chain
ends in, what a backing chain contains, whether a target unmaps zeroes or starts out zeroed,
and whether I/O on a node leaves the coroutine (file-posix's thread pool).
"""

from __future__ import annotations

from emulator.block.node import BlockDriverState


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


def leaf(bs: BlockDriverState | None) -> BlockDriverState | None:
    """The node at the bottom of bs's primary-child chain (the protocol node)."""
    while bs is not None:
        c = bs.primary_child() or bs.filter_child()
        if c is None or c.bs is None:
            return bs
        bs = c.bs
    return None


def io_yields(bs: BlockDriverState | None) -> bool:
    """Does I/O on bs leave the coroutine in QEMU? file-posix completes it in a thread;
    null-co only with a latency."""
    bottom = leaf(bs)
    if bottom is None:
        return False
    return bottom.format_name == "file" or bool(getattr(bottom, "latency_ns", 0))


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
