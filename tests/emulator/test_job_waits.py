"""Where a job's coroutine first waits, against QEMU 7.2: what comes before the reply.

A request to file-posix waits for the thread pool, so the command that started the job
replies first; blkdebug fails a request after aio_co_schedule, a bottom half that still runs
before the reply (docs/qemu-semantics.md §25, emulator/block/waits.py). A first backup sets off
a ``read_aio`` rule and loads the source's L2 table from the file; a second job's first read
then fails in blkdebug without reaching the file: BLOCK_JOB_ERROR before the reply, aborting
after it. The emulator used to decide from the graph alone (a file below: the reply first).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import requires_qemu, requires_qemu_img
from tests.emulator.qemu_runner import qemu_img, run_both


def _setup(d: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", d / "faulty", "4M")
    subprocess.run(["qemu-io", "-c", "write -P 1 0 64k", str(d / "faulty")], check=True,
                   capture_output=True)


@requires_qemu
@requires_qemu_img
@pytest.mark.parametrize("command", ["blockdev-backup", "blockdev-mirror"])
def test_a_read_blkdebug_fails_at_once_reports_before_the_reply(tmp_path: Path,
                                                                 command: str) -> None:
    def job(name: str, verb: str) -> list[tuple[Any, ...]]:
        return [("cmd", verb, {"job-id": name, "device": "dbg", "target": "null0",
                               "sync": "full"}), ("rest", name)]

    steps = [
        ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "null0", "size": 4 << 20}),
        ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "dbg", "file": {
            "driver": "blkdebug", "image": {"driver": "file", "filename": "@DIR@/faulty"},
            "inject-error": [{"event": "read_aio", "errno": 5}]}}),
        *job("first", "blockdev-backup"),
        *job("j", command),
    ]
    real, mine = run_both(tmp_path, steps, _setup)
    assert mine == real
    second = mine[mine.index(("event", "JOB_STATUS_CHANGE", {"status": "created", "id": "j"})):]
    kinds = [r[1] for r in second if r[1] in ("BLOCK_JOB_ERROR", command)
             or r[2] == {"status": "aborting", "id": "j"}]
    assert kinds == ["BLOCK_JOB_ERROR", command, "JOB_STATUS_CHANGE"]


@requires_qemu
@requires_qemu_img
def test_a_cancelled_job_stopped_on_an_error_ends_after_the_reply(tmp_path: Path) -> None:
    """job-cancel of a backup stopped on an error (on-source-error=stop): the job goes on
    to its last block-copy call, whose first read blkdebug fails — a bottom-half wait, so
    the job_exit it then schedules runs after job-cancel's reply (the emulator used to end
    the job before it). Found by the differential test's check of the order on the wire."""
    steps: list[tuple[Any, ...]] = [
        ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "null0", "size": 4 << 20}),
        ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "dbg", "file": {
            "driver": "blkdebug", "image": {"driver": "file", "filename": "@DIR@/faulty"},
            "inject-error": [{"event": "read_aio", "errno": 5}]}}),
        ("cmd", "blockdev-backup", {"job-id": "j", "device": "dbg", "target": "null0",
                                    "sync": "full", "on-source-error": "stop"}),
        ("wait", "BLOCK_JOB_ERROR", {"device": "j"}),
        ("rest", "j"),
        ("cmd", "job-cancel", {"id": "j"}),
        ("rest", "j"),
    ]
    real, mine = run_both(tmp_path, steps, _setup)
    assert mine == real
    cancel = mine.index(("reply", "job-cancel", {"return": {}}))
    assert ("event", "JOB_STATUS_CHANGE", {"status": "aborting", "id": "j"}) in mine[cancel:]
