"""QEMU killed in the middle of a section: that section fails clearly, the run goes on, and
no process or test directory is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness.backends.qemu import QemuBackend
from harness.replay.runner import replay_file
from tests.conftest import GOLDENS, requires_qemu

pytestmark = requires_qemu


def test_sigkill_mid_section_fails_only_that_section() -> None:
    killed: list[int] = []
    started: list[QemuBackend] = []

    class KilledOnce(QemuBackend):
        """Real QEMU, SIGKILLed for real after its 30th command in the first section."""

        commands = 0
        first_sock_dir: str | None = None

        async def start(self, vm):  # type: ignore[no-untyped-def]
            await super().start(vm)
            self.first_sock_dir = self.sock_dir

        async def execute(self, name: str, arguments: dict | None = None) -> dict:  # type: ignore[override]
            self.commands += 1
            if not killed and self.commands == 30 and self.proc is not None:
                os.kill(self.proc.pid, signal.SIGKILL)
                killed.append(self.proc.pid)
            return await super().execute(name, arguments)

    def factory(test_dir: Path) -> QemuBackend:
        backend = KilledOnce(test_dir)
        started.append(backend)
        return backend

    results = asyncio.run(replay_file(GOLDENS / "257.out", factory, keyword="Mode bitmap; "
                                      "Bitmap Sync never"))
    assert len(results) == 3 and killed
    first, *rest = results
    assert not first.passed
    assert first.error is not None and "connection lost" in first.error
    assert "QEMU exited with status -9" in first.error
    assert all(r.passed for r in rest)
    # every QEMU is gone and reaped, every test directory removed
    assert all(b.proc is not None and b.proc.returncode is not None for b in started)
    for b in started:
        assert b.proc is not None and not Path(f"/proc/{b.proc.pid}").exists()
        assert not b.test_dir.exists()
        assert b.first_sock_dir is not None and not Path(b.first_sock_dir).exists()


HARNESS = """
import asyncio, sys, tempfile
from pathlib import Path
from harness.backends.base import VmConfig
from harness.backends.qemu import QemuBackend

async def main():
    backend = QemuBackend(Path(tempfile.mkdtemp(prefix="qmpreplay-orphan-")))
    await backend.start(VmConfig())
    print(backend.proc.pid, backend.test_dir, backend.sock_dir, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_a_killed_harness_takes_its_qemu_with_it() -> None:
    """SIGKILL (or the OOM killer) gives the harness no chance to stop QEMU: the kernel
    does it (PR_SET_PDEATHSIG), so no QEMU is left running, flooding a socket nobody reads."""
    harness = subprocess.Popen([sys.executable, "-c", HARNESS], stdout=subprocess.PIPE,
                               text=True)
    assert harness.stdout is not None
    pid, test_dir, sock_dir = harness.stdout.readline().split()
    try:
        os.kill(int(pid), 0)                 # QEMU runs
        harness.kill()
        harness.wait()
        for _ in range(100):
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                break
            if Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z":
                break                        # dead, waiting for init to reap it
            time.sleep(0.05)
        else:
            raise AssertionError(f"QEMU {pid} outlived the harness")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
        shutil.rmtree(test_dir, ignore_errors=True)
        shutil.rmtree(sock_dir, ignore_errors=True)
