"""drive-backup and drive-mirror creating (or opening) their target, on the emulator and on
QEMU 7.2: every combination of format, mode, target name and sync mode, replies compared.

bdrv_img_create's checks (format, backing file support, file creation errors), the open of
an existing target (probing, a filename a driver refuses, backing support for sync=none)
and the job's own checks come in QEMU's order. vmdk and the other formats QEMU can create
but the emulator cannot are left out (the emulator's boundary); targets are relative names,
so real QEMU only writes inside its test directory.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import requires_qemu, requires_qemu_img
from tests.emulator.qemu_runner import (
    JobFates,
    create_qcow2,
    job_fates,
    run_both,
    settle,
    without_host_details,
)

pytestmark = [requires_qemu, requires_qemu_img]

FORMATS = [None, "qcow2", "raw", "file", "", "null-co", "nosuch"]
MODES = [None, "absolute-paths", "existing"]
TARGETS = ["new", "exists-qcow2", "exists-raw", "", "sub/x", "a" * 300]
SYNCS = ["full", "top", "none"]


def variants() -> list[dict[str, Any]]:
    out = []
    for fmt, mode, target, sync in itertools.product(FORMATS, MODES, TARGETS, SYNCS):
        v: dict[str, Any] = {"device": "top", "sync": sync, "target": target}
        if fmt is not None:
            v["format"] = fmt
        if mode is not None:
            v["mode"] = mode
        out.append(v)
    return out


def script(command: str, fates: JobFates | None) -> list[tuple[Any, ...]]:
    steps: list[tuple[Any, ...]] = [("cmd", "blockdev-add", {
        "driver": "qcow2", "node-name": "top", "file": {"driver": "file",
                                                        "filename": "@DIR@/top"}})]
    for i, variant in enumerate(variants()):
        args = {**variant, "job-id": f"j{i}"}
        if args["target"] in ("new", "exists-qcow2", "exists-raw"):
            args["target"] = f"{args['target']}{i}"
        steps.append(("cmd", command, args))
        steps += settle(args["job-id"], fates)
    steps.append(("cmd", "query-named-block-nodes", {"flat": True}))
    return steps


@pytest.mark.parametrize("command", ["drive-backup", "drive-mirror"])
def test_drive_targets_like_qemu(tmp_path: Path, command: str) -> None:
    def setup(d: Path) -> None:
        create_qcow2(d / "base", "4M")
        create_qcow2(d / "top", "4M", backing=Path("base"))
        create_qcow2(d / "exists-qcow2", "4M")
        for i in range(len(variants())):
            shutil.copyfile(d / "exists-qcow2", d / f"exists-qcow2{i}")
            (d / f"exists-raw{i}").write_bytes(bytes(1 << 20))

    fates = job_fates(tmp_path, lambda f: script(command, f), setup)
    assert len(fates[0] | fates[1]) > 30
    qemu, emu = run_both(tmp_path, script(command, fates), setup)
    replies = [[r for r in without_host_details(records) if r[0] == "reply"]
               for records in (qemu, emu)]
    errors = {r[2]["error"]["desc"] for r in replies[0] if "error" in r[2]}
    assert len(errors) > 10   # many different checks are met
    differ = [f"{q}\n  emulator {e}" for q, e in zip(*replies, strict=True) if q != e]
    assert not differ, "\n".join(differ[:5])


@pytest.mark.parametrize("named", [True, False], ids=["named-filter", "implicit-filter"])
def test_drive_backup_top_opens_the_backing_file_first(tmp_path: Path,
                                                        named: bool) -> None:
    """drive-backup sync=top is the one image creation that opens the new image's backing
    file first (bdrv_img_create without BDRV_O_NO_BACKING): a backing node that cannot be
    opened from its file name — a copy-before-write filter's json:{...} names no target —
    fails the command before the target exists ("Parameter 'target' is missing")."""
    from tests.emulator.qemu_runner import c, compare_replies

    def setup(d: Path) -> None:
        create_qcow2(d / "img", "4M")
        create_qcow2(d / "other", "4M")
        create_qcow2(d / "fleece", "4M")
    filter_name = {"filter-node-name": "f"} if named else {}
    compare_replies(tmp_path, [
        c("blockdev-add", driver="qcow2", **{"node-name": "a"},
          file={"driver": "file", "filename": "@DIR@/img"}),
        c("blockdev-add", driver="qcow2", **{"node-name": "fl"},
          file={"driver": "file", "filename": "@DIR@/fleece"}),
        c("blockdev-add", driver="qcow2", **{"node-name": "top"}, backing="a",
          file={"driver": "file", "filename": "@DIR@/other"}),
        c("blockdev-backup", **{"job-id": "j1"}, device="a", target="fl", sync="none",
          **filter_name),   # the filter goes above a: top's backing is now the filter
        c("drive-backup", **{"job-id": "j2"}, device="top", target="@DIR@/t", sync="top"),
        c("query-named-block-nodes", flat=True)], setup=setup)
    assert (tmp_path / "qemu" / "t").exists() == (tmp_path / "emu" / "t").exists()
