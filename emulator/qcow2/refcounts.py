"""Reference counts: the refcount table, refcount blocks and cluster allocation.

Mirrors block/qcow2-refcount.c so images get QEMU's layout: first-fit allocation from
``free_cluster_index`` (alloc_clusters_noref), new refcount blocks placed where they can
describe themselves (alloc_refcount_block), and a grown refcount table written after a block
of self-describing refcount structures (qcow2_refcount_area). Refcount blocks live in QEMU's
refcount block cache (`Qcow2Cache`, four blocks): changed in memory, written back when the
cache is flushed or a block must make room for another.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
from array import array
from errno import EIO

from emulator.qcow2.blockio import BlockIO, fprintf_stderr
from emulator.qcow2.cache import MIN_REFCOUNT_CACHE_SIZE, Qcow2Cache
from emulator.qcow2.errors import Qcow2Error
from emulator.qcow2.header import OFFSET_REFCOUNT_TABLE, Header

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00


class Again(Exception):
    """QEMU's -EAGAIN from alloc_refcount_block: new refcount metadata took space, so the
    caller must search for free clusters again."""


def get_refcount(block: bytes | bytearray, index: int, order: int) -> int:
    """Entry `index` of a refcount block in its on-disk encoding (refcount_order 0..6)."""
    if order >= 3:
        width = 1 << (order - 3)
        return int.from_bytes(block[index * width:(index + 1) * width], "big")
    bits = 1 << order
    per_byte = 8 // bits
    return (block[index // per_byte] >> (index % per_byte * bits)) & ((1 << bits) - 1)


def set_refcount(block: bytearray, index: int, order: int, value: int) -> tuple[int, int]:
    """Store `value` at entry `index`; returns the byte range that changed."""
    if order >= 3:
        width = 1 << (order - 3)
        block[index * width:(index + 1) * width] = value.to_bytes(width, "big")
        return index * width, (index + 1) * width
    bits = 1 << order
    per_byte = 8 // bits
    shift = index % per_byte * bits
    byte = index // per_byte
    block[byte] = (block[byte] & ~(((1 << bits) - 1) << shift)) | (value << shift)
    return byte, byte + 1


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int,
                           generous_increase: bool) -> tuple[int, int]:
    """qcow2_refcount_metadata_size: (refcount blocks, table clusters) covering `clusters`
    plus themselves; `generous_increase` leaves room for half as many table clusters again."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 >> refcount_order
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous_increase:
            clusters += -(-table // 2)
            n = 0
            generous_increase = False
        if n == last:
            return blocks, table


_ZERO_PAGE = bytes(4096)


def _entries_in_use(raw: bytes) -> int:
    """How many leading 8-byte entries of `raw` hold all its non-zero bytes. Whole zero
    pages are skipped from the end, then the last non-zero page is bisected; every step is
    one memcmp (``bytes.startswith`` of a memoryview slice), nothing is copied or scanned
    byte by byte."""
    view = memoryview(raw)
    page = len(_ZERO_PAGE)
    end = len(raw)   # raw[end:] is all zero
    while end >= page and _ZERO_PAGE.startswith(view[end - page:end]):
        end -= page
    lo, hi = max(0, end - page) // 8, end // 8   # is raw[8 * lo:end] all zero?
    while lo < hi:
        mid = (lo + hi) // 2
        if _ZERO_PAGE.startswith(view[8 * mid:end]):
            hi = mid
        else:
            lo = mid + 1
    return hi


def _load_table(raw: bytes) -> array:
    """The refcount table's entries, masked; only the entries up to the last non-zero one
    are masked one by one (a table is mostly zeroes: one refcount block describes
    gigabytes)."""
    raw = raw[:len(raw) // 8 * 8]
    table = array("Q", raw)
    if sys.byteorder == "little":
        table.byteswap()
    for i in range(_entries_in_use(raw)):
        table[i] &= REFT_OFFSET_MASK
    return table


class Refcounts:
    """The refcount structures of one open image."""

    def __init__(self, io: BlockIO, header: Header, table_raw: bytes | None = None) -> None:
        self.io = io
        self.header = header
        self.cluster_bits = header.cluster_bits
        self.cluster_size = 1 << header.cluster_bits
        self.order = header.refcount_order
        self.block_bits = self.cluster_bits - (self.order - 3)  # log2(entries per block)
        self.block_entries = 1 << self.block_bits
        self.max_refcount = (1 << (1 << self.order)) - 1
        self._table: array | None = None
        if table_raw is not None:   # qcow2_refcount_init's read, made by Qcow2Image's open
            self._table = _load_table(table_raw)
        self.cache = Qcow2Cache(io, MIN_REFCOUNT_CACHE_SIZE, self.cluster_size,
                                update_event="refblock_update_part", load_event=None,
                                decode=bytearray, encode=bytes)
        self.l2_cache: Qcow2Cache | None = None   # the image's L2 table cache
        self.free_cluster_index = 0
        # discard_passthrough: the kinds of frees (enum qcow2_discard_type, lower case) whose
        # freed clusters are discarded on the file; "request" and "other" are options
        self.pass_discard = {"always", "snapshot"}
        self.discards: list[list[int]] = []   # queued [offset, bytes], merged when adjacent
        self.cache_discards = False           # queue until process_discards (batches)

    def _read_table(self) -> array:
        raw = self.io.pread(self.header.refcount_table_offset,
                            self.header.refcount_table_clusters * self.cluster_size)
        return _load_table(raw)

    @property
    def table(self) -> array:
        """The refcount table. QEMU reads it at open; when nothing can observe the file's
        requests (``io.unobserved``) it is read on first use instead, which many opens
        (qemu-img compare, queries of read-only nodes) never come to."""
        if self._table is None:
            self._table = self._read_table()
        return self._table

    @table.setter
    def table(self, value: array) -> None:
        self._table = value

    def adopt(self, table_head: list[int], blocks: dict[int, bytes]) -> None:
        """Take the refcount table (its first entries; the rest of its clusters are zero) and
        blocks a creator has just written as the caches, rather than reading them back (only
        where nothing observes the requests)."""
        table = self._table = array("Q", table_head)
        table.frombytes(bytes(self.header.refcount_table_clusters * self.cluster_size
                              - 8 * len(table_head)))
        for offset, block in blocks.items():
            self.cache.get_empty(offset, bytearray(block))

    # -- lookups ---------------------------------------------------------------------------
    def block(self, offset: int) -> bytearray:
        """The refcount block at host `offset`, from the cache."""
        if offset & (self.cluster_size - 1):
            raise Qcow2Error(f"Refblock offset {offset:#x} unaligned")
        block: bytearray = self.cache.get(offset)
        return block

    def get(self, cluster_index: int) -> int:
        """qcow2_get_refcount: 0 for clusters no refcount block describes."""
        table_index = cluster_index >> self.block_bits
        table = self.table
        if table_index >= len(table) or not table[table_index]:
            return 0
        return get_refcount(self.block(table[table_index]),
                            cluster_index & (self.block_entries - 1), self.order)

    def metadata_preallocated(self, file_length: int, allocated: int) -> bool:
        """qcow2_detect_metadata_preallocation: do more clusters have a refcount than the
        file has clusters allocated (10/9 of them, or two more)? Reads refcount blocks
        through the cache until it knows; errors propagate."""
        real_clusters = allocated // self.cluster_size
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        count = 0
        for i in range(-(-file_length // self.cluster_size)):
            if count >= threshold:
                break
            count += bool(self.get(i))
        return count >= threshold

    def last_cluster(self, size: int) -> int:
        """qcow2_get_last_cluster: the last cluster of a file of `size` bytes that has a
        refcount (-1 if none has: QEMU then marks the image corrupt)."""
        for index in range(-(-size >> self.cluster_bits) - 1, -1, -1):
            if self.get(index):
                return index
        return -1

    # -- allocation --------------------------------------------------------------------------
    def alloc(self, size: int) -> int:
        """qcow2_alloc_clusters: the host offset of `size` bytes of fresh, referenced clusters."""
        self.io.debug_event("cluster_alloc")
        while True:
            offset = self._alloc_noref(size)
            try:
                self.update(offset, size, 1)
                return offset
            except Again:
                continue

    def alloc_at(self, offset: int, nb_clusters: int) -> int:
        """qcow2_alloc_clusters_at: take up to `nb_clusters` free clusters starting exactly at
        `offset`; returns how many were taken (0 if the first is in use)."""
        while True:
            first = offset >> self.cluster_bits
            count = 0
            while count < nb_clusters and self.get(first + count) == 0:
                count += 1
            try:
                self.update(offset, count << self.cluster_bits, 1)
                return count
            except Again:
                continue

    def free(self, offset: int, size: int, kind: str) -> None:
        """qcow2_free_clusters; ``kind`` is the qcow2_discard_type ("never", "always",
        "request", "snapshot", "other"). A failure is printed, not returned: the clusters
        leak (QEMU's TODO)."""
        self.io.debug_event("cluster_free")
        try:
            self.update(offset, size, -1, kind)
        except OSError as e:
            fprintf_stderr(f"qcow2_free_clusters failed: {os.strerror(e.errno or EIO)}\n")

    def shrink_table(self) -> None:
        """qcow2_shrink_reftable: refcount blocks that count nothing (but, for a block that
        describes itself, itself) are dropped from the table on disk, then freed and
        discarded on the file (qcow2_discard_refcount_block)."""
        table = self.table
        kept = array("Q", table)
        for i, block_offset in enumerate(table):
            if not block_offset:
                continue
            block = self.block(block_offset)
            if i == block_offset >> self.cluster_bits >> self.block_bits:
                index = (block_offset >> self.cluster_bits) & (self.block_entries - 1)
                own = get_refcount(block, index, self.order)
                set_refcount(block, index, self.order, 0)
                unused = not any(block)
                set_refcount(block, index, self.order, own)
            else:
                unused = not any(block)
            if unused:
                kept[i] = 0
        failure: OSError | None = None
        try:
            self.io.pwrite(self.header.refcount_table_offset,
                           struct.pack(f">{len(kept)}Q", *kept))
            self.io.flush()
        except OSError as e:
            failure = e
        for i, block_offset in enumerate(table):
            if block_offset and not kept[i]:
                if failure is None:
                    self._discard_block(block_offset)
                table[i] = 0
        if not self.cache_discards:
            self.process_discards(failure is None)
        if failure is not None:
            raise failure

    def _discard_block(self, offset: int) -> None:
        """qcow2_discard_refcount_block: the block's own refcount (which must be 1) goes to
        0, the cached copy is dropped, and its cluster is queued for discard."""
        cluster = offset >> self.cluster_bits
        index = cluster & (self.block_entries - 1)
        owner = self.table[cluster >> self.block_bits]
        block = self.block(owner)
        if get_refcount(block, index, self.order) != 1:
            raise Qcow2Error(f"Invalid refcount: refblock offset {owner:#x}")
        set_refcount(block, index, self.order, 0)
        self.cache.mark_dirty(owner)
        self.free_cluster_index = min(self.free_cluster_index, cluster)
        self.cache.discard(offset)
        self.queue_discard(offset, self.cluster_size)

    def queue_discard(self, offset: int, length: int) -> None:
        """update_refcount_discard: add a freed range to the queue, merged with a queued
        range it touches (freed ranges never overlap), then merged queued ranges merged."""
        for d in self.discards:
            if max(offset + length, d[0] + d[1]) - min(offset, d[0]) <= length + d[1]:
                d[0], d[1] = min(offset, d[0]), d[1] + length
                break
        else:
            d = [offset, length]
            self.discards.append(d)
        for p in [p for p in self.discards
                  if p is not d and not (p[0] > d[0] + d[1] or d[0] > p[0] + p[1])]:
            self.discards.remove(p)
            d[0], d[1] = min(d[0], p[0]), d[1] + p[1]

    def process_discards(self, ok: bool) -> None:
        """qcow2_process_discards: the queued discards go to the file (failures ignored:
        discard is advisory), unless the operation that queued them failed."""
        discards, self.discards = self.discards, []
        for offset, length in discards if ok else ():
            with contextlib.suppress(OSError):
                self.io.pdiscard(offset, length)

    def _alloc_noref(self, size: int) -> int:
        """alloc_clusters_noref: first fit from free_cluster_index, refcounts untouched
        (free_cluster_index ends after the run found, as the cluster-by-cluster scan does)."""
        nb_clusters = -(-size >> self.cluster_bits)
        start = self._next_free(self.free_cluster_index)
        found = 1
        while found < nb_clusters:
            if self.get(start + found) == 0:
                found += 1
            else:
                start = self._next_free(start + found + 1)
                found = 1
        self.free_cluster_index = start + nb_clusters
        return start << self.cluster_bits

    def _next_free(self, index: int) -> int:
        """The first cluster from ``index`` on whose refcount is 0, found with bytes.find
        in the refcount blocks rather than one cluster at a time."""
        width = (1 << self.order) // 8   # bytes per entry; 0 for sub-byte refcounts
        table = self.table
        while True:
            table_index = index >> self.block_bits
            if table_index >= len(table) or not table[table_index]:
                return index
            if not width:
                if self.get(index) == 0:
                    return index
                index += 1
                continue
            block = self.block(table[table_index])
            zero = bytes(width)
            pos = block.find(zero, (index & (self.block_entries - 1)) * width)
            while pos >= 0 and pos % width:
                pos = block.find(zero, pos + 1)
            if pos >= 0:
                return (table_index << self.block_bits) + pos // width
            index = (table_index + 1) << self.block_bits

    def update(self, offset: int, length: int, addend: int, kind: str = "never") -> None:
        """update_refcount: add `addend` to every cluster touched by [offset, offset+length).
        A decrease waits for the L2 tables that dropped the references to be written. When
        a count reaches 0, a table cached at `offset` leaves its cache unwritten.

        Clusters freed by a ``kind`` of free that passes discards through are discarded on
        the file (now, or with the batch the caller is collecting).

        On an error the clusters already counted are undone (best effort) and the discards
        dropped; on `Again` (new refcount metadata was placed) the free-space search also
        restarts at `offset`, as QEMU does.
        """
        if length <= 0:
            return
        if addend < 0 and self.l2_cache is not None:
            self.cache.set_dependency(self.l2_cache)
        start = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        order, entries_mask = self.order, self.block_entries - 1
        done = start
        block_offset = -1
        block = bytearray()
        try:
            for cluster in range(start, last + 1):
                index = cluster & entries_mask
                if block_offset < 0 or index == 0:
                    block_offset = self._refblock_for(cluster, cluster >> self.block_bits)
                    block = self.block(block_offset)
                    self.cache.mark_dirty(block_offset)   # before the range check, as QEMU
                refcount = get_refcount(block, index, order) + addend
                if not 0 <= refcount <= self.max_refcount:
                    raise Qcow2Error(f"Refcount of cluster {cluster} out of range")
                if refcount == 0 and cluster < self.free_cluster_index:
                    self.free_cluster_index = cluster
                set_refcount(block, index, order, refcount)
                if refcount == 0:
                    # QEMU looks the tables up at the range's start, `offset`, not at the
                    # cluster that reached 0 (a table inside a longer range stays cached)
                    if self.cache.discard(offset):
                        block_offset = -1   # QEMU puts the block it held (it may be this one)
                    if self.l2_cache is not None:
                        self.l2_cache.discard(offset)
                    if kind in self.pass_discard:
                        self.queue_discard(cluster << self.cluster_bits, self.cluster_size)
                done = cluster + 1
        except (Again, Qcow2Error, OSError) as exc:
            if not self.cache_discards:
                self.process_discards(False)
            if isinstance(exc, Again):
                self.free_cluster_index = min(self.free_cluster_index, start)
            if done > start:
                with contextlib.suppress(Qcow2Error, OSError):
                    self.update(offset, (done << self.cluster_bits) - offset, -addend)
            raise
        if not self.cache_discards:
            self.process_discards(True)

    def _refblock_for(self, cluster: int, table_index: int) -> int:
        """alloc_refcount_block: the block describing `cluster`, creating it if needed."""
        self.io.debug_event("refblock_alloc")
        table = self.table
        if table_index < len(table) and table[table_index]:
            self.io.debug_event("refblock_load")
            return table[table_index]
        if self.l2_cache is not None:
            self.l2_cache.flush()   # the refcount table changes: L2 tables may depend on it
        new_block = self._alloc_noref(self.cluster_size)
        block = bytearray(self.cluster_size)
        new_index = new_block >> self.cluster_bits
        if new_index >> self.block_bits == table_index:
            self.cache.get_empty(new_block, block)
            set_refcount(block, new_index & (self.block_entries - 1), self.order, 1)
        else:
            self.update(new_block, self.cluster_size, 1)
            self.cache.flush()
            self.cache.get_empty(new_block, block)
        self.io.debug_event("refblock_alloc_write")
        self.cache.mark_dirty(new_block)
        self.cache.flush()
        if table_index < len(self.table):
            self.io.debug_event("refblock_alloc_hookup")
            self.io.pwrite(self.header.refcount_table_offset + 8 * table_index,
                           struct.pack(">Q", new_block))
            self.table[table_index] = new_block
            raise Again
        self.io.debug_event("reftable_grow")
        blocks_used = -(-max(cluster + 1, new_index + 1) // self.block_entries)
        self.refcount_area(blocks_used * self.block_entries << self.cluster_bits,
                           new_index=table_index, new_block=new_block)
        self.block(new_block)   # load_refcount_block: the caller would have held it
        raise Again

    def refcount_area(self, start_offset: int, additional_clusters: int = 0, *,
                      exact: bool = False, new_index: int = 0, new_block: int = 0) -> int:
        """qcow2_refcount_area: at `start_offset` (free space up to the end of the image) write
        the refcount blocks still missing and a new refcount table, all describing
        themselves, covering the image and `additional_clusters` more (with room to grow
        unless `exact`); then switch the header to the new table and free the old one.
        Returns the end of the area, where free space starts."""
        total_blocks, _ = refcount_metadata_size(
            (start_offset >> self.cluster_bits) + additional_clusters, self.cluster_size,
            self.order, not exact)
        area_index = (start_offset >> self.cluster_bits) // self.block_entries
        per_cluster = self.cluster_size // 8
        table_size = total_blocks if exact else total_blocks + -(-total_blocks // 2)
        table_size = -(-table_size // per_cluster) * per_cluster
        table_clusters = table_size // per_cluster
        new_table = array("Q", self.table[:table_size])
        new_table.frombytes(bytes(8 * (table_size - len(new_table))))
        if new_block:
            new_table[new_index] = new_block
        missing = sum(1 for i in range(area_index, total_blocks) if not new_table[i])
        table_offset = start_offset + missing * self.cluster_size
        end_offset = table_offset + table_clusters * self.cluster_size
        block_offset = start_offset
        for i in range(area_index, total_blocks):
            if new_table[i]:
                block = self.block(new_table[i])
            else:
                block = bytearray(self.cluster_size)
                self.cache.get_empty(block_offset, block)
                self.cache.mark_dirty(block_offset)
                new_table[i] = block_offset
                block_offset += self.cluster_size
            first_covered = i * self.block_entries << self.cluster_bits
            if first_covered < end_offset:
                j = max(start_offset - first_covered, 0) >> self.cluster_bits
                end_index = min((end_offset - first_covered) >> self.cluster_bits,
                                self.block_entries)
                for k in range(j, end_index):
                    set_refcount(block, k, self.order, 1)
                self.cache.mark_dirty(new_table[i])
        self.io.debug_event("refblock_alloc_write_blocks")
        self.cache.flush()
        self.io.debug_event("refblock_alloc_write_table")
        self.io.pwrite(table_offset, struct.pack(f">{table_size}Q", *new_table))
        self.io.debug_event("refblock_alloc_switch_table")
        self.io.pwrite(OFFSET_REFCOUNT_TABLE, struct.pack(">QI", table_offset, table_clusters))
        old_offset = self.header.refcount_table_offset
        old_clusters = self.header.refcount_table_clusters
        self.table = new_table
        self.header.refcount_table_offset = table_offset
        self.header.refcount_table_clusters = table_clusters
        self.free(old_offset, old_clusters * self.cluster_size, "other")
        return end_offset
