"""Shared helpers for the job, backup and blkdebug tests (no tests here).

:func:`run_script` runs a script of QMP steps over a real UNIX socket — on the emulator, or on
Debian's QEMU 7.2 (``-machine none -S``, no guest code) — and returns everything the server
said *in wire order*: each reply right after its command, each event where it arrived. The
client is qemu.qmp's QMPClient with its inbound-message hook recording the wire, so the order
of replies and events is the server's, not the library's queues'.

Steps::

    ("cmd", name, arguments)           # execute; the reply is recorded
    ("hmp", "qemu-io drive0 'flush'")  # human-monitor-command
    ("wait", "BLOCK_JOB_PENDING", {"id": "j"})   # until such an event arrived (10 s)
    ("rest", "j")                      # until JOB_STATUS_CHANGE for j is a resting status
    ("img", callable)                  # callable(test_dir) between steps (qemu-img, checks)

Records are ``("reply", name, reply)`` and ``("event", name, data)`` (timestamps dropped),
normalized: the test directory becomes TEST_DIR, ``#blockNNN`` names become #blockN.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient
from qemu.qmp.message import Message

from tests.emulator.test_block_helpers import QEMU, QEMU_IMG, requires_qemu, requires_qemu_img

__all__ = ["QEMU", "QEMU_IMG", "Record", "Step", "create_qcow2", "events", "qemu_img_check",
           "qemu_img_compare", "replies", "requires_qemu", "requires_qemu_img", "run_both",
           "run_script"]

Step = tuple[Any, ...]
Record = tuple[str, str, Any]
RESTING = {"pending", "concluded", "null", "paused", "ready", "standby"}


class WireClient(QMPClient):
    """A QMPClient that records every inbound message in arrival order."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.wire: list[dict[str, Any]] = []

    def _cb_inbound(self, msg: Message) -> Message:
        msg = super()._cb_inbound(msg)
        self.wire.append(dict(msg))
        return msg


async def _execute(client: WireClient, name: str, args: dict[str, Any] | None) -> dict:
    try:
        return {"return": await client.execute(name, args)}
    except ExecuteError as e:
        return {"error": {"class": e.error_class, "desc": str(e)}}


def _event_seen(client: WireClient, start: int, name: str, match: dict[str, Any]) -> bool:
    for msg in client.wire[start:]:
        if msg.get("event") == name and all(msg.get("data", {}).get(k) == v
                                            for k, v in match.items()):
            return True
    return False


def _status(client: WireClient, job_id: str) -> str | None:
    status = None
    for msg in client.wire:
        if msg.get("event") == "JOB_STATUS_CHANGE" and msg["data"]["id"] == job_id:
            status = msg["data"]["status"]
    return status


