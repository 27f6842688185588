"""drive-mirror and blockdev-mirror (blockdev.c, QEMU 7.2).

Both find a root node, check their arguments in QEMU's order (blockdev_mirror_common) and
start the job with mirror_start. drive-mirror first creates the target image (unless
mode=existing: with the source's backing file as backing for sync=top, with the source itself
for sync=none) and opens it without backing and with the source's flags; blockdev-mirror takes
an existing node. Neither is a transaction action in 7.2, and neither drains the source
around the command (only mirror_start_job's bdrv_append is drained).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emulator.block.errors import GenericError
from emulator.jobs.manager import flushing
from emulator.jobs.mirror import LEAVE_BACKING_CHAIN, OPEN_BACKING_CHAIN, SOURCE_BACKING_CHAIN
from emulator.jobs.mirror_graph import (
    backing_chain_next,
    has_zero_init,
    recurse_can_replace,
    skip_filters,
)
from emulator.jobs.mirror_start import mirror_start
from emulator.qmp import schema
from emulator.qmp.registry import command

if TYPE_CHECKING:
    from emulator.block.node import BlockDriverState
    from emulator.machine import Machine

schema.enum("MirrorCopyMode", ["background", "write-blocking"])
schema.struct("DriveMirror", {
    "*job-id": "str", "device": "str", "target": "str", "*format": "str",
    "*node-name": "str", "*replaces": "str", "sync": "MirrorSyncMode",
    "*mode": "NewImageMode", "*speed": "int", "*granularity": "uint32", "*buf-size": "int",
    "*on-source-error": "BlockdevOnError", "*on-target-error": "BlockdevOnError",
    "*unmap": "bool", "*copy-mode": "MirrorCopyMode", "*auto-finalize": "bool",
    "*auto-dismiss": "bool"})


def get_root_bs(vm: Machine, name: str) -> BlockDriverState:
    """qmp_get_root_bs: a node only BlockBackends use."""
    bs = vm.block.lookup_bs(name, name)
    if not all(getattr(c.parent, "is_block_backend", False) for c in bs.parents):
        raise GenericError("Need a root block node")
    if bs.closed:
        raise GenericError("Device has no medium")
    return bs


def check_to_replace_node(vm: Machine, parent_bs: BlockDriverState,
                          node_name: str) -> BlockDriverState:
    """check_to_replace_node."""
    graph = vm.block.graph
    to_replace = graph.find_node(node_name)
    if to_replace is None:
        raise GenericError(f"Failed to find node with node-name='{node_name}'")
    graph.op_check_blocked(to_replace, "replace")
    if not recurse_can_replace(parent_bs, to_replace):
        raise GenericError(f"Cannot replace '{node_name}' by a node mirrored from "
                           f"'{parent_bs.node_name}', because it cannot be guaranteed that "
                           "doing so would not lead to an abrupt change of visible data")
    return to_replace


def blockdev_mirror_common(vm: Machine, job_id: str | None, bs: BlockDriverState,
                           target: BlockDriverState, args: dict[str, Any], *, sync: str,
                           backing_mode: str, zero_target: bool, unmap: bool,
                           filter_node_name: str | None) -> None:
    """blockdev_mirror_common: defaults, granularity, op blockers, replaces, mirror_start."""
    graph = vm.block.graph
    granularity = args.get("granularity", 0)
    if granularity != 0 and (granularity < 512 or granularity > 1048576 * 64):
        raise GenericError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if granularity & (granularity - 1):
        raise GenericError("Parameter 'granularity' expects a power of 2")
    graph.op_check_blocked(bs, "mirror-source")
    graph.op_check_blocked(target, "mirror-target")
    if backing_chain_next(bs) is None and sync == "top":
        sync = "full"
    replaces = args.get("replaces")
    if replaces is None:
        unfiltered = bs.skip_implicit_filters()
        if unfiltered is not bs:
            replaces = unfiltered.node_name
    if replaces is not None:
        bs_size = bs.getlength()
        to_replace = check_to_replace_node(vm, bs, replaces)
        if bs_size != to_replace.getlength():
            raise GenericError("cannot replace image with a mirror image of different size")
    mirror_start(
        vm.jobs, vm.block, job_id, bs, target, sync=sync, replaces=replaces,
        speed=args.get("speed", 0), granularity=granularity, buf_size=args.get("buf-size", 0),
        backing_mode=backing_mode, zero_target=zero_target,
        on_source_error=args.get("on-source-error", "report"),
        on_target_error=args.get("on-target-error", "report"), unmap=unmap,
        filter_node_name=filter_node_name, copy_mode=args.get("copy-mode", "background"),
        manual_finalize=not args.get("auto-finalize", True),
        manual_dismiss=not args.get("auto-dismiss", True))


def _open_target(vm: Machine, bs: BlockDriverState, filename: str, fmt: str | None,
                 node_name: str | None) -> BlockDriverState:
    """bdrv_open(target, NULL, {node-name, driver}, bs->open_flags | RDWR | NO_BACKING)."""
    block = vm.block
    opts: dict[str, Any] = {} if fmt is None else {"driver": fmt}   # None: probed
    if node_name is not None:
        opts["node-name"] = node_name
    if fmt in ("file", "null-co"):
        opts["filename"] = filename
    else:
        opts["file"] = {"driver": "file", "filename": filename}
    opts["cache"] = {"direct": bs.cache_direct, "no-flush": bs.no_flush}
    opts["discard"] = bs.discard
    opts["read-only"] = False
    return block.open_node(opts, no_backing=True)


@command("drive-mirror", data="DriveMirror", boxed=True)
@flushing
def drive_mirror(vm: Machine, arg: dict[str, Any]) -> None:
    """qmp_drive_mirror: create (unless mode=existing) and open the target, then mirror."""
    block = vm.block
    bs = get_root_bs(vm, arg["device"])
    block.graph.op_check_blocked(bs, "mirror-source")
    mode = arg.get("mode", "absolute-paths")
    fmt = arg.get("format", None if mode == "existing" else bs.format_name)
    sync = arg["sync"]
    top = skip_filters(bs)
    cow = top.cow_child() if top is not None else None
    target_backing_bs = cow.bs if cow is not None else None
    if target_backing_bs is None and sync == "top":
        sync = "full"
    if sync == "none":
        target_backing_bs = bs
    size = bs.getlength()
    if "replaces" in arg and "node-name" not in arg:
        raise GenericError("a node-name must be provided when replacing a named node of the "
                           "graph")
    backing_mode = SOURCE_BACKING_CHAIN if mode == "absolute-paths" else OPEN_BACKING_CHAIN
    if (sync == "full" or target_backing_bs is None) and mode != "existing":
        assert fmt is not None
        block.create_image(arg["target"], fmt, size)
    elif mode == "absolute-paths":
        assert fmt is not None and target_backing_bs is not None
        explicit = target_backing_bs.skip_implicit_filters()
        explicit.refresh_filename()
        block.create_image(arg["target"], fmt, size, backing_file=explicit.filename,
                           backing_format=explicit.format_name)
    target_bs = _open_target(vm, bs, arg["target"], fmt, arg.get("node-name"))
    try:
        zero_target = sync == "full" and (mode == "existing" or not has_zero_init(target_bs))
        blockdev_mirror_common(vm, arg.get("job-id"), bs, target_bs, arg, sync=sync,
                               backing_mode=backing_mode, zero_target=zero_target,
                               unmap=arg.get("unmap", True), filter_node_name=None)
    finally:
        block.graph.unref(target_bs)


@command("blockdev-mirror", data={
    "*job-id": "str", "device": "str", "target": "str", "*replaces": "str",
    "sync": "MirrorSyncMode", "*speed": "int", "*granularity": "uint32", "*buf-size": "int",
    "*on-source-error": "BlockdevOnError", "*on-target-error": "BlockdevOnError",
    "*filter-node-name": "str", "*copy-mode": "MirrorCopyMode", "*auto-finalize": "bool",
    "*auto-dismiss": "bool"})
@flushing
def blockdev_mirror(vm: Machine, device: str, target: str, sync: str,
                    **args: Any) -> None:
    """qmp_blockdev_mirror: the target is an existing node; the backing chain is left as
    it is; a full sync zeroes the target first."""
    bs = get_root_bs(vm, device)
    target_bs = vm.block.lookup_bs(target, target)
    opts = {k.replace("_", "-"): v for k, v in args.items()}
    blockdev_mirror_common(vm, args.get("job_id"), bs, target_bs, opts, sync=sync,
                           backing_mode=LEAVE_BACKING_CHAIN, zero_target=sync == "full",
                           unmap=True, filter_node_name=args.get("filter_node_name"))
