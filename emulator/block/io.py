"""The generic request layer of block/io.c, applied on every node a request reaches.

Each node a request passes through gets the same treatment as in QEMU: padding to the node's
``request_alignment`` (read-modify-write for unaligned writes), splitting at ``max_transfer``,
``detect-zeroes``, then the driver hook, then ``bdrv_co_write_req_finish``: ``write_gen`` is
bumped and the node's enabled dirty bitmaps record the (aligned) range — even when the driver
failed, as QEMU does. Errors are ``OSError`` with an errno (what blkdebug injects).

Flush follows bdrv_co_flush: FLUSH_TO_OS on the primary child, FLUSH_TO_DISK only if the node
was written since its last successful flush (and cache.no-flush is off), then every child the
node holds WRITE or WRITE_UNCHANGED on is flushed, in child-list order.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from emulator.block import perm as P
from emulator.block.flags import (
    BDRV_BLOCK_ALLOCATED,
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_EOF,
    BDRV_BLOCK_RAW,
    BDRV_BLOCK_RECURSE,
    BDRV_BLOCK_ZERO,
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_NO_FALLBACK,
    BDRV_REQ_ZERO_WRITE,
)
from emulator.qcow2.blockio import TruncateError, check_truncate_offset

if TYPE_CHECKING:
    from emulator.block.node import BdrvChild, BlockDriverState

_ZERO_CHUNK = 1 << 20


def _eio(code: int = errno.EIO) -> OSError:
    return OSError(code, os.strerror(code))


def _align_down(x: int, a: int) -> int:
    return x // a * a


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _chunks(offset: int, length: int, max_transfer: int, align: int) -> list[tuple[int, int]]:
    if not max_transfer or length <= max_transfer:
        return [(offset, length)]
    step = max(_align_down(max_transfer, align), align)
    return [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]


def _check_writable(bs: BlockDriverState) -> None:
    if bs.closed:
        raise _eio(errno.ENOMEDIUM)
    if bs.read_only or bs.inactive:   # not bs.is_writable(): one call less per request
        raise _eio(errno.EPERM)


def _is_zero(data: bytes) -> bool:
    """buffer_is_zero (one memcmp instead of a Python loop over the bytes)."""
    return not data or (not data[0] and data == bytes(len(data)))


# -- reads ----------------------------------------------------------------------------------
def preadv(bs: BlockDriverState, offset: int, length: int) -> bytes:
    """bdrv_co_preadv_part on ``bs``."""
    if bs.closed:
        raise _eio(errno.ENOMEDIUM)
    if length == 0:
        return b""
    align = bs.request_alignment
    if align == 1:
        return _aligned_preadv(bs, offset, length, 1)
    start, end = _align_down(offset, align), _align_up(offset + length, align)
    data = _aligned_preadv(bs, start, end - start, align)
    return data[offset - start:offset - start + length]


def _aligned_preadv(bs: BlockDriverState, offset: int, length: int, align: int) -> bytes:
    """bdrv_aligned_preadv: the part past the end of the node reads as zeroes."""
    total = bs.drv_getlength()
    max_bytes = _align_up(max(0, total - offset), align)
    readable = min(length, max_bytes)
    max_transfer = bs.max_transfer
    if not max_transfer or readable <= max_transfer:
        out = bytes(bs.drv_preadv(offset, readable))
    else:
        out = b"".join([bs.drv_preadv(o, n)
                        for o, n in _chunks(offset, readable, max_transfer, align)])
    if len(out) < length:
        out += bytes(length - len(out))
    return out


# -- writes ---------------------------------------------------------------------------------
def _write_req_finish(bs: BlockDriverState, offset: int, length: int, *,
                      discard: bool = False) -> None:
    """bdrv_co_write_req_finish: generation counter, growth, dirty bitmaps."""
    bs.write_gen += 1
    if not discard and offset + length > bs.wr_highest_offset:
        bs.wr_highest_offset = offset + length
    if length and bs.dirty_bitmaps:
        bs.set_dirty(offset, length)


def pwritev(bs: BlockDriverState, offset: int, data: bytes, flags: int = 0) -> None:
    """bdrv_co_pwritev_part on ``bs``: RMW padding, detect-zeroes, split, dirty marking."""
    _check_writable(bs)
    length = len(data)
    if length == 0:
        return
    align = bs.request_alignment
    if align != 1 and (offset % align or (offset + length) % align):
        # bdrv_pad_request: read the head and tail blocks (once if they are the same)
        start, end = _align_down(offset, align), _align_up(offset + length, align)
        buf = bytearray(end - start)
        if offset != start:
            buf[0:align] = _aligned_preadv(bs, start, align, align)
        if offset + length != end and (end - align != start or offset == start):
            buf[end - start - align:] = _aligned_preadv(bs, end - align, align, align)
        buf[offset - start:offset - start + length] = data
        data, offset, length = bytes(buf), start, end - start
    _aligned_pwritev(bs, offset, data, flags, align)


def truncate(bs: BlockDriverState, offset: int, prealloc: str = "off") -> None:
    """bdrv_co_truncate: QEMU's checks, then the driver's truncate (a filter's goes to the
    node it filters); growing a node whose backing file reaches further zeroes the new area
    (BDRV_REQ_ZERO_WRITE). Afterwards the node's dirty bitmaps take the new length (rounded
    up to a sector: refresh_total_sectors). Every layer raises TruncateError (QEMU's text
    and errno): qmp_block_resize reports it, qcow2 prefixes it with its step."""
    if bs.closed:
        raise TruncateError(errno.ENOMEDIUM, "No medium inserted")
    check_truncate_offset(offset)
    old_size = bs.getlength()
    if bs.read_only:
        raise TruncateError(errno.EACCES, "Image is read-only")
    backing = bs.cow_child()
    zero_write = bool(offset > old_size and backing is not None and backing.bs is not None
                      and backing.bs.getlength() > old_size)
    bs.drv_truncate(offset, prealloc, zero_write)
    bs.write_gen += 1
    bs.truncate_dirty_bitmaps(bs.getlength())


def supports_fua(bs: BlockDriverState) -> bool:
    """BDRV_REQ_FUA in bs->supported_write_flags (and supported_zero_flags)."""
    while bs.fua_support == "file":
        if bs.file is None or bs.file.bs is None:
            return False
        bs = bs.file.bs
    return bs.fua_support == "native"


def _aligned_pwritev(bs: BlockDriverState, offset: int, data: bytes, flags: int,
                     align: int) -> None:
    length = len(data)
    try:
        if flags & BDRV_REQ_ZERO_WRITE:
            _do_pwrite_zeroes(bs, offset, length, flags)
        elif bs.detect_zeroes != "off" and _is_zero(data):
            zflags = flags | BDRV_REQ_ZERO_WRITE
            if bs.detect_zeroes == "unmap" and bs.discard == "unmap":
                zflags |= BDRV_REQ_MAY_UNMAP
            _do_pwrite_zeroes(bs, offset, length, zflags)
        else:
            # bdrv_driver_pwritev: a FUA the driver lacks is a flush after the (last) write
            emulate_fua = bool(flags & BDRV_REQ_FUA) and not supports_fua(bs)
            if emulate_fua:
                flags &= ~BDRV_REQ_FUA
            if not bs.max_transfer or length <= bs.max_transfer:
                bs.drv_pwritev(offset, data, flags)
            else:
                for o, n in _chunks(offset, length, bs.max_transfer, align):
                    bs.drv_pwritev(o, data[o - offset:o - offset + n], flags)
            if emulate_fua:
                flush(bs)
    finally:
        _write_req_finish(bs, offset, length)


def _do_pwrite_zeroes(bs: BlockDriverState, offset: int, length: int, flags: int) -> None:
    """bdrv_co_do_pwrite_zeroes: the driver's efficient path, else a zero-buffer fallback;
    a FUA the driver lacks is one flush at the end."""
    need_flush = bool(flags & BDRV_REQ_FUA) and not supports_fua(bs)
    if need_flush:
        flags &= ~BDRV_REQ_FUA
    try:
        bs.drv_pwrite_zeroes(offset, length, flags)
    except NotImplementedError:
        if flags & BDRV_REQ_NO_FALLBACK:
            raise _eio(errno.ENOTSUP) from None
        step = bs.max_transfer or _ZERO_CHUNK
        for o in range(offset, offset + length, step):
            n = min(step, offset + length - o)
            bs.drv_pwritev(o, bytes(n), flags & BDRV_REQ_FUA)
    if need_flush:
        flush(bs)


def pwrite_zeroes(bs: BlockDriverState, offset: int, length: int, flags: int = 0) -> None:
    """bdrv_co_pwrite_zeroes (a node's parent writing zeroes): a node without discard=unmap
    may not unmap them; then the zero write request."""
    if bs.discard != "unmap":
        flags &= ~BDRV_REQ_MAY_UNMAP
    zero_write(bs, offset, length, flags)


def zero_write(bs: BlockDriverState, offset: int, length: int, flags: int = 0) -> None:
    """bdrv_co_pwritev with BDRV_REQ_ZERO_WRITE and no buffer — what blk_co_pwrite_zeroes
    sends, so a BlockBackend's BDRV_REQ_MAY_UNMAP stands whatever the node's discard."""
    _check_writable(bs)
    if length == 0:
        return
    align = bs.request_alignment
    if align != 1 and (offset % align or (offset + length) % align):
        # unaligned zero writes become RMW writes of a zero buffer, as in QEMU
        pwritev(bs, offset, bytes(length), flags & ~BDRV_REQ_ZERO_WRITE)
        return
    try:
        _do_pwrite_zeroes(bs, offset, length, flags | BDRV_REQ_ZERO_WRITE)
    finally:
        _write_req_finish(bs, offset, length)


def pdiscard(bs: BlockDriverState, offset: int, length: int) -> None:
    """bdrv_co_pdiscard: nothing at all on a node without discard=unmap ("Do nothing if
    disabled", before the request is tracked: no dirty bitmap sees it); else the driver's
    discard, and the bitmaps dirtied like a write."""
    _check_writable(bs)
    if length == 0 or bs.discard != "unmap":
        return
    try:
        bs.drv_pdiscard(offset, length)
    finally:
        _write_req_finish(bs, offset, length, discard=True)


# -- flush ------------------------------------------------------------------------------------
def flush(bs: BlockDriverState) -> None:
    """bdrv_co_flush on ``bs`` (see the module docstring for the event order)."""
    if bs.closed or bs.read_only:
        return
    current_gen = bs.write_gen
    if bs.drv_flush():
        # the driver flushes all layers itself (.bdrv_co_flush, e.g. blkdebug)
        bs.flushed_gen = current_gen
        return
    primary = bs.primary_child()
    if primary is not None:
        primary.debug_event("flush_to_os")
    bs.drv_flush_to_os()
    if not bs.no_flush and bs.flushed_gen != current_gen:
        if primary is not None:
            primary.debug_event("flush_to_disk")
        bs.drv_flush_to_disk()
    first_error: OSError | None = None
    for c in list(bs.children):
        if c.bs is not None and c.perm & (P.WRITE | P.WRITE_UNCHANGED):
            try:
                flush(c.bs)
            except OSError as e:
                first_error = first_error or e
    if first_error is not None:
        raise first_error
    bs.flushed_gen = current_gen


# -- drained sections ----------------------------------------------------------------------------
# A drained node is quiesced for its parents: bdrv_drained_begin(bs) counts up
# bs->quiesce_counter and calls each parent edge's .drained_begin (the edge counts up its
# parent_quiesce_counter); a node parent quiesces itself and so passes the section on to its
# own parents, a block job pauses (child_job_drained_begin). bdrv_drained_end undoes it in the
# same walk. An edge that moves between nodes of different quiesce counts starts or ends
# sections for its parent then (BlockGraph._replace_child_noperm's drain_saldo).
def parent_drained_begin_single(c: BdrvChild) -> None:
    """bdrv_parent_drained_begin_single (the emulator's jobs stop at once: no poll)."""
    c.parent_quiesce_counter += 1
    cb = getattr(c.parent, "child_cb_drained_begin", None)
    if cb is not None:
        cb(c)


def parent_drained_end_single(c: BdrvChild) -> None:
    """bdrv_parent_drained_end_single."""
    assert c.parent_quiesce_counter > 0
    c.parent_quiesce_counter -= 1
    cb = getattr(c.parent, "child_cb_drained_end", None)
    if cb is not None:
        cb(c)


def _drain_parents(bs: BlockDriverState, ignore: BdrvChild | None,
                   ignore_bds_parents: bool) -> list[BdrvChild]:
    """bs's parent edges in list order (newest first), as bdrv_parent_drained_begin/end
    walk them."""
    return [c for c in list(bs.parents)
            if c is not ignore and not (ignore_bds_parents and c.parent_bs is not None)]


def do_drained_begin_quiesce(bs: BlockDriverState, parent: BdrvChild | None = None,
                             ignore_bds_parents: bool = False) -> None:
    """bdrv_do_drained_begin_quiesce: stop things in parent-to-child order."""
    bs.quiesce_counter += 1
    for c in _drain_parents(bs, parent, ignore_bds_parents):
        parent_drained_begin_single(c)


def do_drained_end(bs: BlockDriverState, parent: BdrvChild | None = None,
                   ignore_bds_parents: bool = False) -> None:
    """bdrv_do_drained_end: re-enable things in child-to-parent order."""
    assert bs.quiesce_counter > 0
    for c in _drain_parents(bs, parent, ignore_bds_parents):
        parent_drained_end_single(c)
    bs.quiesce_counter -= 1


def drained_begin(bs: BlockDriverState) -> None:
    """bdrv_drained_begin (not recursive: bs and everything above it)."""
    do_drained_begin_quiesce(bs)


def drained_end(bs: BlockDriverState) -> None:
    """bdrv_drained_end."""
    do_drained_end(bs)


def drain_all_begin(nodes: list[BlockDriverState]) -> None:
    """bdrv_drain_all_begin: every node (in creation order) is drained for its parents that
    are not nodes (ignore_bds_parents): a job pauses once per edge."""
    for bs in list(nodes):
        do_drained_begin_quiesce(bs, None, True)


def drain_all_end(nodes: list[BlockDriverState]) -> None:
    """bdrv_drain_all_end."""
    for bs in list(nodes):
        do_drained_end(bs, None, True)


# -- block status --------------------------------------------------------------------------------
def block_status(bs: BlockDriverState, offset: int, length: int, *,
                 want_zero: bool = True) -> tuple[int, int]:
    """bdrv_co_block_status (without the mapping): flags and the extent length."""
    total = bs.getlength()
    if offset >= total:
        return BDRV_BLOCK_EOF, 0
    length = min(length, total - offset)
    if length == 0:
        return 0, 0
    ret, pnum, mapped, file = bs.drv_block_status(want_zero, offset, length)
    pnum = max(1, min(pnum, length))
    if ret & BDRV_BLOCK_RAW and file is not None:
        # the driver passes the request through: the file's status is the answer
        return block_status(file, mapped, pnum, want_zero=want_zero)
    if ret & (BDRV_BLOCK_DATA | BDRV_BLOCK_ZERO):
        ret |= BDRV_BLOCK_ALLOCATED
    elif bs.supports_backing:
        cow = bs.cow_child()
        if cow is None or cow.bs is None or (want_zero and offset >= cow.bs.getlength()):
            ret |= BDRV_BLOCK_ZERO
    if want_zero and ret & BDRV_BLOCK_RECURSE and file is not None:
        ret2, pnum2 = block_status(file, mapped, pnum, want_zero=True)
        if ret2 & BDRV_BLOCK_ZERO:
            ret |= BDRV_BLOCK_ZERO
        if pnum2:
            pnum = max(1, min(pnum, pnum2))
    ret &= ~BDRV_BLOCK_RECURSE
    if offset + pnum == total:
        ret |= BDRV_BLOCK_EOF
    return ret, pnum


def block_status_above(bs: BlockDriverState, base: BlockDriverState | None, offset: int,
                       length: int, *, include_base: bool = False,
                       want_zero: bool = True) -> tuple[int, int]:
    """bdrv_common_block_status_above: the status of the first layer of the filter/COW chain
    from ``bs`` down to ``base`` that allocates the extent (for sync=top's skip-unallocated
    scan and for commit/stream-like users)."""
    ret, pnum = block_status(bs, offset, length, want_zero=want_zero)
    if pnum == 0 or ret & BDRV_BLOCK_ALLOCATED or bs is base:
        return ret, pnum
    eof = offset + pnum if ret & BDRV_BLOCK_EOF else None
    length = pnum
    p = bs.filter_or_cow_bs()
    while p is not None and (include_base or p is not base):
        ret, pnum = block_status(p, offset, length, want_zero=want_zero)
        if pnum == 0:
            # this layer is short: what the upper layer deferred reads as zeroes here
            pnum = length
            ret = BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED
            break
        if ret & BDRV_BLOCK_ALLOCATED:
            ret &= ~BDRV_BLOCK_EOF
            break
        if p is base:
            break
        length = pnum
        p = p.filter_or_cow_bs()
    if eof is not None and offset + pnum == eof:
        ret |= BDRV_BLOCK_EOF
    return ret, pnum
