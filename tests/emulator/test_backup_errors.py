"""Backup error policies (on-source-error / on-target-error) on blkdebug-injected errors.

Each script is compared with QEMU 7.2.22 when it is installed (test_matches_qemu); the
expectations written here were recorded from it. block_job_error_action (blockjob.c) emits
BLOCK_JOB_ERROR; "stop" pauses the job user-visibly with io-status "failed" (or "nospace"
for ENOSPC) until job-resume; "ignore" retries at once; "enospc" stops on ENOSPC only.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import requires_qemu
from tests.emulator.qemu_runner import (
    Record,
    Step,
    create_qcow2,
    qemu_io,
    run_both,
    run_script,
)

SIZE = 4 << 20


def images(d: Path) -> None:
    """4 MiB source with data clusters at 0 and 1 MiB, empty 4 MiB target."""
    create_qcow2(d / "src", "4M")
    create_qcow2(d / "dst", "4M")
    for cmd in ("write -P0x11 0 64k", "write -P0x22 1M 64k"):
        qemu_io(d / "src", cmd)


def node(name: str, **rule: Any) -> Step:
    """qcow2 node ``name`` over @DIR@/name, under blkdebug with ``rule`` if one is given."""
    file: dict[str, Any] = {"driver": "file", "filename": f"@DIR@/{name}"}
    if rule:
        file = {"driver": "blkdebug", "image": file, "inject-error": [rule]}
    return ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": name, "file": file})


def backup(**kw: Any) -> Step:
    return ("cmd", "blockdev-backup", {"device": "src", "target": "dst", "sync": "full",
                                       "job-id": "j", "x-perf": {"max-workers": 1}, **kw})


def interesting(records: list[Record]) -> list[Any]:
    out: list[Any] = []
    for kind, name, data in records:
        if kind == "event" and name == "JOB_STATUS_CHANGE":
            out.append(f"{data['status']}")
        elif kind == "event" or name in ("query-block-jobs", "job-resume"):
            out.append((name, data))
    return out


SCRIPTS: dict[str, tuple[list[Step], list[Any]]] = {
    "read-error-report": (
        [node("src", event="read_aio", errno=5, once=True), node("dst"), backup(),
         ("rest", "j")],
        ["created", "running", "paused", "running",
         ("BLOCK_JOB_ERROR", {"action": "report", "device": "j", "operation": "read"}),
         "aborting",
         ("BLOCK_JOB_COMPLETED", {"device": "j", "error": "Input/output error",
                                  "len": SIZE, "offset": 0, "speed": 0, "type": "backup"}),
         "concluded", "null"]),
    "read-error-at-sector-ignore": (
        # host sector 768 = 0x60000: the second data cluster of the source file
        [node("src", event="read_aio", errno=5, sector=768, once=True), node("dst"),
         backup(**{"on-source-error": "ignore"}), ("rest", "j")],
        ["created", "running", "paused", "running",
         ("BLOCK_JOB_ERROR", {"action": "ignore", "device": "j", "operation": "read"}),
         "waiting", "pending",
         ("BLOCK_JOB_COMPLETED", {"device": "j", "len": SIZE, "offset": SIZE, "speed": 0,
                                  "type": "backup"}),
         "concluded", "null"]),
    "write-error-stop-resume": (
        [node("src"), node("dst", event="write_aio", iotype="write", errno=5, once=True),
         backup(**{"on-target-error": "stop"}), ("rest", "j"),
         ("cmd", "query-block-jobs", None),
         ("cmd", "job-resume", {"id": "j"}), ("rest", "j")],
        ["created", "running", "paused", "running",
         ("BLOCK_JOB_ERROR", {"action": "stop", "device": "j", "operation": "write"}),
         "paused",
         ("query-block-jobs", {"return": [{
             "auto-dismiss": True, "auto-finalize": True, "busy": False, "device": "j",
             "io-status": "failed", "len": SIZE, "offset": 0, "paused": True,
             "ready": False, "speed": 0, "status": "paused", "type": "backup"}]}),
         "running", ("job-resume", {"return": {}}), "waiting", "pending",
         ("BLOCK_JOB_COMPLETED", {"device": "j", "len": SIZE, "offset": SIZE, "speed": 0,
                                  "type": "backup"}),
         "concluded", "null"]),
    "enospc-stops-on-enospc": (
        [node("src", event="read_aio", errno=28, once=True), node("dst"),
         backup(**{"on-source-error": "enospc"}), ("rest", "j"),
         ("cmd", "query-block-jobs", None), ("cmd", "job-resume", {"id": "j"}),
         ("rest", "j")],
        ["created", "running", "paused", "running",
         ("BLOCK_JOB_ERROR", {"action": "stop", "device": "j", "operation": "read"}),
         "paused",
         ("query-block-jobs", {"return": [{
             "auto-dismiss": True, "auto-finalize": True, "busy": False, "device": "j",
             "io-status": "nospace", "len": SIZE, "offset": 0, "paused": True,
             "ready": False, "speed": 0, "status": "paused", "type": "backup"}]}),
         "running", ("job-resume", {"return": {}}), "waiting", "pending",
         ("BLOCK_JOB_COMPLETED", {"device": "j", "len": SIZE, "offset": SIZE, "speed": 0,
                                  "type": "backup"}),
         "concluded", "null"]),
    "enospc-reports-eio": (
        [node("src", event="read_aio", errno=5, once=True), node("dst"),
         backup(**{"on-source-error": "enospc"}), ("rest", "j")],
        ["created", "running", "paused", "running",
         ("BLOCK_JOB_ERROR", {"action": "report", "device": "j", "operation": "read"}),
         "aborting",
         ("BLOCK_JOB_COMPLETED", {"device": "j", "error": "Input/output error",
                                  "len": SIZE, "offset": 0, "speed": 0, "type": "backup"}),
         "concluded", "null"]),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_error_policy(tmp_path: Path, name: str) -> None:
    steps, expected = SCRIPTS[name]
    images(tmp_path)
    assert interesting(run_script(steps, tmp_path)) == expected


@requires_qemu
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_matches_qemu(tmp_path: Path, name: str) -> None:
    qemu, emu = run_both(tmp_path, SCRIPTS[name][0], images)
    assert interesting(emu) == interesting(qemu)


@requires_qemu
@pytest.mark.parametrize("immediately", [False, True])
@pytest.mark.parametrize("policy", ["report", "stop"])
def test_a_task_failing_at_once_stops_block_copy(tmp_path: Path, immediately: bool,
                                                  policy: str) -> None:
    """block_copy_dirty_clusters starts tasks in a pool and stops when one has failed: a read
    failing without a wait (blkdebug immediately=on) is seen before the next task starts;
    after a wait (the default) the loop had gone on, and the progress shows it."""
    steps = [node("src", event="read_aio", errno=5, sector=640, immediately=immediately),
             node("dst"),
             ("cmd", "blockdev-backup", {"device": "src", "target": "dst", "sync": "full",
                                         "job-id": "j", "on-source-error": policy}),
             ("rest", "j"), ("cmd", "query-block-jobs", None)]
    qemu, emu = run_both(tmp_path, steps, images)
    assert interesting(emu) == interesting(qemu)


@requires_qemu
@pytest.mark.parametrize("workers", [1, 64])
def test_cancel_while_stopped_runs_the_next_calls_first_tasks(tmp_path: Path,
                                                               workers: int) -> None:
    """backup_loop, stopped on an error and then cancelled, starts its next block-copy call
    before it looks at the job: the tasks that call starts before its first wait still
    copy (BLOCK_JOB_CANCELLED shows the whole disk done; the target holds the data)."""
    steps = [node("src", event="read_aio", errno=5, once=True), node("dst"),
             ("cmd", "blockdev-backup", {"device": "src", "target": "dst", "sync": "full",
                                         "job-id": "j", "on-source-error": "stop",
                                         "x-perf": {"max-workers": workers}}),
             ("rest", "j"), ("cmd", "job-cancel", {"id": "j"}), ("rest", "j")]
    qemu, emu = run_both(tmp_path, steps, images)
    assert interesting(emu) == interesting(qemu)
    compare = subprocess.run(["qemu-img", "compare", str(tmp_path / "qemu" / "dst"),
                              str(tmp_path / "emu" / "dst")], capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout
