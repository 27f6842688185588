"""Qcow2Cache (block/qcow2-cache.c): L2 tables and refcount blocks, written back.

QEMU keeps a fixed number of table slots per cache and writes a changed table back only when
the cache is flushed (a flush of the qcow2 node, its close, l2_allocate, a new refcount
block), when the table's slot is taken for another one, or when a cache that depends on this
one is written. The whole table is written, just after the cache's debug event ("l2_update",
"refblock_update_part"), slot by slot. Slot choice, write-back order and dependencies are
QEMU's, so blkdebug sees the same requests in the same order, and an error injected on a
metadata write surfaces where it does in QEMU (often only at the next flush).

Tables are kept decoded: the caller gives ``encode`` to turn one back into its bytes.
Between two requests nothing holds a table (QEMU's ``ref`` is 0), so every ``get`` is a
get and a put at once: it refreshes the slot's LRU counter.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from emulator.qcow2.blockio import BlockIO
from emulator.qcow2.errors import Qcow2Error

# qcow2.h: cache sizes in tables, and the L2 cache's default upper bound in bytes
MIN_L2_CACHE_SIZE = 2
MIN_REFCOUNT_CACHE_SIZE = 4
DEFAULT_L2_CACHE_MAX_SIZE = 32 * 1024 * 1024


MIN_L2_CACHE_ENTRY_SIZE = 512   # 1 << MIN_CLUSTER_BITS
INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class CacheSizes:
    """What qcow2_update_options_prepare makes of the cache options: slots of each cache."""

    l2_slots: int           # of ``l2_entry_size`` bytes each
    l2_entry_size: int
    refcount_slots: int     # of one cluster each

    def l2_tables(self, cluster_size: int) -> int:
        """The emulator caches whole L2 tables: as many as the slots cover (QEMU's smaller
        entries, slices of a table, are not modelled)."""
        return max(self.l2_slots * self.l2_entry_size // cluster_size, MIN_L2_CACHE_SIZE)


def cache_sizes(virtual_size: int, cluster_size: int, *, cache_size: int | None = None,
                l2_cache_size: int | None = None, l2_cache_entry_size: int | None = None,
                refcount_cache_size: int | None = None) -> CacheSizes:
    """read_cache_sizes, then the minimums and limits of qcow2_update_options_prepare, with
    QEMU's texts. By default: enough L2 for the whole disk as it is at open (up to 32 MiB),
    at least two tables; four refcount blocks."""
    min_refcount_cache = MIN_REFCOUNT_CACHE_SIZE * cluster_size
    max_l2_entries = -(-virtual_size // cluster_size)
    max_l2_cache = -(-max_l2_entries * 8 // cluster_size) * cluster_size
    l2_max_setting = DEFAULT_L2_CACHE_MAX_SIZE if l2_cache_size is None else l2_cache_size
    refcount = refcount_cache_size or 0
    entry = cluster_size if l2_cache_entry_size is None else l2_cache_entry_size
    l2 = min(max_l2_cache, l2_max_setting)
    if cache_size is not None:
        if l2_cache_size is not None and refcount_cache_size is not None:
            raise Qcow2Error("cache-size, l2-cache-size and refcount-cache-size may not be "
                             "set at the same time")
        if l2_cache_size is not None and l2_max_setting > cache_size:
            raise Qcow2Error("l2-cache-size may not exceed cache-size")
        if refcount > cache_size:
            raise Qcow2Error("refcount-cache-size may not exceed cache-size")
        if l2_cache_size is not None:
            refcount = cache_size - l2
        elif refcount_cache_size is not None:
            l2 = cache_size - refcount
        elif cache_size >= max_l2_cache + min_refcount_cache:
            l2 = max_l2_cache
            refcount = cache_size - l2
        else:
            refcount = min(cache_size, min_refcount_cache)
            l2 = cache_size - refcount
    if l2 < max_l2_cache and l2_cache_entry_size is None:
        entry = min(cluster_size, 4096)
    if not MIN_L2_CACHE_ENTRY_SIZE <= entry <= cluster_size or entry & (entry - 1):
        raise Qcow2Error("L2 cache entry size must be a power of two between "
                         f"{MIN_L2_CACHE_ENTRY_SIZE} and the cluster size ({cluster_size})")
    l2_slots = max(l2 // entry, MIN_L2_CACHE_SIZE)
    if l2_slots > INT_MAX:
        raise Qcow2Error("L2 cache size too big")
    refcount_slots = max(refcount // cluster_size, MIN_REFCOUNT_CACHE_SIZE)
    if refcount_slots > INT_MAX:
        raise Qcow2Error("Refcount cache size too big")
    return CacheSizes(l2_slots, entry, refcount_slots)


class Qcow2Cache:
    """One cache: ``size`` slots of ``table_size`` bytes, over the image's file child."""

    def __init__(self, io: BlockIO, size: int, table_size: int, *, update_event: str,
                 load_event: str | None, decode: Callable[[bytes], Any],
                 encode: Callable[[Any], bytes]) -> None:
        self.io = io
        self.table_size = table_size
        self.update_event = update_event
        self.load_event = load_event
        self.decode = decode
        self.encode = encode
        self._slots(size)

    def resize(self, size: int) -> None:
        """New, empty slots (an open's or a reopen's options); nothing may be dirty."""
        assert not any(self.dirty)
        self._slots(size)

    def _slots(self, size: int) -> None:
        self.size = size
        self.offsets = [0] * size
        self.tables: list[Any] = [None] * size
        self.lru = [0] * size
        self.dirty = [False] * size
        self.slots: dict[int, int] = {}   # table offset -> slot
        self.lru_counter = 0
        self.depends: Qcow2Cache | None = None
        self.depends_on_flush = False

    # -- lookups ---------------------------------------------------------------------------
    def get(self, offset: int) -> Any:
        """qcow2_cache_get (+ put): the table at ``offset``, read on a miss."""
        i = self.slots.get(offset)
        if i is None:
            i = self._replace(offset)
            if self.load_event is not None:
                self.io.debug_event(self.load_event)
            table = self.decode(self.io.pread(offset, self.table_size))
            self._install(i, offset, table)
        else:
            table = self.tables[i]
        self.lru_counter += 1
        self.lru[i] = self.lru_counter
        return table

    def get_empty(self, offset: int, table: Any) -> None:
        """qcow2_cache_get_empty (+ put): ``table`` (the caller filled it) at ``offset``,
        nothing read. The caller marks it dirty."""
        i = self.slots.get(offset)
        if i is None:
            i = self._replace(offset)
        self._install(i, offset, table)
        self.lru_counter += 1
        self.lru[i] = self.lru_counter

    def mark_dirty(self, offset: int) -> None:
        """qcow2_cache_entry_mark_dirty."""
        self.dirty[self.slots[offset]] = True

    def discard(self, offset: int) -> bool:
        """qcow2_cache_is_table_offset + qcow2_cache_discard: the cluster holding a cached
        table was freed; its slot is emptied and never written back. False if no table at
        ``offset`` was cached."""
        i = self.slots.pop(offset, None)
        if i is None:
            return False
        self.offsets[i] = 0
        self.tables[i] = None
        self.lru[i] = 0
        self.dirty[i] = False
        return True

    def _replace(self, offset: int) -> int:
        """The slot a missing table takes: the least recently used one, looked for from
        (offset / table_size * 4) % size round the cache; its table is written back first."""
        size = self.size
        start = i = (offset // self.table_size * 4) % size
        best, best_lru = -1, None
        while True:
            if best_lru is None or self.lru[i] < best_lru:
                best, best_lru = i, self.lru[i]
            i += 1
            if i == size:
                i = 0
            if i == start:
                break
        self._entry_flush(best)
        old = self.offsets[best]
        if old:
            del self.slots[old]
            self.offsets[best] = 0
            self.tables[best] = None
        return best

    def _install(self, i: int, offset: int, table: Any) -> None:
        self.offsets[i] = offset
        self.tables[i] = table
        self.slots[offset] = i

    # -- writing back ------------------------------------------------------------------------
    def _entry_flush(self, i: int) -> None:
        """qcow2_cache_entry_flush: a dependency goes first (or a flush of the file, when
        this cache waits for one), then the event and the whole table."""
        if not self.dirty[i] or not self.offsets[i]:
            return
        if self.depends is not None:
            self._flush_dependency()
        elif self.depends_on_flush:
            self.io.flush()
            self.depends_on_flush = False
        self.io.debug_event(self.update_event)
        self.io.pwrite(self.offsets[i], self.encode(self.tables[i]))
        self.dirty[i] = False

    def _flush_dependency(self) -> None:
        """qcow2_cache_flush_dependency."""
        assert self.depends is not None
        self.depends.flush()
        self.depends = None
        self.depends_on_flush = False

    def write(self) -> None:
        """qcow2_cache_write: every dirty table, in slot order; a failed one stays dirty and
        the others are still tried. Raises the error QEMU returns (the last one, unless an
        ENOSPC came first)."""
        error: OSError | None = None
        for i in range(self.size):
            if not self.dirty[i]:
                continue
            try:
                self._entry_flush(i)
            except OSError as exc:
                if error is None or error.errno != errno.ENOSPC:
                    error = exc
        if error is not None:
            raise error

    def flush(self) -> None:
        """qcow2_cache_flush: write back, then flush the file."""
        self.write()
        self.io.flush()

    def set_dependency(self, dependency: Qcow2Cache) -> None:
        """qcow2_cache_set_dependency: ``dependency`` is written before any table of this
        cache (a dependency of the dependency, or another one of this cache, goes now)."""
        try:
            if dependency.depends is not None:
                dependency._flush_dependency()
            if self.depends is not None and self.depends is not dependency:
                self._flush_dependency()
        except OSError:   # every caller ignores the error; the dependency is not set
            return
        self.depends = dependency

    def set_depends_on_flush(self) -> None:
        """qcow2_cache_depends_on_flush: the file is flushed before the next write-back."""
        self.depends_on_flush = True
