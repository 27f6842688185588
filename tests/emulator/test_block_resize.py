"""block_resize against QEMU 7.2: the command's checks and errors, qcow2's truncate both ways
(a grown L1 table, a shrink that fully discards the clusters past the end, frees L2 tables
and refcount blocks and cuts the file's tail), the zeroes written when a backing file would
show through, raw and file nodes, dirty bitmaps, and the bytes of every image afterwards."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import requires_qemu
from tests.emulator.qemu_runner import qemu_img, run_both, without_host_details

pytestmark = requires_qemu


def _resize(node: str, size: int, **more: Any) -> tuple[Any, ...]:
    return ("cmd", "block_resize", {"node-name": node, "size": size, **more})


def _setup(d: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", d / "a", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", d / "small", "1M")
    qemu_img("create", "-q", "-f", "qcow2", d / "base", "4M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base", "-F", "qcow2", d / "top", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base", "-F",
             "qcow2", d / "top2", "1M")
    for name, cmds in (("a", "write -P 1 0 1M"), ("small", "write -P 2 0 1M"),
                       ("base", "write -P 3 0 4M"), ("top", "write -P 4 64k 100k")):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmds, str(d / name)], check=True,
                       capture_output=True)
    (d / "r").write_bytes(b"\1" * 3000)


def _qcow2(name: str, **more: Any) -> tuple[Any, ...]:
    return ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": name, "file": {
        "driver": "file", "node-name": f"{name}-file", "filename": f"@DIR@/{name}"}, **more})


def test_block_resize_like_qemu(tmp_path: Path) -> None:
    digests: dict[Path, list[str]] = {}

    def digest(d: Path) -> None:
        for name in ("a", "small", "base", "top", "top2", "r"):
            digests.setdefault(d, []).append(
                hashlib.sha256((d / name).read_bytes()).hexdigest())

    steps: list[tuple[Any, ...]] = [
        _qcow2("a"), _qcow2("small"), _qcow2("top"), _qcow2("top2"),
        ("cmd", "blockdev-add", {"driver": "raw", "node-name": "r", "file": {
            "driver": "file", "node-name": "r-file", "filename": "@DIR@/r"}}),
        ("cmd", "block-dirty-bitmap-add", {"node": "a", "name": "b0"}),
        ("cmd", "block-dirty-bitmap-add", {"node": "a", "name": "b1", "granularity": 512}),
        # checks and errors
        ("cmd", "block_resize", {"size": 1 << 20}),
        ("cmd", "block_resize", {"device": "nosuch", "size": 1 << 20}),
        _resize("a", -1), _resize("a", 1000), _resize("a", 1 << 63 - 1),
        _resize("a-file", 1 << 20), ("cmd", "block_resize", {"device": "a", "size": 512}),
        # qcow2: grow past one L2 table's reach, shrink, shrink within a cluster, grow again
        _resize("a", 600 << 20), ("cmd", "query-named-block-nodes", {}),
        ("cmd", "block-dirty-bitmap-add", {"node": "a", "name": "b2"}),
        ("hmp", "qemu-io a \"write -P 5 599M 64k\""),
        _resize("a", 300 << 10), ("cmd", "query-named-block-nodes", {}),
        _resize("a", (300 << 10) - 512),
        _resize("a", 2 << 20), ("cmd", "x-debug-block-dirty-bitmap-sha256",
                                {"node": "a", "name": "b2"}),
        # small clusters: many L2 tables and refcount blocks freed
        _resize("small", 40 << 20), ("hmp", "qemu-io small \"write -P 6 39M 1M\""),
        _resize("small", 100 << 10), _resize("small", 5 << 20),
        # a backing file longer than the overlay: the new area reads as zeroes
        _resize("top", (2 << 20) + 1536), _resize("top2", 3 << 20),
        ("hmp", "qemu-io top \"read -P 0 1M 1M\""),
        ("hmp", "qemu-io top2 \"read -P 0 1M 1M\""),
        # a job's target is blocked for resizes ("Device '(null)'": no device given); its
        # source is not, but the copy-before-write filter above it does not share resize
        ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "nul", "size": 2 << 20}),
        ("cmd", "blockdev-backup", {"job-id": "j", "device": "a", "target": "nul",
                                    "sync": "full", "auto-finalize": False}), ("rest", "j"),
        _resize("a", 4 << 20), _resize("nul", 4 << 20),
        ("cmd", "job-finalize", {"id": "j"}), ("rest", "j"),
        # raw over a file, and a file node of its own
        _resize("r", 10000), _resize("r", 100), _resize("r-file", 4097), _resize("nul", 1 << 20),
        ("cmd", "query-named-block-nodes", {}),
    ]
    for node in ("a", "small", "top", "top2", "r"):
        steps.append(("cmd", "blockdev-del", {"node-name": node}))
    steps.append(("img", digest))
    qemu, emu = run_both(tmp_path, steps, _setup)
    # the bytes are QEMU's, the host's allocation of them may not be (actual-size)
    assert without_host_details(emu) == without_host_details(qemu)
    assert digests[tmp_path / "emu"] == digests[tmp_path / "qemu"]
    for d in ("qemu", "emu"):
        for name in ("a", "small", "top", "top2"):
            check = qemu_img("check", tmp_path / d / name)
            assert check.returncode == 0, check.stdout + check.stderr


def test_block_resize_failures_through_blkdebug_like_qemu(tmp_path: Path) -> None:
    """An I/O error in a qcow2 truncate is reported with the step's text ("Failed to grow
    the L1 table: ...", "Failed to update the image size: ..."); the node keeps its size and
    its cache options; a filter under qcow2 cannot be resized (qcow2 does not share it)."""
    def setup(d: Path) -> None:
        qemu_img("create", "-q", "-f", "qcow2", d / "e", "1M")

    steps: list[tuple[Any, ...]] = [
        ("cmd", "blockdev-add", {
            "driver": "qcow2", "node-name": "e", "l2-cache-size": 131072,
            "file": {"driver": "blkdebug", "node-name": "dbg",
                     "inject-error": [{"event": "l1_grow_write_table", "errno": 28}],
                     "image": {"driver": "file", "filename": "@DIR@/e"}}}),
        _resize("e", 1 << 30), _resize("e", 1 << 20), _resize("e", 3 << 20),
        _resize("dbg", 5 << 20),
        ("hmp", "qemu-io e \"write 0 64k\""), ("cmd", "query-named-block-nodes", {}),
    ]
    qemu, emu = run_both(tmp_path, steps, setup)
    assert without_host_details(emu) == without_host_details(qemu)
    errors = [r[2]["error"]["desc"] for r in qemu if r[1] == "block_resize" and "error" in r[2]]
    assert errors[0] == "Failed to grow the L1 table: No space left on device"
