"""Dirty bitmaps as QEMU 7.2 models them (util/hbitmap.c, block/dirty-bitmap.c).

:class:`HBitmap` keeps one bit per granule in a Python int (bit i = granule i), so set, reset,
merge and count are whole-int operations: a 64 MiB disk at 512-byte granularity is 131072 bits,
handled without per-granule loops. Its byte-level semantics follow hbitmap.c: ranges round
outward to granules, ``count`` is dirty granules << granularity (not clipped at the disk end),
and :meth:`HBitmap.sha256` hashes the bottom level as little-endian 64-bit words.

:class:`BdrvDirtyBitmap` adds QEMU's state (name, busy, disabled, readonly, persistent,
inconsistent, skip_store, successor) and operations (create/abdicate/reclaim successor,
merge with backup/restore, checks with QEMU's texts). Bitmaps live on a node, newest first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from emulator.block.errors import GenericError

if TYPE_CHECKING:
    from emulator.block.node import BlockDriverState

BDRV_BITMAP_BUSY = 1
BDRV_BITMAP_RO = 2
BDRV_BITMAP_INCONSISTENT = 4
BDRV_BITMAP_DEFAULT = BDRV_BITMAP_BUSY | BDRV_BITMAP_RO | BDRV_BITMAP_INCONSISTENT
BDRV_BITMAP_ALLOW_RO = BDRV_BITMAP_BUSY | BDRV_BITMAP_INCONSISTENT
BDRV_BITMAP_MAX_NAME_SIZE = 1023


class HBitmap:
    """A flat model of QEMU's HBitmap: ``orig_size`` bytes tracked at 2**granularity."""

    __slots__ = ("bits", "granularity", "orig_size", "size")

    def __init__(self, orig_size: int, granularity: int) -> None:
        assert 0 <= granularity < 64
        self.orig_size = orig_size
        self.granularity = granularity
        self.size = (orig_size + (1 << granularity) - 1) >> granularity  # bits
        self.bits = 0

    def copy(self) -> HBitmap:
        other = HBitmap(self.orig_size, self.granularity)
        other.bits = self.bits
        return other

    def _mask(self, start: int, count: int) -> int:
        if count <= 0:
            return 0
        first = start >> self.granularity
        last = min((start + count - 1) >> self.granularity, self.size - 1)
        if last < first:
            return 0
        return ((1 << (last - first + 1)) - 1) << first

    def set(self, start: int, count: int) -> None:
        """hbitmap_set: every granule touched by [start, start+count) becomes dirty."""
        self.bits |= self._mask(start, count)

    def reset(self, start: int, count: int) -> None:
        """hbitmap_reset (QEMU asserts granule alignment; the same rounding is applied)."""
        self.bits &= ~self._mask(start, count)

    def reset_all(self) -> None:
        self.bits = 0

    def get(self, offset: int) -> bool:
        return bool(self.bits >> (offset >> self.granularity) & 1)

    def count(self) -> int:
        """hbitmap_count: dirty granules << granularity (bytes, not clipped at the end)."""
        return self.bits.bit_count() << self.granularity

    def empty(self) -> bool:
        return self.bits == 0

    def next_dirty(self, start: int, count: int) -> int:
        """hbitmap_next_dirty: first dirty offset in [start, start+count), or -1."""
        if start >= self.orig_size or count == 0:
            return -1
        end = self.orig_size if count > self.orig_size - start else start + count
        first = start >> self.granularity
        rest = self.bits >> first
        if not rest:
            return -1
        off = (first + (rest & -rest).bit_length() - 1) << self.granularity
        if off >= end:
            return -1
        return max(start, off)

    def next_zero(self, start: int, count: int) -> int:
        """hbitmap_next_zero: first clean offset in [start, start+count), or -1."""
        if start >= self.orig_size or count == 0:
            return -1
        if count > self.orig_size - start:
            end_bit = self.size
        else:
            end_bit = ((start + count - 1) >> self.granularity) + 1
        first = start >> self.granularity
        rest = ~(self.bits >> first)
        res = first + (rest & -rest).bit_length() - 1
        if res >= end_bit:
            return -1
        res <<= self.granularity
        return max(start, res)

    def next_dirty_area(self, start: int, end: int, max_dirty_count: int) -> tuple[int, int] | None:
        """hbitmap_next_dirty_area: (offset, bytes) of the next dirty run, capped, or None."""
        end = min(end, self.orig_size)
        if start >= end:
            return None
        start = self.next_dirty(start, end - start)
        if start < 0:
            return None
        end = start + min(end - start, max_dirty_count)
        nz = self.next_zero(start, end - start)
        if nz >= 0:
            end = nz
        return start, end - start

    def status(self, start: int, count: int) -> tuple[bool, int]:
        """hbitmap_status, including 7.2's quirk: a dirty run that ends inside the range
        reports ``False`` (copy-before-write's snapshot-access relies on it as it is)."""
        nd = self.next_dirty(start, count)
        if nd == -1:
            return False, count
        if nd > start:
            return False, nd - start
        nz = self.next_zero(start, count)
        if nz == -1:
            return True, count
        return False, nz - start

    def merge_from(self, src: HBitmap) -> None:
        """hbitmap_merge(self, src, self): OR in ``src``; sizes in bytes must match.

        With different granularities QEMU sets every dirty area of ``src`` in ``self``."""
        assert src.orig_size == self.orig_size
        if src.granularity == self.granularity:
            self.bits |= src.bits
            return
        pos = 0
        while (area := src.next_dirty_area(pos, src.orig_size, 1 << 62)) is not None:
            self.set(*area)
            pos = area[0] + area[1]

    def truncate(self, size: int) -> None:
        """hbitmap_truncate: grow with clean bits, or drop the bits past the new end."""
        self.orig_size = size
        self.size = (size + (1 << self.granularity) - 1) >> self.granularity
        self.bits &= (1 << self.size) - 1

    def words(self) -> int:
        """Number of 64-bit words of the bottom level (hbitmap_alloc: at least one)."""
        return max((self.size + 63) >> 6, 1)

    def serialize(self) -> bytes:
        """The bottom level as QEMU holds it on x86-64: little-endian unsigned longs."""
        return self.bits.to_bytes(self.words() * 8, "little")

    def sha256(self) -> str:
        """hbitmap_sha256: SHA-256 of the bottom level, lower-case hex."""
        import hashlib  # only x-debug-block-dirty-bitmap-sha256 needs it

        return hashlib.sha256(self.serialize()).hexdigest()

    def dirty_ranges(self) -> list[tuple[int, int]]:
        """All dirty runs as (offset, bytes), in ascending order (clipped at orig_size)."""
        out = []
        pos = 0
        while (area := self.next_dirty_area(pos, self.orig_size, 1 << 62)) is not None:
            out.append(area)
            pos = area[0] + area[1]
        return out


