"""The emulator touches files only inside its test directory, and listens on nothing but a
UNIX socket: every way out is tried here over real QMP (qemu.qmp on a real UNIX socket).

Each escape attempt must fail with a GenericError naming the path, and leave no file behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.emulator.qemu_runner import run_commands

REFUSED = "path is outside the emulator's test directory"


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path]:
    """A test directory and, beside it, an outside directory holding a valid image."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    run_commands(outside, [("blockdev-create", {"job-id": "c", "options": {
        "driver": "file", "filename": str(outside / "victim.img"), "size": 0}})])
    return root, outside


def refused(reply: dict, path: str) -> bool:
    err = reply.get("error", {})
    return err.get("class") == "GenericError" and REFUSED in err.get("desc", "") \
        and path in err.get("desc", "")


def file_node(filename: str) -> tuple[str, dict]:
    return ("blockdev-add", {"driver": "file", "node-name": "f", "filename": filename})


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "symlinked-dir"])
def test_blockdev_add_outside_is_refused(world: tuple[Path, Path], how: str) -> None:
    root, outside = world
    victim = outside / "victim.img"
    if how == "absolute":
        name = str(victim)
    elif how == "dotdot":
        name = "../outside/victim.img"
    elif how == "symlink":
        (root / "link.img").symlink_to(victim)
        name = str(root / "link.img")
    else:
        (root / "sub").symlink_to(outside)
        name = str(root / "sub" / "victim.img")
    (reply,) = run_commands(root, [file_node(name)])
    assert refused(reply, name), reply


def test_blockdev_create_and_snapshot_outside_create_nothing(world: tuple[Path, Path]) -> None:
    root, outside = world
    target = str(outside / "new.img")
    replies = run_commands(root, [
        ("blockdev-create", {"job-id": "c", "options": {"driver": "file",
                                                        "filename": target, "size": 0}}),
        ("blockdev-create", {"job-id": "d", "options": {"driver": "file",
                                                        "filename": str(root / "ok.img"),
                                                        "size": 0}}),
        ("job-dismiss", {"id": "d"}),
        ("blockdev-add", {"driver": "file", "node-name": "ok-file",
                          "filename": str(root / "ok.img")}),
        ("blockdev-create", {"job-id": "e", "options": {"driver": "qcow2", "file": "ok-file",
                                                        "size": 1 << 20}}),
        ("job-dismiss", {"id": "e"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "ok", "file": "ok-file"}),
        ("blockdev-snapshot-sync", {"node-name": "ok", "snapshot-file": target,
                                    "snapshot-node-name": "snap"}),
        ("drive-backup", {"job-id": "b", "device": "ok", "target": target, "sync": "full"}),
    ])
    # blockdev-create refuses in the job (as QEMU reports open errors of a create job)
    assert "error" in replies[7] and REFUSED in replies[7]["error"]["desc"], replies[7]
    assert "error" in replies[8] and REFUSED in replies[8]["error"]["desc"], replies[8]
    assert not Path(target).exists()
    assert sorted(p.name for p in outside.iterdir()) == ["victim.img"]


def test_backing_file_named_in_an_image_is_checked(world: tuple[Path, Path]) -> None:
    """An image inside the test directory whose header names a backing file outside."""
    root, outside = world
    from emulator import img
    from emulator.sandbox import Sandbox
    out_box = Sandbox(outside)
    img.create(out_box, str(outside / "base.qcow2"), "qcow2", 1 << 20)
    img.create(Sandbox(root), str(root / "top.qcow2"), "qcow2", 1 << 20)
    # rebase -u writes the outside name into the header (the rebase itself opens nothing)
    img.rebase_unsafe(Sandbox(root), str(root / "top.qcow2"), str(outside / "base.qcow2"),
                      "qcow2")
    (reply,) = run_commands(root, [("blockdev-add", {
        "driver": "qcow2", "node-name": "top",
        "file": {"driver": "file", "filename": str(root / "top.qcow2")}})])
    assert "error" in reply and REFUSED in reply["error"]["desc"], reply


def test_serve_listens_only_on_a_private_unix_socket(tmp_path: Path) -> None:
    """qmpreplay serve: socket mode 0600; no TCP/UDP socket in the process at all."""
    sock = tmp_path / "private" / "qmp.sock"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "serve", "--socket",
                             str(sock), "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        assert sock.exists()
        assert sock.stat().st_mode & 0o777 == 0o600
        assert sock.parent.stat().st_mode & 0o777 == 0o700
        inodes = {os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                  for fd in os.listdir(f"/proc/{proc.pid}/fd")}
        sockets = {i[len("socket:["):-1] for i in inodes if i.startswith("socket:[")}
        assert sockets, "the server holds its listening socket"
        for table in ("tcp", "tcp6", "udp", "udp6"):
            rows = Path(f"/proc/{proc.pid}/net/{table}").read_text().splitlines()[1:]
            assert not sockets & {row.split()[9] for row in rows}, f"a {table} socket"
        unix = Path(f"/proc/{proc.pid}/net/unix").read_text()
        assert str(sock) in unix
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(sock))
        assert b'"QMP"' in client.recv(4096)
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert not sock.exists()
