"""null-co: a node of a given size that discards writes and reads zeroes (block/null.c)."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from emulator.block import waits
from emulator.block.drivers import register
from emulator.block.errors import GenericError
from emulator.block.node import (
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_ZERO,
    BlockDriverState,
    BlockStatus,
)
from emulator.block.qemu_opts import absorb_sizes, number


@register
class NullCoNode(BlockDriverState):
    format_name: ClassVar[str] = "null-co"
    protocol_name: ClassVar[str | None] = "null-co"
    strong_runtime_opts: ClassVar[tuple[str, ...]] = ("size", "read-zeroes")
    has_refresh_filename_hook: ClassVar[bool] = True
    fua_support: ClassVar[str | None] = "native"

    def drv_open(self, options: dict[str, Any], open_child: Any) -> None:
        # QEMU 7.2 absorbs these options with &error_abort, so a negative size aborts
        # QEMU there; the emulator answers as the other drivers' QemuOpts do
        if options.get("filename", "null-co://") != "null-co://":   # null_co_parse_filename
            raise GenericError("The only allowed filename for this driver is 'null-co://'")
        absorb_sizes(options, ("size",))
        self.length = int(options.get("size", 1 << 30))
        self.latency_ns = number(options, "latency-ns", 0)
        if self.latency_ns >= 1 << 63:   # an int64_t in null_file_open
            raise GenericError("latency-ns is invalid")
        self.read_zeroes = bool(options.get("read-zeroes", False))

    def _latency(self) -> None:
        if self.latency_ns:
            waits.note(waits.THREAD)
            time.sleep(self.latency_ns / 1e9)

    def drv_getlength(self) -> int:
        return self.length

    def drv_preadv(self, offset: int, length: int) -> bytes:
        # without read-zeroes QEMU leaves the buffer untouched; zeroes are as good as any
        self._latency()
        return bytes(length)

    def drv_pwritev(self, offset: int, data: bytes, flags: int) -> None:
        self._latency()

    def drv_block_status(self, want_zero: bool, offset: int, length: int) -> BlockStatus:
        ret = BDRV_BLOCK_OFFSET_VALID
        if self.read_zeroes:
            ret |= BDRV_BLOCK_ZERO
        return ret, length, offset, self

    def get_allocated_file_size(self) -> int | None:
        return 0

    def drv_refresh_filename(self) -> None:
        """null_refresh_filename: "null-co://" unless strong options were given."""
        if all(k in ("filename", "driver", "latency-ns") for k in self.full_open_options):
            self.exact_filename = f"{self.format_name}://"


@register
class NullAioNode(NullCoNode):
    """null-aio: the same node behind the AIO interface; identical to the emulator."""

    format_name: ClassVar[str] = "null-aio"
    protocol_name: ClassVar[str | None] = "null-aio"
