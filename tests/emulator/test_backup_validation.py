"""blockdev-backup's argument checks and job-creation errors, in QEMU's order.

The expected replies are QEMU 7.2.22's (Debian), taken from real runs of the same commands
(test_validation_matches_qemu repeats them on the real binary when it is installed). The
order of the bitmap checks is do_backup_common's (blockdev.c); the job-creation checks are
backup_job_create's (block/backup.c) and job_create's (job.c).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import requires_qemu
from tests.emulator.qemu_runner import create_qcow2, replies, run_both, run_script

DRIVE0 = {"driver": "qcow2", "node-name": "drive0",
          "file": {"driver": "file", "filename": "@DIR@/img"}}
TARGET = {"driver": "qcow2", "node-name": "backup_target",
          "file": {"driver": "file", "filename": "@DIR@/target"}}


def images(d: Path) -> None:
    create_qcow2(d / "img", "64M")
    create_qcow2(d / "target", "64M")
    create_qcow2(d / "small", "32M")


def backup(**kw: Any) -> tuple[str, str, dict[str, Any]]:
    args = {"device": "drive0", "target": "backup_target", "job-id": "api_job",
            "filter-node-name": "backup-top", "x-perf": {"max-workers": 1}}
    args.update(kw)
    return ("cmd", "blockdev-backup", {k: v for k, v in args.items() if v is not None})


def err(desc: str) -> dict[str, Any]:
    return {"error": {"class": "GenericError", "desc": desc}}


NO_BITMAP = "must provide a valid bitmap name for '{}' sync mode"
NOT_FOUND = "Bitmap 'bitmap404' could not be found"
ONLY_ON_SUCCESS = "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"
MODE_NEEDED = "Bitmap sync mode must be given when providing a bitmap"
MODE_WITHOUT = "Cannot specify bitmap sync mode without a bitmap"
NEVER = "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{}'"
NONE = "sync mode 'none' does not produce meaningful bitmap outputs"


def api_cases() -> list[tuple[dict[str, Any], str]]:
    """257.out's "API failure tests", generated as test_bitmap_sync's loops generate them."""
    cases: list[tuple[dict[str, Any], str]] = []
    for sync in ("incremental", "bitmap"):
        for mode in ("on-success", "always", "never", None):
            cases.append(({"sync": sync, "bitmap-mode": mode}, NO_BITMAP.format(sync)))
        for mode in ("on-success", "always", "never", None):
            if sync == "incremental" and mode not in ("on-success", None):
                expect = ONLY_ON_SUCCESS
            else:
                expect = NOT_FOUND
            cases.append(({"sync": sync, "bitmap": "bitmap404", "bitmap-mode": mode}, expect))
        if sync == "incremental":
            for mode in ("always", "never"):
                cases.append(({"sync": sync, "bitmap": "bitmap0", "bitmap-mode": mode},
                              ONLY_ON_SUCCESS))
        else:
            cases.append(({"sync": sync, "bitmap": "bitmap0"}, MODE_NEEDED))
    for sync in ("full", "top", "none"):
        for mode in ("on-success", "always", "never"):
            cases.append(({"sync": sync, "bitmap-mode": mode}, MODE_WITHOUT))
        for mode in ("on-success", "always", "never", None):
            cases.append(({"sync": sync, "bitmap": "bitmap404", "bitmap-mode": mode},
                          NOT_FOUND))
        if sync == "none":
            for mode in ("on-success", "always", "never"):
                cases.append(({"sync": sync, "bitmap": "bitmap0", "bitmap-mode": mode}, NONE))
        else:
            cases.append(({"sync": sync, "bitmap": "bitmap0", "bitmap-mode": "never"},
                          NEVER.format(sync)))
        cases.append(({"sync": sync, "bitmap": "bitmap0"}, MODE_NEEDED))
    return cases


SETUP = [("cmd", "blockdev-add", DRIVE0), ("cmd", "blockdev-add", TARGET),
         ("cmd", "block-dirty-bitmap-add", {"node": "drive0", "name": "bitmap0",
                                            "granularity": 65536})]


def test_api_failure_lines_of_257(tmp_path: Path) -> None:
    """Every line of 257.out's API section, in the order test_bitmap_sync produces them."""
    images(tmp_path)
    cases = api_cases()
    out = run_script([*SETUP, *(backup(**args) for args, _ in cases)], tmp_path)
    got = replies(out)[len(SETUP):]
    assert got == [err(desc) for _, desc in cases]
    # no job was ever created: no event at all
    assert [r for r in out if r[0] == "event"] == []


