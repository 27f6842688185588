"""The qcow2 library's view of its file: QEMU's ``bs->file`` child.

All I/O goes through a `BlockIO`, so a blkdebug node can sit between qcow2 and the file and see
the same requests and debug events (``BLKDBG_EVENT(bs->file, ...)``) as in QEMU.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, Protocol

Report = Callable[[str], object]   # where a library writes what QEMU prints to stderr

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


@functools.cache
def _fallocate() -> Any:
    """The C library's fallocate(2) (os has posix_fallocate only, without the mode flags);
    None where there is none. ctypes is imported on the first discard, not at start-up."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fallocate = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fallocate is not None:
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fallocate


FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """do_fallocate: fallocate(2) with ``mode``; 0 or -errno (-ENOTSUP where the C library
    has no fallocate or the file system does not do ``mode``)."""
    call = _fallocate()
    if call is None:
        return -errno.ENOTSUP
    if call(fd, mode, offset, length) == 0:
        return 0
    import ctypes
    err = ctypes.get_errno()
    return -(errno.ENOTSUP if err == errno.EOPNOTSUPP else err)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """file-posix's discard, fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE): the
    range reads as zeroes. False if the file system can't (QEMU then stops asking)."""
    ret = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    if ret == -errno.ENOTSUP:
        return False
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret))
    return True


BDRV_MAX_LENGTH = (2**63 - 1) // (1 << 30) * (1 << 30)


class TruncateError(OSError):
    """A truncate's failure, at any layer (bdrv_co_truncate, a driver's, file-posix's):
    ``message`` is QEMU's whole text, ``code`` its errno."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code, self.message = code, message


def check_truncate_offset(offset: int) -> None:
    """bdrv_co_truncate's checks of the new length (an int64)."""
    if offset < 0:
        raise TruncateError(errno.EINVAL, "Image size cannot be negative")
    if offset > BDRV_MAX_LENGTH:   # bdrv_check_request
        raise TruncateError(errno.EIO, f"offset({offset}) exceeds maximum({BDRV_MAX_LENGTH})")


def regular_truncate(fd: int, offset: int, prealloc: str = "off") -> None:
    """handle_aiocb_truncate: resize a host file to ``offset``, preallocating what is added
    as ``prealloc`` says (falloc: posix_fallocate; full: zeroes written, then fsync). A
    file grown from nothing gets its first block written (allocate_first_block, which makes
    the next open's alignment probe cheap)."""
    current = os.fstat(fd).st_size

    def fail(text: str, err: int) -> TruncateError:
        return TruncateError(err, f"{text}: {os.strerror(err)}")

    if current > offset and prealloc != "off":
        raise TruncateError(errno.ENOTSUP, "Cannot use preallocation for shrinking files")
    try:
        if prealloc == "falloc":
            if offset != current:
                try:
                    os.posix_fallocate(fd, current, offset - current)
                except OSError as e:
                    raise fail("Could not preallocate new data", e.errno or errno.EIO) from None
                if current == 0:
                    _allocate_first_block(fd, offset)
        elif prealloc == "full":
            os.ftruncate(fd, offset)
            zeroes = bytes(65536)
            step = "Could not write zeros for preallocation"
            try:
                for start in range(current, offset, 65536):
                    os.pwrite(fd, zeroes[:min(65536, offset - start)], start)
                step = "Could not flush file to disk"
                os.fsync(fd)
            except OSError as e:
                raise fail(step, e.errno or errno.EIO) from None
        elif prealloc == "off":
            os.ftruncate(fd, offset)
            if current == 0 and offset > 0:
                _allocate_first_block(fd, offset)
        else:
            raise TruncateError(errno.ENOTSUP, f"Unsupported preallocation mode: {prealloc}")
    except TruncateError:
        raise
    except OSError as e:
        raise fail("Could not resize file", e.errno or errno.EIO) from None


def _allocate_first_block(fd: int, size: int) -> None:
    """allocate_first_block: failures ignored."""
    with contextlib.suppress(OSError):
        os.pwrite(fd, bytes(512 if size < 4096 else 4096), 0)


