"""Nodes (BlockDriverState) and the edges between them (BdrvChild).

A node is an instance of a driver class (drivers/*.py subclass :class:`BlockDriverState` and
override the ``drv_*`` hooks, as QEMU drivers fill a BlockDriver table). The generic request
layer of block/io.c lives in :mod:`emulator.block.io`; graph changes with permission checks
live in :mod:`emulator.block.graph`. Lists are kept in QEMU's order, because QEMU's output and
error texts depend on it: ``children`` and ``parents`` newest first (QLIST_INSERT_HEAD), dirty
bitmaps newest first.
"""

from __future__ import annotations

import errno
import re
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from emulator.block import io as blockio
from emulator.block import perm as P
from emulator.block.dirty_bitmap import BdrvDirtyBitmap, HBitmap, ctz
from emulator.block.errors import GenericError

# the flags are re-exported: drivers import them from here
from emulator.block.flags import BDRV_BLOCK_ALLOCATED as BDRV_BLOCK_ALLOCATED
from emulator.block.flags import BDRV_BLOCK_DATA as BDRV_BLOCK_DATA
from emulator.block.flags import BDRV_BLOCK_EOF as BDRV_BLOCK_EOF
from emulator.block.flags import BDRV_BLOCK_OFFSET_VALID as BDRV_BLOCK_OFFSET_VALID
from emulator.block.flags import BDRV_BLOCK_RAW as BDRV_BLOCK_RAW
from emulator.block.flags import BDRV_BLOCK_RECURSE as BDRV_BLOCK_RECURSE
from emulator.block.flags import BDRV_BLOCK_ZERO as BDRV_BLOCK_ZERO
from emulator.block.flags import BDRV_REQ_FUA as BDRV_REQ_FUA
from emulator.block.flags import BDRV_REQ_MAY_UNMAP as BDRV_REQ_MAY_UNMAP
from emulator.block.flags import BDRV_REQ_NO_FALLBACK as BDRV_REQ_NO_FALLBACK
from emulator.block.flags import BDRV_REQ_WRITE_UNCHANGED as BDRV_REQ_WRITE_UNCHANGED
from emulator.block.flags import BDRV_REQ_ZERO_WRITE as BDRV_REQ_ZERO_WRITE
from emulator.block.flags import BDRV_SECTOR_SIZE as BDRV_SECTOR_SIZE
from emulator.block.perm import Role
from emulator.qmp.json_writer import qdict_keys, to_json

if TYPE_CHECKING:
    from emulator.block.graph import BlockGraph, Transaction

# what .bdrv_co_block_status returns: (BDRV_BLOCK_* flags, bytes, mapped offset, file node)
BlockStatus = tuple[int, int, int, "BlockDriverState | None"]


# BlockOpType (include/block/block-common.h), the names op blockers are kept under
OP_TYPES = ("backup-source", "backup-target", "change", "commit-source", "commit-target",
            "dataplane", "drive-del", "eject", "external-snapshot", "internal-snapshot",
            "internal-snapshot-delete", "mirror-source", "mirror-target", "resize", "stream",
            "replace")
# bdrv_backing_attach leaves these allowed on a backing node
BACKING_ALLOWED_OPS = ("commit-target", "stream", "backup-source", "backup-target")


class Parent(Protocol):
    """What sits above a BdrvChild: a node, a BlockBackend, or a block job."""

    def parent_desc(self) -> str: ...


class OpBlocker(str):
    """A blocker reason; removed by identity, as QEMU compares Error pointers."""

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other


