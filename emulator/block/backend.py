"""BlockBackends: what devices, the monitor (HMP qemu-io) and jobs use to reach a node.

A BlockBackend is a parent with one "root" child (role FILTERED|PRIMARY) and its own
permission pair. Requests are checked against the backend's length (blk_check_byte_request)
and then enter the node graph through the generic request layer, so every node on the way —
filters included — sees them and marks its dirty bitmaps.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from emulator.block import io as blockio
from emulator.block import perm as P
from emulator.block.flags import BDRV_REQ_FUA, BDRV_REQ_MAY_UNMAP
from emulator.block.node import BdrvChild, BlockDriverState
from emulator.block.perm import Role

if TYPE_CHECKING:
    from emulator.block.graph import BlockGraph


class BlockBackend:
    """struct BlockBackend (the parts the emulator needs)."""

    is_block_backend = True
    stay_at_node = False

    def __init__(self, graph: BlockGraph, perm: int = 0, shared_perm: int = P.ALL,
                 name: str | None = None) -> None:
        self.graph = graph
        self.name = name
        self.perm = perm
        self.shared_perm = shared_perm
        self.root: BdrvChild | None = None
        self.enable_write_cache = True
        self.dev_id = ""                  # attached qdev id ("" for if=none)
        self.removable = True
        self.locked = False
        self.allow_write_beyond_eof = False
        self.legacy_dinfo: dict | None = None   # -drive options (DriveInfo)

    def __repr__(self) -> str:
        return f"<BlockBackend {self.name!r} -> {self.bs!r}>"

    # -- graph --------------------------------------------------------------------------------
    def parent_desc(self) -> str:
        """blk_root_get_parent_desc."""
        if self.name:
            return f"block device '{self.name}'"
        if self.dev_id:
            return f"block device '{self.dev_id}'"
        return "an unnamed block device"

    @property
    def bs(self) -> BlockDriverState | None:
        return self.root.bs if self.root is not None else None

    def insert_bs(self, bs: BlockDriverState) -> None:
        """blk_insert_bs: attach as 'root' with this backend's permissions (may raise)."""
        assert self.root is None
        bs.refcnt += 1
        try:
            self.root = self.graph.root_attach_child(self, bs, "root", Role.FILTERED | Role.PRIMARY,
                                                     self.perm, self.shared_perm)
        finally:
            bs.refcnt -= 1

    def drain(self) -> None:
        """blk_drain: a drained section of the node — whatever is above it pauses and
        resumes (a job in READY goes to standby and back)."""
        bs = self.bs
        if bs is not None:
            blockio.drained_begin(bs)
            blockio.drained_end(bs)

    def remove_bs(self) -> None:
        """blk_remove_bs: drained first, then detached."""
        if self.root is not None:
            self.drain()
            root, self.root = self.root, None
            self.graph.detach_child(root)

    def set_perm(self, perm: int, shared: int) -> None:
        """blk_set_perm: tighten (may raise QEMU's conflict text) or loosen."""
        if self.root is not None:
            self.graph.child_try_set_perm(self.root, perm, shared)
        self.perm, self.shared_perm = perm, shared

    def unref(self) -> None:
        """blk_unref of the last reference: drained, then deleted (blk_delete: detached from
        the graph — a second drained section —, the name forgotten)."""
        self.drain()
        self.remove_bs()
        if self in self.graph.backends:
            self.graph.backends.remove(self)

    # -- I/O (the IOTarget used by qemu-io) ----------------------------------------------------
    def is_available(self) -> bool:
        return self.bs is not None

    def length(self) -> int:
        """blk_getlength."""
        bs = self.bs
        if bs is None:
            raise OSError(errno.ENOMEDIUM, os.strerror(errno.ENOMEDIUM))
        return bs.getlength()

    def _check(self, offset: int, length: int) -> BlockDriverState:
        """blk_check_byte_request."""
        bs = self.bs
        if bs is None:
            raise OSError(errno.ENOMEDIUM, os.strerror(errno.ENOMEDIUM))
        if offset < 0 or length < 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if not self.allow_write_beyond_eof:
            size = bs.getlength()
            if offset > size or size - offset < length:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return bs

    def pread(self, offset: int, length: int) -> bytes:
        return self._check(offset, length).pread(offset, length)

    def pwrite(self, offset: int, data: bytes, flags: int = 0) -> None:
        if not self.enable_write_cache:
            flags |= BDRV_REQ_FUA
        self._check(offset, len(data)).pwrite(offset, data, flags)

    def pwrite_zeroes(self, offset: int, length: int, flags: int = 0, *,
                      may_unmap: bool = False) -> None:
        if may_unmap:
            flags |= BDRV_REQ_MAY_UNMAP
        if not self.enable_write_cache:   # blk_co_do_pwritev_part, zero writes included
            flags |= BDRV_REQ_FUA
        blockio.zero_write(self._check(offset, length), offset, length, flags)

    def pdiscard(self, offset: int, length: int) -> None:
        self._check(offset, length).pdiscard(offset, length)

    def flush(self) -> None:
        bs = self.bs
        if bs is None:
            raise OSError(errno.ENOMEDIUM, os.strerror(errno.ENOMEDIUM))
        bs.flush()
