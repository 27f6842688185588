"""A driver's runtime options as QemuOpts reads them (util/qemu-option.c).

blockdev-add checks its arguments against the QAPI schema, where sizes and numbers are plain
``int``; the driver then reads them back from a flattened QDict through a QemuOptsList of its
own, which converts each value to text and parses it again. So a negative number passes the
schema but not a QEMU_OPT_SIZE option ("expects a non-negative number below 2^64"), while a
QEMU_OPT_NUMBER option takes it as strtoull does, modulo 2^64. The first bad option is
reported in the order qemu_opts_absorb_qdict walks the QDict.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from emulator.block.errors import GenericError
from emulator.qmp.json_writer import qdict_keys


def absorb_sizes(options: dict[str, Any], sizes: Iterable[str]) -> None:
    """qemu_opts_absorb_qdict for the QEMU_OPT_SIZE options among ``sizes``."""
    wanted = set(sizes)
    for key in qdict_keys(options):
        value = options[key]
        if key in wanted and isinstance(value, int) and value < 0:
            raise GenericError(f"Parameter '{key}' expects a non-negative number below 2^64")


def number(options: dict[str, Any], key: str, default: int) -> int:
    """qemu_opt_get_number: a QEMU_OPT_NUMBER option as the uint64_t QEMU keeps."""
    value = options.get(key)
    return default if value is None else int(value) % (1 << 64)
