"""L1 and L2 tables: where each guest cluster lives (block/qcow2-cluster.c).

The L1 table is read at open and its entries are written through (qcow2_write_l1_entry); L2
tables live in QEMU's L2 table cache (`Qcow2Cache`): read on a miss ("l2_load"), written back
when the cache is flushed. `ClusterTables.run` answers "what is at this guest offset, and for
how long" for a whole run of same-kind clusters at once, so large unallocated ranges cost one
step.
"""

from __future__ import annotations

import struct
import sys
from array import array
from enum import Enum

from emulator.qcow2.blockio import BlockIO
from emulator.qcow2.cache import Qcow2Cache, cache_sizes
from emulator.qcow2.errors import Qcow2Error
from emulator.qcow2.header import Header
from emulator.qcow2.refcounts import Refcounts

OFFSET_MASK = 0x00FFFFFFFFFFFE00  # L1E_OFFSET_MASK == L2E_OFFSET_MASK
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1


class ClusterType(Enum):
    """QCow2ClusterType."""

    UNALLOCATED = "unallocated"  # reads from the backing file, or zeroes
    ZERO_PLAIN = "zero-plain"  # zero flag, no host cluster
    ZERO_ALLOC = "zero-alloc"  # zero flag, host cluster kept (preallocated)
    NORMAL = "normal"
    COMPRESSED = "compressed"

    __hash__ = object.__hash__   # members are singletons; Enum's own hash is Python code


def cluster_type(entry: int) -> ClusterType:
    """qcow2_get_cluster_type for an image without subclusters or an external data file."""
    if entry & OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    if entry & OFLAG_ZERO:
        return ClusterType.ZERO_ALLOC if entry & OFFSET_MASK else ClusterType.ZERO_PLAIN
    return ClusterType.NORMAL if entry & OFFSET_MASK else ClusterType.UNALLOCATED


def needs_new_alloc(entry: int) -> bool:
    """cluster_needs_new_alloc: writing here cannot reuse the host cluster in place (only
    NORMAL and ZERO_ALLOC clusters — not compressed, with a host offset — that we own alone,
    QCOW_OFLAG_COPIED, can be)."""
    return not (entry & OFLAG_COPIED and entry & OFFSET_MASK and not entry & OFLAG_COMPRESSED)


def _count_equal(table: array, start: int, limit: int, value: int) -> int:
    """How many of table[start:start+limit] equal `value` (table[start] does), counted with
    memcmp (``bytes.startswith`` of a uniform pattern, over memoryview slices: nothing is
    copied) — first the whole range, else over blocks that double, then halve at the first
    difference — instead of a Python loop per entry."""
    if limit < 2 or table[start + 1] != value:
        return min(limit, 1)
    pattern = value.to_bytes(8, sys.byteorder) * limit
    view = memoryview(table)[start:start + limit]
    if pattern.startswith(view):
        return limit
    equal, size = 2, 2   # the first `equal` entries are known to be equal
    while True:
        end = min(equal + size, limit)
        if not pattern.startswith(view[equal:end]):
            break
        equal = end
        size *= 4
    while end - equal > 1:   # entries [equal, end) hold a difference
        mid = (equal + end) // 2
        if pattern.startswith(view[equal:mid]):
            equal = mid
        else:
            end = mid
    return equal


def _load_entries(raw: bytes) -> array:
    entries = array("Q", raw)
    if sys.byteorder == "little":
        entries.byteswap()
    return entries


def _pack_entries(entries: array) -> bytes:
    out = array("Q", entries)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()


