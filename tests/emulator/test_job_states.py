"""The job state machine over QMP: every event and reply in wire order (qemu-semantics §5).

The expected sequences are QEMU 7.2.22's (Debian, ``-machine none -S``), recorded from the
real binary with these very scripts; test_sequences_match_qemu replays them there when it is
installed. Facts beyond §5 they pin down (job.c, blockdev.c, block/create.c):

* blockdev-backup is a transaction that drains the source from prepare to clean, so the new
  job pauses as soon as it exists and resumes at clean: created, running, paused, running
  come before the reply;
* a job that finishes without leaving its coroutine (null-co never yields; blockdev-create
  failing its checks) is completed by a bottom half that runs before the reply;
* file I/O yields (thread pool): qcow2 backups and successful creates end after the reply;
* a drained section follows the graph (block/io.c): bdrv_replace_node drains the node it
  replaces, and an edge that moves to a node in fewer drained sections ends them for its
  parent — so when a backup's filter is dropped while another backup of the same source runs
  above it, the other job pauses and resumes once (between BLOCK_JOB_PENDING and
  BLOCK_JOB_COMPLETED of the ending job);
* quit (qemu_cleanup) drains every node without ending the drain, so each job still running
  pauses, in the order of its first node; job_cancel_sync_all then cancels the jobs newest
  first (a paused job runs again to see the cancel, a concluded one is dismissed) — all
  before quit's reply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import requires_qemu
from tests.emulator.qemu_runner import Step, compact, create_qcow2, run_both, run_script

OK = {"return": {}}


def image(d: Path) -> None:
    create_qcow2(d / "img", "64M")


def create_target(n: int) -> list[Step]:
    """257's create_target: blockdev-create file, blockdev-add, blockdev-create qcow2."""
    return [
        ("cmd", "blockdev-create", {"job-id": f"c{n}", "options": {
            "driver": "file", "filename": f"@DIR@/t{n}", "size": 0}}),
        ("rest", f"c{n}"),
        ("cmd", "job-dismiss", {"id": f"c{n}"}),
        ("cmd", "blockdev-add", {"driver": "file", "node-name": f"f{n}",
                                 "filename": f"@DIR@/t{n}"}),
        ("cmd", "blockdev-create", {"job-id": f"q{n}", "options": {
            "driver": "qcow2", "file": f"f{n}", "size": 67108864}}),
        ("rest", f"q{n}"),
        ("cmd", "job-dismiss", {"id": f"q{n}"}),
        ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": f"t{n}", "file": f"f{n}"}),
    ]


def create_events(job: str) -> list[Any]:
    return [f"{job}:created", f"{job}:running", ("blockdev-create", OK), f"{job}:waiting",
            f"{job}:pending", f"{job}:concluded", f"{job}:null", ("job-dismiss", OK)]


TARGET_EVENTS = [*create_events("c1"), ("blockdev-add", OK), *create_events("q1"),
                 ("blockdev-add", OK)]
DRIVE0: Step = ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "drive0",
                                        "file": {"driver": "file", "filename": "@DIR@/img"}})


def backup(**kw: Any) -> Step:
    args = {"device": "drive0", "target": "t1", "filter-node-name": "backup-top",
            "x-perf": {"max-workers": 1}, **kw}
    return ("cmd", "blockdev-backup", {k: v for k, v in args.items() if v is not None})


