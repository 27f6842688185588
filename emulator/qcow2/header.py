"""The qcow2 header (versions 2 and 3) and its header extensions, as in
docs/interop/qcow2.txt.

`Header.pack` lays cluster 0 out the way qcow2_update_header does: the header (112 bytes; 72
for version 2, which has no feature bits, refcount order or header length), the backing
format extension, the feature name table (version 3, clusters of 8 KiB and more), the bitmaps
extension, extensions this code does not know (kept verbatim), the end marker, then the
backing file name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from emulator.qcow2.errors import Qcow2Error

QCOW_MAGIC = 0x514649FB
HEADER_V3_LENGTH = 112  # sizeof(QCowHeader) in QEMU 7.2, compression_type byte + padding
HEADER_V2_LENGTH = 72   # offsetof(QCowHeader, incompatible_features)

_HEADER = struct.Struct(">IIQIIQIIQQIIQQQQII")  # up to and including header_length
_HEADER_V2 = struct.Struct(">IIQIIQIIQQIIQ")     # the version 2 fields
_COMPRESSION_TYPE_OFFSET = 104

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441
EXT_CRYPTO = 0x0537BE77

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_MASK = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

# Field offsets qcow2 rewrites in place (offsetof(QCowHeader, ...)).
OFFSET_SIZE = 24
OFFSET_L1 = 36  # l1_size (u32) followed by l1_table_offset (u64)
OFFSET_REFCOUNT_TABLE = 48  # refcount_table_offset (u64) followed by refcount_table_clusters
OFFSET_INCOMPATIBLE_FEATURES = 72

# The feature name table QEMU 7.2 writes into every v3 image (type, bit, name).
FEATURE_TABLE = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)
# QEMU 7.2 (Debian 7.2.22) leaves the feature name table out of images with clusters of
# 4 KiB or less; seen with qemu-img create -o cluster_size=512..32768.
FEATURE_TABLE_MIN_CLUSTER_SIZE = 8192
_FEATURE_NAMES = {(kind, bit): name for kind, bit, name in FEATURE_TABLE}
_BITMAPS_EXT = struct.Struct(">IIQQ")


@dataclass
class BitmapsExtension:
    """Where the bitmap directory is (qcow2.txt, "Bitmaps extension")."""

    nb_bitmaps: int
    directory_size: int
    directory_offset: int


@dataclass
class Header:
    cluster_bits: int
    size: int
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    refcount_order: int = 4
    version: int = 3
    crypt_method: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    header_length: int = HEADER_V3_LENGTH
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    bitmaps: BitmapsExtension | None = None
    unknown_extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @staticmethod
    def cluster_size_of(start: bytes) -> int:
        """The cluster size from the first bytes of an image: how much to read for `parse`."""
        if len(start) < 24 or struct.unpack_from(">I", start)[0] != QCOW_MAGIC:
            raise Qcow2Error("Image is not in qcow2 format")
        cluster_bits = struct.unpack_from(">I", start, 20)[0]
        if not 9 <= cluster_bits <= 21:
            raise Qcow2Error(f"Unsupported cluster size: 2^{cluster_bits}")
        return 1 << cluster_bits

    @classmethod
    def parse(cls, cluster0: bytes) -> Header:
        """Decode a header from the start of the image (at least one cluster's worth)."""
        if len(cluster0) < _HEADER.size:
            raise Qcow2Error("Image is not in qcow2 format")
        (magic, version, backing_offset, backing_size, cluster_bits, size, crypt_method,
         l1_size, l1_offset, rt_offset, rt_clusters, nb_snapshots, snapshots_offset,
         incompat, compat, autoclear, refcount_order, header_length) = _HEADER.unpack_from(cluster0)
        if magic != QCOW_MAGIC:
            raise Qcow2Error("Image is not in qcow2 format")
        if version not in (2, 3):
            raise Qcow2Error(f"Unsupported qcow2 version {version}")
        if not 9 <= cluster_bits <= 21:
            raise Qcow2Error(f"Unsupported cluster size: 2^{cluster_bits}")
        if version == 2:   # qcow2_do_open: the version 3 fields' values for version 2
            incompat = compat = autoclear = 0
            refcount_order, header_length = 4, HEADER_V2_LENGTH
        elif header_length < 104:
            raise Qcow2Error("qcow2 header too short")
        if header_length > (1 << cluster_bits):
            raise Qcow2Error("qcow2 header exceeds cluster size")
        unsupported = incompat & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION)
        if unsupported:
            raise Qcow2Error("Unsupported qcow2 feature(s): " + ", ".join(
                _FEATURE_NAMES.get((0, bit), f"Unknown incompatible feature: {1 << bit:x}")
                for bit in range(64) if unsupported >> bit & 1))
        if refcount_order > 6:
            raise Qcow2Error("Reference count entry width too large; may not exceed 64 bits")
        header = cls(
            cluster_bits=cluster_bits, size=size, l1_size=l1_size, l1_table_offset=l1_offset,
            refcount_table_offset=rt_offset, refcount_table_clusters=rt_clusters,
            refcount_order=refcount_order, version=version, crypt_method=crypt_method,
            nb_snapshots=nb_snapshots, snapshots_offset=snapshots_offset,
            incompatible_features=incompat, compatible_features=compat,
            autoclear_features=autoclear, header_length=header_length,
            compression_type=cluster0[_COMPRESSION_TYPE_OFFSET] if header_length > 104 else 0)
        header._parse_extensions(cluster0)
        if backing_offset:
            name = cluster0[backing_offset:backing_offset + backing_size]
            if backing_size > 1023 or len(name) != backing_size:
                raise Qcow2Error("Backing file name too long")
            header.backing_file = name.decode("utf-8", "surrogateescape")
        return header

    def _parse_extensions(self, cluster0: bytes) -> None:
        offset = self.header_length
        while offset + 8 <= len(cluster0):
            magic, length = struct.unpack_from(">II", cluster0, offset)
            offset += 8
            if magic == EXT_END:
                return
            data = bytes(cluster0[offset:offset + length])
            if len(data) != length:
                raise Qcow2Error("ext_magic: invalid extension length")
            if magic == EXT_BACKING_FORMAT:
                self.backing_format = data.decode("utf-8", "surrogateescape")
            elif magic == EXT_BITMAPS:
                nb, _reserved, dir_size, dir_offset = _BITMAPS_EXT.unpack_from(data)
                self.bitmaps = BitmapsExtension(nb, dir_size, dir_offset)
            elif magic in (EXT_DATA_FILE, EXT_CRYPTO):
                raise Qcow2Error("External data files and encryption are not supported")
            elif magic != EXT_FEATURE_TABLE:
                self.unknown_extensions.append((magic, data))
            offset += (length + 7) & ~7

    def pack(self, *, extensions: bool = True) -> bytes:
        """Cluster 0 as qcow2_update_header writes it (a whole cluster, zero-padded); without
        ``extensions`` the whole QCowHeader struct whatever the version (what
        qcow2_co_create writes first, before it opens the image)."""
        short = extensions and self.version == 2
        body = bytearray(HEADER_V2_LENGTH if short
                         else self.header_length if extensions else HEADER_V3_LENGTH)
        exts = self._pack_extensions() if extensions else b""
        # an empty name is still a backing file name (its offset is written, its size 0)
        has_backing = extensions and self.backing_file is not None
        backing = (self.backing_file or "").encode("utf-8", "surrogateescape") \
            if has_backing else b""
        backing_offset = len(body) + len(exts) if has_backing else 0
        fields = (QCOW_MAGIC, self.version, backing_offset, len(backing), self.cluster_bits,
                  self.size, self.crypt_method, self.l1_size, self.l1_table_offset,
                  self.refcount_table_offset, self.refcount_table_clusters, self.nb_snapshots,
                  self.snapshots_offset)
        if short:
            _HEADER_V2.pack_into(body, 0, *fields)
        else:
            _HEADER.pack_into(body, 0, *fields, self.incompatible_features,
                              self.compatible_features, self.autoclear_features,
                              self.refcount_order, len(body))
            if len(body) > 104:
                body[_COMPRESSION_TYPE_OFFSET] = self.compression_type
        body += exts
        body += backing
        if len(body) > self.cluster_size:
            raise Qcow2Error("Header extensions too large")
        return bytes(body).ljust(self.cluster_size, b"\0")

    def _pack_extensions(self) -> bytes:
        """The header extensions, in qcow2_update_header's order, and the end marker."""
        exts = bytearray()
        if self.backing_format:
            exts += _extension(EXT_BACKING_FORMAT, self.backing_format.encode())
        if self.version >= 3 and self.cluster_size >= FEATURE_TABLE_MIN_CLUSTER_SIZE:
            exts += _FEATURE_TABLE_EXTENSION
        if self.bitmaps is not None and self.bitmaps.nb_bitmaps:
            exts += _extension(EXT_BITMAPS, _BITMAPS_EXT.pack(
                self.bitmaps.nb_bitmaps, 0, self.bitmaps.directory_size,
                self.bitmaps.directory_offset))
        for magic, data in self.unknown_extensions:
            exts += _extension(magic, data)
        exts += bytes(8)
        return bytes(exts)


def _extension(magic: int, data: bytes) -> bytes:
    padding = -len(data) % 8
    return struct.pack(">II", magic, len(data)) + data + bytes(padding)


_FEATURE_TABLE_EXTENSION = _extension(EXT_FEATURE_TABLE, b"".join(
    struct.pack(">BB46s", kind, bit, name.encode()) for kind, bit, name in FEATURE_TABLE))
