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
from collections.abc import Callable, Generator
from typing import Any

from emulator.block import locking
from emulator.block import perm as P
from emulator.block.drivers import BACKING_CREATORS, IMAGE_CREATORS, QEMU_DRIVERS
from emulator.block.errors import GenericError
from emulator.qcow2.blockio import TruncateError, regular_truncate

EMULATED = ("qcow2", "raw", "file")
PREALLOC_MODES = ("off", "metadata", "falloc", "full")
UINT32_MAX = 2**32 - 1
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MIN_EXTL2_CLUSTER_SIZE = (1 << MIN_CLUSTER_BITS) * 32   # QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER
NOT_EMULATED = "Creating {} images is not emulated"   # the emulator's boundary


def check(filename: str, fmt: str, backing_file: str | None) -> None:
    """The format and backing-file checks of bdrv_img_create (no -o options)."""
    check_format(fmt)
    if backing_file is not None and fmt not in BACKING_CREATORS:
        raise GenericError(f"Backing file not supported for file format '{fmt}'")
    check_backing(filename, backing_file)
    check_emulated(fmt)


def check_format(fmt: str) -> None:
    """bdrv_img_create's first checks: a known format that can create images."""
    if fmt not in QEMU_DRIVERS:
        raise GenericError(f"Unknown file format '{fmt}'")
    if fmt not in IMAGE_CREATORS:
        raise GenericError(f"Format driver '{fmt}' does not support image creation")


def check_backing(filename: str, backing_file: str | None) -> None:
    """bdrv_img_create's checks of the backing file name."""
    if backing_file == filename:
        raise GenericError("Error: Trying to create an image with the same filename as the "
                           "backing file")
    if backing_file == "":
        raise GenericError("Expected backing file name, got empty string")


def check_emulated(fmt: str) -> None:
    """The emulator's boundary: it writes qcow2 images and raw and plain files."""
    if fmt not in EMULATED:
        raise GenericError(NOT_EMULATED.format(fmt))


def write(path: str | os.PathLike[str], filename: str, fmt: str, size: int,
          options: dict[str, Any] | Callable[[], dict[str, Any]] | None = None, *,
          preallocation: str | None = None, extent_size_hint: int | None = None) -> None:
    """bdrv_create. The protocol layer (file-posix's raw_co_create_opts) creates the host
    file with ``preallocation`` and ``extent_size_hint``; a raw image is that file, of
    ``size``. A qcow2 image is written into the empty file, ``options`` being blockdev-create's
    qcow2 options (backing-file, version, ...) or the function that reads them, which
    qcow2_co_create_opts does only once the file is made: they are checked as blockdev-create
    does, and the file is deleted when the image cannot be made."""
    from emulator.qcow2 import FileIO, Qcow2Error, Qcow2Image
    from emulator.qcow2.errors import img_create_message

    if fmt != "qcow2" and preallocation not in (None, *PREALLOC_MODES):
        raise GenericError(f"invalid parameter value: {preallocation}")   # qapi_enum_parse
    # the protocol layer: qcow2's file is made empty (its size and preallocation are its own)
    for _ in raw_co_create(path, filename, 0 if fmt == "qcow2" else size,
                           preallocation or "off", extent_size_hint):
        pass
    if fmt != "qcow2":
        return
    io = FileIO(path)
    try:
        opts = {"size": size, **(options() if callable(options) else options or {})}
        size = int(opts["size"])
        cluster_size, refcount_bits, version = qcow2_create_checks(opts)
        Qcow2Image.create(io, size, cluster_size=cluster_size,
                          backing_file=opts.get("backing-file"),
                          backing_format=opts.get("backing-fmt"),
                          lazy_refcounts=bool(opts.get("lazy-refcounts", False)),
                          refcount_bits=refcount_bits, version=version,
                          preallocation=opts.get("preallocation", "off"))
        if "encrypt" in opts:
            raise encryption_error(opts["encrypt"])
    except (Qcow2Error, GenericError) as e:
        io.close()
        os.unlink(path)   # bdrv_co_delete_file_noerr
        raise GenericError(img_create_message(e) if isinstance(e, Qcow2Error)
                           else e.desc) from None
    finally:
        io.close()


