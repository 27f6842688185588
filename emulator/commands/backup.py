"""blockdev-backup and drive-backup, as commands and as transaction actions (blockdev.c).

Both commands are one-action transactions, as in QEMU: prepare looks the nodes up and creates
the job (do_backup_common's argument checks come first, in QEMU's order — every line of
257.out's "API failure tests"); commit starts it; abort cancels it synchronously. With
completion-mode "grouped" the jobs of one transaction share a JobTxn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emulator.block.dirty_bitmap import BDRV_BITMAP_ALLOW_RO
from emulator.block.errors import GenericError
from emulator.commands.transaction import TransactionAction, action, run_transaction
from emulator.jobs.backup import BackupJob, BackupPerf, backup_job_create
from emulator.jobs.job import JobTxn
from emulator.jobs.manager import flushing
from emulator.qmp import schema
from emulator.qmp.registry import command

if TYPE_CHECKING:
    from emulator.block.node import BlockDriverState
    from emulator.machine import Machine

schema.enum("MirrorSyncMode", ["top", "full", "none", "incremental", "bitmap"])
schema.enum("BitmapSyncMode", ["on-success", "never", "always"])
schema.enum("BlockdevOnError", ["report", "ignore", "enospc", "stop", "auto"])
schema.struct("BackupPerf", {"*use-copy-range": "bool", "*max-workers": "int",
                             "*max-chunk": "int64"})
schema.struct("BackupCommon", {
    "*job-id": "str", "device": "str", "sync": "MirrorSyncMode", "*speed": "int",
    "*bitmap": "str", "*bitmap-mode": "BitmapSyncMode", "*compress": "bool",
    "*on-source-error": "BlockdevOnError", "*on-target-error": "BlockdevOnError",
    "*auto-finalize": "bool", "*auto-dismiss": "bool", "*filter-node-name": "str",
    "*x-perf": "BackupPerf"})
schema.struct("BlockdevBackup", {"target": "str"}, base="BackupCommon")
schema.struct("DriveBackup", {"target": "str", "*format": "str", "*mode": "NewImageMode"},
              base="BackupCommon")


def do_backup_common(vm: Machine, backup: dict[str, Any], bs: BlockDriverState,
                     target_bs: BlockDriverState, txn: JobTxn | None) -> BackupJob:
    """do_backup_common: defaults, bitmap/sync-mode checks, then backup_job_create."""
    sync = backup["sync"]
    has_bitmap = "bitmap" in backup
    has_mode = "bitmap-mode" in backup
    mode = backup.get("bitmap-mode")
    xperf = backup.get("x-perf", {})
    perf = BackupPerf(use_copy_range=xperf.get("use-copy-range", False),
                      max_workers=xperf.get("max-workers", 64),
                      max_chunk=xperf.get("max-chunk", 0))
    if sync in ("bitmap", "incremental") and not has_bitmap:
        raise GenericError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if has_mode and mode != "on-success":
            raise GenericError("Bitmap sync mode must be 'on-success' when using sync mode "
                               "'incremental'")
        has_mode, sync, mode = True, "bitmap", "on-success"
    bmap = None
    if has_bitmap:
        bmap = bs.find_dirty_bitmap(backup["bitmap"])
        if bmap is None:
            raise GenericError(f"Bitmap '{backup['bitmap']}' could not be found")
        if not has_mode:
            raise GenericError("Bitmap sync mode must be given when providing a bitmap")
        bmap.check(BDRV_BITMAP_ALLOW_RO)
        if sync == "none":
            raise GenericError("sync mode 'none' does not produce meaningful bitmap outputs")
        if mode == "never" and sync != "bitmap":
            raise GenericError(f"Bitmap sync mode 'never' has no meaningful effect when "
                               f"combined with sync mode '{sync}'")
    if not has_bitmap and has_mode:
        raise GenericError("Cannot specify bitmap sync mode without a bitmap")
    return backup_job_create(
        vm.jobs, vm.block, backup.get("job-id"), bs, target_bs,
        speed=backup.get("speed", 0), sync_mode=sync, sync_bitmap=bmap,
        bitmap_mode=mode or "on-success", compress=backup.get("compress", False),
        filter_node_name=backup.get("filter-node-name"), perf=perf,
        on_source_error=backup.get("on-source-error", "report"),
        on_target_error=backup.get("on-target-error", "report"),
        manual_finalize=not backup.get("auto-finalize", True),
        manual_dismiss=not backup.get("auto-dismiss", True), txn=txn)


class _BackupAction(TransactionAction):
    """DriveBackupState / BlockdevBackupState: commit starts, abort cancels the job."""

    job: BackupJob | None = None

    def job_txn(self) -> JobTxn | None:
        """The transaction's JobTxn for completion-mode grouped (made by the first user)."""
        if self.txn.completion_mode == "individual":
            return None
        if self.txn.job_txn is None:
            self.txn.job_txn = JobTxn()
        return self.txn.job_txn

    def commit(self) -> None:
        assert self.job is not None
        self.job.start()

    def abort(self) -> None:
        if self.job is not None:
            self.job.cancel_sync(True)

    def clean(self) -> None:
        super().clean()
        self.vm.jobs.flush_bhs()   # `transaction` replies after them too


