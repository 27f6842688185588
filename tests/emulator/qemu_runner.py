"""Real QEMU and the emulator, side by side, for the emulator tests (no tests here).

Everything runs over a real UNIX socket with qemu.qmp, on Debian's QEMU 7.2 (started as the
QEMU backend starts it: ``-machine none -S``, no guest code, run from the test directory) or
on the emulator (a Machine whose test directory is the same kind of directory):

* :func:`run_commands` — ``(name, arguments)`` commands; each reply as ``{"return": …}`` or
  ``{"error": {"class", "desc"}}``, as the server gave it;
* :func:`run_script` — a script of steps (below), recorded in *wire order*: each reply right
  after its command, each event where it arrived (qemu.qmp's inbound-message hook records the
  wire, so the order is the server's, not the library's queues');
* :func:`on_both`, :func:`run_both`, :func:`compare_replies` — the same on real QEMU (in
  tmp_path/qemu) and on the emulator (in tmp_path/emu).

``-drive if=none`` options (``drives``) give either VM named BlockBackends, which QMP cannot
create on ``-machine none``. "@DIR@" in steps and drives becomes the test directory.

Steps::

    ("cmd", name, arguments)           # execute; the reply is recorded
    ("hmp", "qemu-io drive0 'flush'")  # human-monitor-command
    ("wait", "BLOCK_JOB_PENDING", {"id": "j"})   # until such an event arrived (10 s)
    ("rest", "j")                      # until JOB_STATUS_CHANGE for j is a resting status
    ("sleep", seconds)
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
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.message import Message

from harness.backends.base import wait_process
from harness.backends.qemu import LAUNCH, QUIT_TIMEOUT, START_TIMEOUT, option_string

QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")

Command = tuple[str, dict[str, Any] | None]
Step = tuple[Any, ...]
Record = tuple[str, str, Any]
Drive = dict[str, Any]
T = TypeVar("T")
RESTING = {"pending", "concluded", "null", "paused", "ready", "standby"}


# -- the two VMs ------------------------------------------------------------------------------
class WireClient(QMPClient):
    """A QMPClient that records every inbound message in arrival order."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.wire: list[dict[str, Any]] = []

    def _cb_inbound(self, msg: Message) -> Message:
        msg = super()._cb_inbound(msg)
        self.wire.append(dict(msg))
        return msg


def _last_line(path: str) -> str:
    with contextlib.suppress(OSError):
        lines = Path(path).read_text(errors="replace").strip().splitlines()
        if lines:
            return f": {lines[-1]}"
    return ""