async def _wait(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def _script(client: WireClient, steps: list[Step], test_dir: Path) -> list[Record]:
    client.wire.clear()
    out: list[Record] = []
    cursor = 0     # where the last command's messages start: "wait" looks from there
    for step in steps:
        kind = step[0]
        if kind == "cmd":
            _, name, args = step
            before = cursor = len(client.wire)
            reply = await _execute(client, name, args)
            # the reply is the first reply-like message after `before`
            for i in range(before, len(client.wire)):
                if "return" in client.wire[i] or "error" in client.wire[i]:
                    client.wire[i]["__cmd"] = name
                    client.wire[i]["__reply"] = reply
                    break
        elif kind == "hmp":
            before = cursor = len(client.wire)
            reply = await _execute(client, "human-monitor-command", {"command-line": step[1]})
            for i in range(before, len(client.wire)):
                if "return" in client.wire[i] or "error" in client.wire[i]:
                    client.wire[i]["__cmd"] = "human-monitor-command"
                    client.wire[i]["__reply"] = reply
                    break
        elif kind == "wait":
            _, name, match = step
            start = cursor
            await _wait(lambda n=name, m=match, s=start: _event_seen(client, s, n, m),
                        f"{name} {match}")
        elif kind == "rest":
            job_id = step[1]
            await _wait(lambda j=job_id: _status(client, j) in RESTING, f"{job_id} at rest")
        elif kind == "sleep":
            await asyncio.sleep(step[1])
        elif kind == "img":
            step[1](test_dir)
        else:
            raise ValueError(f"unknown step {step!r}")
    await asyncio.sleep(0.05)   # events that follow the last reply
    for msg in client.wire:
        if "event" in msg:
            out.append(("event", msg["event"], msg.get("data")))
        elif "__cmd" in msg:
            out.append(("reply", msg["__cmd"], msg["__reply"]))
    return out


async def _run_qemu(steps: list[Step], test_dir: Path) -> list[Record]:
    with tempfile.TemporaryDirectory(prefix="qjob") as d:
        sock = os.path.join(d, "qmp.sock")
        proc = subprocess.Popen(
            [QEMU or "qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
             "-S", "-accel", "tcg", "-qmp", f"unix:{sock},server=on,wait=off"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=test_dir)
        client = WireClient("qemu")
        try:
            for attempt in range(250):
                try:
                    await client.connect(sock)
                    break
                except ConnectError:
                    if attempt == 249 or proc.poll() is not None:
                        raise
                    await asyncio.sleep(0.02)
            return await _script(client, steps, test_dir)
        finally:
            with contextlib.suppress(Exception):
                await client.execute("quit")
            with contextlib.suppress(Exception):
                await client.disconnect()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _run_emulator(steps: list[Step], test_dir: Path) -> list[Record]:
    from emulator.machine import Machine
    from emulator.qmp.server import QMPServer

    machine = Machine(test_dir)
    server = QMPServer(machine)
    with tempfile.TemporaryDirectory(prefix="ejob") as d:
        sock = os.path.join(d, "qmp.sock")
        await server.start_unix(sock)
        client = WireClient("emu")
        await client.connect(sock)
        try:
            return await _script(client, steps, test_dir)
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()
            await server.close()
            machine.jobs.cancel_sync_all()
            machine.block.close_all()


def normalize(records: list[Record], test_dir: Path) -> list[Record]:
    text = json.dumps(records).replace(str(test_dir), "TEST_DIR")
    text = re.sub(r"#block\d+", "#blockN", text)
    return [tuple(r) for r in json.loads(text)]  # type: ignore[misc]


def _subst(step: Step, test_dir: Path) -> Step:
    if step[0] == "img":
        return step
    return (step[0], *json.loads(json.dumps(list(step[1:])).replace("@DIR@", str(test_dir))))


def run_script(steps: list[Step], test_dir: Path, *, qemu: bool = False) -> list[Record]:
    """Run ``steps`` ("@DIR@" becomes ``test_dir``) on the emulator or on real QEMU, from
    ``test_dir``; the normalized records in wire order."""
    real = [_subst(s, test_dir) for s in steps]
    runner = _run_qemu if qemu else _run_emulator
    return normalize(asyncio.run(runner(real, test_dir)), test_dir)


def run_both(tmp_path: Path, steps: list[Step],
             setup: Callable[[Path], None] | None = None) -> tuple[list[Record], list[Record]]:
    """The same steps on real QEMU (tmp_path/qemu) and the emulator (tmp_path/emu)."""
    out = []
    for kind in ("qemu", "emu"):
        d = tmp_path / kind
        d.mkdir()
        if setup is not None:
            setup(d)
        out.append(run_script(steps, d, qemu=kind == "qemu"))
    return out[0], out[1]


def events(records: list[Record], *names: str) -> list[Record]:
    return [r for r in records if r[0] == "event" and (not names or r[1] in names)]


def replies(records: list[Record]) -> list[Any]:
    return [r[2] for r in records if r[0] == "reply"]


def create_qcow2(path: Path, size: str = "64M") -> None:
    """qemu-img create -f qcow2 (the emulator's own qemu-img subset if QEMU's is missing)."""
    if QEMU_IMG is not None:
        subprocess.run([QEMU_IMG, "create", "-f", "qcow2", str(path), size], check=True,
                       capture_output=True)
        return
    from emulator import img
    from emulator.sandbox import Sandbox
    assert img.main(["create", "-f", "qcow2", str(path), size],
                    sandbox=Sandbox(path.parent)) == 0


def qemu_img_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QEMU_IMG or "qemu-img", "check", str(path)], capture_output=True,
                          text=True, check=False)


def qemu_img_compare(a: Path, b: Path) -> int:
    return subprocess.run([QEMU_IMG or "qemu-img", "compare", str(a), str(b)],
                          capture_output=True, text=True, check=False).returncode
