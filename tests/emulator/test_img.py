"""The qemu-img subset: same output and exit codes as the real qemu-img."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from emulator import img
from emulator import qemu_io as emulated_qemu_io
from emulator.qcow2 import FileIO, Qcow2Image, StoredBitmap
from emulator.sandbox import Sandbox
from tests.conftest import requires_qemu, requires_qemu_img


def mine(root: Path, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = img.main(list(argv), sandbox=Sandbox(root), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def real(root: Path, *argv: str) -> tuple[int, str, str]:
    done = subprocess.run(["qemu-img", *argv], capture_output=True, text=True, cwd=root)
    return done.returncode, done.stdout, done.stderr


def qemu_io(path: Path, *commands: str) -> None:
    argv = ["qemu-io"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(path)], capture_output=True, check=True)


# Each step runs on the emulator in one directory and on qemu-img in another; the images
# they make are used by the later steps.
SCENARIO = [
    ("create", "-f", "qcow2", "a.qcow2", "64M"),
    ("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "o.qcow2"),
    ("create", "-f", "qcow2", "-b", "nonexist", "-F", "qcow2", "o2.qcow2"),
    ("create", "-f", "qcow2", "-b", "a.qcow2", "o3.qcow2"),
    ("create", "-f", "raw", "r.raw", "64M"),
    ("create", "-q", "-f", "qcow2", "q.qcow2", "1M"),
    ("create", "-f", "qcow2", "x.qcow2"),
    ("create", "-f", "qcow2", "-o", "cluster_size=3k", "x.qcow2", "1M"),
    ("create", "-f", "qcow2", "-o", "cluster_size=4k,refcount_bits=8", "c.qcow2", "1.5M"),
    ("create", "-f", "qcow2", "x.qcow2", "abc"),
    ("create", "-f", "vmdk2", "x.img", "1M"),
    ("create", "-f", "raw", "nodir/x.img", "1M"),
    ("compare", "a.qcow2", "o.qcow2"),
    ("compare", "a.qcow2", "r.raw"),
    ("compare", "a.qcow2", "nonexist.qcow2"),
    ("compare", "a.qcow2"),
    ("compare", "a.qcow2", "c.qcow2"),
    ("compare", "-s", "a.qcow2", "c.qcow2"),
    ("check", "a.qcow2"),
    ("check", "--output=json", "a.qcow2"),
    ("check", "r.raw"),
    ("info", "--output=json", "o.qcow2"),
    ("info", "--output=json", "r.raw"),
    ("info", "--output=json", "c.qcow2"),
    ("map", "--output=json", "o.qcow2"),
    ("map", "--output=json", "r.raw"),
    ("map", "--output=json", "p.qcow2"),
    ("info", "--output=json", "--backing-chain", "o.qcow2"),
    ("info", "--output=json", "--backing-chain", "o2.qcow2"),
    ("check", "o2.qcow2"),
    ("create", "-f", "qcow2", "-u", "-b", "l2.qcow2", "-F", "qcow2", "l1.qcow2", "1M"),
    ("create", "-f", "qcow2", "-u", "-b", "l1.qcow2", "-F", "qcow2", "l2.qcow2", "1M"),
    ("info", "--output=json", "--backing-chain", "l1.qcow2"),
]

AFTER_WRITES = [
    ("compare", "a.qcow2", "o.qcow2"),
    ("compare", "-q", "a.qcow2", "o.qcow2"),
    ("compare", "o.qcow2", "a.qcow2"),
    ("compare", "c.qcow2", "a.qcow2"),
    ("compare", "a.qcow2", "c.qcow2"),
    ("compare", "-f", "raw", "-F", "raw", "a.qcow2", "o.qcow2"),
    ("check", "o.qcow2"),
    ("check", "--output=json", "o.qcow2"),
    ("map", "--output=json", "o.qcow2"),
    ("map", "--output=json", "p.qcow2"),   # metadata preallocated: the file's holes, zero
    ("compare", "p.qcow2", "a.qcow2"),
    ("info", "--output=json", "o.qcow2"),
    ("rebase", "-u", "-b", "", "o.qcow2"),
    ("info", "--output=json", "o.qcow2"),
    ("compare", "a.qcow2", "o.qcow2"),
    ("rebase", "-u", "-b", "a.qcow2", "o.qcow2"),
    ("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", "o.qcow2"),
    ("compare", "a.qcow2", "o.qcow2"),
    ("map", "--output=json", "o.qcow2"),
]

WRITES = {
    "a.qcow2": ["write -P 0x49 0 64k", "write -P 0x6c 1M 64k", "write -z 2M 64k"],
    "o.qcow2": ["write -P 0x6c 1M 64k", "write -P 0x11 1000000 1000", "write -z 5M 4k",
                "write -z -u 0 64k"],
    "c.qcow2": ["write -P 0x49 0 64k", "write -P 0x6c 1M 64k", "write -P 0x77 1400000 3"],
    "p.qcow2": ["write -P 0x49 0 64k", "write -P 0x6c 1M 64k"],
}


@requires_qemu_img
def test_verbs_print_and_exit_like_the_real_qemu_img(tmp_path: Path) -> None:
    roots = tmp_path / "mine", tmp_path / "real"
    for root in roots:
        root.mkdir()   # the emulator does not create preallocated images; it reads them
        real(root, "create", "-f", "qcow2", "-o", "preallocation=metadata", "p.qcow2", "4M")
    for argv in SCENARIO:
        assert mine(roots[0], *argv) == real(roots[1], *argv), argv
    for root in roots:
        for name, commands in WRITES.items():
            qemu_io(root / name, *commands)
    for argv in AFTER_WRITES:
        assert mine(roots[0], *argv) == real(roots[1], *argv), argv
    for name in ("a.qcow2", "o.qcow2", "c.qcow2", "r.raw", "p.qcow2"):
        assert (roots[0] / name).read_bytes() == (roots[1] / name).read_bytes(), name


@requires_qemu_img
@pytest.mark.parametrize(("where", "expected"), [
    (0, 0), (1, 0), (511, 0), (512, 512), (70000, 69632), (65535, 65024)])
def test_compare_reports_the_first_differing_sector(tmp_path: Path, where: int,
                                                    expected: int) -> None:
    for name in ("a", "b"):
        real(tmp_path, "create", "-q", "-f", "qcow2", name, "1M")
        qemu_io(tmp_path / name, "write -P 1 0 128k")
    qemu_io(tmp_path / "b", f"write -P 2 {where} 1")
    result = img.compare(Sandbox(tmp_path), "a", "b")
    assert (result.exit_code, result.output) == (1, f"Content mismatch at offset {expected}!\n")
    assert real(tmp_path, "compare", "a", "b")[:2] == (1, result.output)


@requires_qemu_img
def test_compare_reads_through_backing_chains(tmp_path: Path) -> None:
    box = Sandbox(tmp_path)
    img.create(box, "base", "qcow2", 4 << 20)
    qemu_io(tmp_path / "base", "write -P 5 0 1M")
    img.create(box, "top", "qcow2", None, backing_file="base", backing_format="qcow2")
    img.create(box, "flat", "raw", 4 << 20)
    qemu_io(tmp_path / "flat", "write -P 5 0 1M")
    assert img.compare(box, "top", "flat").exit_code == 0
    qemu_io(tmp_path / "top", "write -z 4k 4k")
    result = img.compare(box, "top", "flat")
    assert (result.exit_code, result.output) == (1, "Content mismatch at offset 4096!\n")
    assert real(tmp_path, "compare", "top", "flat")[:2] == (1, result.output)


def test_compare_open_errors_exit_2(tmp_path: Path) -> None:
    box = Sandbox(tmp_path / "root")
    (tmp_path / "root").mkdir()
    img.create(box, "a", "qcow2", 1 << 20)
    with pytest.raises(img.ImgError) as info:
        img.compare(box, "a", "../outside")
    assert info.value.exit_code == 2
    assert str(info.value) == ("Could not open '../outside': Could not open '../outside': "
                               "path is outside the emulator's test directory")


def test_backing_files_outside_the_sandbox_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    Qcow2Image.create(FileIO.create(tmp_path / "secret"), 1 << 20)
    Qcow2Image.create(FileIO.create(root / "top"), 1 << 20, backing_file="../secret",
                      backing_format="qcow2")
    code, out, err = mine(root, "compare", "top", "top")
    assert (code, out) == (2, "")
    assert err == ("qemu-img: Could not open 'top': Could not open backing file: Could not "
                   "open '../secret': path is outside the emulator's test directory\n")
    with pytest.raises(img.ImgError, match="outside the emulator's test directory"):
        img.create(Sandbox(root), "x", "qcow2", None, backing_file=str(tmp_path / "secret"),
                   backing_format="qcow2")
    assert not os.path.exists(root / "x")


@requires_qemu_img
def test_info_lists_bitmaps_like_real_qemu_img(tmp_path: Path) -> None:
    Qcow2Image.create(FileIO.create(tmp_path / "a"), 64 << 20)
    Qcow2Image.open(FileIO(tmp_path / "a")).store_bitmaps(
        [StoredBitmap("bitmap0", 65536, dirty=5), StoredBitmap("b1", 1 << 20, auto=False)])
    expected = real(tmp_path, "info", "--output=json", "a")
    assert mine(tmp_path, "info", "--output=json", "a") == expected
    assert json.loads(expected[1])["format-specific"]["data"]["bitmaps"][1] == {
        "flags": [], "name": "b1", "granularity": 1 << 20}


@requires_qemu_img
def test_check_reports_leaks_and_corruptions_like_qemu_img(tmp_path: Path) -> None:
    real(tmp_path, "create", "-q", "-f", "qcow2", "a", "64M")
    qemu_io(tmp_path / "a", "write -P 1 0 128k")
    data = bytearray((tmp_path / "a").read_bytes())
    data[0x2000E:0x20010] = (1).to_bytes(2, "big")  # cluster 7 referenced by nobody
    data[0x2000A:0x2000C] = (0).to_bytes(2, "big")  # cluster 5 (data) lost its refcount
    (tmp_path / "a").write_bytes(bytes(data))
    expected = real(tmp_path, "check", "a")
    assert expected[0] == 2
    assert mine(tmp_path, "check", "a") == expected
    assert mine(tmp_path, "check", "--output=json", "a") == real(tmp_path, "check",
                                                                 "--output=json", "a")


@requires_qemu_img
def test_offline_qemu_io_like_qemu_io(tmp_path: Path) -> None:
    """What the harness does for a hidden qemu-io step: the image opened as qemu-io opens
    it, on a block layer of its own, through its backing chain (zero writes ask block status
    of the whole chain: the base's written zeroes are data, not zero)."""
    roots = tmp_path / "mine", tmp_path / "real"
    commands = ["write -P 2 4k 512", "write -z 70k 1k", "discard 128k 64k", "read -P 1 0 4k",
                "read -P 2 4k 512", "read -P 1 5k 59k", "read -P 0 128k 64k",
                "write -z 260k 4k", "write -z 200k 4k", "read -P 1 196k 4k", "map"]
    for root in roots:
        root.mkdir()
        real(root, "create", "-q", "-f", "qcow2", "base", "1M")
        qemu_io(root / "base", "write -P 1 0 1M")
        qemu_io(root / "base", "write -P 0 256k 64k")
        real(root, "create", "-q", "-f", "qcow2", "-b", "base", "-F", "qcow2", "top")
    mine_out = [emulated_qemu_io.filter_timing(
        emulated_qemu_io.offline(Sandbox(roots[0]), "top", "qcow2", [c])[1]) for c in commands]
    real_out = [emulated_qemu_io.filter_timing(subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", c, "top"], capture_output=True, cwd=roots[1],
        text=True).stdout) for c in commands]
    assert mine_out == real_out
    assert (roots[0] / "top").read_bytes() == (roots[1] / "top").read_bytes()
    status, out = emulated_qemu_io.offline(Sandbox(roots[0]), "nonexist", "qcow2", ["map"])
    done = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "map", "nonexist"], cwd=roots[1],
                          capture_output=True, text=True)
    assert (status, out) == (done.returncode, done.stderr)


