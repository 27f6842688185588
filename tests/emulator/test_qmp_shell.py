"""qmp-shell (installed with qemu.qmp), unchanged, driving ``qmpreplay serve`` via pexpect."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

PROMPT = r"\(QEMU\) "

pytestmark = pytest.mark.skipif(shutil.which("qmp-shell") is None,
                                reason="qmp-shell not installed (it comes with qemu.qmp)")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Path]:
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "serve", "--socket",
                             str(sock), "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    yield sock
    proc.terminate()
    proc.wait(10)


def reply(shell: pexpect.spawn, line: str) -> object:
    shell.sendline(line)
    shell.expect(PROMPT)
    echoed, _, rest = shell.before.partition("\r\n")
    assert echoed == line
    return json.loads(rest.strip())


def test_qmp_shell_session(served: Path) -> None:
    shell = pexpect.spawn(f"qmp-shell {served}", encoding="utf-8", timeout=15,
                          dimensions=(50, 200))
    try:
        shell.expect(PROMPT)
        assert "Welcome to the QMP low-level shell!" in shell.before
        assert "Connected to QEMU 7.2.22" in shell.before
        assert reply(shell, "query-version") == {"return": {
            "qemu": {"micro": 22, "minor": 2, "major": 7},
            "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}}
        assert reply(shell, "query-status") == {"return": {
            "status": "prelaunch", "singlestep": False, "running": False}}
        assert reply(shell, "query-stat") == {"error": {
            "class": "CommandNotFound", "desc": "The command query-stat has not been found"}}
        assert reply(shell, "block-dirty-bitmap-add node=x name=y granularity=-1") == {
            "error": {"class": "GenericError",
                      "desc": "Parameter 'granularity' expects uint32_t"}}
        # completion comes from query-commands
        shell.send("query-ver\t")
        shell.expect("query-version")
        shell.sendline("")
        shell.expect(PROMPT)
        assert reply(shell, "cont") == {"return": {}}
        assert reply(shell, "quit") == {"return": {}}
        shell.sendeof()
        shell.expect(pexpect.EOF)
    finally:
        shell.close(force=True)
    # the server went away after quit
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + 10
    while served.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(OSError):
        probe.connect(str(served))
    probe.close()
