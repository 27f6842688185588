"""qcow2 version 2 (compat=0.10) images on a node, against QEMU 7.2: opening (and the
lazy-refcounts option it refuses), what query-named-block-nodes says about them, persistent
bitmaps refused, guest writes, zero writes and discards (no zero flag: clusters are
unallocated, or zeroes written where a backing file shows through), a backup into a
version 2 image, and blockdev-create's version 2 — replies, events and image bytes."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import requires_qemu, requires_qemu_img
from tests.emulator.qemu_runner import create_qcow2, run_both
from tests.emulator.test_img import mine as emulated
from tests.emulator.test_img import real

pytestmark = [requires_qemu, requires_qemu_img]

IMAGES = ("base", "v2", "v2top", "target", "created")


def qcow2(name: str, **more: Any) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": f"@DIR@/{name}"}, **more}


def hmp(line: str) -> tuple[str, str, dict[str, str]]:
    return ("cmd", "human-monitor-command", {"command-line": line})


def test_version_2_images_like_qemu(tmp_path: Path) -> None:
    def setup(d: Path) -> None:
        create_qcow2(d / "base", "1M")
        subprocess.run(["qemu-io", "-c", "write -P 0x11 0 256k", "base"], cwd=d, check=True,
                       capture_output=True)
        create_qcow2(d / "v2", "1M", "-o", "compat=0.10")
        create_qcow2(d / "v2top", "1M", "-o", "compat=0.10", backing=Path("base"))
        create_qcow2(d / "target", "1M", "-o", "compat=0.10,cluster_size=4k")
        (d / "created").write_bytes(b"")

    steps: list[tuple[Any, ...]] = [
        ("cmd", "blockdev-add", qcow2("v2", **{"lazy-refcounts": True})),
        ("cmd", "blockdev-add", qcow2("v2", **{"discard": "unmap"})),
        ("cmd", "blockdev-add", qcow2("v2top", **{"discard": "unmap"})),
        ("cmd", "query-named-block-nodes", {"flat": True}),
        ("cmd", "block-dirty-bitmap-add", {"node": "v2", "name": "p", "persistent": True}),
        ("cmd", "block-dirty-bitmap-add", {"node": "v2", "name": "b"}),
        hmp('qemu-io v2 "write -P 0x22 0 192k"'),
        hmp('qemu-io v2 "write -z 64k 64k"'),
        hmp('qemu-io v2 "write -z 130k 2k"'),
        hmp('qemu-io v2 "write -z -u 128k 64k"'),
        hmp('qemu-io v2 "discard 0 64k"'),
        hmp('qemu-io v2top "write -P 0x33 64k 64k"'),
        hmp('qemu-io v2top "write -z 0 64k"'),
        hmp('qemu-io v2top "write -z 64k 64k"'),
        hmp('qemu-io v2top "discard 128k 64k"'),
        ("cmd", "blockdev-add", qcow2("target")),
        ("cmd", "blockdev-backup", {"job-id": "j", "device": "v2top", "target": "target",
                                    "sync": "full", "x-perf": {"max-workers": 1}}),
        ("rest", "j"),
        ("cmd", "blockdev-add", {"driver": "file", "node-name": "cf",
                                 "filename": "@DIR@/created"}),
        ("cmd", "blockdev-create", {"job-id": "c", "options": {
            "driver": "qcow2", "file": "cf", "size": 1 << 20, "version": "v2",
            "backing-file": "base", "backing-fmt": "qcow2"}}),
        ("rest", "c"),
        ("cmd", "query-jobs", {}),
        *(("cmd", "blockdev-del", {"node-name": name}) for name in ("target", "v2top", "v2")),
    ]
    real, mine = run_both(tmp_path, steps, setup)
    assert mine == real
    for name in IMAGES:
        ours = (tmp_path / "emu" / name).read_bytes()
        assert ours == (tmp_path / "qemu" / name).read_bytes(), name
    check = subprocess.run(["qemu-img", "check", "v2top"], cwd=tmp_path / "emu",
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_qemu_img_verbs_on_version_2_images(tmp_path: Path) -> None:
    """info, check and map of a version 2 image: QEMU's text."""
    for side in ("qemu", "emu"):
        d = tmp_path / side
        d.mkdir()
        create_qcow2(d / "v2", "1M", "-o", "compat=0.10")
        subprocess.run(["qemu-io", "-c", "write -P 0x22 0 100k", "v2"], cwd=d, check=True,
                       capture_output=True)
    for verb in (("info", "--output=json", "v2"), ("check", "v2"),
                 ("map", "--output=json", "v2")):
        assert emulated(tmp_path / "emu", *verb) == real(tmp_path / "qemu", *verb), verb