@contextlib.asynccontextmanager
async def qemu_vm(test_dir: Path, drives: Sequence[Drive] = ()) -> AsyncIterator[WireClient]:
    """Debian's qemu-system-x86_64, run from ``test_dir``, as a connected client; quits after.

    QEMU connects to a socket this side already listens on (qemu.qmp's server mode, as
    harness/backends/qemu.py does): nothing polls for a socket QEMU creates, and a QEMU that
    exits before it connects is reported at once, with its last line of output."""
    sock_dir = tempfile.mkdtemp(prefix="qref-")   # short: UNIX socket paths are limited
    sock = os.path.join(sock_dir, "qmp.sock")
    log_path = os.path.join(sock_dir, "qemu.log")
    argv = [QEMU or "qemu-system-x86_64", *LAUNCH, "-chardev", f"socket,id=mon,path={sock}",
            "-mon", "chardev=mon,mode=control"]
    for drive in drives:
        argv += ["-drive", option_string({"if": "none", **drive})]
    client = WireClient("qemu")
    proc: asyncio.subprocess.Process | None = None
    connected = False
    try:
        await client.start_server(sock)
        with open(log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=test_dir, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)
        accept = asyncio.ensure_future(client.accept())
        exited = asyncio.ensure_future(proc.wait())
        done, _ = await asyncio.wait({accept, exited}, timeout=START_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if accept not in done or accept.exception() is not None:
            accept.cancel()
            with contextlib.suppress(BaseException):
                await accept
            with contextlib.suppress(TimeoutError):   # one that hung up is on its way out
                await asyncio.wait_for(proc.wait(), 2.0)
            reason = (f"exited with status {proc.returncode}" if proc.returncode is not None
                      else f"did not connect within {START_TIMEOUT:.0f} s")
            raise RuntimeError(f"{argv[0]} {reason}{_last_line(log_path)}")
        connected = True
        yield client
    finally:
        if connected:   # QEMU may close the socket before the reply to quit is read
            with contextlib.suppress(Exception):
                await client.execute("quit")
        with contextlib.suppress(Exception):
            await client.disconnect()
        if proc is not None:
            if not connected and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await wait_process(proc, QUIT_TIMEOUT)
        shutil.rmtree(sock_dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def emulator_vm(test_dir: Path,
                      drives: Sequence[Drive] = ()) -> AsyncIterator[WireClient]:
    """A fresh emulator whose test directory is ``test_dir``, served on a UNIX socket, as a
    connected client. Afterwards the VM is gone as after quit: jobs cancelled, every node
    closed (persistent bitmaps stored)."""
    from emulator.machine import Machine
    from emulator.qmp.server import QMPServer

    machine = Machine(test_dir)
    for drive in drives:
        machine.block.add_drive(dict(drive))
    server = QMPServer(machine)
    with tempfile.TemporaryDirectory(prefix="emu-") as d:
        sock = os.path.join(d, "qmp.sock")
        await server.start_unix(sock)
        client = WireClient("emu")
        try:
            await client.connect(sock)
            yield client
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()
            await server.close()
            machine.block.close_all()   # job_cancel_sync_all first, then bdrv_close_all


def vm(test_dir: Path, *, qemu: bool,
       drives: Sequence[Drive] = ()) -> contextlib.AbstractAsyncContextManager[WireClient]:
    return qemu_vm(test_dir, drives) if qemu else emulator_vm(test_dir, drives)


async def execute(client: QMPClient, name: str, args: dict[str, Any] | None = None) -> dict:
    """One command; its reply as ``{"return": …}`` or ``{"error": {"class", "desc"}}``."""
    try:
        return {"return": await client.execute(name, args)}
    except ExecuteError as e:
        return {"error": {"class": e.error_class, "desc": str(e)}}


# -- scripts ------------------------------------------------------------------------------------
def _status(client: WireClient, job_id: str) -> str | None:
    status = None
    for msg in client.wire:
        if msg.get("event") == "JOB_STATUS_CHANGE" and msg["data"]["id"] == job_id:
            status = msg["data"]["status"]
    return status


def _event_seen(client: WireClient, start: int, name: str, match: dict[str, Any]) -> bool:
    return any(msg.get("event") == name
               and all(msg.get("data", {}).get(k) == v for k, v in match.items())
               for msg in client.wire[start:])


async def _wait(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def _script(client: WireClient, steps: Sequence[Step], test_dir: Path) -> list[Record]:
    client.wire.clear()
    cursor = 0     # where the last command's messages start: "wait" looks from there
    for step in steps:
        kind = step[0]
        if kind in ("cmd", "hmp"):
            name, args = (step[1], step[2]) if kind == "cmd" else \
                ("human-monitor-command", {"command-line": step[1]})
            cursor = len(client.wire)
            reply = await execute(client, name, args)
            # the reply is the first reply-like message since the command went out
            for msg in client.wire[cursor:]:
                if "return" in msg or "error" in msg:
                    msg["__cmd"], msg["__reply"] = name, reply
                    break
        elif kind == "wait":
            _, name, match = step
            await _wait(lambda n=name, m=match, s=cursor: _event_seen(client, s, n, m),
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
    out: list[Record] = []
    for msg in client.wire:
        if "event" in msg:
            out.append(("event", msg["event"], msg.get("data")))
        elif "__cmd" in msg:
            out.append(("reply", msg["__cmd"], msg["__reply"]))
    return out


def _subst(value: Any, test_dir: Path) -> Any:
    """"@DIR@" → test_dir, in every string of a JSON value."""
    return json.loads(json.dumps(value).replace("@DIR@", str(test_dir)))


def _outside_paths(value: Any, test_dir: Path) -> list[str]:
    """Absolute paths outside ``test_dir`` in a JSON value: real QEMU runs as whoever runs
    the tests (root in CI) with no sandbox, so a drive-backup to "/etc/passwd" would
    overwrite it. The emulator refuses such paths; tests send them to the emulator only."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _outside_paths(v, test_dir)]
    if isinstance(value, list):
        return [p for v in value for p in _outside_paths(v, test_dir)]
    if isinstance(value, str) and value.startswith("/") and not (
            value == str(test_dir) or value.startswith(f"{test_dir}/")):
        return [value]
    return []


def _run(steps: Sequence[Step], test_dir: Path, qemu: bool,
         drives: Sequence[Drive] | None) -> list[Record]:
    real = [s if s[0] == "img" else (s[0], *_subst(list(s[1:]), test_dir)) for s in steps]
    if qemu:
        outside = _outside_paths([list(s[1:]) for s in real if s[0] in ("cmd", "hmp")],
                                 test_dir)
        if outside:
            raise ValueError(f"refusing to send paths outside the test directory to real "
                             f"QEMU: {sorted(set(outside))}")

    async def go() -> list[Record]:
        async with vm(test_dir, qemu=qemu, drives=_subst(list(drives or []), test_dir)) as c:
            return await _script(c, real, test_dir)

    return asyncio.run(go())


def normalize(value: Any, test_dir: Path, *, sizes: bool = False) -> Any:
    """The test directory → TEST_DIR, #blockNNN → #blockN (QEMU's digits are random), and
    with ``sizes`` every actual-size → 0 (host allocation): what a replay must not depend on."""
    text = json.dumps(value).replace(str(test_dir), "TEST_DIR")
    text = re.sub(r"#block\d+", "#blockN", text)
    if sizes:
        text = re.sub(r'"actual-size": \d+', '"actual-size": 0', text)
    return json.loads(text)


def run_script(steps: Sequence[Step], test_dir: Path, *, qemu: bool = False,
               drives: Sequence[Drive] | None = None) -> list[Record]:
    """``steps`` on the emulator or on real QEMU, from ``test_dir`` (with ``drives`` as
    -drive if=none options); the normalized records in wire order."""
    records = normalize(_run(steps, test_dir, qemu, drives), test_dir)
    return [tuple(r) for r in records]  # type: ignore[misc]


# -- scripts of many jobs: wait for each, never sleep ------------------------------------------
JobFates = tuple[set[str], set[str]]   # (jobs that end by themselves, jobs that go on)


def job_fates(test_dir: Path, script: Callable[[JobFates | None], list[Step]],
              setup: Callable[[Path], None]) -> JobFates:
    """Which jobs of ``script`` end by themselves and which go on until cancelled, from a
    probe of ``script(None)`` on the emulator (in test_dir/probe; see :func:`settle`); the
    comparison against QEMU then waits for each job instead of sleeping."""
    probe = test_dir / "probe"
    probe.mkdir()
    setup(probe)
    seen = {(r[2]["id"], r[2]["status"]) for r in run_script(script(None), probe)
            if r[:2] == ("event", "JOB_STATUS_CHANGE")}
    return ({job for job, status in seen if status == "pending"},
            {job for job, status in seen if status == "aborting"})


def settle(job: str, fates: JobFates | None) -> list[Step]:
    """The steps after a command that may have started ``job``: a job that ends is waited
    for (listed, finalized, dismissed), one that goes on is cancelled; in the probe
    (``fates`` None) the job gets time to end, then a finalize, a dismiss and a cancel."""
    if fates is None:
        return [("sleep", 0.01), ("cmd", "job-finalize", {"id": job}), ("sleep", 0.01),
                ("cmd", "job-dismiss", {"id": job}), ("cmd", "job-cancel", {"id": job}),
                ("sleep", 0.01)]
    ended, going_on = fates
    if job in going_on:
        return [("cmd", "job-cancel", {"id": job}), ("rest", job),
                ("cmd", "job-dismiss", {"id": job})]
    if job in ended:
        return [("rest", job), ("cmd", "query-jobs", {}), ("cmd", "job-finalize", {"id": job}),
                ("rest", job), ("cmd", "job-dismiss", {"id": job})]
    return []


def run_commands(test_dir: Path, commands: Sequence[Command], *, qemu: bool = False,
                 drives: Sequence[Drive] | None = None) -> list[dict]:
    """``commands`` on a fresh emulator (or real QEMU) in ``test_dir``; the replies as
    given. The VM has quit (every node closed, persistent bitmaps stored) when this returns."""
    return replies(_run([("cmd", n, a) for n, a in commands], test_dir, qemu, drives))


def c(_cmd: str, **args: Any) -> Command:
    """A command for run_commands: ``c("blockdev-add", driver="null-co")``."""
    return (_cmd, args)


def io(node: str, command: str) -> Command:
    """HMP qemu-io on ``node`` (a BlockBackend name, else a node name)."""
    return ("human-monitor-command", {"command-line": f'qemu-io {node} "{command}"'})


def replies(records: Iterable[Record]) -> list[Any]:
    return [r[2] for r in records if r[0] == "reply"]


def on_both(tmp_path: Path, run: Callable[[Path, bool], T],
            setup: Callable[[Path], None] | None = None) -> tuple[T, T]:
    """``run(directory, qemu)`` on real QEMU in tmp_path/qemu, then on the emulator in
    tmp_path/emu; ``setup(directory)`` prepares each directory first."""
    out = []
    for kind in ("qemu", "emu"):
        d = tmp_path / kind
        d.mkdir()
        if setup is not None:
            setup(d)
        out.append(run(d, kind == "qemu"))
    return out[0], out[1]


def run_both(tmp_path: Path, steps: Sequence[Step],
             setup: Callable[[Path], None] | None = None, *,
             drives: Sequence[Drive] | None = None) -> tuple[list[Record], list[Record]]:
    """The same script on real QEMU and on the emulator: (QEMU's records, the emulator's)."""
    return on_both(tmp_path, lambda d, q: run_script(steps, d, qemu=q, drives=drives), setup)


def compare_replies(tmp_path: Path, commands: Sequence[Command], *,
                    setup: Callable[[Path], None] | None = None,
                    drives: Sequence[Drive] | None = None) -> None:
    """The same commands on real QEMU and on the emulator give the same replies, command by
    command, but for the directory, auto node names' digits and host allocation sizes."""
    qemu, emu = on_both(tmp_path, lambda d, q: normalize(
        run_commands(d, commands, qemu=q, drives=drives), d, sizes=True), setup)
    for i, (a, b) in enumerate(zip(qemu, emu, strict=True)):
        assert b == a, f"command {i}: {commands[i]}"


# -- views of a transcript ------------------------------------------------------------------------
def without_host_details(value: Any) -> Any:
    """Drop what depends on the host's allocation (``actual-size``), as the differential
    test does: everything else must be the same on both backends."""
    if isinstance(value, dict):
        return {k: without_host_details(v) for k, v in value.items() if k != "actual-size"}
    if isinstance(value, list | tuple):
        return [without_host_details(v) for v in value]
    return value


def _node(n: dict[str, Any]) -> tuple[Any, ...]:
    return (n.get("node-name"), n["drv"], n["file"], n.get("backing_file"),
            [b["count"] for b in n.get("dirty-bitmaps", [])])


def compact(records: Iterable[Record]) -> list[Any]:
    """JOB_STATUS_CHANGE as "id:status", other events as (name, data), replies as
    (command, reply); node listings shrink to (node-name, drv, file, backing, bitmap counts)
    and query-block to (device, its node)."""
    out: list[Any] = []
    for kind, name, data in records:
        if kind == "event" and name == "JOB_STATUS_CHANGE":
            out.append(f"{data['id']}:{data['status']}")
        elif kind == "reply" and name == "query-named-block-nodes" and "return" in data:
            out.append((name, [_node(n) for n in data["return"]]))
        elif kind == "reply" and name == "query-block" and "return" in data:
            out.append((name, [(b["device"], _node(b["inserted"]) if "inserted" in b else None)
                               for b in data["return"]]))
        else:
            out.append((name, data))
    return out


# -- recorded transcripts (for tests that must pass where QEMU is not installed) ----------------
RECORDING = Path(__file__).with_name("test_mirror_recording.json")


def recorded(key: str) -> Any:
    """What QEMU gave for ``key`` ("module:script") when the scripts were recorded."""
    return json.loads(RECORDING.read_text())[key]


def as_recorded(records: Iterable[Record]) -> Any:
    """The compact transcript as the recording stores it (tuples become lists)."""
    return json.loads(json.dumps(compact(records)))


def rerecord(prefix: str, record: Callable[[str, Path], list[Record]],
             names: Iterable[str]) -> None:
    """Replace the recordings "prefix:name" of ``names`` by what ``record(name, directory)``
    gives (each test module's ``main``: on real QEMU, in a fresh directory)."""
    keys = {}
    for name in names:
        with tempfile.TemporaryDirectory(prefix="mirror-rec") as d:
            keys[f"{prefix}:{name}"] = as_recorded(record(name, Path(d)))
    data = json.loads(RECORDING.read_text()) if RECORDING.exists() else {}
    data.update(keys)
    RECORDING.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


# -- offline image tools --------------------------------------------------------------------------
def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Real qemu-img (tests that check images with it are marked requires_qemu_img)."""
    return subprocess.run([QEMU_IMG or "qemu-img", *map(str, args)], capture_output=True,
                          text=True, check=False)


def create_qcow2(path: Path, size: str = "64M", *opts: str,
                 backing: Path | None = None) -> None:
    """qemu-img create -f qcow2 [opts] [-b backing -F qcow2] path size (the emulator's
    qemu-img subset if QEMU's is missing)."""
    args = ["create", "-f", "qcow2", *opts]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    if QEMU_IMG is not None:
        subprocess.run([QEMU_IMG, *args, str(path), size], check=True, capture_output=True)
        return
    from emulator import img
    from emulator.sandbox import Sandbox
    assert img.main([*args, str(path), size], sandbox=Sandbox(path.parent)) == 0


def qemu_io(path: Path, command: str) -> None:
    """qemu-io -f qcow2 -c command path (the emulator's qemu-io if QEMU's is missing)."""
    qemu_io_bin = shutil.which("qemu-io")
    if qemu_io_bin is not None:
        subprocess.run([qemu_io_bin, "-f", "qcow2", "-c", command, str(path)], check=True,
                       capture_output=True)
        return
    from emulator import img
    from emulator import qemu_io as qio
    from emulator.sandbox import Sandbox
    with img.opened(Sandbox(path.parent), str(path), "qcow2", writable=True) as image:
        qio.run(image, command)