@action
class BlockdevBackupAction(_BackupAction):
    kind = "blockdev-backup"
    data_type = "BlockdevBackup"

    def prepare(self) -> None:
        """blockdev_backup_prepare."""
        block = self.vm.block
        bs = block.lookup_bs(self.data["device"], self.data["device"])
        target_bs = block.lookup_bs(self.data["target"], self.data["target"])
        self.drain(bs)
        self.job = do_backup_common(self.vm, self.data, bs, target_bs, self.job_txn())


@action
class DriveBackupAction(_BackupAction):
    kind = "drive-backup"
    data_type = "DriveBackup"

    def prepare(self) -> None:
        """drive_backup_prepare: create (unless mode=existing) and open the target image."""
        block = self.vm.block
        d = dict(self.data)
        mode = d.get("mode", "absolute-paths")
        bs = block.lookup_bs(d["device"], d["device"])
        self.drain(bs)
        fmt = d.get("format", None if mode == "existing" else bs.format_name)
        block.graph.op_check_blocked(bs, "backup-source")
        source = None
        no_backing = False
        if d["sync"] == "top":
            from emulator.jobs.mirror_graph import skip_filters
            top = skip_filters(bs)
            cow = top.cow_child() if top is not None else None
            source = cow.bs if cow is not None else None
            if source is None:
                d["sync"] = "full"
        if d["sync"] == "none":
            source = bs
            no_backing = True
        size = bs.getlength()
        if mode != "existing":
            assert fmt is not None
            if source is not None:
                explicit = source.skip_implicit_filters()
                explicit.refresh_filename()
                block.create_image(d["target"], fmt, size, backing_file=explicit.filename,
                                   backing_format=explicit.format_name,
                                   open_backing=not no_backing)
            else:
                block.create_image(d["target"], fmt, size)
        opts: dict[str, Any] = {"discard": "unmap", "detect-zeroes": "unmap"}
        if fmt is not None:   # else the target is probed as bdrv_open probes
            opts["driver"] = fmt
        if fmt in ("file", "null-co"):
            opts["filename"] = d["target"]
        else:
            opts["file"] = {"driver": "file", "filename": d["target"]}
        target_bs = block.open_node(opts, no_backing=no_backing)
        try:
            if no_backing:
                block.graph.set_backing_hd(target_bs, source)
            self.job = do_backup_common(self.vm, d, bs, target_bs, self.job_txn())
        finally:
            block.graph.unref(target_bs)


@command("blockdev-backup", data="BlockdevBackup", boxed=True)
@flushing
def blockdev_backup(vm: Machine, backup: dict[str, Any]) -> None:
    """qmp_blockdev_backup: a one-action transaction."""
    run_transaction(vm, [{"type": "blockdev-backup", "data": backup}])


@command("drive-backup", data="DriveBackup", boxed=True)
@flushing
def drive_backup(vm: Machine, backup: dict[str, Any]) -> None:
    """qmp_drive_backup (deprecated in 7.2, still there): a one-action transaction."""
    run_transaction(vm, [{"type": "drive-backup", "data": backup}])
