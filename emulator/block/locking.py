"""file-posix's image locking: open file description (OFD) byte-range locks on the image.

For each permission bit i a node holds, it keeps a shared lock on byte 100 + i; for each it
does not share, one on byte 200 + i. Before taking new permissions it checks that no other
open file — in this process (another node on the same file) or in another one (a real QEMU
or qemu-img) — holds a lock that conflicts: "Failed to get "write" lock" (someone does not
share what we want), "Failed to get shared "write" lock" (someone holds what we will not
share). The kernel keeps the locks, so they interoperate with QEMU's own and go away when
the file is closed (raw_apply_lock_bytes, raw_check_lock_bytes, raw_handle_perm_lock).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from emulator.block import perm as P
from emulator.block.errors import GenericError

RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200
_FLOCK = "hhqqi4x"   # struct flock on Linux x86-64: type, whence, start, len, pid
_BITS = tuple(1 << i for i in range(P.ALL.bit_length()))


def _fcntl(fd: int, cmd: int, kind: int, offset: int) -> int:
    """One OFD lock request on one byte; returns the l_type the kernel answers."""
    answer = fcntl.fcntl(fd, cmd, struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0))
    return int(struct.unpack(_FLOCK, answer)[0])


def _lock_error(fmt: str, e: OSError) -> GenericError:
    """raw_lock_error_setg_errno: EAGAIN is another user, and says so by name only."""
    code = e.errno or errno.EIO
    return GenericError(fmt if code == errno.EAGAIN else f"{fmt}: {os.strerror(code)}")


def _locked_by_others(fd: int, offset: int) -> bool:
    """qemu_lock_fd_test(exclusive): would a write lock on this byte conflict?"""
    return _fcntl(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK


class LockBytes:
    """The lock bytes one open file holds (s->locked_perm, s->locked_shared_perm): a set of
    byte offsets, 100 + i for a permission held, 200 + i for one not shared."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.locked: set[int] = set()

    def apply(self, perm: int, unshared: int, *, unlock: bool) -> None:
        """raw_apply_lock_bytes: lock the bytes of ``perm`` and ``unshared`` not locked yet;
        with ``unlock``, release the ones they no longer name."""
        wanted = _offsets(perm, RAW_LOCK_PERM_BASE) + _offsets(unshared, RAW_LOCK_SHARED_BASE)
        for offset in wanted:
            if offset not in self.locked:
                try:
                    _fcntl(self.fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, offset)
                except OSError as e:
                    raise _lock_error(f"Failed to lock byte {offset}", e) from None
                self.locked.add(offset)
        if unlock:
            for offset in sorted(self.locked - set(wanted)):
                _fcntl(self.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, offset)
                self.locked.discard(offset)


def _offsets(bits: int, base: int) -> list[int]:
    return [base + i for i, bit in enumerate(_BITS) if bits & bit]


def check(fd: int, perm: int, shared: int, filename: str) -> None:
    """raw_check_lock_bytes: first every permission we want, then every one we do not
    share, each against the other side's lock bytes; the error carries the hint
    raw_handle_perm_lock appends, naming the file."""
    hint = f"Is another process using the image [{filename}]?"
    for i, bit in enumerate(_BITS):
        if perm & bit and _locked_by_others(fd, RAW_LOCK_SHARED_BASE + i):
            raise GenericError(f'Failed to get "{P.perm_names(bit)}" lock', hint=hint)
    for i, bit in enumerate(_BITS):
        if not shared & bit and _locked_by_others(fd, RAW_LOCK_PERM_BASE + i):
            raise GenericError(f'Failed to get shared "{P.perm_names(bit)}" lock', hint=hint)


def lock(fd: int, perm: int, shared: int, filename: str) -> None:
    """Lock bytes taken and checked at once, for a file that holds them until it is closed:
    raw_co_create's (write and resize, resize not shared: the new size is a promise), or a
    qemu-img image's (what its nodes would take)."""
    LockBytes(fd).apply(perm, ~shared & P.ALL, unlock=False)
    check(fd, perm, shared, filename)
