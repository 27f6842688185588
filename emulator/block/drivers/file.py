"""file: a host file (block/file-posix.c), opened through the emulator's sandbox.

``filename`` is kept as given (QEMU shows it verbatim in query output); the host path is
the sandbox's resolution of it. Lengths are the host file's; reads past the end return
zeroes; writes past the end grow the file.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING, Any, ClassVar

from emulator.block import locking, waits
from emulator.block import perm as P
from emulator.block.drivers import register
from emulator.block.errors import GenericError
from emulator.block.flags import BDRV_REQ_MAY_UNMAP
from emulator.block.locking import LockBytes
from emulator.block.node import (
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_ZERO,
    BlockDriverState,
    BlockStatus,
)
from emulator.qcow2.blockio import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
    punch_hole,
    regular_truncate,
)

if TYPE_CHECKING:
    from emulator.block.graph import Transaction

# bdrv_open_common's text for a driver with .bdrv_needs_filename given none
NEEDS_FILENAME = "The 'file' block driver requires a file name"


@register
class FileNode(BlockDriverState):
    format_name: ClassVar[str] = "file"
    protocol_name: ClassVar[str | None] = "file"
    plain_io: ClassVar[bool] = True

    fd: int = -1
    file_length: int = 0   # the host file's length, kept by this node (see drv_getlength)
    has_discard: bool = True   # until the host file system says it can't punch holes
    has_write_zeroes: bool = True   # ... can't FALLOC_FL_ZERO_RANGE
    has_fallocate: bool = True      # ... can't fallocate at all

    def drv_open(self, options: dict[str, Any], open_child: Any) -> None:
        filename = options["filename"]
        if not filename:   # bdrv_open_common: .bdrv_needs_filename
            raise GenericError(NEEDS_FILENAME)
        self.exact_filename = filename
        self.filename = filename
        self.aio = options.get("aio", "threads")
        self.locking = options.get("locking", "auto")
        if "pr-manager" in options:   # pr_manager_lookup: the emulator has no objects
            raise GenericError("No persistent reservation manager with id "
                               f"'{options['pr-manager']}'")
        path = open_child.layer.resolve_path(filename)
        self.host_path = path
        flags = os.O_RDONLY if self.read_only else os.O_RDWR
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as e:
            if (e.errno in (errno.EACCES, errno.EROFS) and self.auto_read_only
                    and not self.read_only):
                self.read_only = True
                self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            else:
                reason = os.strerror(e.errno or errno.EIO)
                raise GenericError(f"Could not open '{filename}': {reason}") from None
        st = os.fstat(self.fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(self.fd)
            self.fd = -1
            raise GenericError(f"Could not open '{filename}': Is a directory")
        self.file_length = st.st_size
        # raw_open_common: no lock byte is held until permissions are taken
        self.use_lock = self.locking != "off"   # on, or auto: OFD locks exist here
        self.lock_bytes = LockBytes(self.fd)
        self.perm, self.shared_perm = 0, P.ALL
        if self.aio == "native" and not self.cache_direct:   # Linux AIO needs O_DIRECT
            raise GenericError("aio=native was specified, but it requires cache.direct=on, "
                               "which was not specified.")

    def drv_getlength(self) -> int:
        """The host file's length as of open, then as this node's writes and truncations
        leave it: QEMU keeps bs->total_sectors of a regular file the same way (bdrv_file has
        no has_variable_length), so no fstat per request."""
        return self.file_length

    def drv_preadv(self, offset: int, length: int) -> bytes:
        waits.note(waits.THREAD)   # every request below goes to the thread pool
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def drv_pwritev(self, offset: int, data: bytes, flags: int) -> None:
        waits.note(waits.THREAD)
        written = os.pwrite(self.fd, data, offset)
        if written < len(data):   # a short write (rare): the rest, as raw_co_prw retries it
            self.drv_pwritev(offset + written, data[written:], flags)
        self.file_length = max(self.file_length, offset + written)

    def drv_pwrite_zeroes(self, offset: int, length: int, flags: int) -> None:
        """raw_do_pwrite_zeroes: with BDRV_REQ_MAY_UNMAP the range is punched out
        (handle_aiocb_write_zeroes_unmap), else, or where that fails,
        handle_aiocb_write_zeroes: FALLOC_FL_ZERO_RANGE (blocks allocated, reading as
        zeroes), punching a hole and allocating it again, fallocate(0) past the end; where
        the file system does none, -ENOTSUP and the block layer writes zero buffers."""
        waits.note(waits.THREAD)
        if flags & BDRV_REQ_MAY_UNMAP:
            ret = fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                            length)
            if ret == 0:
                return
            if ret not in (-errno.ENOTSUP, -errno.EINVAL, -errno.EBUSY):
                raise OSError(-ret, os.strerror(-ret))
        if self.has_write_zeroes:
            ret = fallocate(self.fd, FALLOC_FL_ZERO_RANGE, offset, length)
            if ret == -errno.ENOTSUP:
                self.has_write_zeroes = False
            elif ret != -errno.EINVAL:
                self._allocated(ret, offset + length)
                return
        if self.has_discard and self.has_fallocate:
            ret = fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                            length)
            if ret == 0:
                ret = fallocate(self.fd, 0, offset, length)
                if ret != -errno.ENOTSUP:
                    self._allocated(ret, offset + length)
                    return
                self.has_fallocate = False
            elif ret == -errno.ENOTSUP:
                self.has_discard = False
            elif ret != -errno.EINVAL:
                raise OSError(-ret, os.strerror(-ret))
        if self.has_fallocate and offset >= self.file_length:
            ret = fallocate(self.fd, 0, offset, length)
            if ret != -errno.ENOTSUP:
                self._allocated(ret, offset + length)
                return
            self.has_fallocate = False
        raise NotImplementedError

    def _allocated(self, ret: int, end: int) -> None:
        """After an fallocate without KEEP_SIZE: an error, or a file that may have grown."""
        if ret < 0:
            raise OSError(-ret, os.strerror(-ret))
        self.file_length = max(self.file_length, end)

    def drv_truncate(self, length: int, prealloc: str = "off", zero_write: bool = False) -> None:
        """raw_co_truncate of a regular file: raw_regular_truncate (TruncateError)."""
        waits.note(waits.THREAD)
        regular_truncate(self.fd, length, prealloc)
        self.file_length = length

    def drv_pdiscard(self, offset: int, length: int) -> None:
        """raw_co_pdiscard (handle_aiocb_discard): the range is punched out of the file and
        reads as zeroes. A file system that can't is not asked again, and its -ENOTSUP is
        success to bdrv_co_pdiscard."""
        waits.note(waits.THREAD)
        if self.has_discard:
            self.has_discard = punch_hole(self.fd, offset, length)

    def drv_flush_to_disk(self) -> None:
        """No fdatasync: the emulator's files live in a scratch test directory, and what a
        flush to disk adds (durability across a host crash) is nothing a client, qemu-img or
        any other process can observe; they see written data through the page cache at once."""
        waits.note(waits.THREAD)

    def drv_block_status(self, want_zero: bool, offset: int, length: int) -> BlockStatus:
        """raw_co_block_status: SEEK_DATA/SEEK_HOLE, holes read as zeroes."""
        if not want_zero:
            return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID, length, offset, self
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError:
            return BDRV_BLOCK_ZERO | BDRV_BLOCK_OFFSET_VALID, length, offset, self
        if data > offset:
            return (BDRV_BLOCK_ZERO | BDRV_BLOCK_OFFSET_VALID, min(length, data - offset), offset,
                    self)
        hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID, min(length, hole - offset), offset, self

    def get_info(self) -> dict | None:
        """raw_get_info: no cluster size, never dirty."""
        return {"cluster_size": 0, "is_dirty": False}

    def get_allocated_file_size(self) -> int | None:
        return os.fstat(self.fd).st_blocks * 512

    def drv_close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)   # its lock bytes go with it
            self.fd = -1

    def drv_reopen_read_only(self) -> None:
        """Reopen the host file read-only (raw_reopen_prepare with a new O_RDONLY fd; the
        lock bytes held are copied to it before the old one closes)."""
        if self.fd >= 0 and not self.read_only:
            fd = os.open(self.host_path, os.O_RDONLY | os.O_CLOEXEC)
            locks = LockBytes(fd)
            if self.use_lock:   # raw_check_perm's "copy locks to the new fd"
                locks.apply(self.perm, ~self.shared_perm & P.ALL, unlock=False)
            os.close(self.fd)
            self.fd, self.lock_bytes = fd, locks

    # -- image locking ----------------------------------------------------------------------
    def check_perm(self, perm: int, shared: int, tran: Transaction) -> None:
        """raw_check_perm -> raw_handle_perm_lock(PREPARE): lock what either the old or the
        new permissions need, then check the new ones against other users; on failure, or
        when the transaction aborts, back to the old locks; on commit, exactly the new
        ones (raw_set_perm)."""
        if not self.use_lock or self.inactive or self.fd < 0 or \
                (perm, shared) == (self.perm, self.shared_perm):   # nothing to lock or undo
            return
        if (self.perm | perm) != self.perm or (self.shared_perm & shared) != self.shared_perm:
            try:
                self.lock_bytes.apply(self.perm | perm, ~self.shared_perm & P.ALL
                                      | ~shared & P.ALL, unlock=False)
                locking.check(self.fd, perm, shared, self.filename)
            except GenericError:
                self._restore_locks()
                raise

        def commit() -> None:
            self.lock_bytes.apply(perm, ~shared & P.ALL, unlock=True)
            self.perm, self.shared_perm = perm, shared

        tran.add(abort=self._restore_locks, commit=commit)

    def _restore_locks(self) -> None:
        """RAW_PL_ABORT: the locks of the permissions in force."""
        if self.fd >= 0:
            self.lock_bytes.apply(self.perm, ~self.shared_perm & P.ALL, unlock=True)
