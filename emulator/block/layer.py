"""BlockLayer: the block side of a Machine (``Machine.block``).

Entry points mirror QEMU's: :meth:`add_drive` (``-drive``), :meth:`add_blockdev`
(``-blockdev``), :meth:`blockdev_add` / :meth:`blockdev_del` (QMP), the two queries,
:meth:`reopen_read_only`, :meth:`external_snapshot` (blockdev-snapshot-sync's work),
:meth:`temporary_backend` (HMP qemu-io on a node) and :meth:`close_all` (quit).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emulator.block import perm as P
from emulator.block.backend import BlockBackend
from emulator.block.errors import GenericError
from emulator.block.graph import BlockGraph
from emulator.block.node import BlockDriverState
from emulator.block.open import (
    Opener,
    backing_definition,
    json_filename_options,
    path_has_protocol,
)
from emulator.block.query import block_device_info, block_info
from emulator.qcow2.blockio import TruncateError
from emulator.qmp.json_writer import qdict_clone_shallow

_CACHE_MODES = {  # bdrv_parse_cache_mode: (writeback, direct, no-flush)
    "none": (True, True, False), "off": (True, True, False),
    "writeback": (True, False, False), "unsafe": (True, False, True),
    "directsync": (False, True, False), "writethrough": (False, False, False),
}


def _onoff(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise GenericError(f"Parameter '{name}' expects 'on' or 'off'")


class BlockLayer:
    """The node graph and BlockBackends of one emulated VM."""

    def __init__(self, sandbox: Any = None, emit: Any = None) -> None:
        self.sandbox = sandbox
        self.emit = emit
        self.graph = BlockGraph()
        # set by the job manager: cancel jobs synchronously before the nodes close (quit)
        self.before_close_all: Callable[[], None] | None = None

    # -- paths -------------------------------------------------------------------------------
    def resolve_path(self, filename: str, *, for_create: bool = False) -> str:
        """A client's file name -> the host path (through the Machine's sandbox)."""
        if self.sandbox is None:
            return filename
        return os.fspath(self.sandbox.resolve(filename, for_create=for_create))

    # -- lookups ------------------------------------------------------------------------------
    def lookup_bs(self, device: str | None, node_name: str | None) -> BlockDriverState:
        return self.graph.lookup_bs(device, node_name)

    def find_node(self, node_name: str) -> BlockDriverState | None:
        return self.graph.find_node(node_name)

    def blk_by_name(self, name: str) -> BlockBackend | None:
        return self.graph.blk_by_name(name)

    @property
    def backends(self) -> list[BlockBackend]:
        return self.graph.backends

    # -- creating nodes ----------------------------------------------------------------------
    def open_node(self, options: dict[str, Any] | str, **kw: Any) -> BlockDriverState:
        """bdrv_open for internal users (jobs open filters and targets this way). The caller
        owns one reference (graph.unref when done)."""
        return Opener(self).open(options, **kw)

    def insert_node(self, bs: BlockDriverState, options: dict[str, Any]) -> BlockDriverState:
        """bdrv_insert_node: open a filter from ``options`` (which reference ``bs`` as its
        child) and put it in ``bs``'s place for all of ``bs``'s other parents; on failure the
        filter is dropped and the error reads "Could not replace node: ...". The caller owns
        one reference to the returned node."""
        new_bs = Opener(self).open(options)
        try:
            self.graph.replace_node(bs, new_bs)
        except GenericError as e:
            self.graph.unref(new_bs)
            raise e.prepend("Could not replace node: ") from None
        return new_bs

    def add_blockdev(self, options: dict[str, Any]) -> BlockDriverState:
        """-blockdev / the work of blockdev-add: a monitor-owned node tree."""
        opts = dict(options)
        cache = dict(opts.get("cache", {}))
        cache.setdefault("direct", False)
        cache.setdefault("no-flush", False)
        opts["cache"] = cache
        opts.setdefault("read-only", False)
        bs = Opener(self).open(opts)
        bs.monitor_owned = True
        self.graph.monitor_owned.append(bs)
        return bs

    def blockdev_add(self, options: dict[str, Any]) -> None:
        """qmp_blockdev_add."""
        if options.get("node-name") is None:
            raise GenericError("'node-name' must be specified for the root node")
        self.add_blockdev(options)

    def blockdev_del(self, node_name: str) -> None:
        """qmp_blockdev_del, its checks in QEMU's order."""
        from emulator.block.graph import OP_DRIVE_DEL

        bs = self.graph.find_node(node_name)
        if bs is None:
            raise GenericError(f"Failed to find node with node-name='{node_name}'")
        if bs.has_blk():
            raise GenericError(f"Node {node_name} is in use")
        self.graph.op_check_blocked(bs, OP_DRIVE_DEL)
        if not bs.monitor_owned:
            raise GenericError(f"Node {bs.node_name} is not owned by the monitor")
        if bs.refcnt > 1:
            raise GenericError(f"Block device {bs.device_or_node_name()} is in use")
        self.graph.monitor_owned.remove(bs)
        bs.monitor_owned = False
        self.graph.unref(bs)

    def block_resize(self, device: str | None, node_name: str | None, size: int) -> None:
        """qmp_block_resize: the node found, the size and the node's op blockers checked, a
        BlockBackend taking the resize permission, the truncate (no preallocation) inside a
        drained section."""
        from emulator.block import io

        bs = self.lookup_bs(device, node_name)
        if size < 0:
            raise GenericError("Parameter 'size' expects a >0 size")
        if bs.op_blockers.get("resize"):
            raise GenericError(f"Device '{device if device is not None else '(null)'}' is in use")
        blk = BlockBackend(self.graph, perm=P.RESIZE, shared_perm=P.ALL)
        try:
            blk.insert_bs(bs)
        except GenericError:
            blk.unref()
            raise
        io.drained_begin(bs)
        try:
            io.truncate(bs, size)
        except TruncateError as e:
            raise GenericError(e.message) from None
        finally:
            io.drained_end(bs)
            blk.unref()

    def add_drive(self, options: dict[str, Any]) -> BlockBackend:
        """-drive (drive_new + blockdev_init) for ``if=none`` style drives: a named
        BlockBackend (``id``) over the format node (``node-name``) over a file node."""
        opts = {k: v for k, v in options.items()}
        name = opts.pop("id", None)
        iface = opts.pop("if", "ide")
        for key in ("bus", "unit", "index", "media", "aio", "werror", "rerror", "serial",
                    "addr", "snapshot", "copy-on-read"):
            opts.pop(key, None)
        if name is None:
            name = f"{iface}0"
        if self.graph.blk_by_name(name) is not None:
            raise GenericError(f"Duplicate ID '{name}' for drive")
        return self._open_blk(opts, name, options)

    def blk_new_open(self, filename: str, fmt: str | None, **options: Any) -> BlockBackend:
        """blk_new_open, as qemu-img and qemu-io open an image: an anonymous BlockBackend
        over the image's node (probed without ``fmt``); ``options`` as for a drive."""
        return self._open_blk({"file": filename, **({"format": fmt} if fmt else {}),
                               **options}, "", options)

    def _open_blk(self, opts: dict[str, Any], name: str,
                  legacy: dict[str, Any]) -> BlockBackend:
        """blockdev_init: a BlockBackend named ``name`` over the node ``opts`` define."""
        filename = opts.pop("file", None)
        fmt = opts.pop("format", None)
        writeback, direct, no_flush = _CACHE_MODES["writeback"]
        if "cache" in opts:
            mode = opts.pop("cache")
            if mode not in _CACHE_MODES:
                raise GenericError("invalid cache option")
            writeback, direct, no_flush = _CACHE_MODES[mode]
        read_only = _onoff(opts.pop("read-only", opts.pop("readonly", False)), "read-only")
        node_opts: dict[str, Any] = {}
        for key, value in opts.items():
            node_opts[key] = value
        node_opts["cache"] = {
            "direct": _onoff(node_opts.pop("cache.direct", direct), "cache.direct"),
            "no-flush": _onoff(node_opts.pop("cache.no-flush", no_flush), "cache.no-flush")}
        node_opts["read-only"] = read_only
        # blockdev_init takes detect-zeroes for the drive itself: unlike blockdev-add, it
        # does not ask for discard=unmap with "unmap"
        detect_zeroes = str(node_opts.pop("detect-zeroes", "off"))
        if "discard" in node_opts:
            node_opts["discard"] = str(node_opts["discard"])
        blk = BlockBackend(self.graph, name=name)
        blk.enable_write_cache = writeback
        blk.legacy_dinfo = dict(legacy)
        if filename is None:
            self.graph.backends.append(blk)
            return blk
        if fmt in ("file", "null-co"):
            node_opts["driver"], node_opts["filename"] = fmt, filename
        else:   # without a format, the Opener probes the file (bdrv_open_inherit)
            if fmt is not None:
                node_opts["driver"] = fmt
            described = json_filename_options(filename)   # json:{...}: the options it holds
            if described is None:
                node_opts.setdefault("file", {"driver": "file", "filename": filename})
            for key, value in (described or {}).items():   # the explicit ones win
                node_opts.setdefault(key, value)
        blk.perm = P.CONSISTENT_READ | (0 if read_only else P.WRITE)
        blk.shared_perm = P.ALL
        bs = Opener(self).open(node_opts)
        bs.detect_zeroes = detect_zeroes
        try:
            blk.insert_bs(bs)
        finally:
            self.graph.unref(bs)
        self.graph.backends.append(blk)
        return blk

    # -- monitor helpers ---------------------------------------------------------------------
    def temporary_backend(self, bs: BlockDriverState) -> BlockBackend:
        """blk_new(ctx, 0, BLK_PERM_ALL) + blk_insert_bs: what HMP qemu-io uses for a node.
        The caller calls ``unref()`` on it when done."""
        blk = BlockBackend(self.graph, perm=0, shared_perm=P.ALL)
        blk.insert_bs(bs)
        return blk

    def query_block(self) -> list[dict[str, Any]]:
        return [block_info(blk) for blk in self.graph.backends
                if blk.name or blk.dev_id]

    def query_named_block_nodes(self, flat: bool = False) -> list[dict[str, Any]]:
        """bdrv_named_nodes_list: newest node first (QAPI_LIST_PREPEND over the list)."""
        return [block_device_info(None, bs, flat) for bs in reversed(self.graph.named_nodes)]

    # -- state changes --------------------------------------------------------------------------
    def reopen_read_only(self, bs: BlockDriverState) -> None:
        """bdrv_reopen_set_read_only(bs, true): a whole reopen, even of a node that is
        read-only already (external_snapshot_commit reopens the old top every time). The
        node and the children it opened itself (inherits_from; not those it was given by
        name) each go through their driver's reopen: going read-only, qcow2 stores its
        persistent bitmaps first (qcow2_reopen_bitmaps_ro); every qcow2 node starts over
        with empty metadata caches."""
        if not bs.read_only:
            bs.flush()
        self._reopen_read_only(bs)
        self.graph.refresh_perms(bs)

    def _reopen_read_only(self, bs: BlockDriverState, child: bool = False) -> None:
        if child:
            # bdrv_reopen_queue_child: the first reopen takes the child's options from the
            # parent's, which keep none afterwards; each later one from the child's explicit
            # options, a qdict_clone_shallow of its options at the reopen before
            bs.reopens += 1
            if bs.reopens > 1:
                bs.options = qdict_clone_shallow(bs.options)
        if not bs.read_only:
            bs.drv_reopen_read_only()
            bs.read_only = True
        bs.drv_reopen_commit()
        for c in bs.children:
            if c.bs is not None and c.bs.inherited:
                self._reopen_read_only(c.bs, child=True)

    def create_image(self, filename: str, fmt: str, size: int, *, backing_file: str | None = None,
                     backing_format: str | None = None, open_backing: bool = False) -> None:
        """bdrv_img_create for an image a command makes (emulator/block/create.py). With
        ``open_backing`` (no BDRV_O_NO_BACKING: drive-backup sync=top alone) the backing
        file is opened first, sharing all, and an error opening it is the command's."""
        from emulator.block import create
        create.check(filename, fmt, backing_file)
        if backing_file and open_backing:
            self._try_backing(filename, backing_file, backing_format)
        path = self.resolve_path(filename, for_create=True)
        options = {"backing-file": backing_file, "backing-fmt": backing_format}
        create.write(path, filename, fmt, size,
                     {k: v for k, v in options.items() if v is not None})

    def _try_backing(self, filename: str, backing_file: str, backing_format: str | None) -> None:
        """bdrv_img_create's check that the backing file opens (read-only, force-share;
        the format put in first, as it wins over a json:{...} name's driver)."""
        full = backing_file
        if not (path_has_protocol(full) or os.path.isabs(full)):
            full = os.path.join(os.path.dirname(filename), full)
        opts = backing_definition(full, backing_format)
        opts.update({"read-only": True, "force-share": True})
        self.graph.unref(Opener(self).open(opts))

    def external_snapshot(self, old_bs: BlockDriverState, snapshot_file: str, fmt: str,
                          node_name: str | None, mode: str) -> BlockDriverState:
        """external_snapshot_prepare's image work for blockdev-snapshot-sync: create the
        overlay (unless mode=existing), open it without backing, and append it above
        ``old_bs``. Returns the new node; the caller owns one reference."""
        if mode != "existing":
            size = old_bs.getlength()
            old_bs.refresh_filename()
            self.create_image(snapshot_file, fmt, size, backing_file=old_bs.filename,
                              backing_format=old_bs.format_name)
        opts: dict[str, Any] = {"driver": fmt}
        if node_name is not None:
            opts["node-name"] = node_name
        opts["file"] = {"driver": "file", "filename": snapshot_file}
        opts["cache"] = {"direct": old_bs.cache_direct, "no-flush": old_bs.no_flush}
        opts["read-only"] = old_bs.read_only
        new_bs = Opener(self).open(opts, no_backing=True)
        return new_bs

    def close_all(self) -> None:
        """bdrv_close_all at quit: drop BlockBackends, then monitor-owned nodes."""
        # --- jobs part: qemu_cleanup's job_cancel_sync_all() comes first (JobManager sets
        # this hook); jobs hold nodes through their edges and backup filters ---
        if self.before_close_all is not None:
            self.before_close_all()
        # --- end of jobs part ---
        for blk in list(self.graph.backends):
            blk.unref()
        for bs in list(self.graph.monitor_owned):
            self.graph.monitor_owned.remove(bs)
            bs.monitor_owned = False
            self.graph.unref(bs)

    @staticmethod
    def path_of(bs: BlockDriverState) -> Path | None:
        host = getattr(bs, "host_path", None)
        return Path(host) if host else None
