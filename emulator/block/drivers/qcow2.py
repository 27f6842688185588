"""qcow2: the format node over the qcow2 library (emulator/qcow2), block/qcow2.c's role.

The library does all its I/O through :class:`ChildIO`, a BlockIO over this node's ``file``
child, so a blkdebug node under qcow2 sees every request and debug event (READ_AIO before each
host data read, FLUSH_TO_OS/FLUSH_TO_DISK from the generic flush). Reads of unallocated ranges
come from the backing child through the request layer.

Persistent dirty bitmaps follow block/qcow2-bitmap.c: loaded on open (enabled iff the AUTO
flag is set; an IN_USE bitmap loads as inconsistent; when the node is writable every loaded
bitmap is marked IN_USE in the image at once); stored — and released — when the node is closed
(blockdev-del, quit) and stored-and-made-readonly when it is reopened read-only (the base of
blockdev-snapshot-sync); removed from the image at once by block-dirty-bitmap-remove.
"""

from __future__ import annotations

import errno
import os
from typing import Any, ClassVar

from emulator.block.dirty_bitmap import BDRV_BITMAP_DEFAULT, BdrvDirtyBitmap, ctz
from emulator.block.drivers import register
from emulator.block.errors import GenericError
from emulator.block.flags import BDRV_BLOCK_RECURSE, BDRV_REQ_NO_FALLBACK
from emulator.block.io import truncate
from emulator.block.node import (
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_ZERO,
    BDRV_REQ_MAY_UNMAP,
    BdrvChild,
    BlockDriverState,
    BlockStatus,
)
from emulator.block.perm import Role
from emulator.block.qemu_opts import absorb_sizes, number
from emulator.block.subtree import subtree
from emulator.qcow2 import Qcow2Error
from emulator.qcow2.bitmaps import (
    BME_MAX_GRANULARITY_BITS,
    BME_MAX_NAME_SIZE,
    BME_MAX_PHYS_SIZE,
    BME_MAX_TABLE_SIZE,
    BME_MIN_GRANULARITY_BITS,
    QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
    QCOW2_MAX_BITMAPS,
    calc_dir_entry_size,
    read_directory,
)
from emulator.qcow2.blockio import TruncateError, error_report
from emulator.qcow2.cache import cache_sizes
from emulator.qcow2.image import Status

CACHE_SIZE_OPTIONS = ("cache-size", "l2-cache-size", "l2-cache-entry-size",
                      "refcount-cache-size")   # QEMU_OPT_SIZE in qcow2_runtime_opts
UINT_MAX = 2**32 - 1