SCRIPTS: dict[str, tuple[list[Step], list[Any]]] = {
    "create": ([
        *create_target(1),
        ("cmd", "blockdev-create", {"job-id": "c3", "options": {
            "driver": "qcow2", "file": "nosuch", "size": 67108864}}),
        ("cmd", "query-jobs", None),
        ("cmd", "job-dismiss", {"id": "c3"}),
        ("cmd", "blockdev-create", {"job-id": "c4", "options": {
            "driver": "qcow2", "file": "f1", "size": 1000}}),
        ("cmd", "query-jobs", None),
        ("cmd", "blockdev-create", {"job-id": "c4", "options": {"driver": "null-co"}}),
        ("cmd", "blockdev-create", {"job-id": "1bad", "options": {
            "driver": "file", "filename": "@DIR@/x", "size": 0}}),
        ("cmd", "job-dismiss", {"id": "c4"}),
    ], [
        *TARGET_EVENTS,
        "c3:created", "c3:running", "c3:aborting", "c3:concluded", ("blockdev-create", OK),
        ("query-jobs", {"return": [{"current-progress": 1, "error": "Cannot find device="
                                    "'nosuch' nor node-name='nosuch'", "id": "c3",
                                    "status": "concluded", "total-progress": 1,
                                    "type": "create"}]}),
        "c3:null", ("job-dismiss", OK),
        "c4:created", "c4:running", "c4:aborting", "c4:concluded", ("blockdev-create", OK),
        ("query-jobs", {"return": [{"current-progress": 1, "error": "Image size must be a "
                                    "multiple of 512 bytes", "id": "c4",
                                    "status": "concluded", "total-progress": 1,
                                    "type": "create"}]}),
        ("blockdev-create", {"error": {"class": "GenericError",
                                       "desc": "Driver does not support blockdev-create"}}),
        ("blockdev-create", {"error": {"class": "GenericError",
                                       "desc": "Invalid job ID '1bad'"}}),
        "c4:null", ("job-dismiss", OK),
    ]),
    "manual-finalize-and-cancel-while-pending": ([
        DRIVE0,
        ("cmd", "block-dirty-bitmap-add", {"node": "drive0", "name": "bitmap0",
                                           "granularity": 65536}),
        ("hmp", 'qemu-io drive0 "write -P0x65 0 64k"'),
        *create_target(1),
        backup(sync="bitmap", bitmap="bitmap0", **{"bitmap-mode": "on-success",
                                                   "job-id": "j1", "auto-finalize": False}),
        ("wait", "BLOCK_JOB_PENDING", {"id": "j1"}),
        ("cmd", "query-jobs", None),
        ("hmp", 'qemu-io backup-top "write -P0x74 0x10000 64k"'),
        ("cmd", "job-cancel", {"id": "j1"}),
        ("cmd", "query-jobs", None),
    ], [
        ("blockdev-add", OK), ("block-dirty-bitmap-add", OK),
        ("human-monitor-command", {"return": ""}), *TARGET_EVENTS,
        "j1:created", "j1:running", "j1:paused", "j1:running", ("blockdev-backup", OK),
        "j1:waiting", "j1:pending", ("BLOCK_JOB_PENDING", {"id": "j1", "type": "backup"}),
        ("query-jobs", {"return": [{"current-progress": 65536, "id": "j1",
                                    "status": "pending", "total-progress": 65536,
                                    "type": "backup"}]}),
        ("human-monitor-command", {"return": ""}),
        "j1:aborting",
        ("BLOCK_JOB_CANCELLED", {"device": "j1", "len": 65536, "offset": 65536, "speed": 0,
                                 "type": "backup"}),
        "j1:concluded", "j1:null", ("job-cancel", OK), ("query-jobs", {"return": []}),
    ]),
    "sync-none-verbs": ([
        DRIVE0, *create_target(1),
        backup(sync="none", **{"job-id": "j3", "filter-node-name": None}),
        ("cmd", "query-block-jobs", None),
        ("cmd", "job-pause", {"id": "j3"}),
        ("cmd", "job-pause", {"id": "j3"}),
        ("cmd", "query-block-jobs", None),
        ("cmd", "block-job-resume", {"device": "j3"}),
        ("cmd", "block-job-resume", {"device": "j3"}),
        ("cmd", "job-complete", {"id": "j3"}),
        ("cmd", "job-finalize", {"id": "j3"}),
        ("cmd", "job-dismiss", {"id": "j3"}),
        ("cmd", "block-job-cancel", {"device": "nosuch"}),
        ("cmd", "job-cancel", {"id": "nosuch"}),
        ("cmd", "block-job-set-speed", {"device": "j3", "speed": -1}),
        ("cmd", "block-job-set-speed", {"device": "j3", "speed": 1000}),
        ("cmd", "job-pause", {"id": "j3"}),
        ("cmd", "block-job-cancel", {"device": "j3"}),
        ("cmd", "block-job-cancel", {"device": "j3", "force": True}),
        ("cmd", "query-jobs", None),
    ], [
        ("blockdev-add", OK), *TARGET_EVENTS,
        "j3:created", "j3:running", "j3:paused", "j3:running", ("blockdev-backup", OK),
        ("query-block-jobs", {"return": [{
            "auto-dismiss": True, "auto-finalize": True, "busy": False, "device": "j3",
            "io-status": "ok", "len": 67108864, "offset": 0, "paused": False,
            "ready": False, "speed": 0, "status": "running", "type": "backup"}]}),
        "j3:paused", ("job-pause", OK),
        ("job-pause", {"error": {"class": "GenericError", "desc": "Job is already paused"}}),
        ("query-block-jobs", {"return": [{
            "auto-dismiss": True, "auto-finalize": True, "busy": False, "device": "j3",
            "io-status": "ok", "len": 67108864, "offset": 0, "paused": True,
            "ready": False, "speed": 0, "status": "paused", "type": "backup"}]}),
        "j3:running", ("block-job-resume", OK),
        ("block-job-resume", {"error": {"class": "GenericError",
                                        "desc": "Can't resume a job that was not paused"}}),
        ("job-complete", {"error": {"class": "GenericError", "desc": "Job 'j3' in state "
                                    "'running' cannot accept command verb 'complete'"}}),
        ("job-finalize", {"error": {"class": "GenericError", "desc": "Job 'j3' in state "
                                    "'running' cannot accept command verb 'finalize'"}}),
        ("job-dismiss", {"error": {"class": "GenericError", "desc": "Job 'j3' in state "
                                   "'running' cannot accept command verb 'dismiss'"}}),
        ("block-job-cancel", {"error": {"class": "DeviceNotActive",
                                        "desc": "Block job 'nosuch' not found"}}),
        ("job-cancel", {"error": {"class": "GenericError", "desc": "Job not found"}}),
        ("block-job-set-speed", {"error": {"class": "GenericError", "desc": "Parameter "
                                           "'speed' expects a non-negative value"}}),
        ("block-job-set-speed", OK),
        "j3:paused", ("job-pause", OK),
        ("block-job-cancel", {"error": {"class": "GenericError", "desc": "The block job "
                                        "for device 'j3' is currently paused"}}),
        "j3:running", "j3:aborting",
        ("BLOCK_JOB_CANCELLED", {"device": "j3", "len": 67108864, "offset": 0,
                                 "speed": 1000, "type": "backup"}),
        "j3:concluded", "j3:null", ("block-job-cancel", OK), ("query-jobs", {"return": []}),
    ]),
    "283-permission-conflict": ([
        ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "target",
                                 "size": 1048576}),
        ("cmd", "blockdev-add", {"driver": "blkdebug", "node-name": "source", "image": {
            "driver": "null-co", "node-name": "base", "size": 1048576}}),
        ("cmd", "blockdev-add", {"driver": "blkdebug", "image": "base", "node-name": "other",
                                 "take-child-perms": ["write"]}),
        ("cmd", "blockdev-backup", {"device": "source", "job-id": "backup0", "sync": "full",
                                    "target": "target"}),
    ], [
        ("blockdev-add", OK), ("blockdev-add", OK), ("blockdev-add", OK),
        "backup0:created", "backup0:null",
        ("blockdev-backup", {"error": {"class": "GenericError", "desc": (
            "Permission conflict on node 'base': permissions 'write' are both required by "
            "node 'other' (uses node 'base' as 'image' child) and unshared by node 'source' "
            "(uses node 'base' as 'image' child).")}}),
    ]),
    "283-filter-gone-after-finalize": ([
        ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "source"}),
        ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "target"}),
        ("cmd", "blockdev-backup", {"auto-dismiss": False, "auto-finalize": False,
                                    "device": "source", "filter-node-name": "backup-filter",
                                    "job-id": "backup", "sync": "full", "target": "target"}),
        ("cmd", "job-finalize", {"id": "backup"}),
        ("hmp", 'qemu-io backup-filter "write 0 1M"'),
        ("cmd", "job-dismiss", {"id": "backup"}),
    ], [
        ("blockdev-add", OK), ("blockdev-add", OK),
        # null-co never yields: the whole 1 GiB copy and job_exit happen before the reply
        "backup:created", "backup:running", "backup:paused", "backup:running",
        "backup:waiting", "backup:pending", ("BLOCK_JOB_PENDING", {"id": "backup",
                                                                   "type": "backup"}),
        ("blockdev-backup", OK),
        ("BLOCK_JOB_COMPLETED", {"device": "backup", "len": 1073741824,
                                 "offset": 1073741824, "speed": 0, "type": "backup"}),
        "backup:concluded", ("job-finalize", OK),
        ("human-monitor-command", {"return": "Error: Cannot find device='' nor "
                                             "node-name='backup-filter'\r\n"}),
        "backup:null", ("job-dismiss", OK),
    ]),
    # rate limits (100 ms slices): pausing a sleeping job, dropping the limit, resuming;
    # cancelling while the limit holds the job after its first 1 MiB task
    "speed-pause-set-speed-resume": ([
        ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "src", "size": 67108864}),
        ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "dst", "size": 67108864}),
        ("cmd", "blockdev-backup", {"device": "src", "target": "dst", "sync": "full",
                                    "job-id": "s", "speed": 4194304}),
        ("sleep", 0.3),
        ("cmd", "job-pause", {"id": "s"}),
        ("cmd", "block-job-set-speed", {"device": "s", "speed": 0}),
        ("cmd", "job-resume", {"id": "s"}),
    ], [
        ("blockdev-add", OK), ("blockdev-add", OK),
        "s:created", "s:running", "s:paused", "s:running", ("blockdev-backup", OK),
        "s:paused", ("job-pause", OK), ("block-job-set-speed", OK),
        "s:running", "s:waiting", "s:pending",
        ("BLOCK_JOB_COMPLETED", {"device": "s", "len": 67108864, "offset": 67108864,
                                 "speed": 0, "type": "backup"}),
        "s:concluded", "s:null", ("job-resume", OK),
    ]),
    "speed-cancel": ([
        ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "src", "size": 67108864}),
        ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "dst", "size": 67108864}),
        ("cmd", "blockdev-backup", {"device": "src", "target": "dst", "sync": "full",
                                    "job-id": "s", "speed": 1048576}),
        ("sleep", 0.25),
        ("cmd", "job-cancel", {"id": "s"}),
    ], [
        ("blockdev-add", OK), ("blockdev-add", OK),
        "s:created", "s:running", "s:paused", "s:running", ("blockdev-backup", OK),
        "s:aborting",
        ("BLOCK_JOB_CANCELLED", {"device": "s", "len": 67108864, "offset": 1048576,
                                 "speed": 1048576, "type": "backup"}),
        "s:concluded", "s:null", ("job-cancel", OK),
    ]),
    # two backups of one source: the second one's filter goes between the source and the
    # first one's filter; when it is dropped (backup_clean -> bdrv_cbw_drop ->
    # bdrv_replace_node), the drained section of the dropped filter reaches the other job,
    # which pauses, and resumes as its filter's edge moves to the undrained source
    "backup-ends-beside-another-of-its-source": ([
        *[("cmd", "blockdev-add", {"driver": "null-co", "node-name": n, "size": 67108864})
          for n in ("src", "d1", "d2")],
        ("cmd", "blockdev-backup", {"device": "src", "target": "d1", "sync": "full",
                                    "job-id": "slow", "speed": 1048576}),
        ("sleep", 0.25),
        ("cmd", "blockdev-backup", {"device": "src", "target": "d2", "sync": "full",
                                    "job-id": "fast", "auto-finalize": False}),
        ("cmd", "job-finalize", {"id": "fast"}),
        ("cmd", "job-cancel", {"id": "slow"}),
    ], [
        ("blockdev-add", OK), ("blockdev-add", OK), ("blockdev-add", OK),
        "slow:created", "slow:running", "slow:paused", "slow:running", ("blockdev-backup", OK),
        # the transaction's bdrv_drain_all, then the drained source
        "slow:paused", "slow:running", "slow:paused",
        "fast:created", "fast:running", "fast:paused", "fast:running", "slow:running",
        "fast:waiting", "fast:pending", ("BLOCK_JOB_PENDING", {"id": "fast", "type": "backup"}),
        ("blockdev-backup", OK),
        "slow:paused", "slow:running",
        ("BLOCK_JOB_COMPLETED", {"device": "fast", "len": 67108864, "offset": 67108864,
                                 "speed": 0, "type": "backup"}),
        "fast:concluded", "fast:null", ("job-finalize", OK),
        "slow:aborting",
        ("BLOCK_JOB_CANCELLED", {"device": "slow", "len": 67108864, "offset": 1048576,
                                 "speed": 1048576, "type": "backup"}),
        "slow:concluded", "slow:null", ("job-cancel", OK),
    ]),
    # three filters stacked on one source (newest nearest the source): the ending one's
    # drained section reaches both others, depth first through the filters above it
    "backup-ends-beside-two-others-of-its-source": ([
        *[("cmd", "blockdev-add", {"driver": "null-co", "node-name": n, "size": 67108864})
          for n in ("src", "d1", "d2", "d3")],
        ("cmd", "blockdev-backup", {"device": "src", "target": "d1", "sync": "full",
                                    "job-id": "s1", "speed": 1048576}),
        ("cmd", "blockdev-backup", {"device": "src", "target": "d2", "sync": "none",
                                    "job-id": "s2"}),
        ("sleep", 0.2),
        ("cmd", "blockdev-backup", {"device": "src", "target": "d3", "sync": "full",
                                    "job-id": "f", "auto-finalize": False}),
        ("cmd", "job-finalize", {"id": "f"}),
        ("cmd", "job-cancel", {"id": "s1"}),
        ("cmd", "job-cancel", {"id": "s2"}),
    ], [
        *[("blockdev-add", OK)] * 4,
        "s1:created", "s1:running", "s1:paused", "s1:running", ("blockdev-backup", OK),
        "s1:paused", "s1:running", "s1:paused",
        "s2:created", "s2:running", "s2:paused", "s2:running", "s1:running",
        ("blockdev-backup", OK),
        "s1:paused", "s2:paused", "s1:running", "s2:running", "s2:paused", "s1:paused",
        "f:created", "f:running", "f:paused", "f:running", "s2:running", "s1:running",
        "f:waiting", "f:pending", ("BLOCK_JOB_PENDING", {"id": "f", "type": "backup"}),
        ("blockdev-backup", OK),
        "s2:paused", "s1:paused", "s2:running", "s1:running",
        ("BLOCK_JOB_COMPLETED", {"device": "f", "len": 67108864, "offset": 67108864,
                                 "speed": 0, "type": "backup"}),
        "f:concluded", "f:null", ("job-finalize", OK),
        "s1:aborting",
        ("BLOCK_JOB_CANCELLED", {"device": "s1", "len": 67108864, "offset": 1048576,
                                 "speed": 1048576, "type": "backup"}),
        "s1:concluded", "s1:null", ("job-cancel", OK),
        "s2:aborting",
        ("BLOCK_JOB_CANCELLED", {"device": "s2", "len": 67108864, "offset": 0, "speed": 0,
                                 "type": "backup"}),
        "s2:concluded", "s2:null", ("job-cancel", OK),
    ]),
    "quit-cancels-running-jobs": ([
        *[("cmd", "blockdev-add", {"driver": "null-co", "node-name": n, "size": 67108864})
          for n in ("a", "b", "c", "d")],
        ("cmd", "transaction", {"actions": [
            {"type": "blockdev-backup", "data": {"device": "c", "target": "d", "sync": "none",
                                                 "job-id": "n"}},
            {"type": "blockdev-backup", "data": {"device": "a", "target": "b", "sync": "full",
                                                 "job-id": "s", "speed": 1048576}}]}),
        ("sleep", 0.3),
        ("cmd", "quit", None),
    ], [
        ("blockdev-add", OK), ("blockdev-add", OK), ("blockdev-add", OK), ("blockdev-add", OK),
        "n:created", "s:created", "n:running", "n:paused", "s:running", "s:paused",
        "n:running", "s:running", ("transaction", OK),
        ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}),
        "s:paused", "n:paused",
        "s:running", "s:aborting",
        ("BLOCK_JOB_CANCELLED", {"device": "s", "len": 67108864, "offset": 1048576,
                                 "speed": 1048576, "type": "backup"}),
        "s:concluded", "s:null",
        "n:running", "n:aborting",
        ("BLOCK_JOB_CANCELLED", {"device": "n", "len": 67108864, "offset": 0, "speed": 0,
                                 "type": "backup"}),
        "n:concluded", "n:null", ("quit", OK),
    ]),
    "quit-dismisses-concluded-and-cancels-paused": ([
        *[("cmd", "blockdev-add", {"driver": "null-co", "node-name": n, "size": 67108864})
          for n in ("a", "b", "c", "d")],
        ("cmd", "blockdev-backup", {"device": "a", "target": "b", "sync": "none",
                                    "job-id": "p"}),
        ("cmd", "job-pause", {"id": "p"}),
        ("cmd", "blockdev-backup", {"device": "c", "target": "d", "sync": "full",
                                    "job-id": "k", "auto-dismiss": False}),
        ("rest", "k"),
        ("cmd", "quit", None),
    ], [
        ("blockdev-add", OK), ("blockdev-add", OK), ("blockdev-add", OK), ("blockdev-add", OK),
        "p:created", "p:running", "p:paused", "p:running", ("blockdev-backup", OK),
        "p:paused", ("job-pause", OK),
        "k:created", "k:running", "k:paused", "k:running", "k:waiting", "k:pending",
        ("BLOCK_JOB_COMPLETED", {"device": "k", "len": 67108864, "offset": 67108864,
                                 "speed": 0, "type": "backup"}),
        "k:concluded", ("blockdev-backup", OK),
        ("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}),
        "k:null", "p:running", "p:aborting",
        ("BLOCK_JOB_CANCELLED", {"device": "p", "len": 67108864, "offset": 0, "speed": 0,
                                 "type": "backup"}),
        "p:concluded", "p:null", ("quit", OK),
    ]),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_sequence(tmp_path: Path, name: str) -> None:
    steps, expected = SCRIPTS[name]
    image(tmp_path)
    assert compact(run_script(steps, tmp_path)) == expected


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_sequence_is_deterministic(tmp_path: Path, name: str) -> None:
    """The same command sequence gives the same events in the same order, every time."""
    steps, _ = SCRIPTS[name]
    runs = []
    for i in range(3):
        d = tmp_path / str(i)
        d.mkdir()
        image(d)
        runs.append(compact(run_script(steps, d)))
    assert runs[0] == runs[1] == runs[2]


@requires_qemu
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_sequences_match_qemu(tmp_path: Path, name: str) -> None:
    qemu, emu = run_both(tmp_path, SCRIPTS[name][0], image)
    assert compact(emu) == compact(qemu)


def test_a_bug_inside_a_job_fails_the_job_not_the_vm(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception the emulator did not expect, raised in a job's coroutine, concludes the
    job with an "internal error" (and a logged traceback) instead of leaving it running for
    ever: the session goes on, the job can be dismissed, the next one works."""
    from emulator.jobs import create

    def broken(layer: Any, opts: dict[str, Any]) -> Any:
        yield
        raise MemoryError()

    monkeypatch.setattr(create, "qcow2_creator", broken)
    (tmp_path / "f").write_bytes(b"")
    options = {"driver": "qcow2", "file": "f", "size": 1 << 20}
    records = run_script([
        ("cmd", "blockdev-add", {"driver": "file", "filename": "@DIR@/f", "node-name": "f"}),
        ("cmd", "blockdev-create", {"job-id": "j", "options": options}), ("rest", "j"),
        ("cmd", "query-jobs", {}), ("cmd", "job-dismiss", {"id": "j"}),
        ("cmd", "blockdev-create", {"job-id": "k", "options": {
            "driver": "file", "filename": "@DIR@/g", "size": 1 << 20}}),
        ("rest", "k"), ("cmd", "query-jobs", {})], tmp_path)
    jobs = [r[2]["return"] for r in records if r[:2] == ("reply", "query-jobs")]
    assert jobs[0] == [{"current-progress": 0, "status": "concluded", "total-progress": 1,
                        "type": "create", "id": "j",
                        "error": "internal error in the emulator's create job: MemoryError()"}]
    assert jobs[1] == [{"current-progress": 1, "status": "concluded", "total-progress": 1,
                        "type": "create", "id": "k"}]