def ctz(value: int) -> int:
    return (value & -value).bit_length() - 1


@dataclass(eq=False)
class BdrvDirtyBitmap:
    """One dirty bitmap of a node (struct BdrvDirtyBitmap)."""

    bs: BlockDriverState
    bitmap: HBitmap
    size: int
    name: str | None = None
    busy: bool = False
    successor: BdrvDirtyBitmap | None = None
    disabled: bool = False
    readonly: bool = False
    persistent: bool = False
    inconsistent: bool = False
    skip_store: bool = False
    active_iterators: int = field(default=0, repr=False)

    # -- state -------------------------------------------------------------------------------
    @property
    def granularity(self) -> int:
        return 1 << self.bitmap.granularity

    def enabled(self) -> bool:
        return not self.disabled

    def recording(self) -> bool:
        """Enabled, or has an enabled successor (what query output calls ``recording``)."""
        return not self.disabled or (self.successor is not None and not self.successor.disabled)

    def has_successor(self) -> bool:
        return self.successor is not None

    def get_persistence(self) -> bool:
        """bdrv_dirty_bitmap_get_persistence: persistent and not being removed/migrated."""
        return self.persistent and not self.skip_store

    def count(self) -> int:
        return self.bitmap.count()

    def info(self) -> dict:
        """One BlockDirtyInfo, members in QAPI order (``inconsistent`` only when true)."""
        out: dict = {}
        if self.name is not None:
            out["name"] = self.name
        out.update(count=self.count(), granularity=self.granularity, recording=self.recording(),
                   busy=self.busy, persistent=self.persistent)
        if self.inconsistent:
            out["inconsistent"] = True
        return out

    def check(self, flags: int) -> None:
        """bdrv_dirty_bitmap_check: raise QEMU's error for the first failing condition."""
        if flags & BDRV_BITMAP_BUSY and self.busy:
            raise GenericError(f"Bitmap '{self.name}' is currently in use by another "
                               "operation and cannot be used")
        if flags & BDRV_BITMAP_RO and self.readonly:
            raise GenericError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if flags & BDRV_BITMAP_INCONSISTENT and self.inconsistent:
            raise GenericError(f"Bitmap '{self.name}' is inconsistent and cannot be used")

    # -- bits --------------------------------------------------------------------------------
    def set_dirty(self, offset: int, length: int) -> None:
        """bdrv_set_dirty_bitmap (callers that track writes use node.set_dirty)."""
        assert not self.readonly
        self.bitmap.set(offset, length)

    def reset_dirty(self, offset: int, length: int) -> None:
        assert not self.readonly
        self.bitmap.reset(offset, length)

    def get(self, offset: int) -> bool:
        return self.bitmap.get(offset)

    def clear(self, *, keep_backup: bool = False) -> HBitmap | None:
        """bdrv_clear_dirty_bitmap; with ``keep_backup`` returns the old bits for restore()."""
        assert not self.readonly
        if not keep_backup:
            self.bitmap.reset_all()
            return None
        backup = self.bitmap
        self.bitmap = HBitmap(self.size, backup.granularity)
        return backup

    def restore(self, backup: HBitmap) -> None:
        """bdrv_restore_dirty_bitmap: put back bits saved by clear() or merge()."""
        assert not self.readonly
        self.bitmap = backup

    def next_dirty(self, offset: int, length: int) -> int:
        return self.bitmap.next_dirty(offset, length)

    def next_zero(self, offset: int, length: int) -> int:
        return self.bitmap.next_zero(offset, length)

    def next_dirty_area(self, start: int, end: int, max_count: int) -> tuple[int, int] | None:
        return self.bitmap.next_dirty_area(start, end, max_count)

    def status(self, offset: int, length: int) -> tuple[bool, int]:
        return self.bitmap.status(offset, length)

    def sha256(self) -> str:
        return self.bitmap.sha256()

    def merge_internal(self, src: BdrvDirtyBitmap, *, keep_backup: bool = False) -> HBitmap | None:
        """bdrv_dirty_bitmap_merge_internal: no permission checks; optional backup of self."""
        assert not self.readonly and not self.inconsistent and not src.inconsistent
        if keep_backup:
            backup = self.bitmap
            self.bitmap = backup.copy()
            self.bitmap.merge_from(src.bitmap)
            return backup
        self.bitmap.merge_from(src.bitmap)
        return None

    def merge(self, src: BdrvDirtyBitmap, *, keep_backup: bool = False) -> HBitmap | None:
        """bdrv_merge_dirty_bitmap: the QMP-facing merge with QEMU's checks and texts."""
        self.check(BDRV_BITMAP_DEFAULT)
        src.check(BDRV_BITMAP_ALLOW_RO)
        if src.size != self.size:
            raise GenericError(f"Bitmaps are of different sizes (destination size is "
                               f"{self.size}, source size is {src.size}) and can't be merged")
        return self.merge_internal(src, keep_backup=keep_backup)

    # -- successors (backup jobs) -----------------------------------------------------------
    def create_successor(self) -> BdrvDirtyBitmap:
        """bdrv_dirty_bitmap_create_successor: anonymous child bitmap that records from now
        on (enabled iff the parent was); the parent becomes disabled and busy."""
        self.check(BDRV_BITMAP_BUSY)
        if self.successor is not None:
            raise GenericError("Cannot create a successor for a bitmap that already has one")
        child = self.bs.create_dirty_bitmap(self.granularity, None)
        child.disabled = self.disabled
        self.disabled = True
        self.successor = child
        self.busy = True
        return child

    def enable_successor(self) -> None:
        assert self.successor is not None
        self.successor.disabled = False

    def abdicate(self) -> BdrvDirtyBitmap:
        """bdrv_dirty_bitmap_abdicate: the successor takes name and persistence; self goes."""
        successor = self.successor
        if successor is None:
            raise GenericError("Cannot relinquish control if there's no successor present")
        successor.name, self.name = self.name, None
        self.successor = None
        successor.persistent = self.persistent
        self.persistent = False
        self.busy = False
        self.bs.release_dirty_bitmap(self)
        return successor

    def reclaim(self) -> BdrvDirtyBitmap:
        """bdrv_reclaim_dirty_bitmap: OR the successor back in, take its enabled state."""
        successor = self.successor
        if successor is None:
            raise GenericError("Cannot reclaim a successor when none is present")
        self.bitmap.merge_from(successor.bitmap)
        self.disabled = successor.disabled
        self.busy = False
        self.successor = None
        self.bs.release_dirty_bitmap(successor)
        return self


def default_granularity(cluster_size: int | None) -> int:
    """bdrv_get_default_bitmap_granularity: cluster size clamped to [4 KiB, 64 KiB]."""
    if cluster_size and cluster_size > 0:
        return min(65536, max(4096, cluster_size))
    return 65536
