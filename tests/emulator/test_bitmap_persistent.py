"""Persistent dirty bitmaps in qcow2 images, checked with the real qemu-img and compared
with real QEMU doing the same: stored on blockdev-del (qcow2_inactivate), loaded on
blockdev-add (AUTO -> recording, IN_USE marked in the image while the node is writable),
removed from the image by block-dirty-bitmap-remove, inconsistent when found IN_USE."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import requires_qemu, requires_qemu_img, requires_qemu_io
from tests.emulator.qemu_runner import c, compare_replies, create_qcow2, io, qemu_img, run_commands

pytestmark = [requires_qemu, requires_qemu_img]


QCOW2 = {"driver": "qcow2", "node-name": "d",
         "file": {"driver": "file", "filename": "@DIR@/img.qcow2"}}


def stored(path: Path) -> list[dict]:
    info = json.loads(qemu_img("info", "-U", "--output=json", path).stdout)
    return info["format-specific"]["data"].get("bitmaps", [])


def test_store_on_del_and_load_on_add(tmp_path: Path) -> None:
    cmds = [
        c("blockdev-add", **QCOW2),
        c("block-dirty-bitmap-add", node="d", name="on", persistent=True),
        c("block-dirty-bitmap-add", node="d", name="off", persistent=True, disabled=True,
          granularity=4096),
        c("block-dirty-bitmap-add", node="d", name="mem"),
        c("block-dirty-bitmap-add", node="d", name="gone", persistent=True),
        io("d", "write 0 64k"), io("d", "write 5M 4k"),
        c("block-dirty-bitmap-enable", node="d", name="off"),
        io("d", "write 6M 4k"),
        c("block-dirty-bitmap-disable", node="d", name="off"),
        c("block-dirty-bitmap-remove", node="d", name="gone"),
        c("blockdev-del", **{"node-name": "d"}),
        c("blockdev-add", **QCOW2),
        c("query-named-block-nodes", flat=True),
        c("x-debug-block-dirty-bitmap-sha256", node="d", name="on"),
        c("x-debug-block-dirty-bitmap-sha256", node="d", name="off"),
        io("d", "write 8M 4k"),
        c("block-dirty-bitmap-remove", node="d", name="off"),
        c("blockdev-del", **{"node-name": "d"}),
        c("blockdev-add", **{**QCOW2, "read-only": True}),
        c("query-named-block-nodes", flat=True),
        c("block-dirty-bitmap-clear", node="d", name="on"),
        c("block-dirty-bitmap-remove", node="d", name="on"),
        c("block-dirty-bitmap-add", node="d", name="on", persistent=True),
        c("block-dirty-bitmap-disable", node="d", name="on"),
    ]
    compare_replies(tmp_path, cmds, setup=lambda d: create_qcow2(d / "img.qcow2", "64M"))
    for kind in ("qemu", "emu"):
        assert qemu_img("check", tmp_path / kind / "img.qcow2").returncode == 0
    assert stored(tmp_path / "emu" / "img.qcow2") == stored(tmp_path / "qemu" / "img.qcow2")
    assert stored(tmp_path / "emu" / "img.qcow2") == [
        {"flags": ["auto"], "name": "on", "granularity": 65536}]


def test_in_use_while_open_and_inconsistent_after_crash(tmp_path: Path) -> None:
    """While a writable node has the image open its bitmaps are IN_USE on disk; an image
    left that way (QEMU killed) loads them as inconsistent: only remove works."""
    img = tmp_path / "img.qcow2"
    create_qcow2(img, "1M")
    run_commands(tmp_path, [
        c("blockdev-add", **{**QCOW2, "file": {"driver": "file", "filename": str(img)}}),
        c("block-dirty-bitmap-add", node="d", name="b", persistent=True),
    ])
    assert stored(img) == [{"flags": ["auto"], "name": "b", "granularity": 65536}]

    def crash_copy(d: Path) -> None:
        (d / "img.qcow2").write_bytes(img.read_bytes())

    open_cmds = [c("blockdev-add", **QCOW2), c("query-named-block-nodes", flat=True)]
    (tmp_path / "a").mkdir()
    compare_replies(tmp_path / "a", open_cmds, setup=crash_copy)
    # leave an IN_USE flag behind: mark it as a running QEMU would, then copy the bytes
    from emulator.block.layer import BlockLayer
    layer = BlockLayer()
    layer.blockdev_add({"driver": "qcow2", "node-name": "d",
                        "file": {"driver": "file", "filename": str(img)}})
    assert stored(img) == [{"flags": ["in-use", "auto"], "name": "b", "granularity": 65536}]
    dirty = img.read_bytes()
    layer.close_all()
    assert stored(img) == [{"flags": ["auto"], "name": "b", "granularity": 65536}]

    def dirty_copy(d: Path) -> None:
        (d / "img.qcow2").write_bytes(dirty)

    cmds = [c("blockdev-add", **QCOW2), c("query-named-block-nodes", flat=True),
            c("block-dirty-bitmap-clear", node="d", name="b"),
            c("block-dirty-bitmap-enable", node="d", name="b"),
            c("x-debug-block-dirty-bitmap-sha256", node="d", name="b"),
            c("block-dirty-bitmap-add", node="d", name="b2"),
            c("block-dirty-bitmap-merge", node="d", target="b2", bitmaps=["b"]),
            c("block-dirty-bitmap-remove", node="d", name="b"),
            c("query-named-block-nodes", flat=True)]
    (tmp_path / "b").mkdir()
    compare_replies(tmp_path / "b", cmds, setup=dirty_copy)


def test_stale_extension_and_unknown_autoclear_bits_dropped_at_read_write_open(
        tmp_path: Path) -> None:
    """A bitmaps extension whose autoclear bit a program without bitmap support cleared is
    ignored (no bitmap is loaded) and, like unknown autoclear bits, dropped from the header
    as soon as a node opens the image read-write (qcow2_do_open's update_header)."""
    import struct

    def setup(d: Path) -> None:
        create_qcow2(d / "img.qcow2", "4M")
        qemu_img("bitmap", "--add", d / "img.qcow2", "b")
        with open(d / "img.qcow2", "r+b") as f:   # autoclear: bitmaps bit off, bit 40 on
            f.seek(88)
            f.write(struct.pack(">Q", 1 << 40))
    cmds = [c("blockdev-add", **QCOW2), c("query-named-block-nodes", flat=True),
            c("blockdev-del", **{"node-name": "d"})]
    compare_replies(tmp_path, cmds, setup=setup)
    assert (tmp_path / "emu" / "img.qcow2").read_bytes() == \
        (tmp_path / "qemu" / "img.qcow2").read_bytes()


@requires_qemu_io
def test_tools_warn_of_a_stale_extension_as_qemu_img_does(tmp_path: Path) -> None:
    """qemu-img and qemu-io print qcow2_read_extensions' warning (the tool's name, then
    "Some clusters may be leaked, ..." with no newline) and leave the same bytes; check -r
    frees the stale bitmaps' clusters."""
    import io as textio
    import shutil
    import struct
    import subprocess

    from emulator import img, qemu_io
    from emulator.sandbox import Sandbox
    create_qcow2(tmp_path / "stale", "4M")
    qemu_img("bitmap", "--add", tmp_path / "stale", "b")
    with open(tmp_path / "stale", "r+b") as f:   # the bitmaps autoclear bit off
        f.seek(88)
        f.write(struct.pack(">Q", 0))
    for run in ("info --output=json", "check", "map --output=json", "check -r all"):
        for name in ("real", "mine"):
            shutil.copy(tmp_path / "stale", tmp_path / name)
        real = subprocess.run(["qemu-img", *run.split(), "real"], cwd=tmp_path,
                              capture_output=True, text=True)
        out, err = textio.StringIO(), textio.StringIO()
        status = img.main([*run.split(), "mine"], sandbox=Sandbox(tmp_path), stdout=out,
                          stderr=err)
        assert (status, err.getvalue().replace("mine", "real")) == \
            (real.returncode, real.stderr), run
        assert "lacking bitmap support" in real.stderr
        assert (tmp_path / "mine").read_bytes() == (tmp_path / "real").read_bytes(), run
    for name in ("real", "mine"):
        shutil.copy(tmp_path / "stale", tmp_path / name)
    real = subprocess.run(["qemu-io", "-c", "write 0 512", "real"], cwd=tmp_path,
                          capture_output=True, text=True)
    status, printed = qemu_io.offline(Sandbox(tmp_path), "mine", None, ["write 0 512"])
    assert printed.startswith(real.stderr) and status == real.returncode
    assert (tmp_path / "mine").read_bytes() == (tmp_path / "real").read_bytes()
