"""Helpers for the mirror tests (no tests here): run_script with -drive BlockBackends.

Mirror's pivot is only visible through a BlockBackend (query-block), and QMP cannot create
a named one on ``-machine none``; so the VM may get ``-drive if=none,...`` options, on real
QEMU and on the emulator alike. Everything else is test_job_helpers' wire recording.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError

from harness.backends.qemu import option_string
from tests.emulator.test_job_helpers import (
    QEMU,
    QEMU_IMG,
    Record,
    Step,
    WireClient,
    _script,
    _subst,
    normalize,
)

Drive = dict[str, Any]


async def _qemu(steps: list[Step], test_dir: Path, drives: list[Drive]) -> list[Record]:
    with tempfile.TemporaryDirectory(prefix="qmir") as d:
        sock = os.path.join(d, "qmp.sock")
        argv = [QEMU or "qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display",
                "none", "-S", "-accel", "tcg", "-qmp", f"unix:{sock},server=on,wait=off"]
        for drive in drives:
            argv += ["-drive", option_string({"if": "none", **drive})]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=test_dir)
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


async def _emulator(steps: list[Step], test_dir: Path, drives: list[Drive]) -> list[Record]:
    from emulator.machine import Machine
    from emulator.qmp.server import QMPServer

    machine = Machine(test_dir)
    for drive in drives:
        machine.block.add_drive(dict(drive))
    server = QMPServer(machine)
    with tempfile.TemporaryDirectory(prefix="emir") as d:
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


def run(steps: list[Step], test_dir: Path, *, qemu: bool = False,
        drives: list[Drive] | None = None) -> list[Record]:
    """``steps`` ("@DIR@" → test_dir) on real QEMU or the emulator, with ``drives`` as
    -drive if=none options; the normalized wire records."""
    real = [_subst(s, test_dir) for s in steps]
    dr = [json.loads(json.dumps(d).replace("@DIR@", str(test_dir))) for d in drives or []]
    runner = _qemu if qemu else _emulator
    return normalize(asyncio.run(runner(real, test_dir, dr)), test_dir)


def qcow2(path: Path, size: str = "4M", backing: Path | None = None) -> None:
    """qemu-img create -f qcow2 [-b backing -F qcow2] (the emulator's qemu-img without
    QEMU's); data is written over QMP (HMP qemu-io) by the scripts themselves."""
    args = ["create", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    if QEMU_IMG is not None:
        subprocess.run([QEMU_IMG, *args, str(path), size], check=True, capture_output=True)
        return
    from emulator import img
    from emulator.sandbox import Sandbox
    assert img.main([*args, str(path), size], sandbox=Sandbox(path.parent)) == 0


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


def compact(records: list[Record]) -> list[Any]:
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
    return json.loads(json.dumps(out))   # tuples as lists: comparable with literals


RECORDING = Path(__file__).with_name("test_mirror_recording.json")


def recorded(key: str) -> Any:
    """What QEMU gave for ``key`` ("module:script") when the scripts were recorded."""
    return json.loads(RECORDING.read_text())[key]


def rerecord(keys: dict[str, Any]) -> None:
    """Replace the recordings of ``keys`` (key → compact transcript from real QEMU)."""
    data = json.loads(RECORDING.read_text()) if RECORDING.exists() else {}
    data.update(keys)
    RECORDING.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def qemu_io(path: Path, command: str) -> None:
    """qemu-io -f qcow2 -c command path (the emulator's qemu-io without QEMU's)."""
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


def img_tool(*args: str) -> subprocess.CompletedProcess[str]:
    """Real qemu-img (tests that check images with it are marked requires_qemu_img)."""
    return subprocess.run([QEMU_IMG or "qemu-img", *args], capture_output=True, text=True,
                          check=False)
