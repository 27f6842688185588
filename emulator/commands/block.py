"""Node graph commands: blockdev-add, blockdev-del, block_resize, query-block,
query-named-block-nodes.

The BlockdevOptions schema mirrors qapi/block-core.json (QEMU 7.2): the full BlockdevDriver
enum of the Debian build, with branches for the drivers the emulator implements (blkdebug,
file, null-co, null-aio, qcow2, raw). A driver without a branch passes the schema and then
fails with QEMU's text for a driver this binary lacks ("Unknown driver '%s'").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emulator.block.drivers import QEMU_DRIVERS
from emulator.commands._unemulated import UNEMULATED_BLOCKDEV_BRANCHES
from emulator.qmp import schema
from emulator.qmp.registry import command

if TYPE_CHECKING:
    from emulator.machine import Machine


BLKDEBUG_EVENTS = [
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load", "reftable_grow",
    "reftable_update", "refblock_load", "refblock_update", "refblock_update_part",
    "refblock_alloc", "refblock_alloc_hookup", "refblock_alloc_write",
    "refblock_alloc_write_blocks", "refblock_alloc_write_table",
    "refblock_alloc_switch_table", "cluster_alloc", "cluster_alloc_bytes", "cluster_free",
    "flush_to_os", "flush_to_disk", "pwritev_rmw_head", "pwritev_rmw_after_head",
    "pwritev_rmw_tail", "pwritev_rmw_after_tail", "pwritev", "pwritev_zero", "pwritev_done",
    "empty_image_prepare", "l1_shrink_write_table", "l1_shrink_free_l2_clusters",
    "cor_write", "cluster_alloc_space", "none",
]

GENERIC_FORMAT = {"file": "BlockdevRef"}
GENERIC_COW_FORMAT = {**GENERIC_FORMAT, "*backing": "BlockdevRefOrNull"}

schema.enum("BlockdevDriver", QEMU_DRIVERS)
schema.enum("BlockdevDiscardOptions", ["ignore", "unmap"])
schema.enum("BlockdevDetectZeroesOptions", ["off", "on", "unmap"])
schema.enum("BlockdevAioOptions", ["threads", "native", "io_uring"])
schema.enum("OnOffAuto", ["auto", "on", "off"])
schema.enum("BlockPermission", ["consistent-read", "write", "write-unchanged", "resize"])
schema.enum("BlkdebugEvent", BLKDEBUG_EVENTS)
schema.enum("BlkdebugIOType", ["read", "write", "write-zeroes", "discard", "flush",
                               "block-status"])
schema.enum("Qcow2OverlapCheckMode", ["none", "constant", "cached", "all"])
schema.enum("BlockdevQcow2EncryptionFormat", ["aes", "luks"])
schema.struct("BlockdevCacheOptions", {"*direct": "bool", "*no-flush": "bool"})
schema.struct("BlockdevOptionsFile", {
    "filename": "str", "*pr-manager": "str", "*locking": "OnOffAuto",
    "*aio": "BlockdevAioOptions", "*aio-max-batch": "int", "*drop-cache": "bool",
    "*x-check-cache-dropped": "bool"})
schema.struct("BlockdevOptionsNull", {"*size": "int", "*latency-ns": "uint64",
                                      "*read-zeroes": "bool"})
schema.struct("BlockdevOptionsGenericFormat", GENERIC_FORMAT)
schema.struct("BlockdevOptionsRaw", {**GENERIC_FORMAT, "*offset": "int", "*size": "int"})
schema.struct("Qcow2OverlapCheckFlags", {
    "*template": "Qcow2OverlapCheckMode", "*main-header": "bool", "*active-l1": "bool",
    "*active-l2": "bool", "*refcount-table": "bool", "*refcount-block": "bool",
    "*snapshot-table": "bool", "*inactive-l1": "bool", "*inactive-l2": "bool",
    "*bitmap-directory": "bool"})
schema.alternate("Qcow2OverlapChecks", {"flags": "Qcow2OverlapCheckFlags",
                                        "mode": "Qcow2OverlapCheckMode"})
schema.struct("QCryptoBlockOptionsQCow", {"*key-secret": "str"})
schema.struct("QCryptoBlockOptionsLUKS", {"*key-secret": "str"})
schema.union("BlockdevQcow2Encryption", base={"format": "BlockdevQcow2EncryptionFormat"},
             discriminator="format",
             branches={"aes": "QCryptoBlockOptionsQCow", "luks": "QCryptoBlockOptionsLUKS"})
schema.struct("BlockdevOptionsQcow2", {
    **GENERIC_COW_FORMAT, "*lazy-refcounts": "bool", "*pass-discard-request": "bool",
    "*pass-discard-snapshot": "bool", "*pass-discard-other": "bool",
    "*overlap-check": "Qcow2OverlapChecks", "*cache-size": "int", "*l2-cache-size": "int",
    "*l2-cache-entry-size": "int", "*refcount-cache-size": "int",
    "*cache-clean-interval": "int", "*encrypt": "BlockdevQcow2Encryption",
    "*data-file": "BlockdevRef"})
schema.struct("BlkdebugInjectErrorOptions", {
    "event": "BlkdebugEvent", "*state": "int", "*iotype": "BlkdebugIOType", "*errno": "int",
    "*sector": "int", "*once": "bool", "*immediately": "bool"})
schema.struct("BlkdebugSetStateOptions", {"event": "BlkdebugEvent", "*state": "int",
                                          "new_state": "int"})
schema.struct("BlockdevOptionsBlkdebug", {
    "image": "BlockdevRef", "*config": "str", "*align": "int", "*max-transfer": "int32",
    "*opt-write-zero": "int32", "*max-write-zero": "int32", "*opt-discard": "int32",
    "*max-discard": "int32", "*inject-error": ["BlkdebugInjectErrorOptions"],
    "*set-state": ["BlkdebugSetStateOptions"], "*take-child-perms": ["BlockPermission"],
    "*unshare-child-perms": ["BlockPermission"]})

BLOCKDEV_OPTIONS_BASE = {
    "driver": "BlockdevDriver", "*node-name": "str", "*discard": "BlockdevDiscardOptions",
    "*cache": "BlockdevCacheOptions", "*read-only": "bool", "*auto-read-only": "bool",
    "*force-share": "bool", "*detect-zeroes": "BlockdevDetectZeroesOptions"}

# driver -> branch type; other drivers have no members beyond the base here
BLOCKDEV_BRANCHES: dict[str, str] = {
    **UNEMULATED_BLOCKDEV_BRANCHES,
    "blkdebug": "BlockdevOptionsBlkdebug",
    "file": "BlockdevOptionsFile",
    "null-aio": "BlockdevOptionsNull",
    "null-co": "BlockdevOptionsNull",
    "qcow2": "BlockdevOptionsQcow2",
    "raw": "BlockdevOptionsRaw",
}


def declare_blockdev_options() -> None:
    """(Re)declare the BlockdevOptions union; a module adding a driver branch (e.g.
    copy-before-write) adds to BLOCKDEV_BRANCHES and calls this again."""
    schema.union("BlockdevOptions", base=BLOCKDEV_OPTIONS_BASE, discriminator="driver",
                 branches=dict(BLOCKDEV_BRANCHES))


declare_blockdev_options()
schema.alternate("BlockdevRef", {"definition": "BlockdevOptions", "reference": "str"})
schema.alternate("BlockdevRefOrNull", {"definition": "BlockdevOptions", "reference": "str",
                                       "null": "null"})


@command("blockdev-add", data="BlockdevOptions", boxed=True)
def blockdev_add(vm: Machine, options: dict[str, Any]) -> None:
    vm.block.blockdev_add(options)


@command("blockdev-del", data={"node-name": "str"})
def blockdev_del(vm: Machine, node_name: str) -> None:
    vm.block.blockdev_del(node_name)


@command("block_resize", data={"*device": "str", "*node-name": "str", "size": "int"})
def block_resize(vm: Machine, size: int, device: str | None = None,
                 node_name: str | None = None) -> None:
    vm.block.block_resize(device, node_name, size)


@command("query-block")
def query_block(vm: Machine) -> list[dict[str, Any]]:
    return vm.block.query_block()


@command("query-named-block-nodes", data={"*flat": "bool"})
def query_named_block_nodes(vm: Machine, flat: bool = False) -> list[dict[str, Any]]:
    return vm.block.query_named_block_nodes(flat)
