"""blockdev-create jobs (block/create.c): type "create", manual dismiss, no BLOCK_JOB_* events.

The job's run is the driver's .bdrv_co_create: ``file`` creates and sizes a host file
(file-posix raw_co_create), ``qcow2`` formats an existing node through a BlockBackend
(qcow2_co_create, the same steps as qemu-img create, done by :meth:`Qcow2Image.create`).
A failure ends the job with the error text in query-jobs, as in QEMU.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Generator
from typing import Any

from emulator.block import perm as P
from emulator.block.backend import BlockBackend
from emulator.block.errors import GenericError
from emulator.block.flags import BDRV_REQ_NO_FALLBACK
from emulator.block.node import BlockDriverState
from emulator.block.subtree import subtree
from emulator.jobs.job import Co, Job

UINT32_MAX = 2**32 - 1
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MIN_EXTL2_CLUSTER_SIZE = (1 << MIN_CLUSTER_BITS) * 32   # QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER

CREATE_DRIVERS = frozenset({"file", "qcow2"})


class CreateJob(Job):
    """BlockdevCreateJob."""

    job_type = "create"

    def __init__(self, manager: Any, job_id: str, layer: Any, options: dict[str, Any]) -> None:
        super().__init__(manager, job_id, manual_dismiss=True)
        self.layer = layer
        self.options = options

    def run(self) -> Co:
        """blockdev_create_run: progress 0/1, the driver's create, then 1/1. The checks
        happen at once; the I/O part runs after a yield (after the command's reply), as
        file-posix's thread pool makes it in QEMU."""
        self.progress.set_remaining(1)
        try:
            if self.options["driver"] == "file":
                work = file_creator(self.layer, self.options)
            else:
                work = qcow2_creator(self.layer, self.options)
            try:
                next(work)              # the checks, up to the first I/O
                yield from self.io_yield()
                next(work, None)        # the I/O
            finally:
                work.close()
            ret = 0
        except CreateError as e:
            self.err = e.desc
            ret = -e.errno
        self.progress.work_done(1)
        return ret


class CreateError(GenericError):
    def __init__(self, desc: str, err: int = errno.EINVAL) -> None:
        super().__init__(desc)
        self.errno = err


def _oserror(prefix: str, e: OSError) -> CreateError:
    code = e.errno or errno.EIO
    return CreateError(f"{prefix}: {os.strerror(code)}", code)


def file_creator(layer: Any, opts: dict[str, Any]) -> Generator[None, None, None]:
    """raw_co_create (file-posix): create, empty, then size (and preallocate) the file.
    A generator that stops once before the truncation (the first thread-pool request)."""
    filename = opts["filename"]
    if opts.get("extent-size-hint", 1 << 20) > UINT32_MAX:
        raise CreateError("Extent size hint is too large")
    try:
        path = layer.resolve_path(filename, for_create=True)
    except GenericError as e:
        raise CreateError(e.desc, errno.EACCES) from None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise _oserror(f"Could not create '{filename}'", e) from None
    try:
        yield
        os.ftruncate(fd, 0)
        size = int(opts["size"])
        prealloc = opts.get("preallocation", "off")
        if prealloc == "full":
            step = 1 << 20
            for off in range(0, size, step):
                os.pwrite(fd, bytes(min(step, size - off)), off)
        elif prealloc == "falloc":
            os.posix_fallocate(fd, 0, size) if size else None
        elif prealloc != "off":
            raise CreateError(f"Unsupported preallocation mode: {prealloc}", errno.ENOTSUP)
        os.ftruncate(fd, size)
    except OSError as e:
        raise _oserror("Could not resize file", e) from None
    finally:
        os.close(fd)


class _BackendIO:
    """The qcow2 library's BlockIO over a BlockBackend (qcow2_co_create's ``blk``); debug
    events go to the file node, as BLKDBG_EVENT(bs->file, ...) does."""

    def __init__(self, blk: BlockBackend, bs: BlockDriverState) -> None:
        self.blk = blk
        self.bs = bs
        # plain drivers only below: nothing sees the requests one by one (see ChildIO)
        self.unobserved = all(node.plain_io for node in subtree(bs))

    def pread(self, offset: int, length: int) -> bytes:
        return self.blk.pread(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        self.blk.pwrite(offset, data)

    def pwrite_zeroes(self, offset: int, length: int) -> None:
        self.blk.pwrite_zeroes(offset, length, BDRV_REQ_NO_FALLBACK)

    def pdiscard(self, offset: int, length: int) -> None:
        self.blk.pdiscard(offset, length)

    def length(self) -> int:
        return self.bs.drv_getlength()

    def truncate(self, length: int) -> None:
        self.bs.drv_truncate(length)

    def flush(self) -> None:
        self.blk.flush()

    def debug_event(self, event: str) -> None:
        self.bs.drv_debug_event(event)


def _validate_qcow2(opts: dict[str, Any]) -> tuple[int, int]:
    """qcow2_co_create's option checks, in QEMU's order: (cluster size, refcount bits).
    Options the emulator cannot write (version 2, extended L2 entries, preallocation, an
    external data file, zstd) pass QEMU's checks first, then are refused."""
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
    if version < 3 or extended_l2 or prealloc != "off" or "data-file" in opts \
            or compression != "zlib":
        raise CreateError("This qcow2 creation option is not supported by the emulator",
                          errno.ENOTSUP)
    return cluster_size, refcount_bits


def _encryption_error(encrypt: dict[str, Any]) -> CreateError:
    """qcow2_set_up_encryption, once the image is made: the emulator has no secret
    objects (no object-add), so QEMU's first error is all there is to meet."""
    if "key-secret" not in encrypt:   # qcrypto_block_{luks,qcow}_create
        return CreateError("Parameter 'encrypt.key-secret' is required for cipher")
    return CreateError(f"No secret with id '{encrypt['key-secret']}'")


def qcow2_creator(layer: Any, opts: dict[str, Any]) -> Generator[None, None, None]:
    """qcow2_co_create on the node ``file`` (a reference or a definition); stops once
    before the first write."""
    from emulator.qcow2 import Qcow2Error, Qcow2Image

    try:
        bs = layer.open_node(opts["file"])
    except GenericError as e:
        raise CreateError(e.desc, errno.EIO) from None
    blk: BlockBackend | None = None
    try:
        cluster_size, refcount_bits = _validate_qcow2(opts)
        blk = BlockBackend(layer.graph, perm=P.WRITE | P.RESIZE, shared_perm=P.ALL)
        try:
            blk.insert_bs(bs)
        except GenericError as e:
            raise CreateError(e.desc, errno.EPERM) from None
        blk.allow_write_beyond_eof = True
        yield
        try:
            Qcow2Image.create(_BackendIO(blk, bs), int(opts["size"]),
                              cluster_size=cluster_size,
                              backing_file=opts.get("backing-file"),
                              backing_format=opts.get("backing-fmt"),
                              lazy_refcounts=bool(opts.get("lazy-refcounts", False)),
                              refcount_bits=refcount_bits)
            blk.flush()
            if "encrypt" in opts:
                raise _encryption_error(opts["encrypt"])
        except Qcow2Error as e:
            raise CreateError(str(e)) from None
        except OSError as e:
            raise _oserror("Could not write qcow2 header", e) from None
    finally:
        if blk is not None:
            blk.unref()
        layer.graph.unref(bs)