class BdrvChild:
    """An edge: ``parent`` uses ``bs`` as its child called ``name`` in ``role``."""

    def __init__(self, parent: Parent, bs: BlockDriverState | None, name: str, role: int,
                 perm: int, shared_perm: int) -> None:
        self.parent = parent
        self.bs = bs
        self.name = name
        self.role = role
        self.perm = perm
        self.shared_perm = shared_perm
        self.frozen = False
        self.parent_quiesce_counter = 0   # drained sections of bs this edge passed on

    def __repr__(self) -> str:
        return (f"<BdrvChild {self.parent_desc()} -> {self.bs and self.bs.node_name!r} "
                f"as {self.name!r} perm={self.perm:#x} shared={self.shared_perm:#x}>")

    def parent_desc(self) -> str:
        return self.parent.parent_desc()

    @property
    def parent_bs(self) -> BlockDriverState | None:
        return self.parent if isinstance(self.parent, BlockDriverState) else None

    # I/O through the edge: what a parent driver calls (bdrv_co_preadv(child, ...) etc.)
    def pread(self, offset: int, length: int) -> bytes:
        assert self.bs is not None
        return blockio.preadv(self.bs, offset, length)

    def pwrite(self, offset: int, data: bytes, flags: int = 0) -> None:
        assert self.bs is not None
        blockio.pwritev(self.bs, offset, data, flags)

    def pwrite_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        assert self.bs is not None
        blockio.pwrite_zeroes(self.bs, offset, length, flags)

    def pdiscard(self, offset: int, length: int) -> None:
        assert self.bs is not None
        blockio.pdiscard(self.bs, offset, length)

    def flush(self) -> None:
        assert self.bs is not None
        blockio.flush(self.bs)

    def debug_event(self, event: str) -> None:
        """BLKDBG_EVENT(child, event): tell the child node's driver (blkdebug acts on it)."""
        if self.bs is not None:
            self.bs.drv_debug_event(event)