class ChildIO:
    """The qcow2 library's BlockIO over a BdrvChild (QEMU's bs->file)."""

    def __init__(self, child: BdrvChild) -> None:
        self.child = child
        # no blkdebug below (plain drivers only): nothing sees the requests one by one
        self.unobserved = child.bs is not None and all(bs.plain_io for bs in subtree(child.bs))
        self.requests = 0   # requests sent so far: where QEMU's coroutine would wait

    def pread(self, offset: int, length: int) -> bytes:
        self.requests += 1
        return self.child.pread(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        self.requests += 1
        self.child.pwrite(offset, data)

    def pwrite_zeroes(self, offset: int, length: int) -> None:
        self.requests += 1
        self.child.pwrite_zeroes(offset, length, BDRV_REQ_NO_FALLBACK)

    def pdiscard(self, offset: int, length: int) -> None:
        self.requests += 1
        self.child.pdiscard(offset, length)

    def length(self) -> int:
        assert self.child.bs is not None
        return self.child.bs.drv_getlength()

    def allocated_size(self) -> int | None:
        assert self.child.bs is not None
        return self.child.bs.get_allocated_file_size()

    def truncate(self, length: int, prealloc: str = "off") -> None:
        assert self.child.bs is not None
        truncate(self.child.bs, length, prealloc)

    def flush(self) -> None:
        self.child.flush()

    def debug_event(self, event: str) -> None:
        """BdrvChild.debug_event without the extra call: qcow2 raises several per write."""
        bs = self.child.bs
        if bs is not None:
            bs.drv_debug_event(event)


@register
class Qcow2Node(BlockDriverState):
    format_name: ClassVar[str] = "qcow2"
    supports_backing: ClassVar[bool] = True
    plain_io: ClassVar[bool] = True
    strong_runtime_opts: ClassVar[tuple[str, ...]] = ("encrypt.key-secret",)

    image: Any = None

    def drv_open(self, options: dict[str, Any], open_child: Any) -> None:
        from emulator.qcow2 import Qcow2Image

        open_child(options.get("file"), "file", Role.DATA | Role.METADATA | Role.PRIMARY)
        assert self.file is not None and self.file.bs is not None
        try:
            self.image = Qcow2Image.open(ChildIO(self.file), read_only=not self.is_writable(),
                                         finish=False)
            self.image.zero_status = self._zero_status
            self._update_options(options)
        except Qcow2Error as e:
            raise GenericError(str(e)) from None
        if "data-file" in options:   # qcow2_do_open: an image without an external data file
            open_child(options["data-file"], "data-file", Role.DATA)
            raise GenericError("'data-file' can only be set for images with an external data "
                               "file")
        passed = self.image.refcounts.pass_discard   # qcow2_update_options_prepare
        for kind, default in (("request", self.discard == "unmap"), ("snapshot", True),
                              ("other", False)):
            if options.get(f"pass-discard-{kind}", default):
                passed.add(kind)
            else:
                passed.discard(kind)
        self.backing_file = self.image.backing_file or ""
        self.backing_format = self.image.backing_format or ""
        self.auto_backing_file = self.backing_file
        self._load_dirty_bitmaps()
        try:   # the header update and the repair of a dirty image come last
            self.image.finish_open()
        except Qcow2Error as e:
            raise GenericError(str(e)) from None

    def _update_options(self, options: dict[str, Any]) -> None:
        """qcow2_update_options_prepare's checks, in its order; the cache sizes taken."""
        absorb_sizes(options, CACHE_SIZE_OPTIONS)
        img = self.image
        sizes = cache_sizes(img.size, img.cluster_size,
                            **{key.replace("-", "_"): options[key]
                               for key in CACHE_SIZE_OPTIONS if key in options})
        img.tables.cache.resize(sizes.l2_tables(img.cluster_size))
        img.refcounts.cache.resize(sizes.refcount_slots)
        if number(options, "cache-clean-interval", 600) > UINT_MAX:
            raise Qcow2Error("Cache clean interval too big")
        lazy = bool(options.get("lazy-refcounts", img.lazy_refcounts))
        if lazy and img.header.version < 3:
            raise Qcow2Error("Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                             "compatibility level")
        img.use_lazy_refcounts = lazy
        encrypt = options.get("encrypt")
        if encrypt is not None and not img.header.crypt_method:
            raise Qcow2Error("No encryption in image header, but options specified format "
                             f"'{encrypt['format']}'")

    def drv_refresh_limits(self) -> None:
        self.request_alignment = 1

    # -- geometry and I/O -------------------------------------------------------------------
    def drv_getlength(self) -> int:
        return int(self.image.size)

    def _backing_reader(self) -> Any:
        b = self.backing
        if b is None or b.bs is None:
            return None
        child = b

        def read(offset: int, length: int) -> bytes:
            assert child.bs is not None
            blen = child.bs.getlength()
            if offset >= blen:
                return bytes(length)
            n = min(length, blen - offset)
            data = child.pread(offset, n)
            return data + bytes(length - n)

        return read

    def drv_preadv(self, offset: int, length: int) -> bytes:
        return bytes(self.image.read(offset, length, self._backing_reader()))

    def drv_pwritev(self, offset: int, data: bytes, flags: int) -> None:
        self.image.write(offset, data, self._backing_reader())

    def _zero_status(self, offset: int, length: int, fast: bool) -> bool:
        """qcow2's is_zero (clamped to the image, a loop over extents) and is_zero_cow's
        bdrv_co_is_zero_fast (one extent, no want_zero), on this node and its chain."""
        from emulator.block.io import block_status_above
        if fast:
            ret, pnum = block_status_above(self, None, offset, length, want_zero=False)
            return pnum == length and bool(ret & BDRV_BLOCK_ZERO)
        length = min(length, self.getlength() - offset)
        while length > 0:
            ret, pnum = block_status_above(self, None, offset, length)
            if not ret & BDRV_BLOCK_ZERO or not pnum:
                return False
            offset, length = offset + pnum, length - pnum
        return True

    def drv_pwrite_zeroes(self, offset: int, length: int, flags: int) -> None:
        if flags & BDRV_REQ_NO_FALLBACK and self._version() < 3:
            raise NotImplementedError   # not in version 2's supported_zero_flags
        self.image.write_zeroes(offset, length, may_unmap=bool(flags & BDRV_REQ_MAY_UNMAP),
                                backing=self._backing_reader())

    def drv_pdiscard(self, offset: int, length: int) -> None:
        self.image.discard(offset, length, self._backing_reader())

    def drv_flush_to_os(self) -> None:
        self.image.flush()

    def drv_block_status(self, want_zero: bool, offset: int, length: int) -> BlockStatus:
        preallocated = self.image.metadata_preallocated()
        status, pnum, host = self.image.map_extent(offset, length)
        file_bs = self.file.bs if self.file is not None else None
        if status == Status.DATA:
            # the host offset (the guest offset used to send the file's SEEK_DATA/SEEK_HOLE
            # to the wrong place and split data runs: mirror chunks); the file's status too
            # only where metadata preallocation may have left allocated clusters unwritten
            flags = BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID
            if preallocated:
                flags |= BDRV_BLOCK_RECURSE
            return flags, pnum, host if host is not None else offset, file_bs
        if status == Status.ZERO:
            return BDRV_BLOCK_ZERO, pnum, offset, None
        return 0, pnum, offset, None

    # -- information ----------------------------------------------------------------------------
    def get_info(self) -> dict | None:
        """qcow2_get_info."""
        return self.image.get_info()

    def _version(self) -> int:
        return int(self.image.header.version)

    def get_specific_info(self) -> dict | None:
        """qcow2_get_specific_info."""
        try:
            return {"type": "qcow2", "data": self.image.specific_info()}
        except Qcow2Error as e:   # the bitmap directory could not be read
            raise GenericError(str(e)) from None

    # -- persistent dirty bitmaps -----------------------------------------------------------
    def supports_persistent_dirty_bitmap(self) -> bool:
        return self._version() >= 3

    def _load_dirty_bitmaps(self) -> None:
        """qcow2_load_dirty_bitmaps: every stored bitmap becomes a persistent BdrvDirtyBitmap;
        a writable node marks them all IN_USE in the image right away."""
        try:
            stored = self.image.load_bitmaps(mark_in_use=self.is_writable())
        except Qcow2Error as e:
            raise GenericError(str(e)) from None
        for sb in stored:
            if sb.in_use and self.find_dirty_bitmap(sb.name) is not None:
                continue
            bm = self.create_dirty_bitmap(int(sb.granularity), sb.name)
            bm.persistent = True
            if sb.in_use:
                bm.inconsistent = True
                bm.disabled = True
            else:
                bm.bitmap.bits = int(sb.dirty) & ((1 << bm.bitmap.size) - 1)
            if not sb.auto:
                bm.disabled = True
            if not self.is_writable():
                bm.readonly = True

    def _check_constraints(self, name: str, granularity: int) -> None:
        """check_constraints_on_bitmap."""
        gbits = ctz(granularity)
        if gbits > BME_MAX_GRANULARITY_BITS:
            raise GenericError("Granularity exceeds maximum "
                               f"({1 << BME_MAX_GRANULARITY_BITS} bytes)")
        if gbits < BME_MIN_GRANULARITY_BITS:
            raise GenericError("Granularity is under minimum "
                               f"({1 << BME_MIN_GRANULARITY_BITS} bytes)")
        length = self.getlength()
        nbits = (length + granularity - 1) // granularity
        nbytes = (nbits + 7) // 8
        cluster = int(self.image.cluster_size)
        if nbytes > BME_MAX_PHYS_SIZE or nbytes > BME_MAX_TABLE_SIZE * cluster:
            raise GenericError("Too much space will be occupied by the bitmap. "
                               "Use larger granularity")
        if len(name.encode()) > BME_MAX_NAME_SIZE:
            raise GenericError(f"Name length exceeds maximum ({BME_MAX_NAME_SIZE} characters)")

    def can_store_new_dirty_bitmap(self, name: str, granularity: int) -> None:
        """qcow2_co_can_store_new_dirty_bitmap."""
        if self.find_dirty_bitmap(name) is not None:
            raise GenericError(f"Bitmap already exists: {name}")
        prefix = f"Can't make bitmap '{name}' persistent in '{self.device_or_node_name()}': "
        if self._version() < 3:
            raise GenericError(prefix + "Cannot store dirty bitmaps in qcow2 v2 files")
        try:
            self._check_constraints(name, granularity)
        except GenericError as e:
            raise e.prepend(prefix) from None
        nb, size = 1, calc_dir_entry_size(len(name.encode()))
        for bm in self.dirty_bitmaps:
            if bm.get_persistence():
                nb += 1
                size += calc_dir_entry_size(len((bm.name or "").encode()))
        if nb > QCOW2_MAX_BITMAPS:
            raise GenericError(prefix + "Maximum number of persistent bitmaps is already reached")
        if size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
            raise GenericError(prefix + "Not enough space in the bitmap directory")

    def remove_persistent_dirty_bitmap(self, name: str) -> None:
        """qcow2_co_remove_persistent_dirty_bitmap: a new directory without ``name``, then the
        bitmap's table and data clusters freed; the other bitmaps stay where they are.
        Absent is fine."""
        try:
            self.image.remove_bitmap(name)
        except Qcow2Error as e:
            raise GenericError(str(e)) from None

    def store_persistent_dirty_bitmaps(self, *, release: bool) -> None:
        """qcow2_store_persistent_dirty_bitmaps: every persistent, consistent, non-readonly
        bitmap is written (flags: AUTO iff enabled); stored entries without one stay as
        they are. With ``release``, the written ones and the read-only ones the image
        holds are released."""
        from emulator.qcow2 import StoredBitmap

        written: list[BdrvDirtyBitmap] = []
        readonly: list[BdrvDirtyBitmap] = []
        for bm in self.dirty_bitmaps:
            if not bm.get_persistence() or bm.inconsistent:
                continue
            (readonly if bm.readonly else written).append(bm)
        try:
            stored = self.image.store_bitmaps(
                [StoredBitmap(name=bm.name or "", granularity=bm.granularity,
                              dirty=bm.bitmap.bits, auto=bm.enabled()) for bm in written],
                writable=self.is_writable())
        except Qcow2Error as e:
            raise GenericError(str(e)) from None
        if release:
            for bm in written + [bm for bm in readonly if (bm.name or "") in stored]:
                if bm in self.dirty_bitmaps:
                    bm.busy = False
                    bm.successor = None
                    self.release_dirty_bitmap(bm)

    def drv_truncate(self, length: int, prealloc: str = "off", zero_write: bool = False) -> None:
        """qcow2_co_truncate: QEMU's checks, the image's truncate, then "Update cache
        sizes" (qcow2_update_options: the caches written back, new ones sized for the new
        length)."""
        if length % 512:
            raise TruncateError(errno.EINVAL, "The new size must be a multiple of 512")
        try:
            self._truncate_bitmaps_check()
            self.image.truncate(length, prealloc, zero_write=zero_write,
                                backing=self._backing_reader())
            self.image.flush_caches()
            self._update_options(dict(self.options))
        except GenericError as e:   # a bitmap that cannot be resized
            raise TruncateError(errno.ENOTSUP, e.desc) from None
        except Qcow2Error as e:
            raise TruncateError(e.errno or errno.EIO, str(e)) from None
        except OSError as e:   # writing the caches back
            code = e.errno or errno.EIO
            raise TruncateError(code, os.strerror(code)) from None

    def _truncate_bitmaps_check(self) -> None:
        """qcow2_truncate_bitmaps_check: every bitmap stored in the image must be loaded
        (it is resized in memory) and usable."""
        for entry in read_directory(self.image.io, self.image.header):
            bitmap = self.find_dirty_bitmap(entry.name)
            if bitmap is None:
                raise GenericError("Cannot resize qcow2 with persistent bitmaps that were "
                                   "not loaded into memory")
            bitmap.check(BDRV_BITMAP_DEFAULT)

    def drv_reopen_read_only(self) -> None:
        """qcow2_reopen_prepare going read-only: qcow2_reopen_bitmaps_ro (store, then
        persistent bitmaps become readonly), then a flush (the caches written back)."""
        self.store_persistent_dirty_bitmaps(release=False)
        for bm in self.dirty_bitmaps:
            if bm.get_persistence():
                bm.readonly = True
        self.flush()

    def drv_reopen_commit(self) -> None:
        """qcow2_update_options_commit: the caches qcow2_update_options_prepare made (same
        sizes, nothing in them) replace the flushed ones, so the next lookup of any table
        reads it again, through blkdebug's rules too."""
        for cache in (self.image.tables.cache, self.image.refcounts.cache):
            cache.resize(cache.size)

    def drv_close(self) -> None:
        """qcow2_close -> qcow2_inactivate: store (and release) bitmaps, close the image."""
        if self.image is None:
            return
        lost = False
        if self.is_writable():
            try:
                self.store_persistent_dirty_bitmaps(release=True)
            except (GenericError, OSError) as e:
                lost = True
                text = e.desc if isinstance(e, GenericError) else \
                    os.strerror(e.errno or errno.EIO)
                error_report("Lost persistent bitmaps during inactivation of node "
                             f"'{self.device_or_node_name()}': {text}")
        self.image.close(bitmaps_lost=lost)
        self.image = None