@requires_qemu_img
@pytest.mark.parametrize("backing", [
    {"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "b0"}}},
    {"backing": None},
    {},
    {"driver": "raw"},
], ids=["described-chain", "no-backing", "header-backing", "raw"])
def test_json_backing_file_names_like_qemu_img(tmp_path: Path, backing: dict) -> None:
    """An image whose backing file name is json:{...} (what QEMU writes for a node without
    a plain file name, e.g. a drive-backup target's): qemu-img map and compare open the
    chain it describes — its own backing as options, none with "backing": null, or the
    header's — as the real qemu-img does."""
    described = {"driver": "qcow2", "file": {"driver": "file", "filename": "b1"}, **backing}
    name = "json:" + json.dumps(described)
    outcomes = []
    for side, run in (("qemu", real), ("emu", mine)):
        root = tmp_path / side
        root.mkdir()
        real(root, "create", "-q", "-f", "qcow2", "b0", "1M")
        real(root, "create", "-q", "-f", "qcow2", "-b", "b0", "-F", "qcow2", "b1", "1M")
        real(root, "create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "qcow2", "top",
             "1M")
        qemu_io(root / "b0", "write -P 1 0 64k", "write -P 3 512k 64k")
        qemu_io(root / "b1", "write -P 2 64k 64k")
        subprocess.run(["qemu-io", "-c", "write -P 4 256k 4k", "top"], cwd=root, check=True,
                       capture_output=True)   # its backing's file names are the cwd's
        outcomes.append([run(root, *argv) for argv in (
            ["map", "--output=json", "top"], ["compare", "top", "b0"],
            ["compare", "top", "b1"], ["info", "--output=json", "top"])])
    for argv, emu, qemu in zip(("map", "compare b0", "compare b1", "info"), *outcomes,
                               strict=True):
        if argv == "info":   # actual-size is the host's
            emu, qemu = ((c, json.loads(o).get("backing-filename"), e) for c, o, e in (emu, qemu))
        assert emu == qemu, argv


@requires_qemu
@requires_qemu_img
@pytest.mark.parametrize("driver", ["qcow2", "raw"])
def test_json_backing_file_names_in_a_vm(tmp_path: Path, driver: str) -> None:
    """blockdev-add of such an image: the backing node is opened from the json:{...}
    options, with the header's backing format put first (it wins over their driver)."""
    from tests.emulator.qemu_runner import c, compare_replies

    name = "json:" + json.dumps({"driver": driver, "file": {"driver": "file",
                                                            "filename": "@DIR@/b1"}})

    def setup(root: Path) -> None:
        real(root, "create", "-q", "-f", "qcow2", "b0", "1M")
        real(root, "create", "-q", "-f", "qcow2", "-b", "b0", "-F", "qcow2", "b1", "1M")
        real(root, "create", "-q", "-f", "qcow2", "-u", "-b",
             name.replace("@DIR@", str(root)), "-F", "qcow2", "top", "1M")
    compare_replies(tmp_path, [
        c("blockdev-add", driver="qcow2", **{"node-name": "top"},
          file={"driver": "file", "filename": "@DIR@/top"}),
        c("query-named-block-nodes", flat=True)], setup=setup)