class BlockIO(Protocol):
    """A byte-addressed file child. Reads past the end return zeroes (like a sparse file);
    failures are `OSError` with an errno, as blkdebug raises them."""

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes) -> None: ...

    def pwrite_zeroes(self, offset: int, length: int) -> None:
        """bdrv_co_pwrite_zeroes(..., BDRV_REQ_NO_FALLBACK): OSError ENOTSUP where only a
        written zero buffer would do."""

    def pdiscard(self, offset: int, length: int) -> None:
        """bdrv_pdiscard on the file: advisory (qcow2 ignores its failure)."""

    def length(self) -> int: ...

    def allocated_size(self) -> int | None:
        """bdrv_get_allocated_file_size: bytes the host really uses (None: not known)."""

    def truncate(self, length: int, prealloc: str = "off") -> None:
        """bdrv_co_truncate on the file (``prealloc``: a PreallocMode, lower case); raises
        TruncateError with QEMU's message."""

    def flush(self) -> None: ...

    def debug_event(self, event: str) -> None:
        """A BLKDBG event, lower case as blkdebug's QAPI names them: "read_aio", "l2_load"..."""


class FileIO:
    """A `BlockIO` over a host file: what QEMU's file-posix driver is to qcow2.

    Debug events go nowhere; blkdebug (the block layer's) wraps a FileIO to act on them.
    """

    @property
    def unobserved(self) -> bool:
        """Nothing sees the requests one by one (see Refcounts.table); a subclass may
        watch them, so only a plain FileIO says so."""
        return type(self) is FileIO

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        self._fd = os.open(self.path, os.O_RDONLY if read_only else os.O_RDWR)

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> FileIO:
        """Create (or truncate) the file, as file-posix's image creation does."""
        os.close(os.open(os.fspath(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644))
        return cls(path)

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def pwrite(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, offset)
            view = view[done:]
            offset += done

    def pwrite_zeroes(self, offset: int, length: int) -> None:
        """file-posix zeroes a range without a buffer; here zeroes are written."""
        self.pwrite(offset, bytes(length))

    def pdiscard(self, offset: int, length: int) -> None:
        """qemu-io opens its file with discard=unmap: punched out."""
        if length > 0:
            punch_hole(self._fd, offset, length)

    def length(self) -> int:
        return os.fstat(self._fd).st_size

    def truncate(self, length: int, prealloc: str = "off") -> None:
        regular_truncate(self._fd, length, prealloc)

    def flush(self) -> None:
        """Nothing to do: writes are visible to every process at once, and durability across
        a host crash is not observable (see FileNode.drv_flush_to_disk)."""

    def debug_event(self, event: str) -> None:
        pass

    def allocated_size(self) -> int:
        """Bytes the host file system really uses: ``actual-size`` in qemu-img info."""
        return os.fstat(self._fd).st_blocks * 512

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# The running tool's name and stderr (qemu-img, offline qemu-io): where QEMU's fprintf(stderr),
# error_report() and warn_report() print, the latter two after the tool's name. None in a
# VM, whose stderr nobody sees.
_TOOL: ContextVar[tuple[str, Report] | None] = ContextVar("tool", default=None)


@contextlib.contextmanager
def tool_stderr(progname: str, write: Report) -> Iterator[None]:
    """Run a tool's work with ``write`` as its stderr."""
    token = _TOOL.set((progname, write))
    try:
        yield
    finally:
        _TOOL.reset(token)


def fprintf_stderr(text: str) -> None:
    """fprintf(stderr, ...): ``text`` as it is, on the running tool's stderr."""
    tool = _TOOL.get()
    if tool is not None:
        tool[1](text)


def error_report(text: str) -> None:
    """error_report(): "<tool>: <text>" and a newline."""
    tool = _TOOL.get()
    if tool is not None:
        tool[1](f"{tool[0]}: {text}\n")


def warn_report(text: str) -> None:
    """warn_report(): "<tool>: warning: <text>". ``text`` ends as QEMU's does (a message
    followed by error_printf() may end without a newline)."""
    tool = _TOOL.get()
    if tool is not None:
        tool[1](f"{tool[0]}: warning: {text}")
