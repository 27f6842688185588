"""HMP qemu-io over QMP against real QEMU: lookups (BlockBackend name, then node name
through a temporary BlockBackend), HMP argument errors, and the "" reply whatever qemu-io
prints (its output goes to QEMU's stdout) but what it prints with qemu_printf (info)."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import pytest

from emulator.qcow2.blockio import punch_hole
from tests.conftest import requires_qemu, requires_qemu_img
from tests.emulator.qemu_runner import compare_replies, create_qcow2, run_both, run_commands

pytestmark = [requires_qemu, requires_qemu_img]


def hmp(line: str) -> tuple[str, dict[str, Any]]:
    return ("human-monitor-command", {"command-line": line})


def test_qemu_io_replies_match_qemu(tmp_path: Path) -> None:
    drives = [{"if": "none", "id": "drive0", "file": "@DIR@/img", "format": "qcow2",
               "node-name": "fmt"}]
    cmds = [
        ("blockdev-add", {"driver": "null-co", "node-name": "n"}),
        ("blockdev-add", {"driver": "null-co", "node-name": "ro", "read-only": True}),
        ("block-dirty-bitmap-add", {"node": "n", "name": "b"}),
        hmp('qemu-io n "write 0 512"'),
        hmp('qemu-io n "writ 0 512"'),
        hmp('qemu-io n "write 0"'),
        hmp("qemu-io n write"),
        hmp("qemu-io n"),
        hmp("qemu-io"),
        hmp('qemu-io -d n "write 0 512"'),
        hmp('qemu-io -x n "write 0 512"'),
        hmp('qemu-io nosuch "write 0 512"'),
        hmp('qemu-io n "write 0 512'),
        hmp('qemu-io n "write 0 512" extra'),
        hmp('qemu-io ro "write 0 512"'),
        hmp('qemu-io ro "read 0 512"'),
        hmp('qemu-io drive0 "write -P 0x11 64k 64k"'),
        hmp('qemu-io fmt "write 1M 4k"'),
        hmp('qemu-io drive0 "read -P 0x11 64k 64k"'),
        hmp('qemu-io drive0 "flush"'),
        ("query-named-block-nodes", {"flat": True}),
        ("query-block", None),
    ]
    compare_replies(tmp_path, cmds, drives=drives, setup=lambda d: create_qcow2(d / "img", "4M"))


def test_qemu_io_output_is_logged_not_replied(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="emulator.qemu_io"):
        replies = run_commands(tmp_path, [
            ("blockdev-add", {"driver": "null-co", "node-name": "n", "read-only": True}),
            hmp('qemu-io n "write 0 512"'), hmp('qemu-io n "read 0 512"')])
    assert replies[1:] == [{"return": "Block node is read-only\r\n"}, {"return": ""}]
    assert "read 512/512 bytes at offset 0" in caplog.text


def test_discard_punches_the_file_like_qemu(tmp_path: Path) -> None:
    """discard=unmap: a raw node's discards reach the file, which punches the range out
    (file-posix's fallocate, to the byte), so it reads as zeroes; a qcow2 node passes the
    clusters a guest discard frees to its file the same way (pass-discard-request)."""
    def setup(d: Path) -> None:
        (d / "raw").write_bytes(bytes(256 << 10))
        create_qcow2(d / "qcow2", "4M")

    steps = [
        ("cmd", "blockdev-add", {"driver": "raw", "node-name": "r", "discard": "unmap",
                                 "file": {"driver": "file", "filename": "@DIR@/raw"}}),
        ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "q", "discard": "unmap",
                                 "file": {"driver": "file", "filename": "@DIR@/qcow2"}}),
        ("hmp", 'qemu-io r "write -P 0x11 0 128k"'),
        ("hmp", 'qemu-io r "discard 4k 64k"'),
        ("hmp", 'qemu-io r "discard 100000 1"'),
        ("hmp", 'qemu-io q "write -P 0x22 0 1M"'),
        ("hmp", 'qemu-io q "discard 64k 256k"'),
        ("hmp", 'qemu-io q "write -z -u 512k 128k"'),
        ("cmd", "blockdev-del", {"node-name": "r"}),
        ("cmd", "blockdev-del", {"node-name": "q"}),
    ]
    real, mine = run_both(tmp_path, steps, setup)
    assert mine == real
    for name in ("raw", "qcow2"):
        data = (tmp_path / "emu" / name).read_bytes()
        assert data == (tmp_path / "qemu" / name).read_bytes(), name
    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * 8192)
    with probe.open("r+b") as f:
        if not punch_hole(f.fileno(), 0, 4096):
            return   # a file system without hole punching: QEMU keeps the data too
    raw = (tmp_path / "emu" / "raw").read_bytes()
    assert raw[4096:69632] == bytes(65536) and raw[100000] == 0 and raw[100001] == 0x11


def test_qemu_io_info_replies_its_format_specific_part(tmp_path: Path) -> None:
    """info prints names and sizes with printf (QEMU's stdout) and the format-specific dump
    with qemu_printf, which reaches the monitor: stored bitmaps as an indented list, keys in
    QDict order, dashes as spaces."""
    def setup(d: Path) -> None:
        create_qcow2(d / "img", "4M", "-o", "lazy_refcounts=on,refcount_bits=8")
        for name, more in (("b1", []), ("b2", ["-g", "128k", "--disable"])):
            subprocess.run(["qemu-img", "bitmap", "--add", *more, d / "img", name],
                           check=True)

    drives = [{"if": "none", "id": "drive0", "file": "@DIR@/img", "format": "qcow2",
               "node-name": "fmt"}]
    cmds = [hmp('qemu-io drive0 "info"'), hmp('qemu-io fmt "i"'),
            hmp('qemu-io drive0 "info 1"'),
            ("blockdev-add", {"driver": "null-co", "node-name": "n"}), hmp('qemu-io n "info"'),
            ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "fmt"}),
            hmp('qemu-io r "info"')]
    compare_replies(tmp_path, cmds, drives=drives, setup=setup)


@pytest.mark.parametrize("version", ["1.1", "0.10"])
def test_partial_zero_writes_keep_the_backing_data(tmp_path: Path, version: str) -> None:
    """qcow2_co_pwrite_zeroes on an overlay: a partial cluster becomes a zero cluster only
    if the rest of it reads as zero by block status of the whole chain (is_zero), else
    zeroes are written and the backing data around them stays. A backing cluster written
    with zeroes is data, not zero; past the end of a short backing file is zero. (The
    emulator once checked the overlay alone and zeroed the backing file's data away.)"""
    def setup(d: Path) -> None:
        for argv in (["create", "-f", "qcow2", "base", "512k"],
                     ["create", "-f", "qcow2", "-o", f"compat={version}", "-b", "base",
                      "-F", "qcow2", "top", "1M"]):
            subprocess.run(["qemu-img", *argv], cwd=d, check=True, capture_output=True)
        subprocess.run(["qemu-io", "-c", "write -P 0x11 0 128k", "-c", "write -P 0 256k 64k",
                        "base"], cwd=d, check=True, capture_output=True)

    writes = ["write -z 0 4k", "write -z 68k 4k", "write -z 130k 2k", "write -z 256k 4k",
              "write -z 448k 128k", "write -z 700k 1k", "write -z 768k 64k",
              "discard 192k 64k", "write -z 200k 8k"]
    steps: list[tuple[Any, ...]] = [
        ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "top", "discard": "unmap",
                                 "file": {"driver": "file", "filename": "@DIR@/top"}}),
        *(("hmp", f'qemu-io top "{w}"') for w in writes),
        ("cmd", "blockdev-del", {"node-name": "top"}),
    ]
    real, mine = run_both(tmp_path, steps, setup)
    assert mine == real
    assert (tmp_path / "emu" / "top").read_bytes() == (tmp_path / "qemu" / "top").read_bytes()
    check = subprocess.run(["qemu-io", "-c", "read -P 0x11 4k 60k", "top"],
                           cwd=tmp_path / "emu", capture_output=True, text=True)
    assert "failed" not in check.stdout, check.stdout


@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
def test_writethrough_drives_flush_each_write_like_qemu(tmp_path: Path, cache: str) -> None:
    """A write to a drive without a write cache carries FUA; qcow2 and file-posix lack it, so
    the block layer flushes the node after the write (bdrv_driver_pwritev's emulate_fua): the
    image's L2 tables and refcounts are on disk at once. With writeback they wait in qcow2's
    caches. The file is read while the VM still runs."""
    seen: dict[str, bytes] = {}

    def snapshot(d: Path) -> None:
        seen[d.name] = (d / "img").read_bytes()

    steps: list[tuple[Any, ...]] = [("hmp", 'qemu-io drive0 "write -P 0x11 0 64k"'),
                                    ("hmp", 'qemu-io drive0 "write -z 1M 128k"'),
                                    ("img", snapshot)]
    real, mine = run_both(tmp_path, steps, lambda d: create_qcow2(d / "img", "4M"),
                          drives=[{"id": "drive0", "file": "@DIR@/img", "format": "qcow2",
                                   "if": "none", "cache": cache}])
    assert mine == real
    assert seen["emu"] == seen["qemu"]
    assert (seen["emu"] == (tmp_path / "emu" / "img").read_bytes()) == (cache == "writethrough")


@pytest.mark.parametrize("discard", [None, "ignore", "unmap"])
def test_discard_does_nothing_on_a_node_without_unmap(tmp_path: Path,
                                                      discard: str | None) -> None:
    """bdrv_co_pdiscard returns before anything when the node lacks BDRV_O_UNMAP (blockdev-add
    defaults to discard=ignore, children opened with it to unmap): no cluster freed, and no
    dirty bitmap marked — for a format node and a filter alike."""
    def setup(d: Path) -> None:
        create_qcow2(d / "img", "4M")
        subprocess.run(["qemu-io", "-c", "write -P 0x11 0 1M", "img"], cwd=d, check=True,
                       capture_output=True)

    extra = {"discard": discard} if discard else {}
    node = {"driver": "blkdebug", "node-name": "top", **extra,
            "image": {"driver": "qcow2", "node-name": "d", **extra,
                      "file": {"driver": "file", "filename": "@DIR@/img"}}}
    steps = [("cmd", "blockdev-add", node),
             ("cmd", "block-dirty-bitmap-add", {"node": "d", "name": "a"}),
             ("hmp", 'qemu-io top "discard 0 128k"'),
             ("hmp", 'qemu-io d "discard 256k 64k"'),
             ("hmp", 'qemu-io d "discard 300k 1k"'),
             ("cmd", "x-debug-block-dirty-bitmap-sha256", {"node": "d", "name": "a"}),
             ("cmd", "blockdev-del", {"node-name": "top"})]   # (no node query: actual-size
    # is the host's allocation, which punched holes make file-system dependent)
    real, mine = run_both(tmp_path, steps, setup)
    assert mine == real
    assert (tmp_path / "emu" / "img").read_bytes() == (tmp_path / "qemu" / "img").read_bytes()


@pytest.mark.parametrize("image_lazy,option", [(True, None), (False, True), (True, False)])
def test_lazy_refcounts_mark_the_image_dirty_while_in_use(tmp_path: Path, image_lazy: bool,
                                                         option: bool | None) -> None:
    """With lazy refcounts (the image's feature, or the node's lazy-refcounts option) the
    first cluster allocation sets the dirty bit in the header (query-named-block-nodes shows
    "dirty-flag": true), flushes leave the refcount blocks out, and closing writes them back
    and clears the bit: the file is QEMU's at every step."""
    seen: dict[str, list[bytes]] = {"qemu": [], "emu": []}

    def snapshot(d: Path) -> None:
        seen[d.name].append((d / "img").read_bytes())

    def setup(d: Path) -> None:
        create_qcow2(d / "img", "4M", *(["-o", "lazy_refcounts=on"] if image_lazy else []))

    node: dict[str, Any] = {"driver": "qcow2", "node-name": "q",
                            "file": {"driver": "file", "filename": "@DIR@/img"}}
    if option is not None:
        node["lazy-refcounts"] = option
    steps: list[tuple[Any, ...]] = [
        ("cmd", "blockdev-add", node),
        ("hmp", 'qemu-io q "write -P 0x11 0 64k"'), ("img", snapshot),
        ("hmp", 'qemu-io q "flush"'), ("img", snapshot),
        ("cmd", "query-named-block-nodes", {"flat": True}),
        ("cmd", "blockdev-del", {"node-name": "q"}), ("img", snapshot)]
    real, mine = run_both(tmp_path, steps, setup)
    assert mine == real
    assert seen["emu"] == seen["qemu"]
    dirty = next(r[2]["return"][0]["image"]["dirty-flag"] for r in real
                 if r[1] == "query-named-block-nodes")
    assert dirty == bool(option if option is not None else image_lazy)


@pytest.mark.parametrize("discard", [None, "unmap"])
def test_a_backends_unmapping_zero_write_unmaps_whatever_the_nodes_discard(
        tmp_path: Path, discard: str | None) -> None:
    """blk_co_pwrite_zeroes sends BDRV_REQ_MAY_UNMAP straight to the request layer; only
    bdrv_co_pwrite_zeroes (a node's parent) drops it on a node without discard=unmap. So
    qemu-io's "write -z -u" frees the cluster either way (found by the differential test)."""
    node: dict[str, Any] = {"driver": "qcow2", "node-name": "d",
                            "file": {"driver": "file", "filename": "@DIR@/img"}}
    if discard:
        node["discard"] = discard
    steps = [("cmd", "blockdev-add", node),
             ("hmp", 'qemu-io d "write -P 0 0 512"'), ("hmp", 'qemu-io d "write -P 1 64k 64k"'),
             ("hmp", 'qemu-io d "write -z -u 0 64k"'), ("hmp", 'qemu-io d "write -z 64k 64k"'),
             ("cmd", "blockdev-del", {"node-name": "d"})]
    real, mine = run_both(tmp_path, steps, lambda d: create_qcow2(d / "img", "4M"))
    assert mine == real
    assert (tmp_path / "emu" / "img").read_bytes() == (tmp_path / "qemu" / "img").read_bytes()
