"""Shared helpers for the block-layer tests: a real QEMU to compare with (no tests here).

`run_qemu` starts Debian's qemu-system-x86_64 the way the QEMU backend does for goldens
(no machine, no guest code: ``-machine none -S``), sends QMP commands with qemu.qmp and
returns every reply as ``{"return": ...}`` or ``{"error": {"class", "desc"}}``.
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
from pathlib import Path
from typing import Any

import pytest

QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")

requires_qemu = pytest.mark.skipif(
    QEMU is None, reason="qemu-system-x86_64 not installed (Debian package qemu-system-x86)")
requires_qemu_img = pytest.mark.skipif(
    QEMU_IMG is None, reason="qemu-img not installed (Debian package qemu-utils)")


async def _run(commands: list[tuple[str, dict[str, Any] | None]], args: list[str]) -> list[dict]:
    from qemu.qmp import ConnectError, ExecuteError, QMPClient

    with tempfile.TemporaryDirectory(prefix="qref") as d:
        sock = os.path.join(d, "qmp.sock")
        proc = subprocess.Popen(
            [QEMU or "qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
             "-S", "-accel", "tcg", "-qmp", f"unix:{sock},server=on,wait=off", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            client = QMPClient("ref")
            for attempt in range(250):
                try:
                    await client.connect(sock)
                    break
                except ConnectError:
                    if attempt == 249 or proc.poll() is not None:
                        raise
                    await asyncio.sleep(0.02)
            out: list[dict] = []
            for name, arguments in commands:
                try:
                    ret = await client.execute(name, arguments)
                    out.append({"return": ret})
                except ExecuteError as e:
                    out.append({"error": {"class": e.error_class, "desc": str(e)}})
            # QEMU may close the socket before the reply to quit is read
            with contextlib.suppress(Exception):
                await client.execute("quit")
            with contextlib.suppress(Exception):
                await client.disconnect()
        finally:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return out


def run_qemu(commands: list[tuple[str, dict[str, Any] | None]],
             args: list[str] | None = None) -> list[dict]:
    """Run ``commands`` on a fresh real QEMU and return its replies."""
    return asyncio.run(_run(commands, args or []))


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QEMU_IMG or "qemu-img", *map(str, args)], capture_output=True,
                          text=True, check=False)


# -- the emulator, over a real UNIX socket ------------------------------------------------------
def drive_arg(options: dict[str, Any]) -> str:
    """A -drive option string from the dict Machine.block.add_drive takes."""
    return ",".join(f"{k}={v}" for k, v in options.items())


async def _run_emulator(root: Path, commands: list[tuple[str, dict[str, Any] | None]],
                        drives: list[dict[str, Any]]) -> list[dict]:
    from qemu.qmp import ExecuteError, QMPClient

    from emulator.machine import Machine
    from emulator.qmp.server import QMPServer

    machine = Machine(root)
    for d in drives:
        machine.block.add_drive(d)
    server = QMPServer(machine)
    with tempfile.TemporaryDirectory(prefix="emu") as d:
        sock = os.path.join(d, "qmp.sock")
        await server.start_unix(sock)
        client = QMPClient("emu")
        await client.connect(sock)
        out: list[dict] = []
        try:
            for name, arguments in commands:
                try:
                    out.append({"return": await client.execute(name, arguments)})
                except ExecuteError as e:
                    out.append({"error": {"class": e.error_class, "desc": str(e)}})
        finally:
            await client.disconnect()
            await server.close()
            machine.block.close_all()
    return out


def run_emulator(root: Path, commands: list[tuple[str, dict[str, Any] | None]],
                 drives: list[dict[str, Any]] | None = None) -> list[dict]:
    """Run ``commands`` on a fresh emulator whose test directory is ``root``; the VM quits
    (every node is closed, persistent bitmaps are stored) before this returns."""
    return asyncio.run(_run_emulator(root, commands, drives or []))


def run_both(tmp_path: Path, commands: list[tuple[str, dict[str, Any] | None]], *,
             drives: list[dict[str, Any]] | None = None,
             setup: Any = None) -> tuple[list[dict], list[dict]]:
    """The same commands on real QEMU (in tmp_path/qemu) and on the emulator (in
    tmp_path/emu); ``setup(dir)`` prepares each directory; "@DIR@" in commands and drive
    options becomes that directory. Returns both reply lists with the directory, auto node
    names and host allocation sizes normalized (a replay must not depend on them)."""
    results = []
    for kind in ("qemu", "emu"):
        d = tmp_path / kind
        d.mkdir()
        if setup is not None:
            setup(d)
        cmds = json.loads(json.dumps(commands).replace("@DIR@", str(d)))
        drv = json.loads(json.dumps(drives or []).replace("@DIR@", str(d)))
        if kind == "qemu":
            args = [a for opt in drv for a in ("-drive", drive_arg(opt))]
            res = run_qemu(cmds, args)
        else:
            res = run_emulator(d, cmds, drv)
        results.append(normalize(res, d))
    return results[0], results[1]


def normalize(value: Any, directory: Path) -> Any:
    text = json.dumps(value, sort_keys=True).replace(str(directory), "TEST_DIR")
    text = re.sub(r"#block\d+", "#blockN", text)
    text = re.sub(r'"actual-size": \d+', '"actual-size": 0', text)
    return json.loads(text)


def create_qcow2(path: Path, size: str = "64M", *opts: str) -> None:
    subprocess.run([QEMU_IMG or "qemu-img", "create", "-f", "qcow2", *opts, str(path), size],
                   check=True, capture_output=True)