class BlockDriverState:
    """A node. Class attributes play the role of QEMU's BlockDriver table."""

    format_name: ClassVar[str] = ""
    protocol_name: ClassVar[str | None] = None   # set for protocol drivers (bdrv_file_open)
    is_filter: ClassVar[bool] = False
    supports_backing: ClassVar[bool] = False
    # runtime options that change the node's data; any of them present => json: filename
    strong_runtime_opts: ClassVar[tuple[str, ...]] = ()
    # default request_alignment (bdrv_refresh_limits: byte-based drivers 1, else 512)
    default_request_alignment: ClassVar[int] = 1
    has_refresh_filename_hook: ClassVar[bool] = False
    # requests have no effect beyond the node's own data and dirty bitmaps (no debug-event
    # rules, no copies, no side channels): nothing can tell one big request from several
    plain_io: ClassVar[bool] = False
    filtered_child_is_backing: ClassVar[bool] = False
    # BDRV_REQ_FUA in supported_write_flags/supported_zero_flags: "native" (the driver's
    # own), "file" (its file child's, as raw, blkdebug and copy-before-write pass it on) or
    # None — the generic layer then emulates FUA with a flush of the node (file-posix, qcow2)
    fua_support: ClassVar[str | None] = None

    def __init__(self, graph: BlockGraph) -> None:
        self.graph = graph
        self.node_name = ""
        self.probed = False   # the driver was found by probing (bs->probed)
        self.options: dict[str, Any] = {}          # flat runtime options (bs->options)
        self.children: list[BdrvChild] = []        # newest first
        self.file_child: BdrvChild | None = None
        self.backing_child: BdrvChild | None = None
        self.parents: list[BdrvChild] = []         # newest first
        self.dirty_bitmaps: list[BdrvDirtyBitmap] = []   # newest first
        self.read_only = False
        self.auto_read_only = False
        self.inactive = False
        self.no_flush = False                      # cache.no-flush
        self.cache_direct = False                  # cache.direct
        self.force_share = False
        self.detect_zeroes = "off"
        self.discard = "ignore"
        self.implicit = False
        self.inherited = False   # opened from a definition as a child (bs->inherits_from)
        self.reopens = 0         # reopens through that parent (see BlockLayer.reopen_read_only)
        self.monitor_owned = False
        self.refcnt = 1
        self.write_gen = 0
        self.flushed_gen = 0
        self.wr_highest_offset = 0
        self.request_alignment = self.default_request_alignment
        self.max_transfer = 0
        self.pdiscard_alignment = 0
        self.opt_write_zero = 0
        self.max_pwrite_zeroes = 0
        self.max_pdiscard = 0
        self.encrypted = False
        # header view of the backing file (format drivers)
        self.backing_file = ""
        self.backing_format = ""
        self.auto_backing_file = ""
        # bdrv_refresh_filename results
        self.filename = ""
        self.exact_filename = ""
        self.full_open_options: dict[str, Any] = {}
        self._filename_generation = -1   # graph.generation the three above were computed at
        self.write_threshold = 0
        self.closed = False
        self.opened = False          # drv_open completed (bs->drv set in QEMU)
        self.op_blockers: dict[str, list[str]] = {}   # BLOCK_OP_TYPE -> reasons, newest first
        self.backing_blocker: OpBlocker | None = None
        self.quiesce_counter = 0     # drained sections this node is in (block/io.c)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node_name!r}>"

    # -- identity -----------------------------------------------------------------------------
    def parent_desc(self) -> str:
        """bdrv_child_get_parent_desc: how a node is named in permission errors."""
        return f"node '{self.node_name}'"

    def device_or_node_name(self) -> str:
        """bdrv_get_device_or_node_name: the BlockBackend's name if one is attached."""
        for c in self.parents:
            name = getattr(c.parent, "name", None)
            if getattr(c.parent, "is_block_backend", False) and name:
                return name
        return self.node_name

    # -- children -----------------------------------------------------------------------------
    def child(self, name: str) -> BdrvChild | None:
        for c in self.children:
            if c.name == name:
                return c
        return None

    @property
    def file(self) -> BdrvChild | None:
        """bs->file: the primary non-COW child (blkdebug's is called 'image')."""
        return self.file_child

    @property
    def backing(self) -> BdrvChild | None:
        """bs->backing: the COW child (or a backing-filtered child)."""
        return self.backing_child

    def child_cb_attach(self, c: BdrvChild) -> None:
        """bdrv_child_cb_attach: the new edge goes to the head; file/backing are noted."""
        self.graph.generation += 1
        self.children.insert(0, c)
        if self.is_filter or c.role & Role.FILTERED:
            if c.role & Role.PRIMARY:
                if self.filtered_child_is_backing:
                    self.backing_child = c
                else:
                    self.file_child = c
        elif c.role & Role.COW:
            self.backing_child = c
        elif c.role & Role.PRIMARY:
            self.file_child = c
        if c.role & Role.COW and c.bs is not None:
            self.backing_attach(c.bs)

    def backing_attach(self, backing_bs: BlockDriverState) -> None:
        """bdrv_backing_attach: block every op on the backing node but commit-target,
        stream and backup source/target ("node is used as backing hd of 'X'")."""
        reason = OpBlocker(f"node is used as backing hd of '{self.device_or_node_name()}'")
        self.backing_blocker = reason
        for op in OP_TYPES:
            if op not in BACKING_ALLOWED_OPS:
                backing_bs.op_blockers.setdefault(op, []).insert(0, reason)

    def child_cb_detach(self, c: BdrvChild) -> None:
        self.graph.generation += 1
        if c.role & Role.COW and c.bs is not None and self.backing_blocker is not None:
            for blockers in c.bs.op_blockers.values():
                blockers[:] = [b for b in blockers if b is not self.backing_blocker]
            self.backing_blocker = None
        if c in self.children:
            self.children.remove(c)
        if self.file_child is c:
            self.file_child = None
        if self.backing_child is c:
            self.backing_child = None

    def child_cb_drained_begin(self, c: BdrvChild) -> None:
        """bdrv_child_cb_drained_begin: a drained child quiesces its parent node too."""
        blockio.do_drained_begin_quiesce(self)

    def child_cb_drained_end(self, c: BdrvChild) -> None:
        """bdrv_child_cb_drained_end (bdrv_drained_end_no_poll)."""
        blockio.do_drained_end(self)

    def primary_child(self) -> BdrvChild | None:
        """bdrv_primary_child."""
        for c in self.children:
            if c.role & Role.PRIMARY:
                return c
        return None

    def filter_child(self) -> BdrvChild | None:
        """bdrv_filter_child: bs->backing or bs->file of a filter driver."""
        if not self.is_filter:
            return None
        return self.backing_child or self.file_child

    def cow_child(self) -> BdrvChild | None:
        """bdrv_cow_child: bs->backing of a non-filter node."""
        if self.is_filter:
            return None
        return self.backing_child

    def filter_or_cow_child(self) -> BdrvChild | None:
        return self.filter_child() or self.cow_child()

    def filter_or_cow_bs(self) -> BlockDriverState | None:
        c = self.filter_or_cow_child()
        return c.bs if c else None

    def skip_implicit_filters(self) -> BlockDriverState:
        bs: BlockDriverState = self
        while bs.implicit and (c := bs.filter_child()) is not None and c.bs is not None:
            bs = c.bs
        return bs

    def subtree_contains(self, other: BlockDriverState) -> bool:
        """bdrv_recurse_has_child."""
        if self is other:
            return True
        return any(c.bs is not None and c.bs.subtree_contains(other) for c in self.children)

    def has_blk(self) -> bool:
        return any(getattr(c.parent, "is_block_backend", False) for c in self.parents)

    # -- permissions ----------------------------------------------------------------------------
    def cumulative_perm(self) -> tuple[int, int]:
        """bdrv_get_cumulative_perm: OR of the parents' perms, AND of what they share."""
        perm, shared = 0, P.ALL
        for c in self.parents:
            perm |= c.perm
            shared &= c.shared_perm
        return perm, shared

    def is_writable(self) -> bool:
        return not self.read_only and not self.inactive

    def child_perm(self, child: BdrvChild | None, role: int, perm: int,
                   shared: int) -> tuple[int, int]:
        """.bdrv_child_perm: what this node needs of a child given its own parents' needs.

        ``child`` is None while the edge is being created (bdrv_attach_child_noperm)."""
        nperm, nshared = P.default_perms(role, perm, shared, writable=self.is_writable(),
                                         inactive=self.inactive)
        if child is not None and child.bs is not None and child.bs.force_share:
            nshared = P.ALL
        return nperm, nshared

    def check_perm(self, perm: int, shared: int, tran: Transaction) -> None:
        """.bdrv_check_perm: a driver may refuse a cumulative permission set; what it
        prepares is committed (.bdrv_set_perm) or undone (.bdrv_abort_perm_update) with
        ``tran``."""

    def refresh_limits(self) -> None:
        """bdrv_refresh_limits: max_transfer is the smallest non-zero one of the data,
        filtered and COW children; then the driver may override (drv_refresh_limits)."""
        self.request_alignment = self.default_request_alignment
        mt = 0
        for c in self.children:
            if c.bs is not None and c.role & (Role.DATA | Role.FILTERED | Role.COW):
                cmt = c.bs.max_transfer
                if cmt and (not mt or cmt < mt):
                    mt = cmt
        self.max_transfer = mt
        self.drv_refresh_limits()

    def drv_refresh_limits(self) -> None:
        pass

    # -- sizes ----------------------------------------------------------------------------------
    def getlength(self) -> int:
        """bdrv_getlength: rounded up to sectors like total_sectors * 512."""
        n = self.drv_getlength()
        return (n + BDRV_SECTOR_SIZE - 1) // BDRV_SECTOR_SIZE * BDRV_SECTOR_SIZE

    # -- dirty bitmaps --------------------------------------------------------------------------
    def create_dirty_bitmap(self, granularity: int, name: str | None) -> BdrvDirtyBitmap:
        """bdrv_create_dirty_bitmap: new bitmap at the head of the list."""
        assert granularity >= 512 and granularity & (granularity - 1) == 0
        if name is not None:
            if self.find_dirty_bitmap(name) is not None:
                raise GenericError(f"Bitmap already exists: {name}")
            if len(name.encode()) > 1023:
                raise GenericError(f"Bitmap name too long: {name}")
        size = self.getlength()
        bm = BdrvDirtyBitmap(bs=self, bitmap=HBitmap(size, ctz(granularity)), size=size, name=name)
        self.dirty_bitmaps.insert(0, bm)
        return bm

    def find_dirty_bitmap(self, name: str) -> BdrvDirtyBitmap | None:
        for bm in self.dirty_bitmaps:
            if bm.name is not None and bm.name == name:
                return bm
        return None

    def release_dirty_bitmap(self, bm: BdrvDirtyBitmap) -> None:
        """bdrv_release_dirty_bitmap."""
        assert not bm.busy and bm.successor is None
        self.dirty_bitmaps.remove(bm)

    def release_named_dirty_bitmaps(self) -> None:
        self.dirty_bitmaps = [bm for bm in self.dirty_bitmaps if bm.name is None]

    def set_dirty(self, offset: int, length: int) -> None:
        """bdrv_set_dirty: every enabled bitmap of this node records the range."""
        for bm in self.dirty_bitmaps:
            if not bm.disabled:
                assert not bm.readonly
                bm.bitmap.set(offset, length)

    def truncate_dirty_bitmaps(self, size: int) -> None:
        for bm in self.dirty_bitmaps:
            bm.bitmap.truncate(size)
            bm.size = size

    def query_dirty_bitmaps(self) -> list[dict]:
        return [bm.info() for bm in self.dirty_bitmaps]

    def has_readonly_bitmaps(self) -> bool:
        return any(bm.readonly for bm in self.dirty_bitmaps)

    def default_bitmap_granularity(self) -> int:
        from emulator.block.dirty_bitmap import default_granularity
        info = self.get_info()
        return default_granularity(info.get("cluster_size") if info else None)

    # Persistent bitmaps: drivers that store them (qcow2) override these.
    def supports_persistent_dirty_bitmap(self) -> bool:
        return False

    def can_store_new_dirty_bitmap(self, name: str, granularity: int) -> None:
        """bdrv_can_store_new_dirty_bitmap: raise QEMU's error when it cannot."""
        raise GenericError(f"Can't store persistent bitmaps to {self.device_or_node_name()}: "
                           "Operation not supported")

    def remove_persistent_dirty_bitmap(self, name: str) -> None:
        """bdrv_remove_persistent_dirty_bitmap: drop ``name`` from the image, if stored."""

    # -- I/O (the request layer; see emulator/block/io.py) -----------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        return blockio.preadv(self, offset, length)

    def pwrite(self, offset: int, data: bytes, flags: int = 0) -> None:
        blockio.pwritev(self, offset, data, flags)

    def pwrite_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        blockio.pwrite_zeroes(self, offset, length, flags)

    def pdiscard(self, offset: int, length: int) -> None:
        blockio.pdiscard(self, offset, length)

    def flush(self) -> None:
        blockio.flush(self)

    def block_status(self, offset: int, length: int, *, want_zero: bool = True) -> tuple[int, int]:
        """bdrv_block_status: (BDRV_BLOCK_* flags, bytes) for the extent starting at offset."""
        return blockio.block_status(self, offset, length, want_zero=want_zero)

    def is_allocated_above(self, base: BlockDriverState | None, offset: int, length: int, *,
                           include_base: bool = False) -> tuple[bool, int]:
        """bdrv_is_allocated_above: allocated anywhere from this node down to ``base``?"""
        ret, pnum = blockio.block_status_above(self, base, offset, length,
                                               include_base=include_base, want_zero=False)
        return bool(ret & BDRV_BLOCK_ALLOCATED), pnum

    def is_allocated(self, offset: int, length: int) -> tuple[bool, int]:
        """bdrv_is_allocated: is the extent allocated in this node (not its backing)?"""
        ret, pnum = self.block_status(offset, length, want_zero=False)
        return bool(ret & BDRV_BLOCK_ALLOCATED), pnum

    # -- driver hooks (override) ----------------------------------------------------------
    def drv_open(self, options: dict[str, Any], open_child: Any) -> None:
        """Consume driver options (already schema-checked) and attach children."""

    def drv_getlength(self) -> int:
        raise NotImplementedError

    def drv_preadv(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def drv_pwritev(self, offset: int, data: bytes, flags: int) -> None:
        raise NotImplementedError

    def drv_pwrite_zeroes(self, offset: int, length: int, flags: int) -> None:
        """Default: no efficient zero write; the request layer writes a zero buffer."""
        raise NotImplementedError

    def drv_pdiscard(self, offset: int, length: int) -> None:
        """Default: discard is a no-op (like drivers without .bdrv_co_pdiscard)."""

    def drv_flush(self) -> bool:
        """.bdrv_co_flush: a driver that flushes every layer itself returns True."""
        return False

    def drv_flush_to_os(self) -> None:
        pass

    def drv_flush_to_disk(self) -> None:
        pass

    def drv_has_flush_to_disk(self) -> bool:
        return False

    def drv_block_status(self, want_zero: bool, offset: int, length: int) -> BlockStatus:
        """(flags, pnum, map, file) for the extent at offset (.bdrv_co_block_status)."""
        return BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED, length, offset, None

    def pure_block_status(self) -> bool:
        """Does asking this node's block status have no effects (so asking once for a long
        extent tells the status of any request inside it)? True for plain drivers."""
        return self.plain_io

    def drv_debug_event(self, event: str) -> None:
        """bdrv_debug_event: only blkdebug acts on debug events."""

    def drv_truncate(self, length: int, prealloc: str = "off", zero_write: bool = False) -> None:
        """bdrv_co_truncate's driver call: a filter without its own passes it to the node
        it filters (blkdebug, copy-before-write...)."""
        f = self.filter_child()
        if f is None or f.bs is None:
            raise blockio.TruncateError(errno.ENOTSUP,
                                        "Image format driver does not support resize")
        blockio.truncate(f.bs, length, prealloc)

    def get_info(self) -> dict | None:
        """bdrv_get_info: {'cluster_size', 'is_dirty'} or None (-ENOTSUP); filters forward."""
        f = self.filter_child()
        if f is not None and f.bs is not None:
            return f.bs.get_info()
        return None

    def get_specific_info(self) -> dict | None:
        """ImageInfoSpecific ({'type': ..., 'data': {...}}) or None."""
        return None

    def get_allocated_file_size(self) -> int | None:
        """bdrv_get_allocated_file_size; None stands for -ENOTSUP."""
        if self.protocol_name is not None:
            return None
        if self.is_filter:
            f = self.filter_child()
            return f.bs.get_allocated_file_size() if f and f.bs else None
        total = 0
        for c in self.children:
            if c.role & (Role.DATA | Role.METADATA | Role.FILTERED) and c.bs is not None:
                size = c.bs.get_allocated_file_size()
                if size is None:
                    return None
                total += size
        return total

    def drv_refresh_filename(self) -> None:
        """Driver's .bdrv_refresh_filename (when has_refresh_filename_hook): may set
        exact_filename from full_open_options."""

    def drv_inactivate(self) -> None:
        """.bdrv_inactivate (qcow2 stores persistent bitmaps here)."""

    def drv_reopen_read_only(self) -> None:
        """Reopen read-only: qcow2 stores its persistent bitmaps and marks them readonly."""

    def drv_reopen_commit(self) -> None:
        """.bdrv_reopen_commit, read-only or not: qcow2 swaps in new metadata caches."""

    def drv_close(self) -> None:
        pass

    # -- filenames (bdrv_refresh_filename) ----------------------------------------------------
    def backing_overridden(self) -> bool:
        b = self.backing
        if b is not None and b.bs is not None:
            return self.auto_backing_file != b.bs.filename
        return self.auto_backing_file != ""

    def refresh_filename(self) -> None:
        """bdrv_refresh_filename: exact_filename if the node can be reopened from a plain
        filename, else ``json:{full_open_options}`` in QDict order.

        The result depends on the subtree's edges and on node state fixed when the nodes
        were opened (options, header backing file), so it is kept until an edge anywhere in
        the graph changes (``graph.generation``)."""
        if self._filename_generation == self.graph.generation:
            return
        self._refresh_filename()
        self._filename_generation = self.graph.generation

    def _refresh_filename(self) -> None:
        for c in self.children:
            if c.bs is not None:
                c.bs.refresh_filename()
        if self.implicit and self.children and self.children[0].bs is not None:
            child = self.children[0].bs
            self.exact_filename = child.exact_filename
            self.filename = child.filename
            self.full_open_options = child.full_open_options
            return
        backing_overridden = self.backing_overridden()
        opts: dict[str, Any] = {}
        generate_json = False
        for key in ("driver", "filename", *self.strong_runtime_opts):
            if key.endswith("."):   # bs->options walked in QDict order
                found = {k: self.options[k] for k in qdict_keys(self.options)
                         if k.startswith(key)}
            else:
                found = {key: self.options[key]} if key in self.options else {}
            opts.update(found)
            if found and key not in ("driver", "filename"):
                generate_json = True
        opts.setdefault("driver", self.format_name)
        generate_json |= backing_overridden
        self.gather_child_options(opts, backing_overridden)
        self.full_open_options = opts
        primary = self.primary_child()
        if self.has_refresh_filename_hook:
            self.exact_filename = ""
            self.drv_refresh_filename()
        elif primary is not None and primary.bs is not None:
            pbs = primary.bs
            if (pbs.exact_filename and pbs.protocol_name is not None and not self.is_filter
                    and not generate_json):
                self.exact_filename = pbs.exact_filename
            else:
                self.exact_filename = ""
        self.filename = self.exact_filename or "json:" + to_json(self.full_open_options)

    def gather_child_options(self, opts: dict[str, Any], backing_overridden: bool) -> None:
        for c in self.children:
            if c.name == "backing" and not backing_overridden:
                continue
            if c.bs is not None:
                opts[c.name] = c.bs.full_open_options
        if backing_overridden and self.backing is None:
            opts["backing"] = None


_ID_WELLFORMED = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")


def node_name_is_valid(name: str) -> bool:
    """id_wellformed: a letter first, then letters, digits, '-', '.', '_'."""
    return _ID_WELLFORMED.fullmatch(name) is not None