def test_api_lines_match_golden(goldens: Path) -> None:
    """The generated cases are exactly the golden's command/reply pairs."""
    import json
    lines = (goldens / "257.out").read_text().splitlines()
    start = lines.index("=== API failure tests ===")
    pairs = []
    for i in range(start, len(lines) - 1):
        if lines[i].startswith('{"execute": "blockdev-backup"'):
            pairs.append((json.loads(lines[i])["arguments"], json.loads(lines[i + 1])))
    cases = api_cases()
    assert len(pairs) == len(cases) == 48
    for (args, reply), (case, desc) in zip(pairs, cases, strict=True):
        assert {k: v for k, v in case.items() if v is not None} == {
            k: v for k, v in args.items() if k in ("sync", "bitmap", "bitmap-mode")}
        assert reply == err(desc)


CREATION_CASES: list[tuple[Any, dict[str, Any]]] = [
    # (step, QEMU 7.2.22's reply) — backup_job_create's order, then job_create's
    (backup(sync="full", target="drive0"), err("Source and target cannot be the same")),
    (backup(sync="full", device="nosuch"), err("Cannot find device='nosuch' nor "
                                               "node-name='nosuch'")),
    (backup(sync="full", target="nosuch"), err("Cannot find device='nosuch' nor "
                                               "node-name='nosuch'")),
    (backup(sync="full", **{"x-perf": {"max-workers": 0}}),
     err("max-workers must be between 1 and 2147483647")),
    (backup(sync="full", **{"x-perf": {"max-chunk": -1}}),
     err("max-chunk must be zero (which means no limit) or positive")),
    (backup(sync="full", **{"x-perf": {"max-chunk": 4096}}),
     err("Required max-chunk (4096) is less than backup cluster size (65536)")),
    (backup(sync="full", target="small"), err("Source and target image have different "
                                              "sizes")),
    (backup(sync="full", **{"job-id": "1bad"}), err("Invalid job ID '1bad'")),
    (backup(sync="full", **{"filter-node-name": "drive0"}),
     err("Could not create node: Duplicate nodes with node-name='drive0'")),
    (backup(sync="full", **{"job-id": None}), err("Invalid job ID ''")),
    (backup(sync="full", compress=True, target="null"),
     err("Compression is not supported for this drive ")),
    (backup(sync="full", speed=-1), err("Parameter 'speed' expects a non-negative value")),
]


def creation_steps() -> list[Any]:
    return [*SETUP,
            ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "small",
                                     "file": {"driver": "file", "filename": "@DIR@/small"}}),
            ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "null",
                                     "size": 67108864}),
            *(step for step, _ in CREATION_CASES)]


def test_job_creation_errors(tmp_path: Path) -> None:
    """Errors after the argument checks leave nothing behind: the bitmap has no successor,
    the filter is gone (the same filter name works next time)."""
    images(tmp_path)
    steps = creation_steps()
    out = run_script([*steps, ("cmd", "query-named-block-nodes", None)], tmp_path)
    got = replies(out)[len(steps) - len(CREATION_CASES):-1]
    assert got == [reply for _, reply in CREATION_CASES]
    nodes = replies(out)[-1]["return"]
    assert sorted(n["node-name"] for n in nodes) == sorted(
        ["drive0", "backup_target", "small", "null"] + [n["node-name"] for n in nodes
                                                        if n["node-name"].startswith("#")])
    drive0 = next(n for n in nodes if n["node-name"] == "drive0")
    assert drive0["dirty-bitmaps"] == [{"busy": False, "count": 0, "granularity": 65536,
                                        "name": "bitmap0", "persistent": False,
                                        "recording": True}]


def test_busy_bitmap_and_used_job_id(tmp_path: Path) -> None:
    """A bitmap in use by a running job (sync=none keeps it running) cannot be used again;
    the same job ID cannot be used twice. Events show only the first job."""
    images(tmp_path)
    create_qcow2(tmp_path / "target2", "64M")
    steps = [*SETUP,
             ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "t2",
                                      "file": {"driver": "file",
                                               "filename": "@DIR@/target2"}}),
             backup(sync="bitmap", bitmap="bitmap0", **{"bitmap-mode": "never",
                                                        "auto-finalize": False}),
             ("rest", "api_job"),
             backup(sync="bitmap", bitmap="bitmap0", target="t2",
                    **{"bitmap-mode": "on-success", "job-id": "other",
                       "filter-node-name": None}),
             backup(sync="full", target="t2", **{"filter-node-name": None}),
             ("cmd", "job-cancel", {"id": "api_job"})]
    got = replies(run_script(steps, tmp_path))[len(SETUP) + 1:]
    assert got == [
        {"return": {}},
        err("Bitmap 'bitmap0' is currently in use by another operation and cannot be used"),
        err("Job ID 'api_job' already in use"),
        {"return": {}}]


@requires_qemu
@pytest.mark.parametrize("which", ["api", "creation"])
def test_validation_matches_qemu(tmp_path: Path, which: str) -> None:
    if which == "api":
        steps = [*SETUP, *(backup(**args) for args, _ in api_cases())]
    else:
        steps = creation_steps()
    qemu, emu = run_both(tmp_path, steps, images)
    assert emu == qemu
