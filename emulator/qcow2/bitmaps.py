"""Persistent dirty bitmaps: the bitmaps extension, bitmap directory, bitmap tables and data
(docs/interop/qcow2.txt "Bitmaps extension", block/qcow2-bitmap.c).

A `StoredBitmap` keeps its dirty bits as one Python int, bit i = granule i, which is both the
block layer's HBitmap layout and, written little-endian, the on-disk data layout (bit i of the
bitmap is bit i % 8 of byte i // 8). A 64 MiB disk at 64 KiB granularity is a 1024-bit int.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from emulator.qcow2.blockio import BlockIO
from emulator.qcow2.errors import Qcow2Error
from emulator.qcow2.header import AUTOCLEAR_BITMAPS, BitmapsExtension, Header
from emulator.qcow2.refcounts import Refcounts

BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_TYPE_DIRTY_TRACKING = 1
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31
BME_MAX_NAME_SIZE = 1023
BME_MAX_PHYS_SIZE = 0x20000000
BME_MAX_TABLE_SIZE = 0x8000000
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS

_ENTRY = struct.Struct(">QIIBBHI")


@dataclass
class StoredBitmap:
    """One persistent bitmap as the image stores it.

    `in_use`: BME_FLAG_IN_USE, the bitmap was not stored cleanly (QEMU loads it as
    inconsistent, so its bits are not read). `auto`: BME_FLAG_AUTO, the bitmap records writes
    (is enabled) once loaded. `dirty`: bit i set means granule i is dirty.
    """

    name: str
    granularity: int
    dirty: int = 0
    in_use: bool = False
    auto: bool = True


@dataclass
class DirectoryEntry:
    """A bitmap directory entry."""

    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    name: str
    type: int = BME_TYPE_DIRTY_TRACKING
    extra_data: bytes = b""

    def pack(self) -> bytes:
        name = self.name.encode()
        raw = _ENTRY.pack(self.table_offset, self.table_size, self.flags, self.type,
                          self.granularity_bits, len(name), len(self.extra_data))
        raw += self.extra_data + name
        return raw + bytes(-len(raw) % 8)


def calc_dir_entry_size(name_size: int, extra_data_size: int = 0) -> int:
    """calc_dir_entry_size: 24-byte entry + extra data + name, aligned to 8."""
    return (24 + extra_data_size + name_size + 7) & ~7


def read_directory(io: BlockIO, header: Header) -> list[DirectoryEntry]:
    """bitmap_list_load; empty when the autoclear bit says the extension is stale (a program
    without bitmap support wrote the image)."""
    ext = header.bitmaps
    if ext is None or not ext.nb_bitmaps or not header.autoclear_features & AUTOCLEAR_BITMAPS:
        return []
    try:
        raw = io.pread(ext.directory_offset, ext.directory_size)
    except OSError as e:
        raise Qcow2Error("Failed to read bitmap directory: "
                         f"{os.strerror(e.errno or errno.EIO)}") from None
    entries = []
    pos = 0
    for _ in range(ext.nb_bitmaps):
        if pos + _ENTRY.size > len(raw):
            raise Qcow2Error("Bitmap directory is invalid")
        table_offset, table_size, flags, kind, gran_bits, name_size, extra_size = \
            _ENTRY.unpack_from(raw, pos)
        start = pos + _ENTRY.size
        extra = raw[start:start + extra_size]
        name = raw[start + extra_size:start + extra_size + name_size].decode()
        entries.append(DirectoryEntry(table_offset, table_size, flags, gran_bits, name, kind,
                                      extra))
        pos += (_ENTRY.size + extra_size + name_size + 7) & ~7
    return entries


def check_constraints(name: str, granularity: int, image_size: int) -> None:
    """check_constraints_on_bitmap, with QEMU's texts."""
    if granularity & (granularity - 1) or granularity <= 0:
        raise Qcow2Error("Granularity must be a power of two")
    if granularity > 1 << BME_MAX_GRANULARITY_BITS:
        raise Qcow2Error(f"Granularity exceeds maximum ({1 << BME_MAX_GRANULARITY_BITS} bytes)")
    if granularity < 1 << BME_MIN_GRANULARITY_BITS:
        raise Qcow2Error(f"Granularity is under minimum ({1 << BME_MIN_GRANULARITY_BITS} bytes)")
    if _data_bytes(image_size, granularity) > BME_MAX_PHYS_SIZE:
        raise Qcow2Error("Too much space will be occupied by the bitmap. "
                         "Use larger granularity")
    if len(name.encode()) > BME_MAX_NAME_SIZE:
        raise Qcow2Error(f"Name length exceeds maximum ({BME_MAX_NAME_SIZE} characters)")


