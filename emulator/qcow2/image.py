"""`Qcow2Image`: guest reads and writes on a qcow2 file, following QEMU 7.2's qcow2 driver.

Reads and block status walk whole runs of clusters (qcow2_get_host_offset); writes reuse
clusters in place when they can and otherwise allocate and copy-on-write the partial clusters
(qcow2_alloc_host_offset, perform_cow); zero writes and discards set zero flags
(qcow2_subcluster_zeroize, qcow2_cluster_discard). L2 tables and refcount blocks go through
QEMU's two metadata caches (`emulator.qcow2.cache`): written back when QEMU writes them
back — a flush, close, a new L2 table or refcount block, a full cache — not at each change.

Debug events are raised on the `BlockIO` where qcow2 raises ``BLKDBG_EVENT(bs->file, ...)``,
including the caches' "l2_update" and "refblock_update_part" at write-back.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import struct
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import Enum

from emulator.qcow2 import bitmaps as bm
from emulator.qcow2.blockio import (
    BlockIO,
    Report,
    TruncateError,
    check_truncate_offset,
    error_report,
    fprintf_stderr,
    warn_report,
)
from emulator.qcow2.check import FIX_ERRORS, FIX_LEAKS, CheckResult, check_refcounts
from emulator.qcow2.errors import Qcow2Error
from emulator.qcow2.header import (
    AUTOCLEAR_BITMAPS,
    AUTOCLEAR_MASK,
    COMPAT_LAZY_REFCOUNTS,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO,
    EXT_DATA_FILE,
    EXT_END,
    EXT_FEATURE_TABLE,
    HEADER_V3_LENGTH,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    OFFSET_INCOMPATIBLE_FEATURES,
    OFFSET_L1,
    OFFSET_SIZE,
    Header,
)
from emulator.qcow2.refcounts import Refcounts
from emulator.qcow2.tables import (
    OFFSET_MASK,
    OFLAG_COPIED,
    OFLAG_ZERO,
    ClusterTables,
    ClusterType,
    cluster_type,
    needs_new_alloc,
)

# block.h: INT64_MAX aligned down to BDRV_MAX_ALIGNMENT (1 GiB), the longest image a
# truncate accepts; qcow2.h: the largest L1 table, in bytes
INT_MAX = 2**31 - 1
QCOW_MAX_L1_SIZE = 1 << 25

Backing = Callable[[int, int], bytes]
"""Reads the backing chain: ``backing(offset, length)`` returns the guest data there (a short
result is padded with zeroes, as reads past the end of a shorter backing file are)."""

ZeroStatus = Callable[[int, int, bool], bool]
"""The block layer's answer to "does [offset, +length) of this node read as zeroes?" from
block status: ``zero_status(offset, length, fast)`` — qcow2's is_zero (``fast`` false:
bdrv_block_status_above, looping over its extents) or bdrv_co_is_zero_fast (one extent,
without want_zero). Data that merely happens to be zero is not zero to it."""


class Status(Enum):
    """What block status reports for an extent of this image alone."""

    DATA = "data"
    ZERO = "zero"  # zero clusters: read as zeroes without going to the backing file
    UNALLOCATED = "unallocated"  # reads through to the backing file (zeroes without one)

    __hash__ = object.__hash__   # members are singletons; Enum's own hash is Python code


_STATUS = {
    ClusterType.NORMAL: Status.DATA,
    ClusterType.COMPRESSED: Status.DATA,
    ClusterType.ZERO_PLAIN: Status.ZERO,
    ClusterType.ZERO_ALLOC: Status.ZERO,
    ClusterType.UNALLOCATED: Status.UNALLOCATED,
}


@dataclass
class _Allocation:
    """QCowL2Meta: a run of clusters a write is about to (re)link in one L2 table.

    Offsets are relative to `guest`: the data goes to [data_start, data_end); the COW regions
    [head_from, data_start) and [data_end, tail_to) keep the clusters' old contents.
    """

    guest: int  # guest offset of the first cluster
    host: int  # host offset of the first cluster
    nb_clusters: int
    head_from: int
    data_start: int
    data_end: int
    tail_to: int
    keep_old: bool  # rewriting zero-flagged clusters in place: nothing to free
    l2_offset: int
    l2_index: int
    old_entries: list[int] = field(default_factory=list)
    cow_done: bool = False  # perform_cow wrote the COW regions (not handle_alloc_space)

    @property
    def has_cow(self) -> bool:
        return self.head_from < self.data_start or self.data_end < self.tail_to

    def cow_regions(self) -> list[tuple[int, int]]:
        """The non-empty COW regions as (start, stop) offsets relative to `guest`."""
        return [(start, stop) for start, stop in ((self.head_from, self.data_start),
                                                  (self.data_end, self.tail_to)) if start < stop]


def _pread(io: BlockIO, offset: int, length: int, failure: str) -> bytes:
    """One of qcow2_do_open's reads: a failed one fails the open with QEMU's text."""
    try:
        return io.pread(offset, length)
    except OSError as e:
        code = e.errno or errno.EIO
        raise Qcow2Error(f"{failure}: {os.strerror(code)}", -code) from None


# the header extensions whose data qcow2_read_extensions reads at open, with its text for a
# failed read (the feature table is read only to name unsupported features)
_EXTENSION_READS = {EXT_BACKING_FORMAT: "ERROR: ext_backing_format: Could not read format name",
                    EXT_CRYPTO: "Unable to read CRYPTO header extension",
                    EXT_DATA_FILE: "ERROR: Could not read data file name"}


@dataclass
class OpenReads:
    """What qcow2_do_open reads before the image is usable, read in its order, so that
    blkdebug rules (and a failing disk) meet the same requests: the header struct, unknown
    header fields, the L1 table, the refcount table (after REFTABLE_LOAD), each header
    extension's magic and length and the data QEMU keeps, the backing file name.

    ``header`` is decoded from what was read of the first cluster (the feature table's data
    is not read); ``reftable`` is None where nothing can observe the requests
    (``io.unobserved``), and the table is read on first use."""

    header: Header
    l1: bytes
    reftable: bytes | None
    stale_bitmaps: bool = False   # a bitmaps extension without its autoclear bit

    @classmethod
    def read(cls, io: BlockIO) -> OpenReads:
        fixed = _pread(io, 0, HEADER_V3_LENGTH, "Could not read qcow2 header")
        cluster0 = bytearray(Header.cluster_size_of(fixed))
        cluster0[:len(fixed)] = fixed
        # the fixed fields' checks come before any other read (no extension, no name yet)
        header = Header.parse(bytes(cluster0))
        if header.header_length > HEADER_V3_LENGTH:
            cluster0[HEADER_V3_LENGTH:header.header_length] = _pread(
                io, HEADER_V3_LENGTH, header.header_length - HEADER_V3_LENGTH,
                "Could not read unknown qcow2 header fields")
        l1 = _pread(io, header.l1_table_offset, 8 * header.l1_size,
                    "Could not read L1 table") if header.l1_size else b""
        reftable = None
        if not getattr(io, "unobserved", False):
            io.debug_event("reftable_load")
            reftable = _pread(io, header.refcount_table_offset,
                              header.refcount_table_clusters * header.cluster_size,
                              "Could not initialize refcount handling")
        backing_offset, backing_size = struct.unpack_from(">QI", fixed, 8)
        stale = cls._read_extensions(io, header, cluster0, backing_offset or len(cluster0))
        if backing_offset and backing_size <= min(1023, len(cluster0) - backing_offset):
            cluster0[backing_offset:backing_offset + backing_size] = _pread(
                io, backing_offset, backing_size, "Could not read backing file name")
        return cls(Header.parse(bytes(cluster0)), l1, reftable, stale)

    @staticmethod
    def _read_extensions(io: BlockIO, header: Header, cluster0: bytearray, end: int) -> bool:
        """qcow2_read_extensions' reads (Header.parse decodes and checks what they read);
        True if a bitmaps extension was left stale (its autoclear bit cleared)."""
        offset = header.header_length
        stale = False
        while offset < end:
            ext = _pread(io, offset, 8, "qcow2_read_extension: ERROR: pread fail from "
                                        f"offset {offset}")
            cluster0[offset:offset + 8] = ext
            magic, length = struct.unpack(">II", ext)
            offset += 8
            if magic == EXT_END or offset > end or length > end - offset:
                return stale
            failure = _EXTENSION_READS.get(magic, "ERROR: unknown extension: Could not read "
                                                  "data")
            if magic == EXT_BITMAPS:
                failure = "bitmaps_ext: Could not read ext header"
                if length != 24 or not header.autoclear_features & AUTOCLEAR_BITMAPS:
                    failure = ""
                    stale = length == 24
                    if stale:
                        warn_report(_STALE_BITMAPS[header.version >= 3])
            if magic != EXT_FEATURE_TABLE and failure:
                cluster0[offset:offset + length] = _pread(io, offset, length, failure)
            offset += (length + 7) & ~7
        return stale


# qcow2_read_extensions' warning for a stale bitmaps extension (by "version >= 3"), and the
# error_printf() after it, which ends without a newline
_LEAKED = "\nSome clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
_STALE_BITMAPS = {
    False: "This qcow2 v2 image contains bitmaps, but they may have been modified by a "
           "program without persistent bitmap support; so now they must all be considered "
           "inconsistent" + _LEAKED,
    True: "a program lacking bitmap support modified this file, so all bitmaps are now "
          "considered inconsistent" + _LEAKED}


class _TaskFailed(Exception):
    """A write stretch's task failed: its error, and the allocations it did not link (given
    back by qcow2_alloc_cluster_abort when the task ends)."""

    def __init__(self, error: OSError | Qcow2Error, unlinked: list[_Allocation]) -> None:
        super().__init__(error)
        self.error = error
        self.unlinked = unlinked


class Qcow2Image:
    """An open qcow2 image (version 2 or 3, no internal snapshots, no external data
    file). Version 2 has no zero flag: zero writes and discards unallocate clusters where
    nothing shows through from a backing file, and are refused (-ENOTSUP) where it would."""

    def __init__(self, io: BlockIO, start: OpenReads, *, read_only: bool) -> None:
        header = start.header
        self.io = io
        self.header = header
        self.read_only = read_only
        self.cluster_size = header.cluster_size   # fixed for the life of the image
        self.refcounts = Refcounts(io, header, start.reftable)
        self.tables = ClusterTables(io, header, self.refcounts, start.l1)
        self._metadata_preallocated: bool | None = None   # not checked yet
        # s->use_lazy_refcounts: the image's feature bit, unless a node option says otherwise
        self.use_lazy_refcounts = bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS)
        # set by a block node over this image; without one (an image opened on its own,
        # as qemu-img and offline qemu-io do here) the backing data is read instead
        self.zero_status: ZeroStatus | None = None
        self._header_update_pending = False   # set by open(), done by finish_open()

    # -- creating and opening ----------------------------------------------------------------
    @classmethod
    def create(cls, io: BlockIO, size: int, *, cluster_size: int = 65536,
               backing_file: str | None = None, backing_format: str | None = None,
               lazy_refcounts: bool = False, refcount_bits: int = 16,
               version: int = 3, preallocation: str = "off") -> None:
        """qcow2_co_create on an empty file: the same steps, so the same bytes, as
        ``qemu-img create -f qcow2``: header cluster, refcount table and block, the first
        clusters referenced, the full header, the L1 table sized for `size` and the
        `preallocation` asked for (qcow2_co_truncate from 0), then the backing file in the
        header; the caches are written back as the creator closes."""
        if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 * 1024 * 1024:
            raise Qcow2Error("Cluster size must be a power of two between 512 and 2048k")
        if refcount_bits & (refcount_bits - 1) or not 1 <= refcount_bits <= 64:
            raise Qcow2Error("Refcount width must be a power of two and may not exceed 64 "
                             "bits")
        if backing_format and not backing_file:
            raise Qcow2Error("Backing format cannot be used without backing file")
        header = Header(cluster_bits=cluster_size.bit_length() - 1, size=0,
                        refcount_table_offset=cluster_size, refcount_table_clusters=1,
                        refcount_order=refcount_bits.bit_length() - 1, version=version,
                        compatible_features=COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0)
        io.pwrite(0, header.pack(extensions=False))
        io.pwrite(cluster_size, _empty_refcount_structures(cluster_size))
        image = cls(io, OpenReads.read(io), read_only=False)   # blk_new_open of the new image
        header = image.header
        if getattr(io, "unobserved", False):
            # nothing could tell a read-back from what was just written
            image.refcounts.adopt([2 * cluster_size], {2 * cluster_size: bytes(cluster_size)})
        image.refcounts.alloc(3 * cluster_size)
        image._write_header()
        try:
            try:   # blk_truncate, which takes the size as an int64
                check_truncate_offset(size - (1 << 64) if size >= 1 << 63 else size)
                image.truncate(size, preallocation)
            except TruncateError as e:
                raise Qcow2Error(f"Could not resize image: {e.message}", e.code) from None
            except Qcow2Error as e:
                raise Qcow2Error(f"Could not resize image: {e}", e.errno) from None
            if backing_file is not None:   # bdrv_change_backing_file, once it has its size
                if len(backing_file.encode()) > 1023:   # qcow2_change_backing_file: -EINVAL
                    raise Qcow2Error(f"Could not assign backing file '{backing_file}' with "
                                     f"format '{backing_format or '(null)'}': "
                                     f"{os.strerror(errno.EINVAL)}")
                header.backing_file = backing_file
                header.backing_format = backing_format
                image._write_header()
        finally:
            image.close()

    @classmethod
    def open(cls, io: BlockIO, *, read_only: bool = False, check_mode: bool = False,
             report: Report | None = None, finish: bool = True) -> Qcow2Image:
        """qcow2_open: read and check the header; metadata is loaded on demand.

        ``check_mode`` is BDRV_O_CHECK (``qemu-img check``): a corrupt image may be opened
        read-write and a dirty one is not repaired. ``finish`` runs :meth:`finish_open` at
        once; a block node first takes its options and loads its bitmaps, as
        qcow2_do_open does, then calls it."""
        start = OpenReads.read(io)
        header = start.header
        if header.nb_snapshots:
            raise Qcow2Error("Images with internal snapshots are not supported")
        if not read_only and not check_mode and header.incompatible_features & INCOMPAT_CORRUPT:
            raise Qcow2Error("qcow2: Image is corrupt; cannot be opened read/write")
        image = cls(io, start, read_only=read_only)
        if not read_only and (start.stale_bitmaps or header.autoclear_features & ~AUTOCLEAR_MASK):
            # qcow2_do_open's update_header: the stale extension and unknown autoclear bits
            # go; the header is written by finish_open, unless loading the bitmaps does
            header.autoclear_features &= AUTOCLEAR_MASK
            image._header_update_pending = True
        if finish:
            image.finish_open(check_mode=check_mode, report=report)
        return image

    def finish_open(self, *, check_mode: bool = False, report: Report | None = None) -> None:
        """The end of qcow2_do_open, opened read-write: the header update open() left
        pending (if loading the bitmaps did not write the header), then a dirty image (lazy
        refcounts) repaired; what the repair prints goes to ``report`` (by default the
        stderr of the block graph over the image, if any)."""
        if self.read_only:
            return
        if self._header_update_pending:
            try:
                self._write_header()
            except OSError as e:
                raise Qcow2Error("Could not update qcow2 header: "
                                 f"{os.strerror(e.errno or errno.EIO)}") from None
            self._header_update_pending = False
        if not check_mode and self.header.incompatible_features & INCOMPAT_DIRTY:
            self._repair_dirty(report if report is not None else fprintf_stderr)

    def _repair_dirty(self, report: Report | None) -> None:
        """qcow2_do_open's "Repair image if dirty": qcow2_co_check_locked with
        BDRV_FIX_ERRORS | BDRV_FIX_LEAKS; the open fails if that fails."""
        result = self.check(FIX_ERRORS | FIX_LEAKS)
        if report is not None:
            for line in result.messages:
                report(line + "\n")
        if result.ret < 0 or result.check_errors:
            code = -result.ret if result.ret < 0 else errno.EIO
            raise Qcow2Error(f"Could not repair dirty image: {os.strerror(code)}")

    def truncate(self, offset: int, prealloc: str = "off", *, zero_write: bool = False,
                 backing: Backing | None = None) -> None:
        """qcow2_co_truncate to `offset` (a multiple of 512; the caller checked that and the
        bitmaps): shrinking drops the clusters past the end (a full discard), the L2 tables
        and refcount blocks no longer needed, and the file's unused tail; growing makes the
        L1 table exactly big enough, then preallocates as `prealloc` says, and, with
        `zero_write` (a backing file that would show through), zeroes the new area. The
        header's size is written last (the new size holds even if that write fails). Raises
        Qcow2Error with QEMU's message."""
        old = self.size
        covered = self.cluster_size * (self.cluster_size // 8)
        new_l1_size = -(-offset // covered)
        try:
            if offset < old:
                if prealloc != "off":
                    raise Qcow2Error("Preallocation can't be used for shrinking an image",
                                     errno.EINVAL)
                self._shrink(offset, new_l1_size)
            else:
                with _step("Failed to grow the L1 table"):
                    self._grow_l1(new_l1_size)
            if prealloc == "metadata":
                self._preallocate_metadata(old, offset)
            elif prealloc != "off":
                self._preallocate_data(old, offset, prealloc)
            if zero_write and offset > old:
                self._zero_new_area(old, offset, backing)
            if prealloc != "off":
                with _step("Failed to flush the preallocated area to disk"):
                    self.flush()
            self.header.size = offset   # bs->total_sectors: the new size even if the
            with _step("Failed to update the image size"):   # header's write fails
                self.io.pwrite(OFFSET_SIZE, struct.pack(">Q", offset))
        except TruncateError as e:
            raise Qcow2Error(e.message, e.code) from None

    def _grow_l1(self, min_size: int) -> None:
        """qcow2_grow_l1_table, exact size: a new table (the old entries, then zeroes) in
        new clusters, activated in the header; the old table's clusters are freed."""
        l1_size = self.header.l1_size
        if min_size <= l1_size:
            return
        if min_size > QCOW_MAX_L1_SIZE // 8:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        self.io.debug_event("l1_grow_alloc_table")
        new_offset = self.refcounts.alloc(8 * min_size)
        try:
            self.refcounts.cache.flush()
            self.io.debug_event("l1_grow_write_table")
            new_l1 = self.tables.l1[:l1_size] + [0] * (min_size - l1_size)
            self.io.pwrite(new_offset, struct.pack(f">{min_size}Q", *new_l1))
            self.io.flush()
            self.io.debug_event("l1_grow_activate_table")
            self.io.pwrite(OFFSET_L1, struct.pack(">IQ", min_size, new_offset))
            self.io.flush()
        except OSError:
            self.refcounts.free(new_offset, 8 * min_size, "other")
            raise
        old_offset = self.header.l1_table_offset
        self.header.l1_size, self.header.l1_table_offset = min_size, new_offset
        self.tables.l1 = new_l1
        self.refcounts.free(old_offset, 8 * l1_size, "other")

    def _shrink(self, offset: int, new_l1_size: int) -> None:
        """qcow2_co_truncate shrinking: the clusters from the first whole one past `offset`
        are fully discarded (unallocated again, their clusters freed and discarded on the
        file), then the L1 table and the refcount table shrink, and the file loses the
        clusters after the last one in use (a failure there is only a warning)."""
        start = -(-offset // self.cluster_size) * self.cluster_size
        with _step("Failed to discard cropped clusters"):
            self._update_clusters(start, self.size - start, lambda entry: 0, kind="always")
        with _step("Failed to reduce the number of L2 tables"):
            self._shrink_l1(new_l1_size)
        with _step("Failed to discard unused refblocks"):
            self.refcounts.shrink_table()
        with _step("Failed to inquire current file length"):
            file_size = self.io.length()
        last = self.refcounts.last_cluster(file_size)
        if last < 0:
            raise Qcow2Error("Failed to find the last cluster: "
                             f"{os.strerror(errno.EIO)}", errno.EIO)
        if (last + 1) * self.cluster_size < file_size:
            try:
                self.io.truncate((last + 1) * self.cluster_size)
            except TruncateError as e:
                warn_report(f"Failed to truncate the tail of the image: {e.message}\n")

    def _shrink_l1(self, new_l1_size: int) -> None:
        """qcow2_shrink_l1_table: the dropped entries are zeroed on disk (the header keeps
        the old size), then the L2 tables they pointed to are freed, last first."""
        l1 = self.tables.l1
        if new_l1_size >= len(l1):
            return
        try:
            self.io.debug_event("l1_shrink_write_table")
            self.io.pwrite_zeroes(self.header.l1_table_offset + 8 * new_l1_size,
                                  8 * (len(l1) - new_l1_size))
            self.io.flush()
        except OSError:
            l1[new_l1_size:] = [0] * (len(l1) - new_l1_size)
            raise
        self.io.debug_event("l1_shrink_free_l2_clusters")
        for i in range(len(l1) - 1, new_l1_size - 1, -1):
            if l1[i] & OFFSET_MASK:
                self.refcounts.free(l1[i] & OFFSET_MASK, self.cluster_size, "always")
                l1[i] = 0

    def _zero_new_area(self, old: int, offset: int, backing: Backing | None) -> None:
        """BDRV_REQ_ZERO_WRITE: the grown area reads as zeroes, not as the backing file:
        zero clusters from the first whole one (qcow2_subcluster_zeroize), explicit zeroes
        written before it."""
        zero_start = -(-old // self.cluster_size) * self.cluster_size
        self.header.size = offset   # the writes below reach past the old end
        try:
            if offset > zero_start:
                with _step("Failed to zero out new clusters"):
                    if self.header.version < 3:
                        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
                    self._update_clusters(zero_start, offset - zero_start,
                                          lambda entry: _zeroed(entry, False))
            if zero_start > old:
                with _step("Failed to zero out the new area"):
                    self.write(old, bytes(min(zero_start, offset) - old), backing)
        finally:
            self.header.size = old

    def _preallocate_metadata(self, offset: int, size: int) -> None:
        """preallocate_co from `offset` to `size`: cluster allocations as a write would make
        them, in chunks of at most INT_MAX bytes, linked without data (m->prealloc), the
        tail of a last partial cluster copied on write as zeroes; then the file grown to the
        last allocation."""
        end = 0
        chunk = (INT_MAX >> self.header.cluster_bits) << self.header.cluster_bits
        while offset < size:
            with _step("Allocating clusters failed"):
                host, covered, allocations = self._alloc_host_offset(
                    offset, min(size - offset, chunk))
            with _step("Mapping clusters failed"):
                for alloc in allocations:   # qcow2_handle_l2meta: perform_cow, link_l2
                    for start, stop in alloc.cow_regions():
                        contents = self._cow_read(alloc.guest + start, stop - start, None)
                        self.io.debug_event("cow_write")
                        self.io.pwrite(alloc.host + start, contents)
                        alloc.cow_done = True
                    self._link_l2(alloc)
            offset += covered
            end = host + covered
        if end > self.io.length():   # metadata preallocation is an "off" truncate below
            self.io.truncate(end)

    def _preallocate_data(self, old: int, size: int, mode: str) -> None:
        """qcow2_co_truncate's falloc and full modes: self-describing refcount structures
        for all the data clusters (and their L2 tables) after the last used cluster, the
        data clusters right after them, the file grown over those as `mode` says, then L2
        entries pointing at them one L2 table at a time."""
        cluster_size = self.cluster_size
        file_size = self.io.length()
        last = self.refcounts.last_cluster(file_size)
        file_size = ((last + 1) * cluster_size if last >= 0
                     else -(-file_size // cluster_size) * cluster_size)
        nb_data = -(-size // cluster_size) - old // cluster_size
        nb_l2 = -(-nb_data // self.tables.l2_entries) + 1
        with _step("Failed to resize refcount structures"):
            start = self.refcounts.refcount_area(file_size, nb_data + nb_l2, exact=True)
        with _step("Failed to allocate data clusters"):
            self.refcounts.alloc_at(start, nb_data)
        try:
            self.io.truncate(start + nb_data * cluster_size, mode)
        except TruncateError as e:
            self.refcounts.free(start, nb_data * cluster_size, "other")
            raise Qcow2Error(f"Failed to resize underlying file: {e.message}", e.code) \
                from None
        host, guest = start, old - old % cluster_size
        while nb_data:
            l1_index, l2_index = self.tables.split(guest)
            count = min(nb_data, self.tables.l2_entries - l2_index)
            with _step("Failed to update L2 tables"):
                l2_offset, _ = self.tables.table_for_write(l1_index)
                self._link_l2(_Allocation(
                    guest=guest, host=host, nb_clusters=count, head_from=0, data_start=0,
                    data_end=count * cluster_size, tail_to=count * cluster_size,
                    keep_old=True, l2_offset=l2_offset, l2_index=l2_index))
            guest += count * cluster_size
            host += count * cluster_size
            nb_data -= count

    def _write_header(self) -> None:
        """qcow2_update_header: rewrite cluster 0 from the in-memory header."""
        self.io.pwrite(0, self.header.pack())

    # -- properties --------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.header.size

    @property
    def backing_file(self) -> str | None:
        return self.header.backing_file

    @property
    def backing_format(self) -> str | None:
        return self.header.backing_format

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.header.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.header.refcount_order

    @property
    def corrupt(self) -> bool:
        return bool(self.header.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def vm_state_offset(self) -> int:
        """qcow2_vm_state_offset: where the VM state would go, past the last L1 entry."""
        covered = self.cluster_size * self.tables.l2_entries
        return -(-self.size // covered) * covered

    def get_info(self) -> dict[str, int | bool]:
        """qcow2_get_info (BlockDriverInfo): cluster size, VM state offset, and dirty: the
        DIRTY incompatible feature bit."""
        return {"cluster_size": self.cluster_size, "vm_state_offset": self.vm_state_offset,
                "is_dirty": bool(self.header.incompatible_features & INCOMPAT_DIRTY)}

    def specific_info(self) -> dict[str, object]:
        """qcow2_get_specific_info's data (ImageInfoSpecificQCow2), members in QAPI order;
        ``bitmaps`` only if stored."""
        compression = "zlib" if self.header.compression_type == 0 else "zstd"
        if self.header.version == 2:
            return {"compat": "0.10", "refcount-bits": self.refcount_bits,
                    "compression-type": compression}
        data: dict[str, object] = {"compat": "1.1", "extended-l2": False,
                                   "lazy-refcounts": self.lazy_refcounts,
                                   "corrupt": self.corrupt, "refcount-bits": self.refcount_bits}
        bitmaps = self.bitmap_info()
        if bitmaps:
            data["bitmaps"] = bitmaps
        data["compression-type"] = compression
        return data

    # -- reading -----------------------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> tuple[Status, int]:
        """The status at `offset` and how far (at most `length`) it extends unchanged."""
        status, nbytes, _ = self.map_extent(offset, length)
        return status, nbytes

    def metadata_preallocated(self) -> bool:
        """qcow2_detect_metadata_preallocation, at the first block status of the image
        (s->metadata_preallocation_checked): its refcount reads go through the cache, the
        file child's rules and the thread pool; an error only makes the answer "no"."""
        if self._metadata_preallocated is None:
            allocated = self.io.allocated_size()
            try:
                self._metadata_preallocated = allocated is not None and \
                    self.refcounts.metadata_preallocated(self.io.length(), allocated)
            except (OSError, Qcow2Error):
                self._metadata_preallocated = False
        return self._metadata_preallocated

    def map_extent(self, offset: int, length: int) -> tuple[Status, int, int | None]:
        """Like `block_status`, plus the host offset for DATA and preallocated ZERO extents
        (the "offset" of ``qemu-img map``). `length` is clipped at the end of the image."""
        size = self.header.size
        if offset < 0 or offset > size:
            self._check_range(offset, 0)
        kind, nbytes, host = self.tables.run(offset, min(length, size - offset))
        if kind is ClusterType.COMPRESSED:
            host = None
        return _STATUS[kind], nbytes, host

    def read(self, offset: int, length: int, backing: Backing | None = None) -> bytes:
        """qcow2_co_preadv_part: "read_aio" before each contiguous host data read,
        "read_backing_aio" before each read from `backing`, nothing for zeroes."""
        self._check_range(offset, length)
        parts = []
        pos, end = offset, offset + length
        while pos < end:
            kind, nbytes, host = self.tables.run(pos, end - pos)
            if kind is ClusterType.NORMAL:
                assert host is not None
                self.io.debug_event("read_aio")
                parts.append(self.io.pread(host, nbytes))
            elif kind is ClusterType.COMPRESSED:
                assert host is not None
                parts.append(self._read_compressed(host, pos, nbytes))
            elif kind is ClusterType.UNALLOCATED and backing is not None:
                self.io.debug_event("read_backing_aio")
                parts.append(_exactly(backing(pos, nbytes), nbytes))
            else:
                parts.append(bytes(nbytes))
            pos += nbytes
        return b"".join(parts)

    def _read_compressed(self, entry: int, guest: int, nbytes: int) -> bytes:
        """qcow2_co_preadv_compressed (zlib only): one cluster, inflated."""
        coffset, csize = self._compressed_range(entry)
        self.io.debug_event("read_compressed")
        raw = self.io.pread(coffset, csize)
        if self.header.compression_type != 0:
            raise OSError(95, "Operation not supported")
        try:
            cluster = zlib.decompressobj(-12).decompress(raw, self.cluster_size)
        except zlib.error as exc:
            raise OSError(5, "Input/output error") from exc
        start = guest & (self.cluster_size - 1)
        return _exactly(cluster[start:start + nbytes], nbytes)

    def _compressed_range(self, entry: int) -> tuple[int, int]:
        """qcow2_parse_compressed_l2_entry: host offset and byte length of the data."""
        csize_shift = 62 - (self.header.cluster_bits - 8)
        coffset = entry & ((1 << csize_shift) - 1)
        sectors = ((entry >> csize_shift) & ((1 << (self.header.cluster_bits - 8)) - 1)) + 1
        return coffset, sectors * 512 - (coffset & 511)

    def _reads_as_zero(self, offset: int, length: int, backing: Backing | None, *,
                       fast: bool) -> bool:
        """is_zero (``fast``: is_zero_cow's bdrv_co_is_zero_fast): the block layer's
        `zero_status` where there is one; else an unallocated range with a backing file is
        read and checked."""
        if self.zero_status is not None:
            return not length or self.zero_status(offset, length, fast)
        end = min(offset + length, self.size)
        pos = offset
        while pos < end:
            kind, nbytes, _ = self.tables.run(pos, end - pos)
            if kind in (ClusterType.NORMAL, ClusterType.COMPRESSED):
                return False
            if (kind is ClusterType.UNALLOCATED and backing is not None
                    and _exactly(backing(pos, nbytes), nbytes).strip(b"\0")):
                return False
            pos += nbytes
        return True

    # -- writing -----------------------------------------------------------------------------
    def write(self, offset: int, data: bytes, backing: Backing | None = None) -> None:
        """qcow2_co_pwritev_part: write in place where clusters are ours, else allocate, with
        partial clusters completed from their old contents (`backing` for unallocated ones).

        Each host-contiguous stretch is a task of QEMU's pool, started as soon as it is
        allocated. A task's failure reaches the loop only when the loop itself waits: at
        once if the task's first request failed without waiting (blkdebug immediately=on),
        else after the loop has started the next stretch, and the ones after it as long as
        allocating them needed no I/O. The first failure is the request's."""
        self._check_writable(offset, len(data))
        done = 0
        failure: Exception | None = None
        aborts: list[list[_Allocation]] = []   # the tasks that failed after a wait
        try:
            while done < len(data):
                failed_before = failure is not None
                before = self._requests()
                guest = offset + done
                host, nbytes, allocations = self._alloc_host_offset(guest, len(data) - done)
                started = self._requests()
                waited = started != before
                # the whole request in one stretch (the usual case) is written without a copy
                part = data if nbytes == len(data) else data[done:done + nbytes]
                try:
                    self._write_guest_data(host, guest, part, allocations, backing)
                except _TaskFailed as task:
                    e = task.error
                    at_once = isinstance(e, Qcow2Error) or (
                        getattr(e, "immediate", False) and self._requests() == started + 1)
                    if failure is None and (at_once or nbytes == len(data) - done):
                        self._abort_allocations(task.unlinked)
                        raise e from None
                    aborts.append(task.unlinked)   # given back when the task ends
                    failure = failure or e
                done += nbytes
                if failed_before and waited:
                    break
        finally:
            for unlinked in aborts:
                self._abort_allocations(unlinked)
        if failure is not None:
            raise failure

    def _requests(self) -> int:
        """How many requests the file got so far (0 where nobody counts: then nothing can
        fail one at a time either)."""
        return int(getattr(self.io, "requests", 0))

    def _alloc_host_offset(self, guest: int, nbytes: int) -> tuple[int, int, list[_Allocation]]:
        """qcow2_alloc_host_offset: the longest host-contiguous stretch for [guest, +nbytes),
        combining in-place clusters (handle_copied) and new ones (handle_alloc)."""
        host_start = -1
        covered = 0
        allocations: list[_Allocation] = []
        tables = self.tables
        while covered < nbytes:
            expected = host_start + covered if host_start >= 0 else -1
            pos = guest + covered
            l1_index, l2_index = tables.split(pos)
            l2_offset, table = tables.table_for_write(l1_index)
            step = self._handle_copied(pos, nbytes - covered, expected, allocations,
                                       l2_offset, table, l2_index)
            if step is None:
                step = self._handle_alloc(pos, nbytes - covered, expected, allocations,
                                          l2_offset, table, l2_index)
            if not step:
                break
            host, length = step
            if host_start < 0:
                host_start = host
            covered += length
        return host_start, covered, allocations

    def _handle_copied(self, guest: int, nbytes: int, expected: int,
                       allocations: list[_Allocation], l2_offset: int, table: array,
                       l2_index: int) -> tuple[int, int] | tuple[()] | None:
        """handle_copied: clusters we own alone (QCOW_OFLAG_COPIED) are rewritten in place;
        zero-flagged ones among them get an allocation record so their flag is cleared.
        Returns (host, length), None when the cluster needs a new one, or () when it is ours
        but elsewhere than `expected` (the contiguous stretch ends)."""
        entry = table[l2_index]
        if needs_new_alloc(entry):
            return None
        in_cluster = guest & (self.cluster_size - 1)
        host = (entry & OFFSET_MASK) + in_cluster
        if expected >= 0 and host != expected:
            return ()  # ours, but not where the stretch continues: it ends here
        wanted = self._clusters_in_table(guest, nbytes, l2_index)
        count = 1
        while (count < wanted and not needs_new_alloc(table[l2_index + count])
               and table[l2_index + count] & OFFSET_MASK
               == (entry & OFFSET_MASK) + count * self.cluster_size):
            count += 1
        length = min(nbytes, count * self.cluster_size - in_cluster)
        touched = -(-(in_cluster + length) // self.cluster_size)
        kinds = [cluster_type(e) for e in table[l2_index:l2_index + touched]]
        if ClusterType.ZERO_ALLOC in kinds:
            zero_first = kinds[0] is ClusterType.ZERO_ALLOC
            zero_last = kinds[-1] is ClusterType.ZERO_ALLOC
            allocations.append(_Allocation(
                guest=guest - in_cluster, host=entry & OFFSET_MASK, nb_clusters=touched,
                head_from=0 if zero_first else in_cluster, data_start=in_cluster,
                data_end=in_cluster + length,
                tail_to=touched * self.cluster_size if zero_last else in_cluster + length,
                keep_old=True, l2_offset=l2_offset, l2_index=l2_index))
        return host, length

    def _handle_alloc(self, guest: int, nbytes: int, expected: int,
                      allocations: list[_Allocation], l2_offset: int, table: array,
                      l2_index: int) -> tuple[int, int] | None:
        """handle_alloc: new host clusters for a run of clusters that need them, at
        `expected` when continuing a contiguous stretch (qcow2_alloc_clusters_at)."""
        wanted = self._clusters_in_table(guest, nbytes, l2_index)
        count = 1
        while count < wanted and needs_new_alloc(table[l2_index + count]):
            count += 1
        if expected < 0:
            host_cluster = self.refcounts.alloc(count * self.cluster_size)
        else:
            host_cluster = expected & ~(self.cluster_size - 1)
            count = self.refcounts.alloc_at(host_cluster, count)
            if not count:
                return None
        in_cluster = guest & (self.cluster_size - 1)
        length = min(nbytes, count * self.cluster_size - in_cluster)
        allocations.append(_Allocation(
            guest=guest - in_cluster, host=host_cluster, nb_clusters=count, head_from=0,
            data_start=in_cluster, data_end=in_cluster + length,
            tail_to=count * self.cluster_size, keep_old=False, l2_offset=l2_offset,
            l2_index=l2_index, old_entries=table[l2_index:l2_index + count].tolist()))
        return host_cluster + in_cluster, length

    def _clusters_in_table(self, guest: int, nbytes: int, l2_index: int) -> int:
        in_cluster = guest & (self.cluster_size - 1)
        return min(-(-(in_cluster + nbytes) // self.cluster_size),
                   self.tables.l2_entries - l2_index)

    def _write_guest_data(self, host: int, guest: int, data: bytes,
                          allocations: list[_Allocation], backing: Backing | None) -> None:
        """qcow2_co_pwritev_task: zero-fill COW regions that read as zero
        (handle_alloc_space), write the data (merged with the COW regions when one
        allocation surrounds it, as merge_cow does), copy the other COW regions
        (perform_cow), then link the new clusters into the L2 table."""
        pending: list[_Allocation] = []
        try:
            for alloc in allocations:
                if not alloc.has_cow:
                    continue
                if all(self._reads_as_zero(alloc.guest + start, stop - start, backing,
                                           fast=True)
                       for start, stop in alloc.cow_regions()):
                    # handle_alloc_space: the whole clusters zeroed at once, data included
                    self.io.debug_event("cluster_alloc_space")
                    try:
                        self.io.pwrite_zeroes(alloc.host + alloc.head_from,
                                              alloc.tail_to - alloc.head_from)
                        continue
                    except OSError as exc:
                        if exc.errno not in (errno.ENOTSUP, errno.EAGAIN):
                            raise
                alloc.cow_done = True
                pending.append(alloc)
            end = guest + len(data)
            merged = next((a for a in pending if a.guest + a.data_start == guest
                           and a.guest + a.data_end == end), None) if pending else None
            if merged is not None:
                head = self._cow_read(merged.guest + merged.head_from,
                                      merged.data_start - merged.head_from, backing)
                tail = self._cow_read(end, merged.tail_to - merged.data_end, backing)
                self.io.debug_event("write_aio")
                self.io.pwrite(merged.host + merged.head_from, head + data + tail)
                pending.remove(merged)
            else:
                self.io.debug_event("write_aio")
                self.io.pwrite(host, data)
        except (OSError, Qcow2Error) as e:
            raise _TaskFailed(e, allocations) from e
        # qcow2_handle_l2meta: each allocation's COW (perform_cow), then its L2 entries; a
        # failure aborts that allocation and the ones after it
        for i, alloc in enumerate(allocations):
            try:
                if alloc in pending:
                    for start, stop in alloc.cow_regions():
                        contents = self._cow_read(alloc.guest + start, stop - start, backing)
                        self.io.debug_event("cow_write")
                        self.io.pwrite(alloc.host + start, contents)
                self._link_l2(alloc)
            except (OSError, Qcow2Error) as e:
                raise _TaskFailed(e, allocations[i:]) from e

    def _abort_allocations(self, allocations: list[_Allocation]) -> None:
        """qcow2_alloc_cluster_abort: the new clusters of failed allocations are freed."""
        for alloc in allocations:
            if not alloc.keep_old:
                self.refcounts.free(alloc.host, alloc.nb_clusters * self.cluster_size, "never")

    def _cow_read(self, guest: int, length: int, backing: Backing | None) -> bytes:
        """do_perform_cow_read: the old contents, read through qcow2 itself (past the end of
        the image, the last cluster's tail reads as zeroes)."""
        if length <= 0:
            return b""
        self.io.debug_event("cow_read")
        inside = max(0, min(length, self.size - guest))
        return _exactly(self.read(guest, inside, backing) if inside else b"", length)

    def _link_l2(self, alloc: _Allocation) -> None:
        """qcow2_alloc_cluster_link_l2: point the L2 entries at the new clusters, then drop
        the references the old entries held. The L2 table is written back only after the
        refcounts (and, after a copy-on-write, after a flush of the file: perform_cow)."""
        if alloc.cow_done:
            self.tables.cache.set_depends_on_flush()
        if self.use_lazy_refcounts:
            self._mark_dirty()
        if self.need_accurate_refcounts:
            self.tables.cache.set_dependency(self.refcounts.cache)
        table = self.tables.l2_table(alloc.l2_offset)
        entries = [(alloc.host + i * self.cluster_size) | OFLAG_COPIED
                   for i in range(alloc.nb_clusters)]
        self.tables.set_entries(alloc.l2_offset, table, alloc.l2_index, entries)
        if not alloc.keep_old:
            for entry in alloc.old_entries:
                if entry & ~OFLAG_ZERO:   # no host cluster behind unallocated or zero-plain
                    self._free_any_cluster(entry, "never")

    def _free_any_cluster(self, entry: int, discard: str) -> None:
        """qcow2_free_any_cluster (``discard``: the qcow2_discard_type of the free)."""
        kind = cluster_type(entry)
        if kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            self.refcounts.free(entry & OFFSET_MASK, self.cluster_size, discard)
        elif kind is ClusterType.COMPRESSED:
            self.refcounts.free(*self._compressed_range(entry), discard)

    # -- zeroes and discard ------------------------------------------------------------------
    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False,
                     backing: Backing | None = None) -> None:
        """bdrv_co_do_pwrite_zeroes + qcow2_co_pwrite_zeroes: whole clusters get the zero
        flag (and lose their host cluster with `may_unmap`); a partial cluster does too if the
        rest of it already reads as zero and it holds no data, else zeroes are written."""
        self._check_writable(offset, length)
        end = offset + length
        tail = end & (self.cluster_size - 1)
        pos = offset
        while pos < end:
            head = pos & (self.cluster_size - 1)
            num = end - pos
            if head:
                num = min(num, self.cluster_size - head)
            elif tail and num > self.cluster_size:
                num -= tail
            if not self._pwrite_zeroes(pos, num, may_unmap, backing):
                self.write(pos, bytes(num), backing)
            pos += num

    def _pwrite_zeroes(self, offset: int, length: int, may_unmap: bool,
                       backing: Backing | None) -> bool:
        """qcow2_co_pwrite_zeroes; False where QEMU returns -ENOTSUP (caller writes zeroes)."""
        head = offset & (self.cluster_size - 1)
        tail = -(offset + length) % self.cluster_size
        if offset + length == self.size:
            tail = 0
        if head or tail:
            if not (self._reads_as_zero(offset - head, head, backing, fast=False)
                    and self._reads_as_zero(offset + length, tail, backing, fast=False)):
                return False
            offset -= head
            length = self.cluster_size
            kind, _, _ = self.tables.run(offset, min(length, self.size - offset))
            if kind not in (ClusterType.UNALLOCATED, ClusterType.ZERO_PLAIN,
                            ClusterType.ZERO_ALLOC):
                return False
        length = min(length, self.size - offset)
        if self.header.version == 2:   # qcow2_subcluster_zeroize: no zero flag
            if backing is not None:
                return False
            self._update_clusters(offset, length, lambda entry: _discarded(entry, False, 0))
        else:
            self._update_clusters(offset, length, lambda entry: _zeroed(entry, may_unmap))
        return True

    def discard(self, offset: int, length: int, backing: Backing | None = None) -> None:
        """bdrv_co_pdiscard + qcow2_co_pdiscard: only whole clusters (or the partial last
        one) are discarded; they read as zeroes afterwards (zero flag; version 2: unallocated,
        and nothing at all where a backing file would show through), and their host clusters
        are freed."""
        self._check_writable(offset, length)
        if self.header.version == 2 and backing is not None:
            return   # -ENOTSUP, which bdrv_co_pdiscard does not report
        start = -(-offset // self.cluster_size) * self.cluster_size
        end = offset + length
        if end != self.size:
            end -= end & (self.cluster_size - 1)
        if start >= end:
            return
        has_backing = backing is not None
        zero = OFLAG_ZERO if self.header.version >= 3 else 0
        self._update_clusters(start, end - start,
                              lambda entry: _discarded(entry, has_backing, zero))

    def _update_clusters(self, offset: int, length: int, new_entry: Callable[[int], int],
                         kind: str = "request") -> None:
        """qcow2_subcluster_zeroize / qcow2_cluster_discard: rewrite the L2 entries of whole
        clusters, one L2 table at a time, then free the host clusters no entry points to any
        more (a guest request: with pass-discard-request, discarded on the file as one batch
        at the end)."""
        refcounts = self.refcounts
        refcounts.cache_discards = True
        ok = False
        try:
            self._update_l2_slices(offset, length, new_entry, kind)
            ok = True
        finally:
            refcounts.cache_discards = False
            refcounts.process_discards(ok)

    def _update_l2_slices(self, offset: int, length: int, new_entry: Callable[[int], int],
                          kind: str) -> None:
        """zero_in_l2_slice / discard_in_l2_slice for every L2 table the range touches."""
        pos, end = offset, offset + length
        while pos < end:
            l1_index, l2_index = self.tables.split(pos)
            count = min(-(-(end - pos) // self.cluster_size), self.tables.l2_entries - l2_index)
            l2_offset, table = self.tables.table_for_write(l1_index)
            old = table[l2_index:l2_index + count].tolist()
            if not any(old):   # all unallocated: one new entry for all, nothing to free
                if new_entry(0):
                    self.tables.set_entries(l2_offset, table, l2_index, [new_entry(0)] * count)
            else:
                new = [new_entry(entry) for entry in old]
                changed = [i for i in range(count) if old[i] != new[i]]
                if changed:
                    first, last = changed[0], changed[-1] + 1
                    self.tables.set_entries(l2_offset, table, l2_index + first, new[first:last])
                    for i in changed:
                        if old[i] & OFFSET_MASK and new[i] & OFFSET_MASK != old[i] & OFFSET_MASK:
                            self._free_any_cluster(old[i], kind)
            pos += count * self.cluster_size - (pos & (self.cluster_size - 1))

    # -- other operations --------------------------------------------------------------------
    def flush(self) -> None:
        """qcow2_co_flush_to_os (qcow2_write_caches): the L2 tables, then the refcount
        blocks (not while lazy refcounts keep the image dirty), written back; flushing the
        file is the block layer's next step."""
        self.tables.cache.write()
        if self.need_accurate_refcounts:
            self.refcounts.cache.write()

    @property
    def need_accurate_refcounts(self) -> bool:
        """qcow2_need_accurate_refcounts: not while the dirty bit is set."""
        return not self.header.incompatible_features & INCOMPAT_DIRTY

    def _mark_dirty(self) -> None:
        """qcow2_mark_dirty: set the dirty bit in the header (bdrv_pwrite_sync: the write,
        then a flush of the file) before the first refcount update it excuses."""
        if self.header.incompatible_features & INCOMPAT_DIRTY:
            return
        value = self.header.incompatible_features | INCOMPAT_DIRTY
        self.io.pwrite(OFFSET_INCOMPATIBLE_FEATURES, struct.pack(">Q", value))
        self.io.flush()
        self.header.incompatible_features = value

    def _mark_clean(self) -> None:
        """qcow2_mark_clean: clear the dirty bit, write both caches back and flush, then
        rewrite the header."""
        if self.header.incompatible_features & INCOMPAT_DIRTY:
            self.header.incompatible_features &= ~INCOMPAT_DIRTY
            self.flush_caches()
            self._write_header()

    def flush_caches(self) -> None:
        """qcow2_flush_caches: write both caches back, then flush the file."""
        self.flush()
        self.io.flush()

    def set_backing(self, backing_file: str | None, backing_format: str | None) -> None:
        """qcow2_change_backing_file (what ``qemu-img rebase -u`` does): rewrite the header's
        backing file name and format, nothing else."""
        self._check_writable(0, 0)
        if backing_file is not None and len(backing_file.encode()) > 1023:
            raise Qcow2Error("Backing file name too long")
        self.header.backing_file = backing_file or None
        self.header.backing_format = backing_format if backing_file else None
        self._write_header()

    def load_bitmaps(self, *, mark_in_use: bool = False) -> list[bm.StoredBitmap]:
        """The persistent bitmaps, in directory order. With `mark_in_use` (QEMU does this when
        it opens an image read-write) the stored flags gain IN_USE until `store_bitmaps`."""
        entries = bm.read_directory(self.io, self.header)
        bitmaps = [bm.load_bitmap(self.io, e, self.size, self.cluster_size) for e in entries]
        if mark_in_use and not self.read_only and \
                any(not e.flags & bm.BME_FLAG_IN_USE for e in entries):
            for entry in entries:
                entry.flags |= bm.BME_FLAG_IN_USE
            try:
                bm.rewrite_directory_in_place(self.io, self.header, entries,
                                              self._write_header)
            except OSError as e:
                raise Qcow2Error("Can't update bitmap directory: "
                                 f"{os.strerror(e.errno or errno.EIO)}") from None
            self._header_update_pending = False   # "header_updated"
        return bitmaps

    def bitmap_info(self) -> list[dict[str, object]]:
        """qcow2_get_bitmap_info_list: what the directory says (no bitmap data is read)."""
        return [{"flags": ["in-use"] * bool(e.flags & bm.BME_FLAG_IN_USE)
                 + ["auto"] * bool(e.flags & bm.BME_FLAG_AUTO),
                 "name": e.name, "granularity": 1 << e.granularity_bits}
                for e in bm.read_directory(self.io, self.header)]

    def store_bitmaps(self, bitmaps: list[bm.StoredBitmap], *,
                      writable: bool = True) -> set[str]:
        """qcow2_store_persistent_dirty_bitmaps' image side: `bitmaps` are the node's
        persistent, consistent, writable ones. The directory is read once; each of them
        gets new data clusters and a new table (a stored entry of its name must be in use:
        its old table is dropped once the new directory is in place; a new name is
        appended), then the directory and header are rewritten. Entries no bitmap names
        stay as they are. Returns the names the directory held (the caller releases its
        read-only bitmaps by them)."""
        entries = bm.read_directory(self.io, self.header)
        by_name = {e.name: e for e in entries}
        stored = set(by_name)
        count = len(entries)
        dir_size = self.header.bitmaps.directory_size if entries and self.header.bitmaps \
            else 0
        chosen: dict[str, bm.StoredBitmap] = {}
        dropped: list[bm.DirectoryEntry] = []
        for bitmap in bitmaps:
            try:
                bm.check_constraints(bitmap.name, bitmap.granularity, self.size)
            except Qcow2Error as e:
                raise Qcow2Error(f"Bitmap '{bitmap.name}' doesn't satisfy the constraints: "
                                 f"{e}") from None
            entry = by_name.get(bitmap.name)
            if entry is None:
                count += 1
                if count > bm.QCOW2_MAX_BITMAPS:
                    raise Qcow2Error("Too many persistent bitmaps")
                dir_size += bm.calc_dir_entry_size(len(bitmap.name.encode()))
                if dir_size > bm.QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
                    raise Qcow2Error("Bitmap directory is too large")
                entry = by_name[bitmap.name] = bm.DirectoryEntry(0, 0, 0, 0, bitmap.name)
                entries.append(entry)
            else:
                if not entry.flags & bm.BME_FLAG_IN_USE:
                    raise Qcow2Error(f"Bitmap '{bitmap.name}' already exists in the image")
                dropped.append(replace(entry))
                entry.table_offset = entry.table_size = 0
            entry.flags = bm.BME_FLAG_AUTO if bitmap.auto else 0
            entry.granularity_bits = bitmap.granularity.bit_length() - 1
            chosen[bitmap.name] = bitmap
        if not chosen:
            return stored
        if not writable:
            raise Qcow2Error("No write access")
        written: list[bm.DirectoryEntry] = []
        try:
            for entry in entries:   # in directory order
                if entry.name not in chosen:
                    continue
                new = bm.store_bitmap(self.io, self.refcounts, chosen[entry.name], self.size,
                                      self.cluster_size)
                entry.table_offset, entry.table_size = new.table_offset, new.table_size
                written.append(entry)
            bm.write_directory(self.io, self.refcounts, self.header, entries,
                               self._write_header, self.flush_caches)
        except Qcow2Error:   # the tables stored so far are freed (if they can be read back)
            for entry in written:
                with contextlib.suppress(OSError):
                    bm.free_bitmap_clusters(self.io, self.refcounts, entry, self.cluster_size)
            raise
        for entry in dropped:   # "TODO it is better to reuse these clusters"
            with contextlib.suppress(OSError):
                bm.free_bitmap_clusters(self.io, self.refcounts, entry, self.cluster_size)
        return stored

    def remove_bitmap(self, name: str) -> None:
        """qcow2_co_remove_persistent_dirty_bitmap: a new directory without ``name``, then
        the bitmap's table and data clusters freed; the other bitmaps stay where they are.
        Absent is fine."""
        entries = bm.read_directory(self.io, self.header)
        victim = next((e for e in entries if e.name == name), None)
        if victim is None:
            return
        bm.write_directory(self.io, self.refcounts, self.header,
                           [e for e in entries if e is not victim], self._write_header,
                           self.flush_caches)
        with contextlib.suppress(OSError):   # its return value is not looked at
            bm.free_bitmap_clusters(self.io, self.refcounts, victim, self.cluster_size)

    def check(self, fix: int = 0) -> CheckResult:
        """qcow2_co_check_locked: the refcount check (and, with ``fix``, repair: see
        emulator.qcow2.check); a repair that leaves no errors marks the image clean and
        consistent."""
        result = check_refcounts(self, fix)
        if fix and result.ret == 0 and not result.check_errors and not result.corruptions:
            self._mark_clean()
            self._mark_consistent()
        return result

    def _mark_consistent(self) -> None:
        """qcow2_mark_consistent: write both caches back and flush, then clear the corrupt
        bit and rewrite the header."""
        if self.header.incompatible_features & INCOMPAT_CORRUPT:
            self.flush_caches()
            self.header.incompatible_features &= ~INCOMPAT_CORRUPT
            self._write_header()

    def close(self, *, bitmaps_lost: bool = False) -> None:
        """qcow2_inactivate's cache flushes (L2 tables, then refcount blocks; a failure is
        printed on stderr and the image closes anyway), then qcow2_mark_clean unless
        something failed (persistent bitmaps lost included); the caches are dropped. The
        BlockIO stays open (its owner closes it)."""
        if self.tables is None:
            return
        failed = bitmaps_lost
        for cache, name in ((self.tables.cache, "L2 table"),
                            (self.refcounts.cache, "refcount block")):
            try:
                cache.flush()
            except OSError as e:
                failed = True
                error_report(f"Failed to flush the {name} cache: "
                             f"{os.strerror(e.errno or errno.EIO)}")
        if not failed:
            with contextlib.suppress(OSError):
                self._mark_clean()
        self.tables = None  # type: ignore[assignment]
        self.refcounts = None  # type: ignore[assignment]

    # -- helpers -----------------------------------------------------------------------------
    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"request {offset}+{length} outside the {self.size}-byte image")

    def _check_writable(self, offset: int, length: int) -> None:
        if self.read_only:
            raise OSError(1, "Operation not permitted")
        self._check_range(offset, length)


@contextlib.contextmanager
def _step(text: str) -> Iterator[None]:
    """A step whose I/O error QEMU reports as "<text>: <strerror>" (a resize of the file
    reports its own message)."""
    try:
        yield
    except TruncateError:
        raise
    except OSError as e:
        code = e.errno or errno.EIO
        raise Qcow2Error(f"{text}: {os.strerror(code)}", code) from None


@functools.cache
def _empty_refcount_structures(cluster_size: int) -> bytes:
    """A new image's refcount table (pointing at the block after it) and its empty refcount
    block: kept, as allocating and zeroing such buffers costs more than writing them."""
    return struct.pack(">Q", 2 * cluster_size) + bytes(2 * cluster_size - 8)


def _zeroed(entry: int, may_unmap: bool) -> int:
    """zero_in_l2_slice: the entry after zeroing (host cluster kept unless unmapping)."""
    kind = cluster_type(entry)
    unmap = kind is ClusterType.COMPRESSED or (
        may_unmap and kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC))
    return (0 if unmap else entry) | OFLAG_ZERO


def _discarded(entry: int, has_backing: bool, zero: int) -> int:
    """discard_in_l2_slice (no full discard): allocated clusters, and every cluster of an
    image with a backing file, become ``zero`` (the zero flag; 0 in version 2)."""
    kind = cluster_type(entry)
    if has_backing or kind not in (ClusterType.UNALLOCATED, ClusterType.ZERO_PLAIN):
        return zero
    return entry


def _exactly(data: bytes, length: int) -> bytes:
    if len(data) < length:
        return data + bytes(length - len(data))
    return data[:length]
