"""The ``transaction`` command and its action registry (blockdev.c qmp_transaction).

Every action is a :class:`TransactionAction` subclass registered with :func:`action` under its
TransactionActionKind name and the QAPI type of its ``data``. ``transaction`` prepares the
actions in order; if one fails, every action prepared so far — including the one that failed
— is aborted in reverse order; otherwise all are committed in order; ``clean`` runs for all at
the end (BlkActionOps). ``blockdev-backup``/``drive-backup`` are added by the backup module the
same way; grouped completion mode gives such actions a shared :attr:`TransactionState.job_txn`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from emulator.block.dirty_bitmap import (
    BDRV_BITMAP_ALLOW_RO,
    BDRV_BITMAP_DEFAULT,
    BdrvDirtyBitmap,
    HBitmap,
)
from emulator.block.errors import GenericError
from emulator.commands import bitmap as bitmap_cmds
from emulator.commands._unemulated import UNEMULATED_ACTIONS
from emulator.qmp import schema
from emulator.qmp.registry import command

if TYPE_CHECKING:
    from emulator.block.node import BlockDriverState
    from emulator.machine import Machine

TRANSACTION_ACTION_KINDS = [
    "abort", "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
    "blockdev-backup", "blockdev-snapshot", "blockdev-snapshot-internal-sync",
    "blockdev-snapshot-sync", "drive-backup",
]

schema.enum("TransactionActionKind", TRANSACTION_ACTION_KINDS)
schema.enum("ActionCompletionMode", ["individual", "grouped"])
schema.enum("NewImageMode", ["existing", "absolute-paths"])
schema.struct("Abort", {})
schema.struct("TransactionProperties", {"*completion-mode": "ActionCompletionMode"})
schema.struct("BlockdevSnapshot", {"node": "str", "overlay": "str"})
schema.struct("BlockdevSnapshotSync", {
    "*device": "str", "*node-name": "str", "snapshot-file": "str",
    "*snapshot-node-name": "str", "*format": "str", "*mode": "NewImageMode"})


@dataclass
class TransactionState:
    """What all actions of one transaction share (TransactionProperties, the JobTxn)."""

    vm: Machine
    completion_mode: str = "individual"
    job_txn: Any = None     # set for grouped completion; the jobs layer fills it in


@dataclass
class TransactionAction:
    """One action (BlkActionState + BlkActionOps). Subclasses override the four steps."""

    kind: ClassVar[str] = ""
    data_type: ClassVar[str] = ""

    txn: TransactionState
    data: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    drained: BlockDriverState | None = None   # the node prepare drained, until clean

    @property
    def vm(self) -> Machine:
        return self.txn.vm

    def check_completion_mode(self) -> None:
        """action_check_completion_mode."""
        if self.txn.completion_mode != "individual":
            raise GenericError(f"Action '{self.kind}' does not support Transaction property "
                               f"completion-mode = {self.txn.completion_mode}")

    def prepare(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def drain(self, bs: BlockDriverState) -> None:
        """bdrv_drained_begin(bs) in prepare, paired with clean: jobs above bs pause until
        then (a backup's new job too, once it holds its filter)."""
        self.drained = bs
        self.vm.jobs.drained_begin(bs)

    def clean(self) -> None:
        """Ends the drained section prepare began (first thing in QEMU's clean steps)."""
        if self.drained is not None:
            self.vm.jobs.drained_end(self.drained)
            self.drained = None


ACTIONS: dict[str, type[TransactionAction]] = {}


def declare_transaction_schema() -> None:
    """(Re)declare TransactionAction: one {data: T} wrapper branch per registered action,
    and per action the emulator does not emulate (checked, then "not supported")."""
    branches = {}
    for kind, data_type in UNEMULATED_ACTIONS.items():
        schema.struct(f"{data_type}Wrapper", {"data": data_type})
        branches[kind] = f"{data_type}Wrapper"
    for kind, cls in ACTIONS.items():
        wrapper = f"{cls.__name__}Wrapper"
        schema.struct(wrapper, {"data": cls.data_type})
        branches[kind] = wrapper
    schema.union("TransactionAction", base={"type": "TransactionActionKind"},
                 discriminator="type", branches=branches)


def action(cls: type[TransactionAction]) -> type[TransactionAction]:
    """Register a transaction action class (``kind`` and ``data_type`` set on the class)."""
    ACTIONS[cls.kind] = cls
    declare_transaction_schema()
    return cls


def run_transaction(vm: Machine, actions: list[dict[str, Any]],
                    properties: dict[str, Any] | None = None,
                    on_grouped: Callable[[TransactionState], None] | None = None) -> None:
    """qmp_transaction: prepare all; on failure abort the prepared ones in reverse."""
    txn = TransactionState(vm, (properties or {}).get("completion-mode", "individual"))
    if txn.completion_mode != "individual" and on_grouped is not None:
        on_grouped(txn)
    vm.jobs.drain_all()   # "drain all i/o before any operations"
    states: list[TransactionAction] = []
    try:
        try:
            for act in actions:
                cls = ACTIONS.get(act["type"])
                if cls is None:
                    raise GenericError(f"Action '{act['type']}' is not supported")
                state = cls(txn, act.get("data", {}))
                states.append(state)
                state.prepare()
        except GenericError:
            for state in reversed(states):
                state.abort()
            raise
        for state in states:
            state.commit()
    finally:
        for state in states:
            state.clean()


# -- actions ---------------------------------------------------------------------------------
@action
class AbortAction(TransactionAction):
    kind = "abort"
    data_type = "Abort"

    def prepare(self) -> None:
        raise GenericError("Transaction aborted using Abort action")

    def commit(self) -> None:
        raise AssertionError("the abort action never succeeds")


@dataclass
class _BitmapAction(TransactionAction):
    """BlockDirtyBitmapState."""

    bitmap: BdrvDirtyBitmap | None = None
    bs: BlockDriverState | None = None
    backup: HBitmap | None = None
    prepared: bool = False
    was_enabled: bool = False


@action
class BitmapAddAction(_BitmapAction):
    kind = "block-dirty-bitmap-add"
    data_type = "BlockDirtyBitmapAdd"

    def prepare(self) -> None:
        self.check_completion_mode()
        d = self.data
        bitmap_cmds.bitmap_add(self.vm.block, d["node"], d["name"], d.get("granularity"),
                               d.get("persistent"), d.get("disabled"))
        self.prepared = True

    def abort(self) -> None:
        if self.prepared:
            bitmap_cmds.bitmap_remove(self.vm.block, self.data["node"], self.data["name"],
                                      release=True)


class _BitmapRestoreAction(_BitmapAction):
    """An action that changes the bits: abort restores the old ones (hbitmap backup)."""

    def abort(self) -> None:
        if self.backup is not None and self.bitmap is not None:
            self.bitmap.restore(self.backup)

    def commit(self) -> None:
        self.backup = None


@action
class BitmapClearAction(_BitmapRestoreAction):
    kind = "block-dirty-bitmap-clear"
    data_type = "BlockDirtyBitmap"

    def prepare(self) -> None:
        self.check_completion_mode()
        self.bitmap, self.bs = bitmap_cmds.bitmap_lookup(self.vm.block, self.data["node"],
                                                         self.data["name"])
        self.bitmap.check(BDRV_BITMAP_DEFAULT)
        self.backup = self.bitmap.clear(keep_backup=True)


@action
class BitmapEnableAction(_BitmapAction):
    """block-dirty-bitmap-enable; abort restores the old state (its -disable twin is below)."""

    kind = "block-dirty-bitmap-enable"
    data_type = "BlockDirtyBitmap"
    disable: ClassVar[bool] = False

    def prepare(self) -> None:
        self.check_completion_mode()
        self.bitmap, _ = bitmap_cmds.bitmap_lookup(self.vm.block, self.data["node"],
                                                   self.data["name"])
        self.bitmap.check(BDRV_BITMAP_ALLOW_RO)
        self.was_enabled = self.bitmap.enabled()
        self.bitmap.disabled = self.disable

    def abort(self) -> None:
        # QEMU 7.2 dereferences the bitmap even when prepare failed before finding it
        # (a crash); the emulator skips that case.
        if self.bitmap is not None and self.was_enabled == self.disable:
            self.bitmap.disabled = not self.disable


@action
class BitmapDisableAction(BitmapEnableAction):
    kind = "block-dirty-bitmap-disable"
    disable = True


@action
class BitmapMergeAction(_BitmapRestoreAction):
    kind = "block-dirty-bitmap-merge"
    data_type = "BlockDirtyBitmapMerge"

    def prepare(self) -> None:
        self.check_completion_mode()
        d = self.data
        self.bitmap, self.backup = bitmap_cmds.bitmap_merge(
            self.vm.block, d["node"], d["target"], d["bitmaps"], keep_backup=True)


@action
class BitmapRemoveAction(_BitmapAction):
    kind = "block-dirty-bitmap-remove"
    data_type = "BlockDirtyBitmap"

    def prepare(self) -> None:
        self.check_completion_mode()
        self.bitmap = bitmap_cmds.bitmap_remove(self.vm.block, self.data["node"],
                                                self.data["name"], release=False)
        self.bitmap.skip_store = True
        self.bitmap.busy = True

    def abort(self) -> None:
        if self.bitmap is not None:
            self.bitmap.skip_store = False
            self.bitmap.busy = False

    def commit(self) -> None:
        assert self.bitmap is not None
        self.bitmap.busy = False
        self.bitmap.bs.release_dirty_bitmap(self.bitmap)


class ExternalSnapshotAction(TransactionAction):
    """external_snapshot_prepare/commit/abort/clean: an overlay appended above a node.

    blockdev-snapshot and blockdev-snapshot-sync differ only in naming the node and in
    where the overlay comes from (:meth:`open_overlay`)."""

    old_bs: BlockDriverState | None = None
    new_bs: BlockDriverState | None = None
    overlay_appended: bool = False

    def names(self) -> tuple[str | None, str | None]:
        """The node to snapshot, as bdrv_lookup_bs takes it: (device, node-name)."""
        raise NotImplementedError

    def open_overlay(self, old: BlockDriverState) -> BlockDriverState:
        """The new node (bdrv_open); the action owns one reference to it."""
        raise NotImplementedError

    def prepare(self) -> None:
        device, node_name = self.names()
        self.check_completion_mode()
        block = self.vm.block
        self.old_bs = block.lookup_bs(device, node_name)
        old = self.old_bs
        self.drain(old)
        from emulator.block.graph import OP_EXTERNAL_SNAPSHOT
        block.graph.op_check_blocked(old, OP_EXTERNAL_SNAPSHOT)
        if not old.read_only:
            try:
                old.flush()
            except OSError:   # QERR_IO_ERROR, whatever the errno
                raise GenericError("An IO error has occurred") from None
        self.new_bs = new = self.open_overlay(old)
        perm, _ = new.cumulative_perm()
        from emulator.block import perm as P
        if perm & P.CONSISTENT_READ:
            raise GenericError("The overlay is already in use")
        if new.is_filter:
            raise GenericError("Filters cannot be used as overlays")
        if new.cow_child() is not None:
            raise GenericError("The overlay already has a backing image")
        if not new.supports_backing:
            raise GenericError("The overlay does not support backing images")
        block.graph.append(new, old)
        self.overlay_appended = True

    def commit(self) -> None:
        assert self.old_bs is not None
        self.vm.block.reopen_read_only(self.old_bs)

    def abort(self) -> None:
        if self.new_bs is not None and self.overlay_appended and self.old_bs is not None:
            graph = self.vm.block.graph
            self.old_bs.refcnt += 1
            graph.set_backing_hd(self.new_bs, None)
            graph.replace_node(self.new_bs, self.old_bs)
            graph.unref(self.old_bs)

    def clean(self) -> None:
        super().clean()
        if self.new_bs is not None:
            self.vm.block.graph.unref(self.new_bs)


@action
class BlockdevSnapshotAction(ExternalSnapshotAction):
    """blockdev-snapshot: an existing node (blockdev-add'ed, without backing) as overlay."""

    kind = "blockdev-snapshot"
    data_type = "BlockdevSnapshot"

    def names(self) -> tuple[str | None, str | None]:
        return self.data["node"], self.data["node"]

    def open_overlay(self, old: BlockDriverState) -> BlockDriverState:
        """bdrv_open(NULL, overlay, NULL, 0): a new reference to the node named."""
        new = self.vm.block.lookup_bs(self.data["overlay"], self.data["overlay"])
        new.refcnt += 1
        return new


@action
class BlockdevSnapshotSyncAction(ExternalSnapshotAction):
    """blockdev-snapshot-sync: a new image file created (or found) and opened as overlay."""

    kind = "blockdev-snapshot-sync"
    data_type = "BlockdevSnapshotSync"

    def names(self) -> tuple[str | None, str | None]:
        return self.data.get("device"), self.data.get("node-name")

    def open_overlay(self, old: BlockDriverState) -> BlockDriverState:
        d = self.data
        block = self.vm.block
        snap_name = d.get("snapshot-node-name")
        if d.get("node-name") is not None and snap_name is None:
            raise GenericError("New overlay node-name missing")
        if snap_name is not None:
            try:
                block.lookup_bs(snap_name, snap_name)
            except GenericError:
                pass
            else:
                raise GenericError("New overlay node-name already in use")
        return block.external_snapshot(old, d["snapshot-file"], d.get("format", "qcow2"),
                                       snap_name, d.get("mode", "absolute-paths"))


@command("transaction", data={"actions": ["TransactionAction"],
                              "*properties": "TransactionProperties"})
def transaction(vm: Machine, actions: list[dict[str, Any]],
                properties: dict[str, Any] | None = None) -> None:
    run_transaction(vm, actions, properties)


@command("blockdev-snapshot", data="BlockdevSnapshot")
def blockdev_snapshot(vm: Machine, node: str, overlay: str) -> None:
    """qmp_blockdev_snapshot: a one-action transaction."""
    run_transaction(vm, [{"type": "blockdev-snapshot",
                          "data": {"node": node, "overlay": overlay}}])


@command("blockdev-snapshot-sync", data="BlockdevSnapshotSync")
def blockdev_snapshot_sync(vm: Machine, **data: Any) -> None:
    """qmp_blockdev_snapshot_sync: a one-action transaction."""
    args = {k.replace("_", "-"): v for k, v in data.items()}
    run_transaction(vm, [{"type": "blockdev-snapshot-sync", "data": args}])
