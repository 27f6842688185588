"""blockdev-backup's arguments, one at a time, on the emulator and on QEMU 7.2, while a
rate-limited backup of another node keeps running.

Every variant is a transaction of its own, so each drains all I/O first (bdrv_drain_all):
the running job pauses and resumes once per variant, whatever the variant's fate. Replies,
the job listing after each job came to rest, the node listing and every JOB_STATUS_CHANGE
must be QEMU's, in wire order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

BASE = {"device": "src", "target": "tgt", "sync": "full"}
SETUP = [
    ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "src", "file": {
        "driver": "file", "filename": "@DIR@/src", "node-name": "srcfile"}}),
    ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "tgt", "size": 4 << 20}),
    ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "src2", "file": {
        "driver": "file", "filename": "@DIR@/src2"}}),
    ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "tgt2", "size": 4 << 20}),
    ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "null0", "size": 1 << 20}),
    ("cmd", "block-dirty-bitmap-add", {"node": "src", "name": "b0"}),
    ("cmd", "block-dirty-bitmap-add", {"node": "src", "name": "dis", "disabled": True}),
    ("hmp", 'qemu-io src "write -P 1 0 64k"'),
    # runs (at one byte a second) through every variant below; from a source of its own
    # (a second backup of the same source ending pauses it once more in QEMU: not modelled)
    ("cmd", "blockdev-backup", {**BASE, "job-id": "slow", "device": "src2", "target": "tgt2",
                                "speed": 1}),
]


def variants() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [dict(BASE)]
    for key, values in {
        "speed": [0, -1, (1 << 63) - 1],
        "sync": ["top", "none", "bitmap", "incremental"],
        "bitmap": ["b0", "nosuch", "", "dis"],
        "bitmap-mode": ["on-success", "never", "always"],
        "compress": [True],
        "on-source-error": ["ignore", "enospc", "stop", "auto"],
        "on-target-error": ["ignore", "enospc", "stop", "auto"],
        "auto-finalize": [False], "auto-dismiss": [False],
        "filter-node-name": ["f", "", "src", "1bad"],
        "x-perf": [{"use-copy-range": True}, {"max-workers": 0}, {"max-workers": 1},
                   {"max-chunk": -1}, {"max-chunk": 1}, {"max-chunk": 1 << 40}],
        "device": ["nosuch", "tgt", "null0", "srcfile"],
        "target": ["nosuch", "src", "srcfile", "null0", "tgt2"],
        "job-id": ["", "1bad", "slow"],
    }.items():
        out += [{**BASE, key: value} for value in values]
    for sync in ("full", "top", "none", "bitmap", "incremental"):
        for mode in (None, "on-success", "never", "always"):
            out.append({**BASE, "sync": sync, "bitmap": "b0",
                        **({"bitmap-mode": mode} if mode else {})})
    return out


def script(fates: JobFates | None) -> list[tuple[Any, ...]]:
    """The variants, each followed by what its job needs (see qemu_runner.settle)."""
    steps: list[tuple[Any, ...]] = list(SETUP)
    for i, variant in enumerate(variants()):
        args = {"job-id": f"j{i}", **variant}
        if args["target"] == "tgt":   # a target of its own: jobs that go on keep theirs
            args["target"] = f"t{i}"
            steps.append(("cmd", "blockdev-add", {"driver": "null-co", "node-name": f"t{i}",
                                                  "size": 4 << 20}))
        steps.append(("cmd", "blockdev-backup", args))
        if args["job-id"] == f"j{i}":   # ("slow" stays: its duplicate's job never starts)
            steps += settle(args["job-id"], fates)
        steps.append(("cmd", "query-named-block-nodes", {"flat": True}))
    return steps


def test_backup_arguments_like_qemu(tmp_path: Path) -> None:
    def setup(d: Path) -> None:
        create_qcow2(d / "src", "4M")
        create_qcow2(d / "src2", "4M")

    fates = job_fates(tmp_path, script, setup)
    assert len(fates[0]) > 20
    qemu, emu = run_both(tmp_path, script(fates), setup)
    qemu, emu = without_host_details(qemu), without_host_details(emu)
    pauses = sum(1 for r in qemu if r[1] == "JOB_STATUS_CHANGE"
                 and r[2] == {"status": "paused", "id": "slow"})
    assert pauses > len(variants()) // 2   # bdrv_drain_all in the transactions
    differ = [f"record {i}:\n  QEMU     {q}\n  emulator {e}"
              for i, (q, e) in enumerate(zip(qemu, emu, strict=False)) if q != e]
    assert len(qemu) == len(emu) and not differ, "\n".join(differ[:5])
