"""bdrv_open: turn an option dictionary (blockdev-add / -blockdev / -drive) into nodes.

The steps and their order are QEMU's (block.c bdrv_open_inherit / bdrv_open_common /
bdrv_open_driver), because error texts and auto-generated node names depend on them:
a format driver's ``file`` child is opened before the format node gets its name; then the
node name is assigned and checked; then the driver opens (protocol drivers such as blkdebug
open their children here); then the backing file (from the option or the image header).
Child options inherit cache, read-only and force-share from the parent and default to
``discard=unmap``; backing children default to read-only (bdrv_inherited_options).
"""

from __future__ import annotations

import errno
import json
import os
from typing import TYPE_CHECKING, Any

from emulator.block.errors import GenericError
from emulator.block.graph import Transaction
from emulator.block.node import BdrvChild, BlockDriverState
from emulator.block.perm import Role
from emulator.qcow2.blockio import BDRV_MAX_LENGTH
from emulator.qmp.json_writer import QDICT_BUCKET_MAX, qdict_keys, tdb_hash

if TYPE_CHECKING:
    from emulator.block.layer import BlockLayer

# options every node accepts (BlockdevOptions base), not passed to the driver
COMMON_KEYS = ("driver", "node-name", "discard", "cache", "read-only", "auto-read-only",
               "force-share", "detect-zeroes")


def backing_role(bs: BlockDriverState) -> int:
    """bdrv_backing_role."""
    if bs.is_filter:
        return Role.FILTERED | Role.PRIMARY
    return Role.COW


def file_role(bs: BlockDriverState) -> int:
    """bdrv_open_file_child's role."""
    if bs.is_filter:
        return Role.FILTERED | Role.PRIMARY
    return Role.DATA | Role.METADATA | Role.PRIMARY


def _inherit(child: dict[str, Any], parent: dict[str, Any], role: int) -> dict[str, Any]:
    """bdrv_inherited_options / bdrv_backing_options for a child given as a definition."""
    out = dict(child)
    pcache = parent.get("cache", {})
    cache = dict(out.get("cache", {}))
    for key in ("direct", "no-flush"):
        if key not in cache and key in pcache:
            cache[key] = pcache[key]
    if cache:
        out["cache"] = cache
    if "force-share" not in out and "force-share" in parent:
        out["force-share"] = parent["force-share"]
    if role & Role.COW:
        out.setdefault("read-only", True)
        out.setdefault("auto-read-only", False)
    else:
        if "read-only" in parent:
            out.setdefault("read-only", parent["read-only"])
        if "auto-read-only" in parent:
            out.setdefault("auto-read-only", parent["auto-read-only"])
    out.setdefault("discard", "unmap")
    return out


def _flat_options(opts: dict[str, Any]) -> dict[str, Any]:
    """bs->options as QEMU keeps them: the node's own options, children as references."""
    out: dict[str, Any] = {}
    for key, value in opts.items():
        if isinstance(value, dict) and key != "cache":
            continue
        if key == "cache":
            for k, v in value.items():
                out[f"cache.{k}"] = v
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    for k, v in item.items():
                        out[f"{key}.{i}.{k}"] = v
                else:
                    out[f"{key}.{i}"] = item
            continue
        out[key] = value
    return out


def flatten_order(options: dict[str, Any]) -> list[str]:
    """The insertion order of qdict_flatten's result for a blockdev-add definition.

    Top-level scalars stay where they were put; nested dicts and lists are walked in QDict
    order and their flattened keys appended. The order matters where keys share a QDict
    bucket: blkdebug's ``inject-error.N.errno`` and ``.event`` do, and QEMU walks them in
    bs->options order for the node's json: filename."""
    order = [key for key, value in options.items() if not _flattens(value)]
    for key in qdict_keys(options):
        _flatten_into(order, options[key], key)
    return order


def _flattens(value: Any) -> bool:
    return isinstance(value, dict | list) and bool(value)


def _flatten_into(order: list[str], value: Any, prefix: str) -> None:
    """qdict_flatten_qdict / qdict_flatten_qlist below the top level: a dict's members in
    QDict order, a list's in list order; non-empty dicts and lists recursively."""
    if not _flattens(value):
        return
    members = [(k, value[k]) for k in qdict_keys(value)] if isinstance(value, dict) \
        else list(enumerate(value))
    for key, member in members:
        if _flattens(member):
            _flatten_into(order, member, f"{prefix}.{key}")
        else:
            order.append(f"{prefix}.{key}")


def extract_order(order: list[str], child: str) -> list[str]:
    """The insertion order of a child's options: bdrv_open_child_bs extracts them
    (qdict_extract_subqdict) from a qdict_clone_shallow of the parent's, so within a
    bucket of the parent's full keys the parent's insertion order survives both copies."""
    prefix = child + "."
    keys = [key for key in order if key.startswith(prefix)]
    keys.sort(key=lambda key: tdb_hash(key) % QDICT_BUCKET_MAX)
    return [key[len(prefix):] for key in keys]


