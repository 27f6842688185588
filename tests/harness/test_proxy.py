"""``qmpreplay proxy`` between qemu.qmp and real QEMU: the session becomes a golden that
replays on QEMU; the framing and the log follow iotests' conventions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from harness.backends import make_factory
from harness.backends.qemu import LAUNCH
from harness.proxy import JsonFramer, SessionLog
from harness.replay.runner import replay_file
from harness.transcript import parse
from tests.conftest import requires_qemu, requires_qemu_img


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short private directory: UNIX socket paths are limited to 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="qrproxy-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qemu(sockets: Path, qemu_binary: str) -> Iterator[Path]:
    """A real QEMU whose QMP monitor is a server socket, as a user would start it."""
    sock = sockets / "qemu.sock"
    proc = subprocess.Popen([qemu_binary, *LAUNCH, "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(sock, proc)
        yield sock
    finally:
        proc.kill()
        proc.wait()


def start_proxy(sockets: Path, qemu: Path, out: Path, test_dir: Path
                ) -> tuple[subprocess.Popen[str], Path]:
    listen = sockets / "proxy.sock"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "proxy", "--listen",
                             str(listen), "--connect", str(qemu), "-o", str(out),
                             "--test-dir", str(test_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(listen, proc)
    return proc, listen


async def session(listen: Path, test_dir: Path) -> None:
    """What a script would do: make an image, dirty a bitmap, back it up, hit an error."""
    qmp = QMPClient("proxy-test")
    events = EventListener()
    qmp.register_listener(events)
    await qmp.connect(str(listen))

    async def until(event: str, **data: object) -> None:
        while True:
            got = await asyncio.wait_for(events.get(), 15)
            if got["event"] == event and all(got["data"].get(k) == v for k, v in data.items()):
                return

    img = str(test_dir / "disk.qcow2")
    for options in ({"driver": "file", "filename": img, "size": 0},
                    {"driver": "qcow2", "file": {"driver": "file", "filename": img},
                     "size": 1048576}):
        await qmp.execute("blockdev-create", {"job-id": "create", "options": options})
        await until("JOB_STATUS_CHANGE", id="create", status="concluded")
        await qmp.execute("job-dismiss", {"id": "create"})
        await until("JOB_STATUS_CHANGE", id="create", status="null")
    drive = {"driver": "qcow2", "node-name": "drive0",
             "file": {"driver": "file", "filename": img}}
    await qmp.execute("blockdev-add", drive)
    await qmp.execute("block-dirty-bitmap-add", {"node": "drive0", "name": "bitmap0",
                                                 "granularity": 65536})
    await qmp.execute("human-monitor-command",
                      {"command-line": 'qemu-io drive0 "write -P0x5a 0 128k"'})
    with pytest.raises(ExecuteError):
        await qmp.execute("blockdev-add", drive)
    await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "target",
                                       "size": 1048576})
    await qmp.execute("blockdev-backup", {"job-id": "backup0", "device": "drive0",
                                          "target": "target", "sync": "bitmap",
                                          "bitmap": "bitmap0", "bitmap-mode": "on-success"})
    await until("JOB_STATUS_CHANGE", id="backup0", status="null")
    await qmp.execute("query-block-jobs")
    await qmp.disconnect()


@requires_qemu
@requires_qemu_img
def test_qemu_qmp_session_through_the_proxy_replays_on_qemu(
        tmp_path: Path, sockets: Path, qemu: Path) -> None:
    test_dir = tmp_path / "live"
    test_dir.mkdir()
    golden = tmp_path / "session.out"
    proxy, listen = start_proxy(sockets, qemu, golden, test_dir)
    try:
        asyncio.run(session(listen, test_dir))
        out, err = proxy.communicate(timeout=15)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proxy.kill()
    assert proxy.returncode == 0, err
    assert "recorded 11 commands" in out, out
    assert not listen.exists()

    text = golden.read_text()
    lines = text.splitlines()
    assert "qmp_capabilities" not in text and "__qmp#" not in text
    assert str(test_dir) not in text and "TEST_DIR/PID-disk.qcow2" in text
    assert lines[0] == ('{"execute": "blockdev-create", "arguments": {"job-id": "create", '
                        '"options": {"driver": "file", "filename": "TEST_DIR/PID-disk.qcow2", '
                        '"size": 0}}}')
    assert lines[1] == '{"return": {}}'
    # events come after the reply of the command they arrived during, timestamps filtered
    backup = next(i for i, ln in enumerate(lines) if '"blockdev-backup"' in ln)
    assert lines[backup + 1] == '{"return": {}}'
    after = [json.loads(ln) for ln in lines[backup + 2:] if '"event"' in ln]
    assert [e["event"] for e in after].count("BLOCK_JOB_COMPLETED") == 1
    assert all(e["timestamp"] == {"microseconds": "USECS", "seconds": "SECS"} for e in after)
    assert lines[-2:] == ['{"execute": "query-block-jobs", "arguments": {}}', '{"return": []}']
    assert sum('"error"' in ln for ln in lines) == 1
    parse(text, golden)

    results = asyncio.run(replay_file(golden, make_factory("qemu")))
    assert len(results) == 1 and results[0].passed, (results[0].error, results[0].notes)


@requires_qemu
def test_sigterm_mid_session_still_writes_the_golden(
        tmp_path: Path, sockets: Path, qemu: Path) -> None:
    golden = tmp_path / "cut.out"
    proxy, listen = start_proxy(sockets, qemu, golden, tmp_path)

    async def one_command_then_stop() -> None:
        qmp = QMPClient("proxy-test")
        await qmp.connect(str(listen))
        await qmp.execute("query-block-jobs")
        proxy.terminate()
        assert await asyncio.to_thread(proxy.wait, 15) == 0
        with contextlib.suppress(EOFError):      # the proxy hung up on us, as it should
            await qmp.disconnect()

    asyncio.run(one_command_then_stop())
    assert golden.read_text() == ('{"execute": "query-block-jobs", "arguments": {}}\n'
                                  '{"return": []}\n')


@requires_qemu
def test_proxy_without_qemu_behind_it_records_nothing(sockets: Path, tmp_path: Path) -> None:
    golden = tmp_path / "none.out"
    proxy, listen = start_proxy(sockets, sockets / "absent.sock", golden, tmp_path)

    async def knock() -> None:
        reader, writer = await asyncio.open_unix_connection(str(listen))
        assert await reader.read() == b""      # closed: there is no QEMU to talk to
        writer.close()

    asyncio.run(knock())
    _, err = proxy.communicate(timeout=15)
    assert proxy.returncode == 1
    assert "cannot connect to" in err and "nothing recorded" in err
    assert not golden.exists()


def test_framer_splits_messages_without_newlines_and_across_reads() -> None:
    framer = JsonFramer()
    wire = b'{"execute": "a", "arguments": {"s": "x}\\"{"}}{"execute": "b"}\r\n[1, {"c": []}]'
    got = [m for i in range(len(wire)) for m in framer.feed(wire[i:i + 1])]
    assert got == [{"execute": "a", "arguments": {"s": 'x}"{'}}, {"execute": "b"},
                   [1, {"c": []}]]


def test_log_pairs_replies_by_id_and_places_events_after_the_reply() -> None:
    log = SessionLog("/srv/t")
    log.from_server({"QMP": {"version": {}, "capabilities": []}})
    log.from_client({"execute": "qmp_capabilities", "id": 1})
    log.from_server({"return": {}, "id": 1})
    log.from_client({"execute": "job-dismiss", "arguments": {"id": "j"}, "id": "a"})
    log.from_client({"execute": "query-jobs", "id": "b"})
    event = {"event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "null"},
             "timestamp": {"seconds": 1, "microseconds": 2}}
    log.from_server(event)
    log.from_server({"return": {}, "id": "a"})
    log.from_server({"return": [{"file": "/srv/t/x"}], "id": "b"})
    assert log.text().splitlines() == [
        '{"execute": "job-dismiss", "arguments": {"id": "j"}}',
        '{"return": {}}',
        '{"data": {"id": "j", "status": "null"}, "event": "JOB_STATUS_CHANGE", '
        '"timestamp": {"microseconds": "USECS", "seconds": "SECS"}}',
        '{"execute": "query-jobs", "arguments": {}}',
        '{"return": [{"file": "TEST_DIR/PID-x"}]}',
    ]


def test_keys_qmp_spells_with_underscores_stay_replayable() -> None:
    log = SessionLog()
    log.from_client({"execute": "block_set_io_throttle", "arguments": {"bps_rd": 1}})
    log.from_client({"execute": "blockdev-add", "arguments": {"set-state": [
        {"event": "read_aio", "new_state": 2, "state": 1}]}})
    log.from_server({"return": {}})
    log.from_server({"return": {}})
    lines = log.text().splitlines()
    assert lines[0] == '{"execute": "block_set_io_throttle", "arguments": {"bps_rd": 1}}'
    assert '"new-state": 2' in lines[2]          # iotests' spelling; replay sends new_state


def test_network_addresses_are_refused(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "proxy", "--listen",
                           "tcp:127.0.0.1:4444", "--connect", str(tmp_path / "q.sock"),
                           "-o", str(tmp_path / "x.out")], capture_output=True, text=True,
                          check=False, env={**os.environ})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "UNIX socket" in proc.stderr
