"""The writing side of qcow2's check: rebuilding the refcount structure, and the metadata
overlap checks every repair write passes first (block/qcow2-refcount.c).

``rebuild_refcount_structure`` writes a new refcount structure made solely from the check's
in-memory refcount table (IMRT): each refcount block holding non-zero entries is placed in
a cluster the IMRT says is free, then the refcount table, until the table stops growing;
the header is switched over and the old structure is left to be freed as leaks.

QEMU refuses (and marks the image corrupt) any repair write that would overlap metadata
(qcow2_pre_write_overlap_check, the default "cached" checks). The emulator does not emulate
that aftermath: a repair that would come to it is refused before it writes anything where
that can be known in advance (`refuse_overlapping_metadata`, the rebuild's writes), else
at the write (`Overlaps.guard`). A refused repair raises Qcow2Error.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator
from typing import TYPE_CHECKING

from emulator.qcow2.errors import Qcow2Error
from emulator.qcow2.header import AUTOCLEAR_BITMAPS, OFFSET_REFCOUNT_TABLE
from emulator.qcow2.tables import OFFSET_MASK

if TYPE_CHECKING:
    from emulator.qcow2.check import Imrt
    from emulator.qcow2.image import Qcow2Image

# QCow2MetadataOverlap
OL_MAIN_HEADER = 1 << 0
OL_ACTIVE_L1 = 1 << 1
OL_ACTIVE_L2 = 1 << 2
OL_REFCOUNT_TABLE = 1 << 3
OL_REFCOUNT_BLOCK = 1 << 4
OL_SNAPSHOT_TABLE = 1 << 5
OL_INACTIVE_L1 = 1 << 6
OL_BITMAP_DIRECTORY = 1 << 8
OL_CACHED = (OL_MAIN_HEADER | OL_ACTIVE_L1 | OL_ACTIVE_L2 | OL_REFCOUNT_TABLE
             | OL_REFCOUNT_BLOCK | OL_SNAPSHOT_TABLE | OL_INACTIVE_L1 | OL_BITMAP_DIRECTORY)
UINT64_MASK = (1 << 64) - 1


def _ranges_overlap(first1: int, len1: int, first2: int, len2: int) -> bool:
    """ranges_overlap (uint64_t arithmetic)."""
    last1 = (first1 + len1 - 1) & UINT64_MASK
    last2 = (first2 + len2 - 1) & UINT64_MASK
    return not (last2 < first1 or last1 < first2)


class Overlaps:
    """qcow2_check_metadata_overlap with the default overlap-check=cached, for an image
    without snapshots: the metadata as it is now, mapped by cluster (a write's range is
    widened to whole clusters, so touching a cluster of a structure is overlapping it)."""

    ORDER = ((OL_ACTIVE_L1, "active L1 table"), (OL_REFCOUNT_TABLE, "refcount table"),
             (OL_ACTIVE_L2, "active L2 table"), (OL_REFCOUNT_BLOCK, "refcount block"),
             (OL_BITMAP_DIRECTORY, "bitmap directory"))

    def __init__(self, image: Qcow2Image) -> None:
        self.cluster_bits = image.header.cluster_bits
        self.clusters: dict[int, int] = {}        # cluster -> OL_* bits of what is there
        self.empty: list[tuple[int, int]] = []    # (bit, offset) of zero-length regions
        for bit, offset, length in _metadata(image):
            self._add(bit, offset, length)

    def _add(self, bit: int, offset: int, length: int) -> None:
        if not length:
            self.empty.append((bit, offset))
            return
        for cluster in range(offset >> self.cluster_bits,
                             ((offset + length - 1) >> self.cluster_bits) + 1):
            self.clusters[cluster] = self.clusters.get(cluster, 0) | bit

    def find(self, ign: int, offset: int, size: int) -> str | None:
        """The name of the metadata a write of [offset, +size) would overlap, if any."""
        chk = OL_CACHED & ~ign
        if not size:
            return None
        if chk & OL_MAIN_HEADER and offset < 1 << self.cluster_bits:
            return "qcow2_header"
        first, last = offset >> self.cluster_bits, (offset + size - 1) >> self.cluster_bits
        found = 0
        for cluster in range(first, last + 1):
            found |= self.clusters.get(cluster, 0)
        start, length = first << self.cluster_bits, (last + 1 - first) << self.cluster_bits
        for bit, region in self.empty:
            if _ranges_overlap(start, length, region, 0):
                found |= bit
        return next((name for bit, name in self.ORDER if found & chk & bit), None)

    def guard(self, ign: int, offset: int, size: int) -> None:
        """qcow2_pre_write_overlap_check before a repair write: where QEMU would prevent the
        write and mark the image corrupt, the emulator refuses."""
        name = self.find(ign, offset, size)
        if name is not None:
            raise Qcow2Error(f"The emulator does not repair this image: QEMU would prevent a "
                             f"write at {offset:#x} (overlaps with {name}) and mark the image "
                             "corrupt")


def refuse_overlapping_metadata(image: Qcow2Image) -> None:
    """Before a repair writes anything: the structures a repair may rewrite (the L1 table,
    the L2 tables, the refcount blocks) must not overlap other metadata, or QEMU's overlap
    checks could stop the repair midway; such images are refused."""
    overlaps = Overlaps(image)
    for bit, offset, length in _metadata(image):
        if bit in (OL_ACTIVE_L1, OL_ACTIVE_L2, OL_REFCOUNT_BLOCK):
            overlaps.guard(bit, offset, length)


def _metadata(image: Qcow2Image) -> Iterator[tuple[int, int, int]]:
    """The active metadata qcow2_check_metadata_overlap knows: (OL_* bit, offset, length)."""
    header = image.header
    cluster_size = image.cluster_size
    if header.l1_size:
        yield OL_ACTIVE_L1, header.l1_table_offset, 8 * header.l1_size
    if header.refcount_table_clusters:
        yield (OL_REFCOUNT_TABLE, header.refcount_table_offset,
               header.refcount_table_clusters * cluster_size)
    for entry in image.tables.l1:
        if entry & OFFSET_MASK:
            yield OL_ACTIVE_L2, entry & OFFSET_MASK, cluster_size
    for offset in image.refcounts.table:
        if offset:
            yield OL_REFCOUNT_BLOCK, offset, cluster_size
    if header.autoclear_features & AUTOCLEAR_BITMAPS:
        ext = header.bitmaps
        yield (OL_BITMAP_DIRECTORY, ext.directory_offset if ext else 0,
               ext.directory_size if ext else 0)


def rebuild_refcount_structure(image: Qcow2Image, refs: Imrt) -> None:
    """rebuild_refcount_structure: refcount blocks written for every block of ``refs``
    holding references, then a refcount table placed (which may need more blocks, and a
    bigger table: repeated until it stops growing), written, and made the image's. The
    writes are planned first, so an overlap refuses the rebuild before any of them."""
    refcounts = image.refcounts
    refcounts.cache.flush()   # qcow2_cache_empty
    refcounts.cache.resize(refcounts.cache.size)
    writes: list[tuple[int, bytes]] = []
    reftable: list[int] = []
    grown = _write_refblocks(image, refs, 0, refs.nb_clusters, reftable, writes)
    assert grown
    while True:
        clusters = -(-8 * len(reftable) // image.cluster_size)
        reftable_offset, _ = refs.alloc(clusters, 0)
        start = reftable_offset // image.cluster_size
        if not _write_refblocks(image, refs, start, start + clusters, reftable, writes):
            break
    writes.append((reftable_offset, struct.pack(f">{len(reftable)}Q", *reftable)))
    overlaps = Overlaps(image)
    for offset, data in writes:
        overlaps.guard(0, offset, len(data))
    for offset, data in writes:
        image.io.pwrite(offset, data)
    image.io.pwrite(OFFSET_REFCOUNT_TABLE, struct.pack(">QI", reftable_offset, clusters))
    image.io.flush()
    refcounts.table = array("Q", reftable)
    image.header.refcount_table_offset = reftable_offset
    image.header.refcount_table_clusters = clusters


def _write_refblocks(image: Qcow2Image, refs: Imrt, first_cluster: int, end_cluster: int,
                     reftable: list[int], writes: list[tuple[int, bytes]]) -> bool:
    """rebuild_refcounts_write_refblocks: for each refcount block with references among
    clusters [first_cluster, end_cluster), a cluster (allocated in ``refs`` unless
    ``reftable`` has one) and a write of its slice of ``refs``. Returns whether
    ``reftable`` had to grow."""
    block_bits = image.refcounts.block_bits
    cluster_bits = image.header.cluster_bits
    first_free = 0
    grown = False
    cluster = first_cluster
    while cluster < end_cluster:
        if not refs.get(cluster):
            cluster += 1
            continue
        index = cluster >> block_bits
        block_start = index << block_bits
        if index < len(reftable) and reftable[index]:
            offset = reftable[index]
        else:
            first_free = max(first_free, block_start)
            offset, first_free = refs.alloc(1, first_free)
            end_cluster = max(end_cluster, (offset >> cluster_bits) + 1)
            if len(reftable) <= index:
                entries = -(-8 * (index + 1) // image.cluster_size) * image.cluster_size // 8
                reftable.extend([0] * (entries - len(reftable)))
                grown = True
            reftable[index] = offset
        writes.append((offset, refs.refblock(index)))
        cluster = block_start + (1 << block_bits)
    return grown