def _in_order(flat: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """``flat`` in QEMU's insertion order; keys QEMU adds later (inherited ones) last."""
    rank = {key: i for i, key in enumerate(order)}
    return dict(sorted(flat.items(), key=lambda item: rank.get(item[0], len(rank))))


def _find_image_format(file_bs: BlockDriverState | None) -> str:
    """find_image_format: an empty file is raw, else its first 512 bytes decide."""
    from emulator.block import io as blockio
    from emulator.block.probe import BLOCK_PROBE_BUF_SIZE, probe

    if file_bs is None:
        raise GenericError("Must specify either driver or file")
    if file_bs.getlength() == 0:
        return "raw"
    try:
        head = blockio.preadv(file_bs, 0, BLOCK_PROBE_BUF_SIZE)
    except OSError as e:
        raise GenericError("Could not read image for determining its format: "
                           f"{os.strerror(e.errno or errno.EIO)}") from None
    return probe(head)


class Opener:
    """One bdrv_open call tree; undoes everything it created if any step fails."""

    def __init__(self, layer: BlockLayer) -> None:
        self.layer = layer
        self.graph = layer.graph
        # flattened-key order of each child definition not opened yet (by id: the
        # definitions stay alive in their parent's options while the tree opens)
        self._child_orders: dict[int, list[str]] = {}

    def open(self, options: dict[str, Any] | str, *, parent_opts: dict[str, Any] | None = None,
             role: int | None = None, no_backing: bool = False) -> BlockDriverState:
        """Open a node from a definition, or take a reference to an existing one.

        The caller owns one reference to the result."""
        if isinstance(options, str):
            bs = self.graph.lookup_bs(options, options)
            bs.refcnt += 1
            return bs
        from emulator.block.drivers import DRIVERS

        order = self._child_orders.pop(id(options), None)
        if order is None:
            order = flatten_order(options)
        for key, value in options.items():
            if isinstance(value, dict) and key != "cache":
                self._child_orders[id(value)] = extract_order(order, key)
        opts = dict(options)
        if parent_opts is not None and role is not None:
            opts = _inherit(opts, parent_opts, role)
        probed = "driver" not in opts
        file_bs: BlockDriverState | None = None
        known = DRIVERS.get(opts.get("driver", ""))
        if (probed or (known is not None and known.protocol_name is None)) \
                and isinstance(opts.get("file"), dict | str):
            # bdrv_open_inherit opens the image file before the format node (probing)
            file_bs = self.open(opts["file"], parent_opts=opts,
                                role=Role.DATA | Role.METADATA | Role.PRIMARY)
        try:
            if probed:
                opts["driver"] = _find_image_format(file_bs)
            driver = opts["driver"]
            cls = DRIVERS.get(driver)
            if cls is None:
                raise GenericError(f"Unknown driver '{driver}'")
        except BaseException:
            if file_bs is not None:
                self.graph.unref(file_bs)
            raise
        bs = cls(self.graph)
        bs.probed = probed
        bs.inherited = parent_opts is not None
        try:
            self._open_common(bs, opts, file_bs, order)
        except BaseException:
            if file_bs is not None:
                self.graph.unref(file_bs)
            self._discard(bs)
            raise
        if file_bs is not None:
            self.graph.unref(file_bs)   # the "file" edge holds its own reference now
        if cls.supports_backing and not no_backing:
            try:
                self._open_backing(bs, opts)
            except BaseException:
                self._discard(bs)
                raise
        return bs

    def _discard(self, bs: BlockDriverState) -> None:
        bs.refcnt = 1
        self.graph.unref(bs)

    def _open_common(self, bs: BlockDriverState, opts: dict[str, Any],
                     file_bs: BlockDriverState | None, order: list[str]) -> None:
        """bdrv_open_common + bdrv_open_driver."""
        cache = opts.get("cache", {})
        bs.cache_direct = bool(cache.get("direct", False))
        bs.no_flush = bool(cache.get("no-flush", False))
        bs.read_only = bool(opts.get("read-only", False))
        bs.auto_read_only = bool(opts.get("auto-read-only", False))
        bs.force_share = bool(opts.get("force-share", False))
        if bs.force_share and not bs.read_only:
            raise GenericError("force-share=on can only be used with read-only images")
        bs.discard = opts.get("discard", "ignore")
        detect = opts.get("detect-zeroes", "off")
        if detect == "unmap" and bs.discard != "unmap":
            raise GenericError("setting detect-zeroes to unmap is not allowed without "
                               "setting discard operation to unmap")
        bs.detect_zeroes = detect
        bs.options = _in_order(_flat_options({k: v for k, v in opts.items()
                                              if k != "node-name"}), order)
        if file_bs is not None:
            bs.options["file"] = file_bs.node_name
        self.graph.assign_node_name(bs, opts.get("node-name"))
        self.graph.all_nodes.append(bs)
        drv_opts = {k: v for k, v in opts.items() if k not in COMMON_KEYS}
        if file_bs is not None:
            drv_opts["file"] = file_bs.node_name
        bs.drv_open(drv_opts, ChildOpener(self, bs, opts))
        bs.opened = True
        bs.refresh_limits()
        if -(-bs.drv_getlength() // 512) * 512 > BDRV_MAX_LENGTH:   # refresh_total_sectors
            raise GenericError("Could not refresh total sector count: "
                               f"{os.strerror(errno.EFBIG)}")

    def _open_backing_child(self, ref: dict[str, Any] | str, opts: dict[str, Any],
                            bs: BlockDriverState) -> BlockDriverState:
        try:
            return self.open(ref, parent_opts=opts, role=backing_role(bs))
        except GenericError as e:
            raise e.prepend("Could not open backing file: ") from None

    def _open_backing(self, bs: BlockDriverState, opts: dict[str, Any]) -> None:
        """bdrv_open_backing_file: the ``backing`` option, else the header's backing file."""
        if "backing" in opts:
            value = opts["backing"]
            if value is None:
                return
            child = self._open_backing_child(value, opts, bs)
        elif bs.backing_file:
            definition = backing_definition(full_backing_filename(bs), bs.backing_format)
            child = self._open_backing_child(definition, opts, bs)
            child.refresh_filename()
            bs.auto_backing_file = child.filename
        else:
            return
        try:
            self.graph.attach_child(bs, child, "backing", backing_role(bs))
        finally:
            self.graph.unref(child)


class ChildOpener:
    """What a driver's drv_open uses to open its children (bdrv_open_child)."""

    def __init__(self, opener: Opener, bs: BlockDriverState, opts: dict[str, Any]) -> None:
        self.opener = opener
        self.bs = bs
        self.opts = opts
        self.layer = opener.layer

    def __call__(self, ref: dict[str, Any] | str | None, name: str, role: int, *,
                 allow_none: bool = False) -> BdrvChild | None:
        if ref is None:
            if allow_none:
                return None
            raise GenericError(f"A block device must be specified for \"{name}\"")
        child_bs = self.opener.open(ref, parent_opts=self.opts, role=role)
        try:
            return self.opener.graph.attach_child(self.bs, child_bs, name, role)
        finally:
            self.opener.graph.unref(child_bs)


def path_has_protocol(path: str) -> bool:
    """path_has_protocol: a ':' before any '/'."""
    head = path.split("/", 1)[0]
    return ":" in head


def bdrv_dirname(bs: BlockDriverState) -> str | None:
    """bdrv_dirname: the directory of the protocol node under ``bs`` (with a trailing '/');
    None where QEMU reports "Cannot generate a base directory"."""
    primary = bs.primary_child()
    if primary is not None and primary.bs is not None:
        return bdrv_dirname(primary.bs)
    bs.refresh_filename()
    if bs.exact_filename:
        return os.path.dirname(bs.exact_filename) + "/" if "/" in bs.exact_filename else ""
    return None


def json_filename_options(name: str) -> dict[str, Any] | None:
    """parse_json_filename: the options a ``json:{...}`` file name stands for (what QEMU
    writes as a backing file name when the backing node has no plain one), dotted keys
    nested; None for a plain name (or one that is not a JSON object)."""
    if not name.startswith("json:"):
        return None
    try:
        flat = json.loads(name[5:])
    except ValueError:
        return None
    if not isinstance(flat, dict):
        return None
    options: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        target = options
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return options


def backing_definition(filename: str, backing_format: str | None) -> dict[str, Any]:
    """What bdrv_open_backing_file opens for a backing file name: the file, or the options a
    json:{...} name holds; the backing format, put into the options first, wins over their
    driver (without one the image is probed, as bdrv_open_inherit does)."""
    definition = json_filename_options(filename) or \
        {"file": {"driver": "file", "filename": filename}}
    if backing_format:
        definition["driver"] = backing_format
    return definition


def full_backing_filename(bs: BlockDriverState) -> str:
    """bdrv_get_full_backing_filename: a relative header name is taken relative to the
    image's directory; "" when there is none or no directory can be derived."""
    name = bs.backing_file
    if not name:
        return ""
    if path_has_protocol(name) or os.path.isabs(name):
        return name
    base = bdrv_dirname(bs)
    if base is None:
        return ""
    return base + name


def new_transaction() -> Transaction:
    return Transaction()
