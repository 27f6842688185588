"""Format probing (block.c find_image_format, each driver's .bdrv_probe): which driver the
first 512 bytes of an image call for, when no format is given.

The magics are those of the drivers Debian's QEMU 7.2 probes from the start of the image;
raw (score 1) is the answer when none matches. Formats whose probe looks elsewhere (dmg at
the end) or at text (cloop, bochs, parallels) are not told apart here and read as raw.
"""

from __future__ import annotations

import struct

BLOCK_PROBE_BUF_SIZE = 512

_MAGICS = ((b"QED\0", "qed"), (b"KDMV", "vmdk"), (b"COWD", "vmdk"),
           (b"vhdxfile", "vhdx"), (b"conectix", "vpc"), (b"LUKS\xba\xbe", "luks"))
_VDI_SIGNATURE = 0xBEDA107F


def probe(head: bytes) -> str:
    """bdrv_probe_all over ``head`` (the image's first bytes; empty or short is fine):
    the driver's name."""
    if head[:4] == b"QFI\xfb" and len(head) >= 8:   # qcow (version 1) and qcow2
        return "qcow2" if struct.unpack_from(">I", head, 4)[0] >= 2 else "qcow"
    for magic, name in _MAGICS:
        if head.startswith(magic):
            return name
    if len(head) >= 68 and struct.unpack_from("<I", head, 64)[0] == _VDI_SIGNATURE:
        return "vdi"
    return "raw"
