"""Consistency check and repair of a qcow2 image's refcounts (qcow2_check_refcounts).

The references every structure makes are counted from scratch into an in-memory refcount
table (header, active L1 and L2 tables, data clusters, refcount table and blocks, bitmaps)
and compared with the stored refcounts; the COPIED flags are checked against them. With
``fix`` (BDRV_FIX_LEAKS, BDRV_FIX_ERRORS) the mismatches are repaired as QEMU 7.2 repairs
them: refcounts corrected in place, or the whole refcount structure rebuilt from the
in-memory table (`emulator.qcow2.repair`) when a referenced cluster has no refcount. The
messages are the lines qcow2 prints to stderr, in QEMU's order.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from emulator.qcow2 import bitmaps as bm
from emulator.qcow2 import repair
from emulator.qcow2.errors import Qcow2Error
from emulator.qcow2.header import AUTOCLEAR_BITMAPS
from emulator.qcow2.refcounts import REFT_OFFSET_MASK, set_refcount
from emulator.qcow2.tables import OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO, ClusterType, cluster_type

if TYPE_CHECKING:
    from emulator.qcow2.image import Qcow2Image

FIX_LEAKS = 1    # BdrvCheckMode
FIX_ERRORS = 2

L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_RESERVED_MASK = 0x1FF
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
INT_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
SECTOR = 512


@dataclass
class CheckResult:
    """BdrvCheckResult (with its fragmentation info) plus the lines qcow2 printed and what
    qcow2_co_check returned (``ret``: 0 or -errno)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)
    ret: int = 0

    def counters(self) -> dict[str, int]:
        """The BdrvCheckResult part, for QEMU's ``saved = *res`` / ``*res = saved``."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("messages", "ret")}

    def restore(self, counters: dict[str, int]) -> None:
        for name, value in counters.items():
            setattr(self, name, value)


class CheckFailed(Exception):
    """A check function returned -errno: qcow2_check_refcounts stops there."""

    def __init__(self, ret: int) -> None:
        super().__init__(os.strerror(-ret))
        self.ret = ret


class Imrt:
    """The in-memory refcount table (IMRT) the check builds: one refcount per host cluster,
    ``nb_clusters`` of them (it grows as references or allocations go past its end)."""

    def __init__(self, image: Qcow2Image, result: CheckResult, nb_clusters: int) -> None:
        self.image = image
        self.cluster_bits = image.header.cluster_bits
        self.cluster_size = 1 << self.cluster_bits
        self.max_refcount = image.refcounts.max_refcount
        self.result = result
        self.counts = [0] * nb_clusters
        self.file_len = 0
        self.refresh_file_len()

    @property
    def nb_clusters(self) -> int:
        return len(self.counts)

    def refresh_file_len(self) -> None:
        """bdrv_getlength(bs->file->bs): the file's length in whole sectors."""
        self.file_len = -(-self.image.io.length() // SECTOR) * SECTOR

    def grow(self, nb_clusters: int) -> None:
        """realloc_refcount_array to at least ``nb_clusters`` entries (new ones zero)."""
        if nb_clusters > len(self.counts):
            self.counts.extend([0] * (nb_clusters - len(self.counts)))

    def get(self, cluster: int) -> int:
        return self.counts[cluster] if cluster < len(self.counts) else 0

    def clear(self) -> None:
        self.counts = [0] * len(self.counts)

    def inc(self, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt: one more reference to each cluster of the range."""
        if size <= 0:
            return
        if offset + size - self.file_len >= self.cluster_size:
            self.result.messages.append(
                "ERROR: counting reference for region exceeding the end of the file by one "
                f"cluster or more: offset 0x{offset:x} size 0x{size:x}")
            self.result.corruptions += 1
            return
        first = offset >> self.cluster_bits
        last = (offset + size - 1) >> self.cluster_bits
        self.grow(last + 1)
        counts = self.counts
        for cluster in range(first, last + 1):
            if counts[cluster] == self.max_refcount:
                self.result.messages += [
                    f"ERROR: overflow cluster offset=0x{cluster << self.cluster_bits:x}",
                    "Use qemu-img amend to increase the refcount entry width or qemu-img "
                    "convert to create a clean copy if the image cannot be opened for writing"]
                self.result.corruptions += 1
                continue
            counts[cluster] += 1

    def alloc(self, count: int, first_free: int) -> tuple[int, int]:
        """alloc_clusters_imrt: ``count`` contiguous clusters free in the IMRT from
        ``first_free`` on (appended past its end if need be), now referenced once. Returns
        their offset and the new first_free (the first gap seen)."""
        cluster = first_free
        contiguous = 0
        first_gap = True
        while cluster < len(self.counts) and contiguous < count:
            if not self.counts[cluster]:
                contiguous += 1
                if first_gap:
                    first_free = cluster
                    first_gap = False
            elif contiguous:
                contiguous = 0
            cluster += 1
        if contiguous < count:
            self.grow(cluster + count - contiguous)
        cluster -= contiguous
        for i in range(count):
            self.counts[cluster + i] = 1
        return cluster << self.cluster_bits, first_free

    def refblock(self, index: int) -> bytes:
        """Refcount block ``index`` as the slice of the IMRT it is (the on-disk encoding)."""
        refcounts = self.image.refcounts
        start = index * refcounts.block_entries
        block = bytearray(self.cluster_size)
        for i, value in enumerate(self.counts[start:start + refcounts.block_entries]):
            if value:
                set_refcount(block, i, refcounts.order, value)
        return bytes(block)


class Checker:
    """qcow2_check_refcounts and the functions it calls, for one run with one ``fix``."""

    def __init__(self, image: Qcow2Image, fix: int, result: CheckResult) -> None:
        self.image = image
        self.io = image.io
        self.header = image.header
        self.fix = fix
        self.result = result
        self.cluster_bits = image.header.cluster_bits
        self.cluster_size = 1 << self.cluster_bits
        self.signaled_corruption = False
        self.overlaps: repair.Overlaps | None = None   # the metadata map, until a rebuild

    def say(self, line: str) -> None:
        self.result.messages.append(line)

    def guard(self, ign: int, offset: int, size: int) -> None:
        """qcow2_pre_write_overlap_check before a repair write (see emulator.qcow2.repair)."""
        if self.overlaps is None:
            self.overlaps = repair.Overlaps(self.image)
        self.overlaps.guard(ign, offset, size)

    def refcount(self, cluster: int) -> int | None:
        """qcow2_get_refcount (the stored refcount, through the refcount block cache); None
        for its -EIO on a refcount block at an unaligned offset, where QEMU signals
        corruption: on a read-only image once, as a non-fatal event (a writable image would
        be marked corrupt and its node made unusable: refused before, not emulated)."""
        refcounts = self.image.refcounts
        index = cluster >> refcounts.block_bits
        offset = refcounts.table[index] if index < len(refcounts.table) else 0
        if not offset & (self.cluster_size - 1):
            return refcounts.get(cluster)
        if not self.signaled_corruption:
            self.say(f"qcow2: Image is corrupt: Refblock offset {_hash_x(offset)} unaligned "
                     f"(reftable index: {_hash_x(index)}); further non-fatal corruption "
                     "events will be suppressed")
            self.signaled_corruption = True
        return None

    # -- qcow2_check_refcounts ---------------------------------------------------------------
    def run(self) -> None:
        """qcow2_check_refcounts; raises CheckFailed where it returns -errno."""
        res, fix = self.result, self.fix
        nb_clusters = self._clusters(-(-self.io.length() // SECTOR) * SECTOR)
        if nb_clusters > INT_MAX:
            res.check_errors += 1
            raise CheckFailed(-errno.EFBIG)
        res.total_clusters = self._clusters(self.image.size // SECTOR * SECTOR)
        if fix:
            _refuse_unaligned_refblocks(self.image)
            repair.refuse_overlapping_metadata(self.image)
        refs = Imrt(self.image, res, nb_clusters)
        rebuild = self.calculate_refcounts(refs, fix)
        pre_compare = res.counters()
        highest, rebuild = self.compare_refcounts(refs, 0, rebuild)
        if rebuild and fix & FIX_ERRORS:
            highest = self._rebuild(refs, highest)
        elif fix:
            if rebuild:
                self.say("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise CheckFailed(-errno.EIO)
            if res.leaks or res.corruptions:
                res.restore(pre_compare)
                highest, rebuild = self.compare_refcounts(refs, fix, rebuild)
        self.check_oflag_copied()
        res.image_end_offset = (highest + 1) * self.cluster_size

    def _rebuild(self, refs: Imrt, highest: int) -> int:
        """The rebuild branch of qcow2_check_refcounts: a new refcount structure, the
        references counted again, the old structure's clusters freed as leaks. Returns the
        highest cluster in use (as the last comparison found it)."""
        res = self.result
        old = res.counters()
        fresh_leaks = 0
        self.say("Rebuilding refcount structure")
        repair.rebuild_refcount_structure(self.image, refs)
        self.overlaps = None
        res.corruptions = 0
        res.leaks = 0
        refs.clear()
        rebuild = self.calculate_refcounts(refs, 0)
        if self.fix & FIX_LEAKS:
            saved = res.counters()
            res.restore({name: 0 for name in saved})
            highest, rebuild = self.compare_refcounts(refs, FIX_LEAKS, rebuild)
            if rebuild:
                self.say("ERROR rebuilt refcount structure is still broken")
            fresh_leaks = res.leaks
            res.restore(saved)
        if res.corruptions < old["corruptions"]:
            res.corruptions_fixed += old["corruptions"] - res.corruptions
        if res.leaks < old["leaks"]:
            res.leaks_fixed += old["leaks"] - res.leaks
        res.leaks += fresh_leaks
        return highest

    def _clusters(self, size: int) -> int:
        """size_to_clusters."""
        return -(-size // self.cluster_size)

    # -- counting references -----------------------------------------------------------------
    def calculate_refcounts(self, refs: Imrt, fix: int) -> bool:
        """calculate_refcounts: every reference into ``refs``; returns whether the refcount
        structure needs a rebuild."""
        refs.refresh_file_len()
        header = self.header
        refs.inc(0, self.cluster_size)
        self.check_refcounts_l1(refs, header.l1_table_offset, header.l1_size, fix)
        refs.inc(header.refcount_table_offset,
                 header.refcount_table_clusters * self.cluster_size)
        self.check_bitmaps_refcounts(refs)
        return self.check_refblocks(refs, fix)

    def check_refcounts_l1(self, refs: Imrt, l1_offset: int, l1_size: int, fix: int) -> None:
        """check_refcounts_l1 for the active L1 table (read from the file)."""
        if not l1_size:
            return
        refs.inc(l1_offset, 8 * l1_size)
        for entry in struct.unpack(f">{l1_size}Q", self.io.pread(l1_offset, 8 * l1_size)):
            if not entry:
                continue
            if entry & L1E_RESERVED_MASK:
                self.say(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                self.result.corruptions += 1
            l2_offset = entry & OFFSET_MASK
            refs.inc(l2_offset, self.cluster_size)
            if l2_offset & (self.cluster_size - 1):
                self.say(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 "
                         "entry corrupted")
                self.result.corruptions += 1
            self.check_refcounts_l2(refs, l2_offset, fix)

    def check_refcounts_l2(self, refs: Imrt, l2_offset: int, fix: int) -> None:
        """check_refcounts_l2 (active table, with fragmentation info)."""
        res = self.result
        count = self.cluster_size // 8
        table = list(struct.unpack(f">{count}Q", self.io.pread(l2_offset, self.cluster_size)))
        next_contiguous = 0
        for i, entry in enumerate(table):
            kind = cluster_type(entry)
            if kind is not ClusterType.COMPRESSED and entry & L2E_STD_RESERVED_MASK:
                self.say(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            if kind is ClusterType.COMPRESSED:
                if entry & OFLAG_COPIED:
                    coffset, _ = self.image._compressed_range(entry)
                    self.say(f"ERROR: coffset=0x{coffset:x}: copied flag must never be set "
                             "for compressed clusters")
                    entry &= ~OFLAG_COPIED
                    res.corruptions += 1
                refs.inc(*self.image._compressed_range(entry))
                res.allocated_clusters += 1
                res.compressed_clusters += 1
                res.fragmented_clusters += 1
            elif kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                offset = entry & OFFSET_MASK
                if offset & (self.cluster_size - 1) and self._unaligned(table, i, l2_offset,
                                                                        offset, fix):
                    continue
                res.allocated_clusters += 1
                if next_contiguous and offset != next_contiguous:
                    res.fragmented_clusters += 1
                next_contiguous = offset + self.cluster_size
                refs.inc(offset, self.cluster_size)

    def _unaligned(self, table: list[int], index: int, l2_offset: int, offset: int,
                   fix: int) -> bool:
        """An allocated L2 entry whose offset is not cluster aligned: an error; a zero
        cluster's entry (no data) is made a plain zero cluster with BDRV_FIX_ERRORS
        (fix_l2_entry_by_zero). True if it was, so the cluster is not counted."""
        self.result.corruptions += 1
        if not table[index] & OFLAG_ZERO:
            self.say(f"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 "
                     "entry corrupted.")
            return False
        word = "Repairing" if fix & FIX_ERRORS else "ERROR"
        self.say(f"{word} offset={offset:x}: Preallocated cluster is not properly aligned; "
                 "L2 entry corrupted.")
        if not fix & FIX_ERRORS:
            return False
        table[index] = OFLAG_ZERO
        entry_offset = l2_offset + 8 * index
        self.guard(repair.OL_ACTIVE_L2, entry_offset, 8)
        self.io.pwrite(entry_offset, struct.pack(">Q", OFLAG_ZERO))
        self.io.flush()
        self.result.corruptions -= 1
        self.result.corruptions_fixed += 1
        return True

    def check_bitmaps_refcounts(self, refs: Imrt) -> None:
        """qcow2_check_bitmaps_refcounts: the directory, each bitmap table and its data
        clusters."""
        header = self.header
        ext = header.bitmaps
        if ext is None or not _has_bitmaps(self.image):
            return
        refs.inc(ext.directory_offset, ext.directory_size)
        try:
            entries = bm.read_directory(self.io, header)
        except Qcow2Error:
            self.result.corruptions += 1
            raise CheckFailed(-errno.EINVAL) from None
        for entry in entries:
            refs.inc(entry.table_offset, 8 * entry.table_size)
            raw = self.io.pread(entry.table_offset, 8 * entry.table_size)
            for value in struct.unpack(f">{entry.table_size}Q", raw):
                offset = value & bm.BME_TABLE_ENTRY_OFFSET_MASK
                if _bad_bitmap_entry(value, self.cluster_size):
                    self.result.corruptions += 1
                    continue
                if offset:
                    refs.inc(offset, self.cluster_size)

    def check_refblocks(self, refs: Imrt, fix: int) -> bool:
        """check_refblocks: every refcount block inside the image and referenced exactly
        once; with BDRV_FIX_ERRORS the file grows to hold one that lies past its end.
        Returns whether a rebuild is needed."""
        header = self.header
        size = header.refcount_table_clusters * self.cluster_size
        raw = struct.unpack(f">{size // 8}Q", self.io.pread(header.refcount_table_offset, size))
        rebuild = False
        res = self.result
        for i, value in enumerate(raw):
            offset = value & REFT_OFFSET_MASK
            cluster = offset >> self.cluster_bits
            if value & REFT_RESERVED_MASK:
                self.say(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            if offset & (self.cluster_size - 1):
                self.say(f"ERROR refcount block {i} is not cluster aligned; refcount table "
                         "entry corrupted")
                res.corruptions += 1
                rebuild = True
                continue
            if cluster >= refs.nb_clusters:
                res.corruptions += 1
                word = "Repairing" if fix & FIX_ERRORS else "ERROR"
                self.say(f"{word} refcount block {i} is outside image")
                if fix & FIX_ERRORS:
                    rebuild |= self._grow_to(refs, offset)
                continue
            if offset:
                refs.inc(offset, self.cluster_size)
                if refs.get(cluster) != 1:
                    self.say(f"ERROR refcount block {i} refcount={refs.get(cluster)}")
                    res.corruptions += 1
                    rebuild = True
        return rebuild

    def _grow_to(self, refs: Imrt, offset: int) -> bool:
        """check_refblocks' repair of a refcount block past the end of the file: the file
        is truncated up to include it (it reads as zeroes). True if that failed."""
        ret = 0
        if offset > INT64_MAX - self.cluster_size:
            ret = -errno.EINVAL
        else:
            self.io.truncate(offset + self.cluster_size)
            refs.refresh_file_len()
            refs.grow(self._clusters(refs.file_len))
            if offset >> self.cluster_bits >= refs.nb_clusters:
                ret = -errno.EINVAL
        if ret:
            self.say(f"ERROR could not resize image: {os.strerror(-ret)}")
            return True
        self.result.corruptions -= 1
        self.result.corruptions_fixed += 1
        refs.inc(offset, self.cluster_size)
        return False

    # -- comparing and fixing ----------------------------------------------------------------
    def compare_refcounts(self, refs: Imrt, fix: int, rebuild: bool) -> tuple[int, bool]:
        """compare_refcounts: the stored refcount of every cluster against the IMRT; with
        ``fix`` leaks (and, with BDRV_FIX_ERRORS, too small refcounts) are corrected in place.
        A referenced cluster without a refcount asks for a rebuild. Returns the highest
        cluster in use and the rebuild flag."""
        res = self.result
        highest = 0
        for i in range(refs.nb_clusters):
            stored = self.refcount(i)
            if stored is None:
                self.say(f"Can't get refcount for cluster {i}: {os.strerror(errno.EIO)}")
                res.check_errors += 1
                continue
            refcount1 = stored
            refcount2 = refs.get(i)
            if refcount1 or refcount2:
                highest = i
            if refcount1 == refcount2:
                continue
            fixed = ""
            if refcount1 == 0:
                rebuild = True
            elif refcount1 > refcount2 and fix & FIX_LEAKS:
                fixed = "leaks_fixed"
            elif refcount1 < refcount2 and fix & FIX_ERRORS:
                fixed = "corruptions_fixed"
            word = "Repairing" if fixed else "ERROR" if refcount1 < refcount2 else "Leaked"
            self.say(f"{word} cluster {i} refcount={refcount1} reference={refcount2}")
            if fixed and self._set_refcount(i, refcount2 - refcount1):
                setattr(res, fixed, getattr(res, fixed) + 1)
                continue
            if refcount1 < refcount2:
                res.corruptions += 1
            else:
                res.leaks += 1
        return highest, rebuild

    def _set_refcount(self, cluster: int, addend: int) -> bool:
        """update_refcount(QCOW2_DISCARD_ALWAYS) of one cluster; False if it failed."""
        try:
            self.image.refcounts.update(cluster << self.cluster_bits, 1, addend, "always")
        except (Qcow2Error, OSError):
            return False
        return True

    def check_oflag_copied(self) -> None:
        """check_oflag_copied: COPIED set exactly where the refcount is 1, in the L1 table and
        in the L2 entries of allocated clusters; repaired with BDRV_FIX_ERRORS, or with
        BDRV_FIX_LEAKS when the refcounts are known to be right now."""
        res, fix = self.result, self.fix
        if fix & FIX_ERRORS:
            repairing = True
        elif fix & FIX_LEAKS:
            repairing = not (res.check_errors or res.corruptions or res.leaks)
        else:
            repairing = False
        word = "Repairing" if repairing else "ERROR"
        l1 = self.image.tables.l1
        for i, l1_entry in enumerate(l1):
            l2_offset = l1_entry & OFFSET_MASK
            if not l2_offset:
                continue
            refcount = self.refcount(l2_offset >> self.cluster_bits)
            if refcount is None:
                continue
            if (refcount == 1) != bool(l1_entry & OFLAG_COPIED):
                res.corruptions += 1
                self.say(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} "
                         f"refcount={refcount}")
                if repairing:
                    l1[i] = l1_entry | OFLAG_COPIED if refcount == 1 else l1_entry & ~OFLAG_COPIED
                    self.guard(repair.OL_ACTIVE_L1, self.header.l1_table_offset + 8 * i, 8)
                    self.image.tables.write_l1_entry(i)
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            self._check_l2_copied(l2_offset, word, repairing)

    def _check_l2_copied(self, l2_offset: int, word: str, repairing: bool) -> None:
        """check_oflag_copied for the entries of one L2 table (read from the file, written
        back whole if repaired)."""
        count = self.cluster_size // 8
        table = list(struct.unpack(f">{count}Q", self.io.pread(l2_offset, self.cluster_size)))
        dirty = 0
        for j, entry in enumerate(table):
            if cluster_type(entry) not in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                continue
            refcount = self.refcount((entry & OFFSET_MASK) >> self.cluster_bits)
            if refcount is None:
                continue
            if (refcount == 1) != bool(entry & OFLAG_COPIED):
                self.result.corruptions += 1
                self.say(f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} "
                         f"refcount={refcount}")
                if repairing:
                    table[j] = entry | OFLAG_COPIED if refcount == 1 else entry & ~OFLAG_COPIED
                    dirty += 1
        if dirty:
            self.guard(repair.OL_ACTIVE_L2, l2_offset, self.cluster_size)
            self.io.pwrite(l2_offset, struct.pack(f">{count}Q", *table))
            self.result.corruptions -= dirty
            self.result.corruptions_fixed += dirty


def _hash_x(value: int) -> str:
    """printf's %#x: no 0x prefix for zero."""
    return f"{value:#x}" if value else "0"


def _has_bitmaps(image: Qcow2Image) -> bool:
    """s->nb_bitmaps != 0: a bitmaps extension the autoclear bit vouches for."""
    ext = image.header.bitmaps
    return ext is not None and bool(ext.nb_bitmaps) and \
        bool(image.header.autoclear_features & AUTOCLEAR_BITMAPS)


def _bad_bitmap_entry(entry: int, cluster_size: int) -> bool:
    """check_table_entry (qcow2-bitmap.c) failing."""
    if entry & BME_TABLE_ENTRY_RESERVED_MASK:
        return True
    offset = entry & bm.BME_TABLE_ENTRY_OFFSET_MASK
    return bool(offset) and bool(entry & bm.BME_TABLE_ENTRY_FLAG_ALL_ONES
                                 or offset % cluster_size)


def _refuse_unaligned_refblocks(image: Qcow2Image) -> None:
    """Before a repair writes anything: a refcount table entry pointing into the middle of a
    cluster (QEMU's qcow2_get_refcount signals corruption on it) is refused."""
    for index, offset in enumerate(image.refcounts.table):
        if offset & (image.cluster_size - 1):
            raise Qcow2Error(f"The emulator does not repair images whose refcount table "
                             f"entry {index} points at an unaligned refcount block "
                             f"({offset:#x})")


def check_refcounts(image: Qcow2Image, fix: int) -> CheckResult:
    """qcow2_check_refcounts (with the empty snapshot table's part of qcow2_co_check_locked:
    the emulator opens no image with internal snapshots)."""
    result = CheckResult()
    try:
        Checker(image, fix, result).run()
    except CheckFailed as exc:
        result.ret = exc.ret
    return result
