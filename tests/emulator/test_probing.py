"""Format probing (find_image_format, bs->probed) against QEMU 7.2: a backing file whose
header names no format is probed (a qcow2 backing file is qcow2, not raw), a drive without a
format too, and a raw image found by probing is guarded — a write whose first sector would
probe as another format is refused with EPERM (raw_co_pwritev), and writable opens warn on
stderr (qemu-io and qemu-img print it)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from emulator import qemu_io
from emulator.qcow2 import FileIO, Qcow2Image
from emulator.sandbox import Sandbox
from tests.conftest import requires_qemu, requires_qemu_img
from tests.emulator.qemu_runner import create_qcow2, run_both


def _set_backing_without_format(path: Path, backing: str) -> None:
    """A header QEMU 7.2's qemu-img no longer writes (it insists on a backing format)."""
    io = FileIO(path)
    image = Qcow2Image.open(io)
    image.set_backing(backing, None)
    image.close()
    io.close()


@requires_qemu
@requires_qemu_img
def test_backing_files_and_drives_without_a_format_are_probed(tmp_path: Path) -> None:
    def setup(d: Path) -> None:
        create_qcow2(d / "base", "1M")
        subprocess.run(["qemu-io", "-c", "write -P 0x11 0 64k", "base"], cwd=d, check=True,
                       capture_output=True)
        create_qcow2(d / "top", "1M")
        _set_backing_without_format(d / "top", "base")
        (d / "raw").write_bytes(b"\x22" * 65536)
        create_qcow2(d / "top2", "1M")
        _set_backing_without_format(d / "top2", "raw")
        size = (d / "base").stat().st_size
        (d / "target").write_bytes(bytes(-(-size // 512) * 512))   # the source's length

    def qcow2(name: str) -> dict[str, Any]:
        return {"driver": "qcow2", "node-name": name,
                "file": {"driver": "file", "filename": f"@DIR@/{name}"}}

    steps: list[tuple[Any, ...]] = [
        ("cmd", "blockdev-add", qcow2("top")),
        ("cmd", "blockdev-add", qcow2("top2")),
        ("cmd", "query-named-block-nodes", {"flat": True}),
        ("cmd", "query-block", {}),
        ("cmd", "query-jobs", {}),
        # a backup of the qcow2 file itself (as raw) onto the probed raw drive: its first
        # sector is a qcow2 header, which the probed target refuses
        ("cmd", "blockdev-add", {"driver": "raw", "node-name": "asraw",
                                 "file": {"driver": "file", "filename": "@DIR@/base",
                                          "locking": "off"}, "read-only": True}),
        ("cmd", "blockdev-backup", {"job-id": "j", "device": "asraw", "target": "drive0",
                                    "sync": "full", "x-perf": {"max-workers": 1}}),
        ("rest", "j"),
        ("cmd", "query-jobs", {}),
    ]
    real, mine = run_both(tmp_path, steps, setup,
                          drives=[{"id": "drive0", "file": "@DIR@/target", "if": "none"}])
    # QEMU's first copy can fail while blockdev-backup's drained section ends (its poll
    # runs the job's I/O), so the error event may come before the reply: order aside
    error = ("event", "BLOCK_JOB_ERROR", {"device": "j", "operation": "write",
                                          "action": "report"})
    assert error in real and error in mine
    assert [r for r in mine if r != error] == [r for r in real if r != error]
    done = [r[2] for r in real if r[1] == "BLOCK_JOB_COMPLETED"]
    assert done and done[0]["error"] == "Operation not permitted"
    formats = [n["drv"] for n in
               next(r[2]["return"] for r in real if r[1] == "query-named-block-nodes")]
    assert formats.count("qcow2") == 3   # top, top2 and the probed base


@requires_qemu_img
def test_offline_qemu_io_warns_about_a_probed_raw_image(tmp_path: Path) -> None:
    for side in ("real", "mine"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "r").write_bytes(bytes(4096))
    commands = ["write -P 0x33 100 10", "read -P 0x33 100 10", "read -P 0 0 100"]
    real = subprocess.run(["qemu-io", *(a for c in commands for a in ("-c", c)), "r"],
                          cwd=tmp_path / "real", capture_output=True, text=True)
    status, mine = qemu_io.offline(Sandbox(tmp_path / "mine"), "r", None, commands)
    assert (status, qemu_io.filter_timing(mine)) == \
        (real.returncode, qemu_io.filter_timing(real.stderr + real.stdout))
    assert (tmp_path / "mine" / "r").read_bytes() == (tmp_path / "real" / "r").read_bytes()
