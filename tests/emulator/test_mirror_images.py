"""What mirror writes: sync modes, target creation, guest writes, checked with qemu-img.

Each script mirrors a few drives (qcow2 over a qcow2 base) in one VM; afterwards QEMU's
``qemu-img compare`` must find every target identical to its source (what the guest saw) and
``qemu-img check`` must find no errors; the transcript must be QEMU's (recorded, and live where
QEMU is installed). Facts they pin down (qmp_drive_mirror, mirror_dirty_init,
mirror_exit_common):

* sync=top with mode=absolute-paths creates the target with the source's backing file as
  backing and copies only what the top image allocates (len is that, not the disk size);
  after the pivot the device has the target over that backing file;
* sync=none creates the target with the source itself as backing and copies only new
  writes; block-job-cancel in READY leaves the device on the source;
* mode=existing zeroes the target first (its old data must go): all of it is marked dirty,
  so len is the whole disk; format=raw creates a raw target; granularity and buf-size change
  the chunking, not the result;
* copy-mode=write-blocking copies guest writes to the target before they complete, so
  query-block-jobs shows them copied at once;
* blockdev-mirror sync=full onto an existing node (discard=unmap) first zeroes the target
  with unmap (initial zeroing, not counted as progress), then copies what is allocated;
* guest writes during a rate-limited mirror are copied too (they mark the job's bitmap
  through the mirror_top filter).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import requires_qemu, requires_qemu_img
from tests.emulator.qemu_runner import (
    Step,
    as_recorded,
    create_qcow2,
    on_both,
    qemu_img,
    qemu_io,
    recorded,
    rerecord,
    run_script,
    without_host_details,
)


def done(job: str) -> Step:
    return ("wait", "JOB_STATUS_CHANGE", {"id": job, "status": "null"})


def drive(name: str) -> dict[str, Any]:
    return {"id": f"d{name}", "file": f"@DIR@/{name}.img", "format": "qcow2",
            "node-name": f"n{name}"}


def setup(d: Path) -> None:
    create_qcow2(d / "base.img", "4M")
    qemu_io(d / "base.img", "write -P 0x11 0 2M")
    for name in "abcefg":
        create_qcow2(d / f"{name}.img", "4M", backing=d / "base.img")
        qemu_io(d / f"{name}.img", "write -P 0x22 1M 1M")
    create_qcow2(d / "ex.img", "4M")
    qemu_io(d / "ex.img", "write -P 0x77 3M 1M")
    create_qcow2(d / "h.img", "4M")
    qemu_io(d / "h.img", "write -P 0x33 0 1M")
    create_qcow2(d / "h-target.img", "4M")
    qemu_io(d / "h-target.img", "write -P 0x99 0 4M")


QBJ: Step = ("cmd", "query-block-jobs", None)

SCRIPTS: dict[str, tuple[list[dict[str, Any]], list[Step]]] = {
    "sync-modes": ([drive(n) for n in "abce"], [
        ("cmd", "drive-mirror", {"device": "da", "target": "@DIR@/a-top.img", "sync": "top"}),
        ("rest", "da"), QBJ, ("cmd", "job-complete", {"id": "da"}), done("da"),
        ("cmd", "drive-mirror", {"device": "db", "target": "@DIR@/b-none.img",
                                 "sync": "none", "speed": 1000000}),
        ("rest", "db"), ("hmp", 'qemu-io db "write -P 0x44 128k 64k"'), ("sleep", 0.2), QBJ,
        ("cmd", "block-job-cancel", {"device": "db"}), done("db"),
        ("cmd", "drive-mirror", {"device": "dc", "target": "@DIR@/ex.img", "sync": "full",
                                 "mode": "existing"}),
        ("rest", "dc"), QBJ, ("cmd", "job-complete", {"id": "dc"}), done("dc"),
        ("cmd", "drive-mirror", {"device": "de", "target": "@DIR@/e.raw", "sync": "full",
                                 "format": "raw", "granularity": 4096, "buf-size": 100000}),
        ("rest", "de"), QBJ, ("cmd", "job-complete", {"id": "de"}), done("de"),
        ("cmd", "query-block", None),
    ]),
    "guest-writes": ([drive(n) for n in "fg"], [
        ("cmd", "drive-mirror", {"device": "df", "target": "@DIR@/f-wb.img", "sync": "full",
                                 "copy-mode": "write-blocking"}),
        ("rest", "df"), ("hmp", 'qemu-io df "write -P 0x55 100k 10k"'), QBJ,
        ("hmp", 'qemu-io df "write -z 2M 64k"'), QBJ,
        ("cmd", "job-complete", {"id": "df"}), done("df"),
        ("cmd", "drive-mirror", {"device": "dg", "target": "@DIR@/g-copy.img", "sync": "full",
                                 "speed": 262144, "buf-size": 65536, "job-id": "g"}),
        ("sleep", 0.05), ("hmp", 'qemu-io dg "write -P 0x66 1536k 64k"'),
        ("hmp", 'qemu-io dg "write -P 0x67 3M 4k"'), QBJ,
        ("cmd", "block-job-set-speed", {"device": "g", "speed": 0}), ("rest", "g"), QBJ,
        ("cmd", "job-complete", {"id": "g"}), done("g"), ("cmd", "query-block", None),
    ]),
    "blockdev-mirror-zeroes-target": ([], [
        ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "src", "file": {
            "driver": "file", "filename": "@DIR@/h.img"}}),
        ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "dst", "discard": "unmap",
                                 "file": {"driver": "file", "filename": "@DIR@/h-target.img"}}),
        ("cmd", "blockdev-mirror", {"job-id": "h", "device": "src", "target": "dst",
                                    "sync": "full", "filter-node-name": "mtop"}),
        ("rest", "h"), QBJ, ("cmd", "query-named-block-nodes", {"flat": True}),
        ("cmd", "job-complete", {"id": "h"}), done("h"),
        ("cmd", "query-named-block-nodes", {"flat": True}),
    ]),
}

# (source, target) pairs that must compare identical afterwards
PAIRS: dict[str, list[tuple[str, str]]] = {
    "sync-modes": [("a.img", "a-top.img"), ("b.img", "b-none.img"), ("c.img", "ex.img"),
                   ("e.img", "e.raw")],
    "guest-writes": [("f.img", "f-wb.img"), ("g.img", "g-copy.img")],
    "blockdev-mirror-zeroes-target": [("h.img", "h-target.img")],
}


def record(name: str, d: Path, *, qemu: bool) -> list[Any]:
    setup(d)
    drives, steps = SCRIPTS[name]
    return run_script(steps, d, qemu=qemu, drives=drives)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_mirror_writes_give_qemus_recorded_transcript(tmp_path: Path, name: str) -> None:
    assert as_recorded(record(name, tmp_path, qemu=False)) == recorded(f"images:{name}")


@requires_qemu_img
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_mirrored_images_compare_identical_and_check_clean(tmp_path: Path,
                                                          name: str) -> None:
    record(name, tmp_path, qemu=False)
    for source, target in PAIRS[name]:
        proc = qemu_img("compare", str(tmp_path / source), str(tmp_path / target))
        assert (proc.returncode, proc.stdout) == (0, "Images are identical.\n"), proc.stderr
        if target.endswith(".img"):
            check = qemu_img("check", str(tmp_path / target))
            assert check.returncode == 0, check.stdout + check.stderr
            assert "No errors were found on the image." in check.stdout


def test_sync_top_and_none_targets_name_their_backing_files(tmp_path: Path) -> None:
    """The headers drive-mirror wrote: top → the source's backing file, none → the source."""
    from emulator import img
    from emulator.sandbox import Sandbox
    record("sync-modes", tmp_path, qemu=False)
    box = Sandbox(tmp_path)
    assert img.info(box, "a-top.img").get("backing-filename") == str(tmp_path / "base.img")
    assert img.info(box, "b-none.img").get("backing-filename") == str(tmp_path / "b.img")
    assert img.info(box, "ex.img").get("backing-filename") is None