def _data_bytes(image_size: int, granularity: int) -> int:
    """Bytes of bitmap data: one bit per granule, rounded up to whole bytes."""
    nb_bits = -(-image_size // granularity)
    return -(-nb_bits // 8)


def load_bitmap(io: BlockIO, entry: DirectoryEntry, image_size: int,
                cluster_size: int) -> StoredBitmap:
    """load_bitmap: the bits of a bitmap stored cleanly; an in-use one comes back empty."""
    granularity = 1 << entry.granularity_bits
    bitmap = StoredBitmap(entry.name, granularity, in_use=bool(entry.flags & BME_FLAG_IN_USE),
                          auto=bool(entry.flags & BME_FLAG_AUTO))
    if bitmap.in_use:
        return bitmap
    nbytes = _data_bytes(image_size, granularity)
    try:
        raw = io.pread(entry.table_offset, 8 * entry.table_size)
    except OSError as e:
        raise Qcow2Error("Could not read bitmap_table table from image for bitmap "
                         f"'{entry.name}': {os.strerror(e.errno or errno.EIO)}") from None
    data = bytearray()
    for value in struct.unpack(f">{entry.table_size}Q", raw):
        offset = value & BME_TABLE_ENTRY_OFFSET_MASK
        if offset:
            try:
                data += io.pread(offset, cluster_size)
            except OSError as e:
                raise Qcow2Error(f"Could not read bitmap '{entry.name}' from image: "
                                 f"{os.strerror(e.errno or errno.EIO)}") from None
        elif value & BME_TABLE_ENTRY_FLAG_ALL_ONES:
            data += b"\xff" * cluster_size
        else:
            data += bytes(cluster_size)
    nb_bits = -(-image_size // granularity)
    bitmap.dirty = int.from_bytes(data[:nbytes], "little") & ((1 << nb_bits) - 1)
    return bitmap


def store_bitmap(io: BlockIO, refcounts: Refcounts, bitmap: StoredBitmap, image_size: int,
                 cluster_size: int) -> DirectoryEntry:
    """store_bitmap: data clusters for every cluster-sized stretch with a dirty bit, then the
    bitmap table; returns the directory entry describing them. A failed allocation or write
    frees what this bitmap got so far (clear_bitmap_table) and raises QEMU's text."""
    nbytes = _data_bytes(image_size, bitmap.granularity)
    data = bitmap.dirty.to_bytes(nbytes, "little")
    table_size = -(-nbytes // cluster_size)
    table = [0] * table_size
    table_offset = 0
    try:
        for k in range(table_size):
            chunk = data[k * cluster_size:(k + 1) * cluster_size]
            if chunk.strip(b"\0"):
                table[k] = _alloc(refcounts, cluster_size, bitmap.name)
                _write(io, table[k], chunk + bytes(cluster_size - len(chunk)), bitmap.name)
        table_offset = _alloc(refcounts, 8 * table_size, bitmap.name)
        _write(io, table_offset, struct.pack(f">{table_size}Q", *table), bitmap.name)
    except Qcow2Error:
        for offset in table:
            if offset:
                refcounts.free(offset, cluster_size, "always")
        if table_offset:
            refcounts.free(table_offset, 8 * table_size, "other")
        raise
    flags = (BME_FLAG_IN_USE if bitmap.in_use else 0) | (BME_FLAG_AUTO if bitmap.auto else 0)
    return DirectoryEntry(table_offset, table_size, flags,
                          bitmap.granularity.bit_length() - 1, bitmap.name)


def _alloc(refcounts: Refcounts, size: int, name: str) -> int:
    try:
        return refcounts.alloc(size)
    except OSError as e:
        raise Qcow2Error(f"Failed to allocate clusters for bitmap '{name}': "
                         f"{os.strerror(e.errno or errno.EIO)}") from None


def _write(io: BlockIO, offset: int, data: bytes, name: str) -> None:
    try:
        io.pwrite(offset, data)
    except OSError as e:
        raise Qcow2Error(f"Failed to write bitmap '{name}' to file: "
                         f"{os.strerror(e.errno or errno.EIO)}") from None


def free_bitmap_clusters(io: BlockIO, refcounts: Refcounts, entry: DirectoryEntry,
                         cluster_size: int) -> None:
    """free_bitmap_clusters: a bitmap's data clusters and its table."""
    raw = io.pread(entry.table_offset, 8 * entry.table_size)
    for value in struct.unpack(f">{entry.table_size}Q", raw):
        if value & BME_TABLE_ENTRY_OFFSET_MASK:
            refcounts.free(value & BME_TABLE_ENTRY_OFFSET_MASK, cluster_size, "always")
    refcounts.free(entry.table_offset, 8 * entry.table_size, "other")


def write_directory(io: BlockIO, refcounts: Refcounts, header: Header,
                    entries: list[DirectoryEntry], update_header: Callable[[], None],
                    flush_caches: Callable[[], None]) -> None:
    """update_ext_header_and_dir: a new directory and the metadata caches written back,
    the header pointing at it (autoclear bit set while bitmaps exist) and the file flushed
    (update_header_sync), then the old directory freed; on a failure the new directory is
    freed, the header fields restored and QEMU's "Failed to update bitmap extension"
    raised."""
    old = header.bitmaps
    saved = old, header.autoclear_features
    raw = b"".join(entry.pack() for entry in entries)
    offset = 0
    try:
        if entries:
            offset = refcounts.alloc(len(raw))
            io.pwrite(offset, raw)
            flush_caches()
            header.bitmaps = BitmapsExtension(len(entries), len(raw), offset)
            header.autoclear_features |= AUTOCLEAR_BITMAPS
        else:
            header.bitmaps = None
            header.autoclear_features &= ~AUTOCLEAR_BITMAPS
        _update_header_sync(io, update_header)
    except OSError as e:   # the new directory is given back, the header fields restored
        if offset:
            refcounts.free(offset, len(raw), "other")
        header.bitmaps, header.autoclear_features = saved
        raise Qcow2Error("Failed to update bitmap extension: "
                         f"{os.strerror(e.errno or errno.EIO)}") from None
    if old is not None and old.directory_size:
        refcounts.free(old.directory_offset, old.directory_size, "other")


def rewrite_directory_in_place(io: BlockIO, header: Header, entries: list[DirectoryEntry],
                               update_header: Callable[[], None]) -> None:
    """update_ext_header_and_dir_in_place (flag changes only): the autoclear bit is cleared
    while the directory is rewritten, so a crash leaves the bitmaps marked stale. Each
    header update is update_header_sync's: the header written, then the file flushed. An
    I/O error stops it where it happens (the bit stays cleared: the bitmaps are lost)."""
    assert header.bitmaps is not None
    header.autoclear_features &= ~AUTOCLEAR_BITMAPS
    _update_header_sync(io, update_header)
    io.pwrite(header.bitmaps.directory_offset, b"".join(entry.pack() for entry in entries))
    _update_header_sync(io, update_header)
    header.autoclear_features |= AUTOCLEAR_BITMAPS
    _update_header_sync(io, update_header)


def _update_header_sync(io: BlockIO, update_header: Callable[[], None]) -> None:
    """update_header_sync: the header written, then the file flushed."""
    update_header()
    io.flush()
