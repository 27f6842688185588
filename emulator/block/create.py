"""bdrv_img_create's two halves, shared by every way to make an image: qemu-img create, and
the images drive-backup, drive-mirror and blockdev-snapshot-sync create.

:func:`check` is QEMU's checks of the format and backing file, in its order and with its
texts, then the emulator's limit (it writes qcow2, raw and plain files); :func:`write`
creates the host file as file-posix does (qemu_create) and formats it. Both raise
GenericError with QEMU's text; qemu-img puts the file name before it.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from emulator.block.drivers import BACKING_CREATORS, IMAGE_CREATORS, QEMU_DRIVERS
from emulator.block.errors import GenericError

EMULATED = ("qcow2", "raw", "file")
NOT_EMULATED = "Creating {} images is not emulated"   # the emulator's boundary


def check(filename: str, fmt: str, backing_file: str | None) -> None:
    """The format and backing-file checks of bdrv_img_create."""
    if fmt not in QEMU_DRIVERS:
        raise GenericError(f"Unknown file format '{fmt}'")
    if fmt not in IMAGE_CREATORS:
        raise GenericError(f"Format driver '{fmt}' does not support image creation")
    if backing_file is not None and fmt not in BACKING_CREATORS:
        raise GenericError(f"Backing file not supported for file format '{fmt}'")
    if backing_file == filename:
        raise GenericError("Error: Trying to create an image with the same filename as the "
                           "backing file")
    if backing_file == "":
        raise GenericError("Expected backing file name, got empty string")
    if fmt not in EMULATED:
        raise GenericError(NOT_EMULATED.format(fmt))


def write(path: str | os.PathLike[str], filename: str, fmt: str, size: int,
          **qcow2_options: Any) -> None:
    """bdrv_create: the host file created (or truncated), then a qcow2 image of ``size``
    written into it, or a raw file of that size with its first block allocated
    (file-posix's allocate_first_block)."""
    from emulator.qcow2 import FileIO, Qcow2Error, Qcow2Image
    from emulator.qcow2.errors import img_create_message

    try:
        io = FileIO.create(path)
    except OSError as e:   # qemu_create
        raise GenericError(f"Could not create '{filename}': "
                           f"{os.strerror(e.errno or errno.EIO)}") from None
    try:
        if fmt == "qcow2":
            Qcow2Image.create(io, size, **qcow2_options)
        else:
            io.truncate(size)
            io.pwrite(0, bytes(min(size, 4096)))
    except Qcow2Error as e:
        raise GenericError(img_create_message(e)) from None
    finally:
        io.close()
