"""Consistency check of a qcow2 image without repair (qcow2_check_refcounts).

The references every structure makes are counted from scratch (header, L1 and L2 tables, data
clusters, refcount table and blocks, bitmaps) and compared with the stored refcounts; the
COPIED flags are checked against them. The messages are the ones qcow2 prints to stderr.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from emulator.qcow2 import bitmaps as bm
from emulator.qcow2.tables import OFFSET_MASK, OFLAG_COPIED, ClusterType, cluster_type

if TYPE_CHECKING:
    from emulator.qcow2.image import Qcow2Image


@dataclass
class CheckResult:
    """BdrvCheckResult (with its fragmentation info) plus the lines qcow2 printed."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)


class _References:
    """The in-memory refcount table the check builds (qcow2_inc_refcounts_imrt)."""

    def __init__(self, image: Qcow2Image, result: CheckResult, nb_clusters: int) -> None:
        self.cluster_bits = image.header.cluster_bits
        self.max_refcount = image.refcounts.max_refcount
        self.result = result
        self.counts = [0] * nb_clusters

    def add(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        if last >= len(self.counts):
            self.counts.extend([0] * (last + 1 - len(self.counts)))
        for cluster in range(first, last + 1):
            if self.counts[cluster] == self.max_refcount:
                self.result.messages += [
                    f"ERROR: overflow cluster offset=0x{cluster << self.cluster_bits:x}",
                    "Use qemu-img amend to increase the refcount entry width or qemu-img "
                    "convert to create a clean copy if the image cannot be opened for writing"]
                self.result.corruptions += 1
                continue
            self.counts[cluster] += 1


def check_image(image: Qcow2Image) -> CheckResult:
    header = image.header
    cluster_size = image.cluster_size
    result = CheckResult(total_clusters=-(-image.size // cluster_size))
    refs = _References(image, result, -(-image.io.length() // cluster_size))
    refs.add(0, cluster_size)
    refs.add(header.l1_table_offset, 8 * header.l1_size)
    for l1_entry in image.tables.l1:
        l2_offset = l1_entry & OFFSET_MASK
        if not l2_offset:
            continue
        if l2_offset & (cluster_size - 1):
            result.messages.append(f"ERROR l2_offset={l2_offset:x}: Table is not cluster "
                                   "aligned; L1 entry corrupted")
            result.corruptions += 1
            continue
        refs.add(l2_offset, cluster_size)
        _check_l2(image, image.tables.l2_table(l2_offset), refs, result)
    refs.add(header.refcount_table_offset, header.refcount_table_clusters * cluster_size)
    for entry in bm.read_directory(image.io, header):
        refs.add(entry.table_offset, 8 * entry.table_size)
        raw = image.io.pread(entry.table_offset, 8 * entry.table_size)
        for value in struct.unpack(f">{entry.table_size}Q", raw):
            refs.add(value & bm.BME_TABLE_ENTRY_OFFSET_MASK, cluster_size)
    if header.bitmaps is not None and bm.read_directory(image.io, header):
        refs.add(header.bitmaps.directory_offset, header.bitmaps.directory_size)
    _check_refblocks(image, refs, result)
    highest = -1
    refcounts = image.refcounts
    for cluster, reference in enumerate(refs.counts):
        refcount = refcounts.get(cluster)
        if refcount or reference:
            highest = cluster
        if refcount != reference:
            kind = "ERROR" if refcount < reference else "Leaked"
            result.messages.append(
                f"{kind} cluster {cluster} refcount={refcount} reference={reference}")
            if refcount < reference:
                result.corruptions += 1
            else:
                result.leaks += 1
    _check_oflag_copied(image, result)
    result.image_end_offset = (highest + 1) * cluster_size
    return result


def _check_l2(image: Qcow2Image, table: Iterable[int], refs: _References,
              result: CheckResult) -> None:
    """check_refcounts_l2 for the active L1 table (with fragmentation info)."""
    cluster_size = image.cluster_size
    next_contiguous = 0
    for entry in table:
        kind = cluster_type(entry)
        if kind is ClusterType.COMPRESSED:
            if entry & OFLAG_COPIED:
                coffset, _ = image._compressed_range(entry & ~OFLAG_COPIED)
                result.messages.append(f"ERROR: coffset=0x{coffset:x}: copied flag must never "
                                       "be set for compressed clusters")
                result.corruptions += 1
                entry &= ~OFLAG_COPIED
            result.allocated_clusters += 1
            result.compressed_clusters += 1
            result.fragmented_clusters += 1
            refs.add(*image._compressed_range(entry))
        elif kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            offset = entry & OFFSET_MASK
            if offset & (cluster_size - 1):
                result.messages.append(f"ERROR offset={offset:x}: Cluster is not properly "
                                       "aligned; L2 entry corrupted.")
                result.corruptions += 1
                continue
            result.allocated_clusters += 1
            if next_contiguous and offset != next_contiguous:
                result.fragmented_clusters += 1
            next_contiguous = offset + cluster_size
            refs.add(offset, cluster_size)


def _check_refblocks(image: Qcow2Image, refs: _References, result: CheckResult) -> None:
    """check_refblocks: every refcount block inside the file, referenced exactly once."""
    cluster_bits = image.header.cluster_bits
    file_clusters = -(-image.io.length() >> cluster_bits)
    for index, offset in enumerate(image.refcounts.table):
        if offset & ((1 << cluster_bits) - 1):
            result.messages.append(f"ERROR refcount block {index} is not cluster aligned; "
                                   "refcount table entry corrupted")
            result.corruptions += 1
            continue
        if offset >> cluster_bits >= file_clusters:
            result.messages.append(f"ERROR refcount block {index} is outside image")
            result.corruptions += 1
            continue
        if offset:
            refs.add(offset, 1 << cluster_bits)
            if refs.counts[offset >> cluster_bits] != 1:
                result.messages.append(f"ERROR refcount block {index} "
                                       f"refcount={refs.counts[offset >> cluster_bits]}")
                result.corruptions += 1


def _check_oflag_copied(image: Qcow2Image, result: CheckResult) -> None:
    """check_oflag_copied: COPIED is set exactly where the refcount is 1."""
    refcounts = image.refcounts
    cluster_bits = image.header.cluster_bits
    for l1_index, l1_entry in enumerate(image.tables.l1):
        l2_offset = l1_entry & OFFSET_MASK
        if not l2_offset or l2_offset & ((1 << cluster_bits) - 1):
            continue
        refcount = refcounts.get(l2_offset >> cluster_bits)
        if (refcount == 1) != bool(l1_entry & OFLAG_COPIED):
            result.messages.append(f"ERROR OFLAG_COPIED L2 cluster: l1_index={l1_index} "
                                   f"l1_entry={l1_entry:x} refcount={refcount}")
            result.corruptions += 1
        for entry in image.tables.l2_table(l2_offset):
            if cluster_type(entry) in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                refcount = refcounts.get((entry & OFFSET_MASK) >> cluster_bits)
                if (refcount == 1) != bool(entry & OFLAG_COPIED):
                    result.messages.append(f"ERROR OFLAG_COPIED data cluster: "
                                           f"l2_entry={entry:x} refcount={refcount}")
                    result.corruptions += 1
