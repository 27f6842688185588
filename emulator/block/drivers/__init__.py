"""Block drivers by QAPI name. Every module of this package is imported when the package is
(so a new driver such as copy-before-write needs no edit here) and registers its node class
with @register."""

from __future__ import annotations

from typing import TypeVar

from emulator.block.node import BlockDriverState

DRIVERS: dict[str, type[BlockDriverState]] = {}

T = TypeVar("T", bound=type[BlockDriverState])


def register(cls: T) -> T:
    DRIVERS[cls.format_name] = cls
    return cls


def _load() -> None:
    # copy_before_write: the backup filter (the jobs part's driver)
    from emulator.block.drivers import (  # noqa: F401
        blkdebug,
        copy_before_write,
        file,
        null_co,
        qcow2,
        raw,
    )


_load()
