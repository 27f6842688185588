"""Image locking (block/file-posix.c): nodes take OFD byte-range locks on their files for
the permissions they hold and the ones they do not share, so a second user of an image — a
second node in the same VM, a backup target's backing chain, an image creation, or a
qemu-img in another process — is refused as QEMU refuses it. Replies and image bytes are
compared with real QEMU 7.2; the last tests hold the emulator's locks against the real
qemu-img, which sees them as it sees QEMU's."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from emulator.block.backend import BlockBackend
from emulator.block.layer import BlockLayer
from emulator.block.perm import ALL, CONSISTENT_READ, WRITE
from emulator.sandbox import Sandbox
from tests.conftest import requires_qemu, requires_qemu_img, requires_qemu_io
from tests.emulator.qemu_runner import c, compare_replies, create_qcow2, io


def qcow2(name: str, filename: str = "img", **more: Any) -> tuple[str, dict[str, Any]]:
    return c("blockdev-add", driver="qcow2", **{"node-name": name, "file": {
        "driver": "file", "filename": f"@DIR@/{filename}"}, **more})


def setup(d: Path) -> None:
    create_qcow2(d / "img", "4M")
    create_qcow2(d / "other", "4M")


CASES = {
    "second-writer": [qcow2("a"), qcow2("b"), c("blockdev-del", **{"node-name": "a"}),
                      qcow2("b")],
    "reader-after-writer": [qcow2("a"), qcow2("r", **{"read-only": True})],
    "writer-after-reader": [qcow2("r", **{"read-only": True}), qcow2("a")],
    "two-readers": [qcow2("r", **{"read-only": True}), qcow2("s", **{"read-only": True}),
                    io("r", "read 0 4k")],
    "locking-off": [qcow2("a"), qcow2("b", file={"driver": "file", "locking": "off",
                                                   "filename": "@DIR@/img"})],
    "create-over-a-user": [qcow2("a"), c("blockdev-create", **{"job-id": "j"}, options={
        "driver": "file", "filename": "@DIR@/img", "size": 0})],
    "drive-backup-onto-a-user": [
        qcow2("a"), qcow2("t", "other"),
        c("drive-backup", **{"job-id": "j"}, device="a", target="@DIR@/other", sync="full")],
    "backing-chain-of-a-writer": [
        qcow2("a"), c("blockdev-add", driver="qcow2", **{"node-name": "top"}, backing="a",
                      file={"driver": "file", "filename": "@DIR@/other"}),
        c("drive-backup", **{"job-id": "j"}, device="top", target="@DIR@/t", sync="top",
          format="qcow2")],
    "json-backing-file": [   # t's backing file is json:{...} (top has no plain name)
        qcow2("a"), c("blockdev-add", driver="qcow2", **{"node-name": "top"}, backing="a",
                      file={"driver": "file", "filename": "@DIR@/other"}),
        c("drive-backup", **{"job-id": "j1"}, device="top", target="@DIR@/t", sync="none"),
        c("job-cancel", id="j1"),
        c("drive-backup", **{"job-id": "j2"}, device="a", target="@DIR@/t", sync="full",
          mode="existing")],
    "below-an-overlay": [qcow2("a"), qcow2("base", "other"),
                         c("blockdev-snapshot-sync", **{"node-name": "a",
                           "snapshot-file": "@DIR@/snap", "snapshot-node-name": "snap"}),
                         qcow2("again", **{"read-only": True})],
}


@requires_qemu
@requires_qemu_img
@pytest.mark.parametrize("name", list(CASES))
def test_locks_refuse_a_second_user_as_qemu_does(tmp_path: Path, name: str) -> None:
    compare_replies(tmp_path, [*CASES[name], c("query-named-block-nodes", flat=True)],
                    setup=setup)
    for image in ("img", "other"):
        assert (tmp_path / "emu" / image).read_bytes() == \
            (tmp_path / "qemu" / image).read_bytes(), image


@requires_qemu_img
def test_real_qemu_img_sees_the_emulators_locks(tmp_path: Path) -> None:
    """A writable node in the emulator: the real qemu-img cannot open the image (not even
    to read it) until the node is gone; with -U (force share) it can."""
    create_qcow2(tmp_path / "img", "4M")
    layer = BlockLayer(sandbox=Sandbox(tmp_path))
    bs = layer.add_blockdev({"driver": "qcow2", "node-name": "a",
                             "file": {"driver": "file", "filename": str(tmp_path / "img")}})
    blk = BlockBackend(layer.graph, perm=CONSISTENT_READ | WRITE, shared_perm=ALL)
    blk.insert_bs(bs)

    def qemu_img(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["qemu-img", *argv, str(tmp_path / "img")],
                              capture_output=True, text=True)
    refused = qemu_img("info")
    assert refused.returncode == 1
    assert 'Failed to get shared "write" lock' in refused.stderr
    assert qemu_img("info", "-U").returncode == 0
    blk.unref()
    layer.close_all()
    assert qemu_img("info").returncode == 0


@requires_qemu_img
@requires_qemu_io
def test_emulator_sees_real_qemu_ios_locks(tmp_path: Path) -> None:
    """A real qemu-io holding the image open read-write: the emulator's node cannot take it."""
    create_qcow2(tmp_path / "img", "4M")
    holder = subprocess.Popen(["qemu-io", str(tmp_path / "img")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert holder.stdout is not None
        holder.stdout.read(len("qemu-io> "))   # the prompt: the image is open
        layer = BlockLayer(sandbox=Sandbox(tmp_path))
        with pytest.raises(Exception, match='Failed to get "write" lock'):
            layer.add_blockdev({"driver": "qcow2", "node-name": "a", "file": {
                "driver": "file", "filename": str(tmp_path / "img")}})
        layer.close_all()
    finally:
        holder.communicate("quit\n", timeout=10)


TOOL_RUNS = ["info --output=json held", "info --output=json top", "check held",
             "check -U held", "map --output=json held", "compare held top",
             "compare -U held top", "rebase -u -b held -F qcow2 top",
             "info -U --output=json held", "bitmap --add held b", "create -f qcow2 held 1M",
             "check top", "map --output=json top", "info --output=json --backing-chain top"]


@requires_qemu_img
@requires_qemu_io
def test_tools_refuse_an_image_in_use_as_qemu_img_does(tmp_path: Path) -> None:
    """A real qemu-io holds ``held`` open read-write: the emulator's qemu-img verbs and
    offline qemu-io print what the real ones print (the hint naming the image included),
    and -U (force share) and an image whose backing file is not opened still work."""
    import io as textio

    from emulator import img, qemu_io
    for argv in (["create", "-q", "-f", "qcow2", "held", "1M"],
                 ["create", "-q", "-f", "qcow2", "-b", "held", "-F", "qcow2", "top", "1M"]):
        subprocess.run(["qemu-img", *argv], cwd=tmp_path, check=True)
    holder = subprocess.Popen(["qemu-io", "held"], cwd=tmp_path, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert holder.stdout is not None
        holder.stdout.read(len("qemu-io> "))   # the prompt: the image is open
        for run in TOOL_RUNS:
            real = subprocess.run(["qemu-img", *run.split()], cwd=tmp_path,
                                  capture_output=True, text=True)
            out, err = textio.StringIO(), textio.StringIO()
            status = img.main(run.split(), sandbox=Sandbox(tmp_path), stdout=out, stderr=err)
            assert (status, err.getvalue()) == (real.returncode, real.stderr), run
        for name in ("held", "top"):   # top: the hint survives "Could not open backing file"
            real = subprocess.run(["qemu-io", "-c", "read 0 512", name], cwd=tmp_path,
                                  capture_output=True, text=True)
            assert qemu_io.offline(Sandbox(tmp_path), name, "qcow2", ["read 0 512"]) == \
                (real.returncode, real.stdout + real.stderr)
    finally:
        holder.communicate("quit\n", timeout=10)
