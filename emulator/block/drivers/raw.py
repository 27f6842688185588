"""raw: the format driver that passes requests to its file, optionally within a window
(``offset``/``size``) (block/raw-format.c). Without a window its file child is FILTERED."""

from __future__ import annotations

import errno
import os
from typing import Any, ClassVar

from emulator.block import perm as P
from emulator.block.drivers import register
from emulator.block.errors import GenericError
from emulator.block.io import truncate
from emulator.block.node import (
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_RAW,
    BdrvChild,
    BlockDriverState,
    BlockStatus,
)
from emulator.block.perm import Role
from emulator.block.probe import BLOCK_PROBE_BUF_SIZE, probe
from emulator.block.qemu_opts import absorb_sizes
from emulator.qcow2.blockio import TruncateError, fprintf_stderr


@register
class RawNode(BlockDriverState):
    fua_support: ClassVar[str | None] = "file"
    format_name: ClassVar[str] = "raw"
    plain_io: ClassVar[bool] = True
    strong_runtime_opts: ClassVar[tuple[str, ...]] = ("offset", "size")

    offset: int = 0
    size: int | None = None

    def drv_open(self, options: dict[str, Any], open_child: Any) -> None:
        absorb_sizes(options, ("offset", "size"))   # raw_read_options, before the file
        self.offset = int(options.get("offset", 0))
        self.size = int(options["size"]) if "size" in options else None
        windowed = bool(self.offset) or self.size is not None
        role = (Role.DATA if windowed else Role.FILTERED) | Role.PRIMARY
        open_child(options.get("file"), "file", role)
        assert self.file is not None and self.file.bs is not None
        real = self.file.bs.getlength()
        if self.offset > real:
            raise GenericError(f"Offset ({self.offset}) cannot be greater than size of the "
                               f"containing file ({real})")
        if self.size is not None and real - self.offset < self.size:
            raise GenericError(f"The sum of offset ({self.offset}) and size ({self.size}) has "
                               f"to be smaller or equal to the  actual size of the containing "
                               f"file ({real})")
        if self.size is not None and self.size % 512:
            raise GenericError("Specified size is not multiple of 512")
        if self.probed and self.is_writable():
            self.file.bs.refresh_filename()
            fprintf_stderr(
                f"WARNING: Image format was not specified for '{self.file.bs.filename}' and "
                "probing guessed raw.\n         Automatically detecting the format is "
                "dangerous for raw images, write operations on block 0 will be restricted.\n"
                "         Specify the 'raw' format explicitly to remove the restrictions.\n")

    def drv_refresh_limits(self) -> None:
        """raw_refresh_limits: a probed image is read and written in whole sectors, so its
        first sector can be checked."""
        if self.probed:
            self.request_alignment = BLOCK_PROBE_BUF_SIZE

    def child_perm(self, child: BdrvChild | None, role: int, perm: int,
                   shared: int) -> tuple[int, int]:
        """raw_child_perm: WRITE and RESIZE only if the parents need them."""
        nperm, nshared = super().child_perm(child, role, perm, shared)
        nperm &= ~(P.WRITE | P.RESIZE)
        nperm |= perm & (P.WRITE | P.RESIZE)
        return nperm, nshared

    def _bounds(self, offset: int, length: int) -> int:
        if self.size is not None and (offset > self.size or length > self.size - offset):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return offset + self.offset

    def drv_getlength(self) -> int:
        if self.size is not None:
            return self.size
        assert self.file is not None and self.file.bs is not None
        return max(0, self.file.bs.getlength() - self.offset)

    def drv_preadv(self, offset: int, length: int) -> bytes:
        assert self.file is not None
        return self.file.pread(self._bounds(offset, length), length)

    def drv_pwritev(self, offset: int, data: bytes, flags: int) -> None:
        """raw_co_pwritev: on a probed image, a first sector that would probe as another
        format is refused (-EPERM)."""
        assert self.file is not None
        if self.probed and offset < BLOCK_PROBE_BUF_SIZE and data \
                and probe(data[:BLOCK_PROBE_BUF_SIZE]) != "raw":
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        self.file.pwrite(self._bounds(offset, len(data)), data, flags)

    def drv_pwrite_zeroes(self, offset: int, length: int, flags: int) -> None:
        assert self.file is not None
        self.file.pwrite_zeroes(self._bounds(offset, length), length, flags)

    def drv_pdiscard(self, offset: int, length: int) -> None:
        assert self.file is not None
        self.file.pdiscard(self._bounds(offset, length), length)

    def drv_block_status(self, want_zero: bool, offset: int, length: int) -> BlockStatus:
        assert self.file is not None
        return (BDRV_BLOCK_RAW | BDRV_BLOCK_OFFSET_VALID, length, offset + self.offset,
                self.file.bs)

    def get_info(self) -> dict | None:
        """raw_get_info: the file's info."""
        assert self.file is not None and self.file.bs is not None
        return self.file.bs.get_info()

    def drv_truncate(self, length: int, prealloc: str = "off", zero_write: bool = False) -> None:
        """raw_co_truncate: a window of fixed size cannot change; the file is resized to
        the offset plus the new length (bdrv_co_truncate on the file child)."""
        assert self.file is not None and self.file.bs is not None
        if self.size is not None:
            raise TruncateError(errno.ENOTSUP, "Cannot resize fixed-size raw disks")
        truncate(self.file.bs, length + self.offset, prealloc)
