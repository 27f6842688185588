"""qemu-img bitmap against the real qemu-img: each action is the QMP bitmap command on the
image's node (opened read-write without its backing chain, on a block layer of its own),
in command-line order; the option checks come first. Output, exit code, the bitmaps the
image then lists, and the bytes of every file must match (#block names aside: QEMU
appends two random digits)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import requires_qemu_img, requires_qemu_io
from tests.emulator.test_img import mine, real

CASES = [
    ["--add", "x", "b1"],
    ["--add", "-g", "64k", "x", "b1"],
    ["--add", "-g", "1000", "x", "b1"],
    ["--add", "-g", "abc", "x", "b1"],
    ["--add", "-g", "99999999999999999999", "x", "b1"],
    ["--remove", "x", "b1"],
    ["--remove", "x", "old"],
    ["--add", "--disable", "x", "b2"],
    ["--clear", "x", "old"],
    ["--enable", "x", "old"],
    ["--disable", "x", "old"],
    ["--merge", "old", "x", "b3"],
    ["--add", "--merge", "old", "x", "b3"],
    ["--add", "--merge", "nosuch", "x", "b3"],
    ["--add", "--merge", "sb", "-b", "src", "x", "b4"],
    ["--add", "--merge", "sb", "-b", "src", "-F", "qcow2", "x", "b4"],
    ["-g", "64k", "--remove", "x", "old"],
    ["-F", "qcow2", "--add", "x", "a"],
    ["-b", "src", "--add", "x", "a"],
    ["x", "b"],
    ["--add", "x"],
    ["--add", "nosuch", "b"],
    ["--add", "-f", "raw", "x", "b"],
    ["--add", "r", "b"],
    ["--add", "x", ""],
    ["--add", "x", "old"],
    ["--add", "--add", "x", "z"],
    ["--add", "--remove", "--add", "x", "z"],
    ["--add", "-f", "qcow2", "v2", "b"],
    ["--add", "--merge", "sb", "-b", "nosuch", "x", "b5"],
    ["--merge", "", "x", "old"],          # an empty source name is a name (differential)
    ["--add", "--merge=", "x", "b6"],
]

_SETUP = (["create", "-q", "-f", "qcow2", "x", "1M"], ["create", "-q", "-f", "qcow2", "src", "1M"],
          ["create", "-q", "-f", "raw", "r", "1M"],
          ["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2", "1M"],
          ["bitmap", "--add", "x", "old"], ["bitmap", "--add", "src", "sb"])


def _outcome(root: Path, result: tuple[int, str, str]) -> tuple[object, ...]:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "x"], cwd=root,
                                     capture_output=True, text=True, check=True).stdout)
    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(root.iterdir())}
    code, out, err = result
    return (code, out, re.sub(r"#block\d+", "#blockN", err),
            info["format-specific"]["data"].get("bitmaps"), files)


@requires_qemu_img
@requires_qemu_io
@pytest.mark.parametrize("argv", CASES, ids=" ".join)
def test_bitmap_like_qemu_img(tmp_path: Path, argv: list[str]) -> None:
    outcomes = []
    for side in ("qemu", "emu"):
        root = tmp_path / side
        root.mkdir()
        for setup in _SETUP:
            subprocess.run(["qemu-img", *setup], cwd=root, check=True)
        for name, command in (("x", "write 0 64k"), ("x", "write 512k 64k"),
                              ("src", "write 128k 64k")):
            subprocess.run(["qemu-io", "-c", command, name], cwd=root, check=True,
                           capture_output=True)
        run = real if side == "qemu" else mine
        outcomes.append(_outcome(root, run(root, "bitmap", *argv)))
    assert outcomes[1] == outcomes[0]


@requires_qemu_img
@pytest.mark.parametrize("iotype", ["write", "flush", "read"])
def test_bitmap_store_failing_at_close_like_qemu_img(tmp_path: Path, iotype: str) -> None:
    """qemu-img bitmap on a json:{...} image over blkdebug whose writes (or flushes, or
    reads) fail: what closing prints (error_report: "qemu-img: Lost persistent bitmaps
    during inactivation of node ...", "qemu-img: Failed to flush the refcount block cache:
    ..."), the exit status and the bytes left are the real qemu-img's."""
    name = "json:" + json.dumps({"driver": "qcow2", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": "x"},
        "inject-error": [{"event": "none", "errno": 5, "iotype": iotype}]}})
    outcomes = []
    for side, run in (("qemu", real), ("emu", mine)):
        root = tmp_path / side
        root.mkdir()
        real(root, "create", "-q", "-f", "qcow2", "x", "1M")
        code, out, err = run(root, "bitmap", "--add", name, "b")
        outcomes.append((code, out, re.sub(r"#block\d+", "#blockN", err),
                         (root / "x").read_bytes()))
    assert outcomes[1] == outcomes[0]