class ClusterTables:
    """The L1 table and the cached L2 tables of one open image."""

    def __init__(self, io: BlockIO, header: Header, refcounts: Refcounts,
                 l1_raw: bytes) -> None:
        self.io = io
        self.header = header
        self.refcounts = refcounts
        self.cluster_bits = header.cluster_bits
        self.cluster_size = 1 << header.cluster_bits
        self.l2_bits = self.cluster_bits - 3
        self.l2_entries = 1 << self.l2_bits
        self.l1 = list(struct.unpack(f">{header.l1_size}Q", l1_raw))
        self.cache = Qcow2Cache(io, cache_sizes(header.size, self.cluster_size).l2_tables(
                                    self.cluster_size),
                                self.cluster_size, update_event="l2_update",
                                load_event="l2_load", decode=_load_entries,
                                encode=_pack_entries)
        refcounts.l2_cache = self.cache

    def l2_table(self, l2_offset: int) -> array:
        """l2_load: the L2 table at host `l2_offset`, from the cache."""
        if l2_offset & (self.cluster_size - 1):
            raise Qcow2Error(f"L2 table offset {l2_offset:#x} unaligned")
        table: array = self.cache.get(l2_offset)
        return table

    def split(self, guest_offset: int) -> tuple[int, int]:
        """(L1 index, L2 index) of the cluster holding `guest_offset`."""
        cluster = guest_offset >> self.cluster_bits
        return cluster >> self.l2_bits, cluster & (self.l2_entries - 1)

    def run(self, guest_offset: int, max_bytes: int) -> tuple[ClusterType, int, int | None]:
        """qcow2_get_host_offset: the kind of cluster at `guest_offset`, how many bytes (at
        most `max_bytes`, never past the L2 table) share that kind, and the host offset for
        NORMAL / ZERO_ALLOC runs (host-contiguous, as count_contiguous_subclusters requires).
        Called for every read and block-status step, hence the inlined arithmetic."""
        bits = self.cluster_bits
        cluster = guest_offset >> bits
        l1_index = cluster >> self.l2_bits
        l2_index = cluster & (self.l2_entries - 1)
        in_cluster = guest_offset & (self.cluster_size - 1)
        limit = ((self.l2_entries - l2_index) << bits) - in_cluster   # to the table's end
        if max_bytes < limit:
            limit = max_bytes
        l1 = self.l1
        l2_offset = l1[l1_index] & OFFSET_MASK if l1_index < len(l1) else 0
        if not l2_offset:
            return ClusterType.UNALLOCATED, limit, None
        table = self.l2_table(l2_offset)
        wanted = (in_cluster + limit + self.cluster_size - 1) >> bits   # within the table
        first = table[l2_index]
        kind = cluster_type(first)
        if kind is ClusterType.COMPRESSED:
            return kind, min(self.cluster_size - in_cluster, limit), first
        count = _count_equal(table, l2_index, wanted, first)
        if count < wanted:
            count = self._count_same_kind(table, l2_index, count, wanted, first, kind)
        nbytes = (count << bits) - in_cluster
        if limit < nbytes:
            nbytes = limit
        if kind is ClusterType.NORMAL or kind is ClusterType.ZERO_ALLOC:
            return kind, nbytes, (first & OFFSET_MASK) + in_cluster
        return kind, nbytes, None

    def _count_same_kind(self, table: array, start: int, count: int, wanted: int, first: int,
                         kind: ClusterType) -> int:
        """Extend a run of `count` entries equal to `first`: entries of the same kind follow
        (other flag bits may differ), host-contiguous for NORMAL and ZERO_ALLOC."""
        step = self.cluster_size if kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) else 0
        # what decides kind and host offset; COPIED and reserved bits do not
        mask = OFFSET_MASK | OFLAG_COMPRESSED | OFLAG_ZERO
        expected = (first & mask) + count * step
        while count < wanted and table[start + count] & mask == expected:
            expected += step
            count += 1
        return count

    def table_for_write(self, l1_index: int) -> tuple[int, array]:
        """get_cluster_table: the L2 table to modify for `l1_index`, allocated (or copied,
        when shared with a snapshot) first if needed. Returns (host offset, table)."""
        if l1_index >= len(self.l1):
            raise Qcow2Error("Guest offset beyond the L1 table")
        entry = self.l1[l1_index]
        if entry & OFLAG_COPIED:
            return entry & OFFSET_MASK, self.l2_table(entry & OFFSET_MASK)
        old_offset = entry & OFFSET_MASK
        new_offset = self._l2_allocate(l1_index)
        if old_offset:
            self.refcounts.free(old_offset, self.cluster_size, "other")
        return new_offset, self.l2_table(new_offset)

    def _l2_allocate(self, l1_index: int) -> int:
        """l2_allocate: a new table (a copy of the old one, if any) goes through the cache,
        which is flushed (refcounts first) before the L1 entry points to it. On failure the
        L1 entry is restored and the new cluster freed."""
        old_offset = self.l1[l1_index] & OFFSET_MASK
        new_offset = self.refcounts.alloc(self.cluster_size)
        try:
            self.refcounts.cache.flush()
            table = array("Q", bytes(self.cluster_size))
            self.cache.get_empty(new_offset, table)
            if old_offset:
                self.io.debug_event("l2_alloc_cow_read")
                table[:] = self.l2_table(old_offset)
            self.io.debug_event("l2_alloc_write")
            self.cache.mark_dirty(new_offset)
            self.cache.flush()
            self.l1[l1_index] = new_offset | OFLAG_COPIED
            self.write_l1_entry(l1_index)
        except OSError:
            self.l1[l1_index] = old_offset
            self.refcounts.free(new_offset, self.cluster_size, "always")
            raise
        return new_offset

    def write_l1_entry(self, l1_index: int) -> None:
        """qcow2_write_l1_entry ("l1_update")."""
        self.io.debug_event("l1_update")
        self.io.pwrite(self.header.l1_table_offset + 8 * l1_index,
                       struct.pack(">Q", self.l1[l1_index]))

    def set_entries(self, l2_offset: int, table: array, l2_index: int,
                    entries: list[int]) -> None:
        """Change consecutive L2 entries: the table is dirty in the cache."""
        table[l2_index:l2_index + len(entries)] = array("Q", entries)
        self.cache.mark_dirty(l2_offset)
