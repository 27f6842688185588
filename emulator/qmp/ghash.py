"""GLib 2.74's GHashTable, reduced to a set of strings, for QEMU's argument checks.

QEMU's input visitor keeps the not-yet-visited keys of each JSON object in a GHashTable
(``g_str_hash``) and, when a struct is complete, reports the *first* key its iterator yields
as "Parameter '%s' is unexpected".  With two or more unexpected keys, which one QEMU names
depends on GLib's open-addressing layout (insertions, removals and the resizes they trigger),
so this module reproduces that layout exactly: ``g_hash_table_hash_to_index``, quadratic
probing, tombstones, and the in-place ``g_hash_table_resize`` of GLib >= 2.60.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

HASH_TABLE_MIN_SHIFT = 3
UNUSED, TOMBSTONE = 0, 1
_MASK32 = 0xFFFFFFFF

# the first prime below each power of two (ghash.c prime_mod[])
PRIME_MOD = [
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521,
    131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393,
    67108859, 134217689, 268435399, 536870909, 1073741789, 2147483647,
]


def g_str_hash(key: bytes) -> int:
    """djb2 over *signed* chars, as g_str_hash does."""
    h = 5381
    for b in key:
        h = (h * 33 + (b - 256 if b >= 0x80 else b)) & _MASK32
    return h


class GStrSet:
    """A GHashTable(g_str_hash, g_str_equal) used as a set of C strings (UTF-8 bytes)."""

    def __init__(self, keys: Iterable[bytes] = ()) -> None:
        self._set_shift(HASH_TABLE_MIN_SHIFT)
        self.hashes = [UNUSED] * self.size
        self.keys: list[bytes | None] = [None] * self.size
        self.nnodes = 0
        self.noccupied = 0
        for key in keys:
            self.add(key)

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = PRIME_MOD[shift]
        self.mask = self.size - 1

    def _set_shift_from_size(self, size: int) -> None:
        shift = size.bit_length()  # g_hash_table_find_closest_shift
        self._set_shift(max(shift, HASH_TABLE_MIN_SHIFT))

    def _to_index(self, h: int) -> int:
        return ((h * 11) & _MASK32) % self.mod

    def _lookup(self, key: bytes) -> tuple[int, int]:
        """g_hash_table_lookup_node: (index, hash); a miss yields the first tombstone seen,
        else the empty slot that ended the probe."""
        h = g_str_hash(key)
        if h <= TOMBSTONE:
            h = 2
        index = self._to_index(h)
        step = 0
        first_tombstone = -1
        while self.hashes[index] != UNUSED:
            node_hash = self.hashes[index]
            if node_hash == h and self.keys[index] == key:
                return index, h
            if node_hash == TOMBSTONE and first_tombstone < 0:
                first_tombstone = index
            step += 1
            index = (index + step) & self.mask
        return (first_tombstone if first_tombstone >= 0 else index), h

    def __contains__(self, key: bytes) -> bool:
        index, _ = self._lookup(key)
        return self.hashes[index] > TOMBSTONE

    def __len__(self) -> int:
        return self.nnodes

    def add(self, key: bytes) -> None:
        """g_hash_table_insert (a new key; an existing one is left in place)."""
        index, h = self._lookup(key)
        old = self.hashes[index]
        if old > TOMBSTONE:
            return
        self.hashes[index] = h
        self.keys[index] = key
        self.nnodes += 1
        if old == UNUSED:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: bytes) -> bool:
        """g_hash_table_remove: leaves a tombstone, then maybe shrinks."""
        index, _ = self._lookup(key)
        if self.hashes[index] <= TOMBSTONE:
            return False
        self.hashes[index] = TOMBSTONE
        self.keys[index] = None
        self.nnodes -= 1
        self._maybe_resize()
        return True

    def __iter__(self) -> Iterator[bytes]:
        """GHashTableIter order: slot order."""
        for index in range(self.size):
            if self.hashes[index] > TOMBSTONE:
                key = self.keys[index]
                assert key is not None
                yield key

    def _maybe_resize(self) -> None:
        noccupied, size = self.noccupied, self.size
        if ((size > self.nnodes * 4 and size > 1 << HASH_TABLE_MIN_SHIFT)
                or size <= noccupied + noccupied // 16):
            self._resize()

    def _resize(self) -> None:
        """g_hash_table_resize with resize_set(): relocation by eviction, in place."""
        old_size = self.size
        self._set_shift_from_size(int(self.nnodes * 1.333))
        if self.size > old_size:
            self.hashes.extend([UNUSED] * (self.size - old_size))
            self.keys.extend([None] * (self.size - old_size))
            relocated = [False] * self.size
        else:
            relocated = [False] * old_size
        for i in range(old_size):
            node_hash = self.hashes[i]
            if node_hash <= TOMBSTONE:
                self.hashes[i] = UNUSED
                continue
            if relocated[i]:
                continue
            self.hashes[i] = UNUSED
            key = self.keys[i]
            self.keys[i] = None
            while True:
                index = self._to_index(node_hash)
                step = 0
                while relocated[index]:
                    step += 1
                    index = (index + step) & self.mask
                relocated[index] = True
                replaced_hash = self.hashes[index]
                self.hashes[index] = node_hash
                if replaced_hash <= TOMBSTONE:
                    self.keys[index] = key
                    break
                node_hash = replaced_hash
                key, self.keys[index] = self.keys[index], key
        if self.size < old_size:
            del self.hashes[self.size:]
            del self.keys[self.size:]
        self.noccupied = self.nnodes