@requires_qemu
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_mirror_writes_match_qemu(tmp_path: Path, name: str) -> None:
    qemu, emu = on_both(tmp_path, lambda d, q: record(name, d, qemu=q))
    assert without_host_details(emu) == without_host_details(qemu)


def main() -> None:   # pragma: no cover - regenerates the recording from real QEMU
    rerecord("images", lambda name, d: record(name, d, qemu=True),
             sys.argv[1:] or sorted(SCRIPTS))


if __name__ == "__main__":   # pragma: no cover
    main()


@requires_qemu_img
def test_mirror_copies_land_newest_first(tmp_path: Path) -> None:
    """Mirror's copy operations read through file-posix's thread pool; the pool's completion
    bottom half takes finished requests newest first (its list takes each new request at
    the head), so the operations write — and allocate their target clusters — in the
    reverse of the order they were started: the last extent gets the lowest host offset.
    QEMU 7.2 itself gives this layout in about half the runs of this script (its other
    layout depends on thread timing); the emulator always gives it (in submission order it
    gave neither)."""
    extents = [(0, "64k"), (1 << 20, "64k"), (2 << 20, "128k"), (5 << 20, "64k")]
    create_qcow2(tmp_path / "src", "8M")
    create_qcow2(tmp_path / "tgt", "8M", "-o", "cluster_size=4k")
    for i, (offset, length) in enumerate(extents):
        qemu_io(tmp_path / "src", f"write -P {i + 1} {offset} {length}")

    def qcow2(name: str) -> dict[str, Any]:
        return {"driver": "qcow2", "node-name": name,
                "file": {"driver": "file", "filename": f"@DIR@/{name}"}}

    run_script([("cmd", "blockdev-add", qcow2("src")), ("cmd", "blockdev-add", qcow2("tgt")),
                ("cmd", "blockdev-mirror", {"job-id": "j", "device": "src", "target": "tgt",
                                            "sync": "full"}),
                ("wait", "BLOCK_JOB_READY", {"device": "j"}),
                ("cmd", "job-complete", {"id": "j"}), done("j"),
                ("cmd", "blockdev-del", {"node-name": "tgt"})], tmp_path)
    mapped = subprocess.run(["qemu-img", "map", "--output=json", "tgt"], cwd=tmp_path,
                            capture_output=True, text=True, check=True).stdout
    hosts = [e["offset"] for e in json.loads(mapped) if e["data"]]
    assert len(hosts) == len(extents)
    assert hosts == sorted(hosts, reverse=True)
