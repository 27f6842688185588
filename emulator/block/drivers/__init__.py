"""Block drivers by QAPI name. Every module of this package is imported when the package is
(so a new driver such as copy-before-write needs no edit here) and registers its node class
with @register."""

from __future__ import annotations

from typing import TypeVar

from emulator.block.node import BlockDriverState

DRIVERS: dict[str, type[BlockDriverState]] = {}

# every driver of Debian's QEMU 7.2 build (QAPI's BlockdevDriver), emulated or not
QEMU_DRIVERS = (
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps",
    "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "luks", "nbd", "nfs",
    "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed", "quorum",
    "raw", "rbd", "replication", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat",
)
# those that can create images (.create_opts: bdrv_img_create); the emulator writes two
IMAGE_CREATORS = frozenset({
    "file", "host_device", "host_cdrom", "gluster", "iscsi", "nbd", "nfs", "nvme", "luks",
    "parallels", "qcow", "qcow2", "qed", "raw", "rbd", "ssh", "vdi", "vhdx", "vmdk", "vpc"})
# those whose creation options take a backing file (BLOCK_OPT_BACKING_FILE)
BACKING_CREATORS = frozenset({"qcow", "qcow2", "qed", "vmdk"})

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
