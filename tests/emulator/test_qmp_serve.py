"""``qmpreplay serve`` and ``qmpreplay commands`` as processes, over real UNIX sockets."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emulator.qmp.qemu_probe import RawQMP

CLI = [sys.executable, "-m", "harness.cli"]


def start_serve(sock: Path, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([*CLI, "serve", "--socket", str(sock), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while True:  # listening once a connection is accepted (a stale file may be there)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"serve did not start: {err.decode()}")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(sock))
        except OSError:
            time.sleep(0.02)
        else:
            return proc
        finally:
            probe.close()


def negotiated(sock: Path) -> RawQMP:
    conn = RawQMP(str(sock))
    greeting = conn.read_lines(1)
    assert greeting and greeting[0].startswith(b'{"QMP": {"version": {"qemu": {"micro": 22')
    conn.send(b'{"execute": "qmp_capabilities"}\n')
    assert conn.read_lines(1) == [b'{"return": {}}\r\n']
    return conn


def test_socket_in_private_directory(tmp_path: Path) -> None:
    sock = tmp_path / "private" / "qmp.sock"
    proc = start_serve(sock, "--dir", str(tmp_path))
    try:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        conn = negotiated(sock)
        conn.send(b'{"execute": "query-status", "id": [1]}\n')
        assert conn.read_lines(1) == [
            b'{"return": {"status": "prelaunch", "singlestep": false, "running": false}, '
            b'"id": [1]}\r\n']
        conn.send(b'{"execute": "quit"}\n')
        lines = conn.read_lines(3)
        assert b'"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}' \
            in lines[0]
        assert lines[1:] == [b'{"return": {}}\r\n']  # then EOF
        assert proc.wait(10) == 0
        assert not sock.exists()
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_the_server(tmp_path: Path, signum: int) -> None:
    sock = tmp_path / "qmp.sock"
    proc = start_serve(sock)
    try:
        conn = negotiated(sock)
        proc.send_signal(signum)
        lines = conn.read_lines(2)
        assert len(lines) == 1, lines  # the event, then EOF
        assert lines[0].endswith(b'"event": "SHUTDOWN", "data": {"guest": false, '
                                 b'"reason": "host-signal"}}\r\n')
        assert proc.wait(10) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert f"terminating on signal {int(signum)}" in err
        assert "Traceback" not in err
        # the temporary test directory made for the run is gone
        made = re.search(r"test directory (\S+)\)", err)
        assert made is not None and not os.path.exists(made.group(1))
        assert not sock.exists()
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("address", ["localhost:4444", "tcp:127.0.0.1:4444", ":4444",
                                     "[::1]:4444"])
def test_refuses_network_addresses(address: str) -> None:
    res = subprocess.run([*CLI, "serve", "--socket", address], capture_output=True,
                         timeout=30)
    assert res.returncode == 2
    assert res.stderr.decode().count("\n") == 1
    assert "refusing to listen on network address" in res.stderr.decode()


def test_refuses_a_regular_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("keep me")
    res = subprocess.run([*CLI, "serve", "--socket", str(target)], capture_output=True,
                         timeout=30)
    assert res.returncode == 2
    assert "exists and is not a socket" in res.stderr.decode()
    assert target.read_text() == "keep me"


def test_replaces_a_stale_socket_but_not_a_live_one(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens
    proc = start_serve(sock)
    try:
        negotiated(sock).close()
        res = subprocess.run([*CLI, "serve", "--socket", str(sock)], capture_output=True,
                             timeout=30)
        assert res.returncode == 2
        assert "in use by another server" in res.stderr.decode()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_test_directory_must_exist(tmp_path: Path) -> None:
    res = subprocess.run([*CLI, "serve", "--socket", str(tmp_path / "s"), "--dir",
                          str(tmp_path / "missing")], capture_output=True, timeout=30)
    assert res.returncode == 2
    assert "does not exist" in res.stderr.decode()


def test_commands_table_and_markdown(tmp_path: Path) -> None:
    md = tmp_path / "out" / "commands.md"
    res = subprocess.run([*CLI, "commands", "--markdown", str(md)], capture_output=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr.decode()
    out = res.stdout.decode()
    assert out.splitlines()[0].split() == ["COMMAND", "FAMILY", "ARGUMENTS"]
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "human-monitor-command" in rows
    assert "command-line: str, cpu-index?: int" in rows["human-monitor-command"]
    assert rows["query-status"].split()[1] == "misc"
    text = md.read_text()
    assert "| `qmp_capabilities` | misc | enable?: [QMPCapability] |" in text


@pytest.mark.qemu
def test_commands_against_qemu(qemu_binary: str, tmp_path: Path) -> None:
    """Block-layer commands, events and transaction actions beside QEMU's, with coverage."""
    md = tmp_path / "commands.md"
    res = subprocess.run([*CLI, "commands", "--against", qemu_binary, "--markdown", str(md)],
                         capture_output=True, timeout=120)
    out = res.stdout.decode()
    for what in ("block-layer commands", "block-layer events", "transaction actions"):
        assert re.search(rf"^{what}: \d+ of \d+ \(\d+\.\d%\)", out, re.M), out
    assert "schema differences: none" in out, out
    assert res.returncode == 0
    text = md.read_text()
    assert "| `blockdev-backup` | ✓ |" in text and "| `block-stream` | — |" in text
    assert "| `JOB_STATUS_CHANGE` | ✓ |" in text and "| `blockdev-snapshot-sync` | ✓ |" in text


def test_emitted_events_list_matches_the_code() -> None:
    """emulator/qmp/events.py lists exactly the events the code emits."""
    from emulator.qmp.events import EMITTED
    root = Path(__file__).resolve().parents[2] / "emulator"
    found = {m for f in root.rglob("*.py")
             for m in re.findall(r'emit\(\s*"([A-Z_]+)"', f.read_text())}
    assert found == EMITTED


def test_query_commands_lists_qemus_order(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    proc = start_serve(sock)
    try:
        conn = negotiated(sock)
        conn.send(b'{"execute": "query-commands"}\n')
        names = [c["name"] for c in json.loads(conn.read_lines(1)[0])["return"]]
        from emulator.qmp.qemu_commands import QUERY_COMMANDS_ORDER

        known = [n for n in names if n in QUERY_COMMANDS_ORDER]
        assert known == [n for n in QUERY_COMMANDS_ORDER if n in set(known)]
        assert {"qmp_capabilities", "quit", "human-monitor-command"} <= set(names)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
