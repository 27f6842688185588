"""blockdev-create jobs (block/create.c): type "create", manual dismiss, no BLOCK_JOB_* events.

The job's run is the driver's .bdrv_co_create: ``file`` creates and sizes a host file
(file-posix raw_co_create), ``qcow2`` formats an existing node through a BlockBackend
(qcow2_co_create, the same steps as qemu-img create, done by :meth:`Qcow2Image.create`).
A failure ends the job with the error text in query-jobs, as in QEMU.
"""

from __future__ import annotations

import errno
from collections.abc import Generator
from typing import Any

from emulator.block import perm as P
from emulator.block.backend import BlockBackend
from emulator.block.create import (
    CreateError,
    encryption_error,
    oserror,
    qcow2_create_checks,
    raw_co_create,
)
from emulator.block.errors import GenericError
from emulator.block.flags import BDRV_REQ_NO_FALLBACK
from emulator.block.io import truncate
from emulator.block.node import BlockDriverState
from emulator.block.subtree import subtree
from emulator.jobs.job import Co, Job

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


def file_creator(layer: Any, opts: dict[str, Any]) -> Generator[None, None, None]:
    """The file driver's create: raw_co_create on the client's file name."""
    try:
        path = layer.resolve_path(opts["filename"], for_create=True)
    except GenericError as e:
        raise CreateError(e.desc, errno.EACCES) from None
    return raw_co_create(path, opts["filename"], int(opts["size"]),
                         opts.get("preallocation", "off"), opts.get("extent-size-hint"))


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

    def allocated_size(self) -> int | None:
        return self.bs.get_allocated_file_size()

    def truncate(self, length: int, prealloc: str = "off") -> None:
        truncate(self.bs, length, prealloc)   # blk_co_truncate

    def flush(self) -> None:
        self.blk.flush()

    def debug_event(self, event: str) -> None:
        self.bs.drv_debug_event(event)


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
        cluster_size, refcount_bits, version = qcow2_create_checks(opts)
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
                              refcount_bits=refcount_bits, version=version,
                              preallocation=opts.get("preallocation", "off"))
            blk.flush()
            if "encrypt" in opts:
                raise encryption_error(opts["encrypt"])
        except Qcow2Error as e:
            raise CreateError(str(e)) from None
        except OSError as e:
            raise oserror("Could not write qcow2 header", e) from None
    finally:
        if blk is not None:
            blk.unref()
        layer.graph.unref(bs)
