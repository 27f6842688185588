"""mirror_start / mirror_start_job (block/mirror.c, QEMU 7.2): set a mirror job up.

QEMU's checks and graph changes in QEMU's order: the mirror_top filter is appended above the
source inside a drained section, the job is created on it, then the target's BlockBackend,
the dirty bitmap and the job's "source"/"target" edges; any failure undoes all of it (the job,
if it exists, goes from created to null).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emulator.block import perm as P
from emulator.block.backend import BlockBackend
from emulator.block.drivers.mirror_top import MirrorTopNode, new_mirror_top
from emulator.block.errors import GenericError
from emulator.block.node import BlockDriverState
from emulator.jobs.job import JobTxn
from emulator.jobs.mirror import MirrorJob
from emulator.jobs.mirror_graph import (
    backing_chain_next,
    chain_contains,
    find_overlay,
    skip_filters,
)
from emulator.jobs.mirror_ops import DEFAULT_MIRROR_BUF_SIZE, LEAVE_BACKING_CHAIN

if TYPE_CHECKING:
    from emulator.jobs.manager import JobManager


def _drop_filter(layer: Any, mtop: MirrorTopNode) -> None:
    """mirror_start_job's failure path for the filter: stop, step aside, unref."""
    graph = layer.graph
    mtop.stop = True
    if mtop.backing is not None and mtop.backing.bs is not None:
        graph.child_refresh_perms(mtop, mtop.backing)
        graph.replace_node(mtop, mtop.backing.bs)
    graph.unref(mtop)


def mirror_start_job(manager: JobManager, layer: Any, job_id: str | None,
                     bs: BlockDriverState, target: BlockDriverState, *,
                     replaces: str | None = None, speed: int = 0, granularity: int = 0,
                     buf_size: int = 0, backing_mode: str = LEAVE_BACKING_CHAIN,
                     zero_target: bool = False, on_source_error: str = "report",
                     on_target_error: str = "report", unmap: bool = True,
                     is_none_mode: bool = False, base: BlockDriverState | None = None,
                     filter_node_name: str | None = None, copy_mode: str = "background",
                     manual_finalize: bool = False, manual_dismiss: bool = False,
                     txn: JobTxn | None = None) -> MirrorJob:
    """mirror_start_job: QEMU's checks and graph changes in QEMU's order, undone on failure."""
    graph = layer.graph
    if granularity == 0:
        granularity = target.default_bitmap_granularity()
    assert granularity & (granularity - 1) == 0
    if buf_size < 0:
        raise GenericError("Invalid parameter 'buf-size'")
    if buf_size == 0:
        buf_size = DEFAULT_MIRROR_BUF_SIZE
    if skip_filters(bs) is skip_filters(target):
        raise GenericError("Can't mirror node into itself")
    target_is_backing = chain_contains(bs, target)
    mtop = new_mirror_top(layer, bs, filter_node_name)
    mtop.is_commit = target_is_backing
    manager.drained_begin(bs)
    try:
        graph.append(mtop, bs)
    except GenericError:
        manager.drained_end(bs)
        graph.unref(mtop)
        raise
    manager.drained_end(bs)
    mtop.refresh_limits()
    try:
        job = MirrorJob.create(manager, job_id, txn, mtop, P.CONSISTENT_READ,
                               P.CONSISTENT_READ | P.WRITE_UNCHANGED | P.WRITE, speed,
                               manual_finalize=manual_finalize,
                               manual_dismiss=manual_dismiss, layer=layer)
    except GenericError:
        _drop_filter(layer, mtop)
        raise
    assert isinstance(job, MirrorJob)
    mtop.job = job
    graph.unref(mtop)    # the job's "main node" edge holds it now
    job.mirror_top_bs = mtop
    try:
        _setup(job, bs, target, target_is_backing, replaces=replaces,
               on_source_error=on_source_error, on_target_error=on_target_error,
               is_none_mode=is_none_mode, backing_mode=backing_mode,
               zero_target=zero_target, copy_mode=copy_mode, base=base,
               granularity=granularity, buf_size=buf_size, unmap=unmap)
    except GenericError:
        mtop.refcnt += 1
        if job.target_blk is not None:
            job.target_blk.unref()
            job.target_blk = None
        mtop.job = None
        if job.dirty_bitmap is not None:
            bs.release_dirty_bitmap(job.dirty_bitmap)
            job.dirty_bitmap = None
        job.early_fail()
        _drop_filter(layer, mtop)
        raise
    job.start()
    return job


def _setup(job: MirrorJob, bs: BlockDriverState, target: BlockDriverState,
           target_is_backing: bool, *, replaces: str | None, on_source_error: str,
           on_target_error: str, is_none_mode: bool, backing_mode: str, zero_target: bool,
           copy_mode: str, base: BlockDriverState | None, granularity: int, buf_size: int,
           unmap: bool) -> None:
    """The part of mirror_start_job after block_job_create: target BlockBackend, fields,
    dirty bitmap, the job's "source" and "target" edges (and commit's intermediate ones)."""
    target_perms = P.WRITE
    target_shared = P.WRITE_UNCHANGED
    if target_is_backing:
        if target.getlength() < bs.getlength():
            target_perms |= P.RESIZE
        target_shared |= P.CONSISTENT_READ | P.WRITE
    elif chain_contains(bs, skip_filters(target)):
        raise GenericError("Cannot mirror to a filter on top of a node in the source's "
                           "backing chain")
    blk = BlockBackend(job.graph, perm=target_perms, shared_perm=target_shared)
    blk.insert_bs(target)
    job.target_blk = blk
    job.replaces = replaces
    job.on_source_error = on_source_error
    job.on_target_error = on_target_error
    job.is_none_mode = is_none_mode
    job.backing_mode = backing_mode
    job.zero_target = zero_target
    job.copy_mode = copy_mode
    job.base = base
    job.base_overlay = find_overlay(bs, base)
    job.granularity = granularity
    job.buf_size = -(-buf_size // granularity) * granularity
    job.unmap = unmap
    job.dirty_bitmap = bs.create_dirty_bitmap(granularity, None)
    if copy_mode == "write-blocking":
        job.dirty_bitmap.disabled = True
    job.add_bdrv("source", bs, 0, P.WRITE_UNCHANGED | P.WRITE | P.CONSISTENT_READ)
    job.add_bdrv("target", target, 0, P.ALL)
    if target_is_backing:
        shared = P.WRITE_UNCHANGED | P.WRITE
        overlay = find_overlay(bs, target)
        cow = overlay.cow_child() if overlay is not None else None
        filtered_target = cow.bs if cow is not None else None
        it = bs.filter_or_cow_bs()
        while it is not None and it is not target:
            if it is filtered_target:
                shared |= P.CONSISTENT_READ
            job.add_bdrv("intermediate node", it, 0, shared)
            it = it.filter_or_cow_bs()


def mirror_start(manager: JobManager, layer: Any, job_id: str | None, bs: BlockDriverState,
                 target: BlockDriverState, *, sync: str, **kw: Any) -> MirrorJob:
    """mirror_start: sync mode → none-mode and base, then mirror_start_job."""
    if sync in ("incremental", "bitmap"):
        raise GenericError(f"Sync mode '{sync}' not supported")
    base = backing_chain_next(bs) if sync == "top" else None
    return mirror_start_job(manager, layer, job_id, bs, target, is_none_mode=sync == "none",
                            base=base, **kw)
