"""Mirror errors against QEMU 7.2.22: argument checks in QEMU's order, and error actions.

As in test_mirror_jobs, each script must give QEMU's recorded transcript on the emulator
and, where QEMU is installed, the same transcript as QEMU live. What they pin down:

* drive-mirror's checks: qmp_get_root_bs ("Cannot find device=…", "Need a root block
  node"), granularity ("Parameter 'granularity' expects a power of 2" before the range
  check), buf-size, unsupported sync modes, job id, speed (after the job exists: created and
  null come first), replaces without node-name, unknown replaces, an existing-mode target that
  does not exist, an unknown format; "Can't mirror node into itself"; a duplicate or invalid
  filter-node-name (unprefixed node-name errors); nodes held by a running mirror are busy
  for other jobs and for blockdev-del ("Node 'x' is busy: block device is in use by block
  job: mirror"); a target of another size fails the running job;
* I/O errors: every failed copy operation emits BLOCK_JOB_ERROR, so with the default 16 MiB
  buffer a source that fails every read reports four errors (four 1 MiB reads in flight);
  "stop" pauses the job after the operations in flight completed (io-status "failed"),
  resume retries the failed range; "ignore" goes on retrying; "enospc" reports EIO.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import requires_qemu
from tests.emulator.qemu_runner import (
    Step,
    as_recorded,
    create_qcow2,
    on_both,
    recorded,
    rerecord,
    run_script,
    without_host_details,
)


def setup(d: Path) -> None:
    create_qcow2(d / "disk.img", "4M")
    create_qcow2(d / "small.img", "2M")
    create_qcow2(d / "tgt.img", "4M")


def dm(**kw: Any) -> Step:
    args = {"device": "drive0", "target": "@DIR@/t.img", "sync": "full", "job-id": "j", **kw}
    return ("cmd", "drive-mirror", {k: v for k, v in args.items() if v is not None})


def bm(**kw: Any) -> Step:
    args = {"device": "drive0", "target": "tgt", "sync": "full", "job-id": "j", **kw}
    return ("cmd", "blockdev-mirror", {k: v for k, v in args.items() if v is not None})


NODES: list[Step] = [
    ("cmd", "blockdev-add", {"driver": "file", "node-name": "f0",
                             "filename": "@DIR@/disk.img"}),
    ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "drive0", "file": "f0"}),
    ("hmp", 'qemu-io drive0 "write -P 0x11 0 1M"'),
    ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "small", "file": {
        "driver": "file", "filename": "@DIR@/small.img"}}),
    ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "tgt", "file": {
        "driver": "file", "filename": "@DIR@/tgt.img"}}),
]


def failing_source(name: str, once: bool) -> Step:
    """drive0's image under blkdebug: reads of guest data fail with EIO."""
    return ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": name, "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": "@DIR@/disk.img"},
        "inject-error": [{"event": "read_aio", "errno": 5, "once": once}]}})


def on(name: str, job: str, policy: str, **kw: Any) -> Step:
    return ("cmd", "drive-mirror", {"job-id": job, "device": name, "sync": "full",
                                    "target": f"@DIR@/{job}.img",
                                    "on-source-error": policy, **kw})


SCRIPTS: dict[str, list[Step]] = {
    "argument-checks": [
        *NODES,
        dm(device="nosuch"), dm(device="f0"), dm(granularity=1000), dm(granularity=256),
        dm(granularity=2**27), dm(**{"buf-size": -1}), dm(sync="incremental"),
        dm(sync="bitmap"), dm(**{"job-id": "1bad"}), dm(speed=-1), dm(replaces="drive0"),
        dm(replaces="nosuch", **{"node-name": "nn"}),
        dm(mode="existing", target="@DIR@/nosuch.img"), dm(format="nosuchfmt"),
        bm(target="drive0"), bm(**{"filter-node-name": "drive0"}),
        bm(**{"filter-node-name": "1x"}), ("cmd", "query-jobs", None),
    ],
    "busy-nodes-and-size-mismatch": [
        *NODES,
        bm(target="small"), ("rest", "j"), ("cmd", "query-jobs", None),
        bm(**{"filter-node-name": "mtop", "auto-dismiss": False}, speed=1), ("sleep", 0.2),
        ("cmd", "query-named-block-nodes", {"flat": True}),
        dm(**{"job-id": "j2"}),
        bm(device="tgt", target="small", **{"job-id": "k"}),
        bm(device="small", target="tgt", **{"job-id": "k"}),
        ("cmd", "blockdev-del", {"node-name": "drive0"}),
        ("cmd", "blockdev-del", {"node-name": "mtop"}),
        ("cmd", "job-cancel", {"id": "j"}), ("rest", "j"),
        ("cmd", "query-block-jobs", None), ("cmd", "job-dismiss", {"id": "j"}),
        ("cmd", "query-named-block-nodes", {"flat": True}),
    ],
    "source-errors": [
        ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "w", "file": {
            "driver": "file", "filename": "@DIR@/disk.img"}}),
        ("hmp", 'qemu-io w "write -P 0x11 0 4M"'), ("cmd", "blockdev-del", {"node-name": "w"}),
        failing_source("s1", False), on("s1", "j1", "report"), ("rest", "j1"),
        ("cmd", "blockdev-del", {"node-name": "s1"}),
        failing_source("s2", True), on("s2", "j2", "stop"), ("rest", "j2"),
        ("cmd", "query-block-jobs", None), ("cmd", "block-job-resume", {"device": "j2"}),
        ("rest", "j2"), ("cmd", "query-block-jobs", None),
        ("cmd", "job-complete", {"id": "j2"}),
        ("wait", "JOB_STATUS_CHANGE", {"id": "j2", "status": "null"}),
        ("cmd", "blockdev-del", {"node-name": "s2"}),
        failing_source("s3", False), on("s3", "j3", "ignore", speed=262144),
        ("sleep", 0.15), ("cmd", "job-cancel", {"id": "j3"}), ("rest", "j3"),
        ("cmd", "blockdev-del", {"node-name": "s3"}),
        failing_source("s4", False), on("s4", "j4", "enospc", **{"buf-size": 65536}),
        ("rest", "j4"),
    ],
}


def record(name: str, d: Path, *, qemu: bool) -> list[Any]:
    setup(d)
    return run_script(SCRIPTS[name], d, qemu=qemu)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_mirror_errors_give_qemus_recorded_transcript(tmp_path: Path, name: str) -> None:
    assert as_recorded(record(name, tmp_path, qemu=False)) == recorded(f"errors:{name}")


@requires_qemu
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_mirror_errors_match_qemu(tmp_path: Path, name: str) -> None:
    qemu, emu = on_both(tmp_path, lambda d, q: record(name, d, qemu=q))
    assert without_host_details(emu) == without_host_details(qemu)


def main() -> None:   # pragma: no cover - regenerates the recording from real QEMU
    rerecord("errors", lambda name, d: record(name, d, qemu=True),
             sys.argv[1:] or sorted(SCRIPTS))


if __name__ == "__main__":   # pragma: no cover
    main()