def raw_co_create(path: str | os.PathLike[str], filename: str, size: int, prealloc: str,
                  extent_size_hint: int | None) -> Generator[None, None, None]:
    """raw_co_create (file-posix): create, empty, then size (and preallocate) the file.
    A generator that stops once before the truncation (the first thread-pool request,
    which a blockdev-create job waits for)."""
    if extent_size_hint is not None and extent_size_hint > UINT32_MAX:
        raise CreateError("Extent size hint is too large")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise oserror(f"Could not create '{filename}'", e) from None
    try:
        try:   # nobody else may be using the file ("Failed to get "resize" lock")
            locking.lock(fd, P.WRITE | P.RESIZE, P.ALL & ~P.RESIZE, filename)
        except GenericError as e:
            raise CreateError(e.desc, errno.EAGAIN, hint=e.hint) from None
        yield
        try:   # "Clear the file by truncating it to 0", then the size asked for
            regular_truncate(fd, 0)
            regular_truncate(fd, size, prealloc)
        except TruncateError as e:
            raise CreateError(e.message, e.code) from None
    finally:
        os.close(fd)


def oserror(prefix: str, e: OSError) -> CreateError:
    """QEMU's error_setg_errno text, with the errno for a job's result."""
    code = e.errno or errno.EIO
    return CreateError(f"{prefix}: {os.strerror(code)}", code)


class CreateError(GenericError):
    def __init__(self, desc: str, err: int = errno.EINVAL, *, hint: str = "") -> None:
        super().__init__(desc, hint=hint)
        self.errno = err


def qcow2_create_checks(opts: dict[str, Any]) -> tuple[int, int, int]:
    """qcow2_co_create's option checks, in QEMU's order: (cluster size, refcount bits,
    version). Options the emulator cannot write (extended L2 entries, an external data
    file, zstd) pass QEMU's checks first, then are refused."""
    if opts["size"] % 512:
        raise CreateError("Image size must be a multiple of 512 bytes")
    version = 2 if opts.get("version") == "v2" else 3
    v3_needed = "compatibility level 1.1 and above (use version=v3 or greater)"
    cluster_size = int(opts.get("cluster-size", 65536))
    extended_l2 = bool(opts.get("extended-l2", False))
    if extended_l2 and version < 3:
        raise CreateError(f"Extended L2 entries are only supported with {v3_needed}")
    bits = (cluster_size & -cluster_size).bit_length() - 1
    if not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS or 1 << bits != cluster_size:
        raise CreateError(f"Cluster size must be a power of two between "
                          f"{1 << MIN_CLUSTER_BITS} and {1 << (MAX_CLUSTER_BITS - 10)}k")
    if extended_l2 and cluster_size < MIN_EXTL2_CLUSTER_SIZE:
        raise CreateError("Extended L2 entries are only supported with cluster sizes of at "
                          f"least {MIN_EXTL2_CLUSTER_SIZE} bytes")
    prealloc = opts.get("preallocation", "off")
    if "backing-file" in opts and prealloc != "off" and not extended_l2:
        raise CreateError("Backing file and preallocation can only be used at the same "
                          "time if extended_l2 is on")
    if "backing-fmt" in opts and "backing-file" not in opts:
        raise CreateError("Backing format cannot be used without backing file")
    if version < 3 and opts.get("lazy-refcounts"):
        raise CreateError(f"Lazy refcounts only supported with {v3_needed}")
    refcount_bits = int(opts.get("refcount-bits", 16))
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise CreateError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise CreateError("Different refcount widths than 16 bits require compatibility "
                          "level 1.1 or above (use version=v3 or greater)")
    if opts.get("data-file-raw") and "data-file" not in opts:
        raise CreateError("data-file-raw requires data-file")
    if opts.get("data-file-raw") and "backing-file" in opts:
        raise CreateError("Backing file and data-file-raw cannot be used at the same time")
    if "data-file" in opts and version < 3:
        raise CreateError(f"External data files are only supported with {v3_needed}")
    compression = opts.get("compression-type", "zlib")
    if compression != "zlib" and version < 3:
        raise CreateError(f"Non-zlib compression type is only supported with {v3_needed}")
    if extended_l2 or "data-file" in opts or compression != "zlib":
        raise CreateError("This qcow2 creation option is not supported by the emulator",
                          errno.ENOTSUP)
    return cluster_size, refcount_bits, version


def encryption_error(encrypt: dict[str, Any]) -> CreateError:
    """qcow2_set_up_encryption, once the image is made: the emulator has no secret
    objects (no object-add), so QEMU's first error is all there is to meet."""
    if "key-secret" not in encrypt:   # qcrypto_block_{luks,qcow}_create
        return CreateError("Parameter 'encrypt.key-secret' is required for cipher")
    return CreateError(f"No secret with id '{encrypt['key-secret']}'")
