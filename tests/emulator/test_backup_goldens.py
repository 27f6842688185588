"""257.out sections driven command by command, without the replayer (tests/qemu-iotests/257).

For a section of each failure kind — none, simulated (cancel while pending), intermediate
(blkdebug's injected read error) — the test runs test_bitmap_sync's steps over QMP on the
emulator and asserts the golden's BLOCK_JOB_* event payloads and bitmap dumps, in order; then,
after the VM quits, that every image passes real ``qemu-img check`` and that real ``qemu-img
compare`` (after 257's ``rebase -u``) gives the golden's verification verdicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.conftest import requires_qemu_img
from tests.emulator.qemu_runner import create_qcow2, emulator_vm, qemu_img

GRANULARITY = 65536
SIZE = 64 << 20
GROUPS = [
    [("0x49", 0x0000000, 0x10000), ("0x6c", 0x0100000, 0x10000),
     ("0x6f", 0x2000000, 0x10000), ("0x76", 0x3ff0000, 0x10000)],
    [("0x65", 0x0000000, 0x10000), ("0x77", 0x00f8000, 0x10000),
     ("0x72", 0x2008000, 0x10000), ("0x69", 0x3fe0000, 0x10000)],
    [("0x74", 0x0010000, 0x10000), ("0x69", 0x00e8000, 0x10000),
     ("0x6e", 0x2018000, 0x10000), ("0x67", 0x3fe0000, 0x20000)],
    [("0xaa", 0x0010000, 0x30000), ("0xbb", 0x00d8000, 0x10000),
     ("0xcc", 0x2028000, 0x10000), ("0xdd", 0x3fc0000, 0x10000)],
]
BLKDEBUG = {
    "set-state": [{"event": "flush_to_disk", "state": 1, "new_state": 2},
                  {"event": "read_aio", "state": 2, "new_state": 3}],
    "inject-error": [{"event": "read_aio", "errno": 5, "state": 3, "immediately": False,
                      "once": True}],
}


class Section:
    """test_bitmap_sync for one (sync mode, bitmap mode, failure) on a live emulator."""

    def __init__(self, client: QMPClient, d: Path, msync: str, bsync: str,
                 failure: str | None) -> None:
        self.client = client
        self.d = d
        self.msync, self.bsync, self.failure = msync, bsync, failure
        self.log: list[Any] = []        # ("event", data) and ("bitmaps", dump) in order
        self.events: list[dict[str, Any]] = []

    async def qmp(self, command: str, /, **args: Any) -> Any:
        return await self.client.execute(command, {k.replace("_", "-"): v
                                                   for k, v in args.items()})

    async def bitmaps(self) -> dict[str, Any]:
        nodes = await self.qmp("query-named-block-nodes")
        dump = {n["node-name"]: n["dirty-bitmaps"] for n in nodes if "dirty-bitmaps" in n}
        self.log.append(("bitmaps", dump))
        return dump

    async def writes(self, n: int, node: str = "drive0") -> None:
        for byte, off, size in GROUPS[n]:
            await self.qmp("human-monitor-command",
                           command_line=f'qemu-io {node} "write -P{byte} {off:#x} {size:#x}"')
        await self.bitmaps()

    async def next_event(self) -> dict[str, Any]:
        while not self.events:
            await asyncio.sleep(0.001)
        return self.events.pop(0)

    async def run_job(self, job: str, *, manual_finalize: bool, callback: Any = None,
                      cancel: bool = False, manual_dismiss: bool = False) -> None:
        """iotests' run_job: log BLOCK_JOB_* events, act on JOB_STATUS_CHANGE."""
        while True:
            ev = await asyncio.wait_for(self.next_event(), 10)
            data = ev.get("data", {})
            if data.get("device", data.get("id")) != job:
                continue
            if ev["event"] != "JOB_STATUS_CHANGE":
                self.log.append(("event", ev["event"], data))
                continue
            status = data["status"]
            if status == "pending" and manual_finalize:
                if callback is not None:
                    await callback()
                await self.qmp("job-cancel" if cancel else "job-finalize", id=job)
            elif status == "concluded" and manual_dismiss:
                await self.qmp("job-dismiss", id=job)
            elif status == "null":
                return

    async def create_target(self, name: str, filename: str) -> None:
        path = str(self.d / filename)
        await self.qmp("blockdev-create", job_id="bdc-file-job",
                       options={"driver": "file", "filename": path, "size": 0})
        await self.run_job("bdc-file-job", manual_finalize=False, manual_dismiss=True)
        await self.qmp("blockdev-add", driver="file", node_name=f"file_{filename}",
                       filename=path)
        await self.qmp("blockdev-create", job_id="bdc-fmt-job",
                       options={"driver": "qcow2", "file": f"file_{filename}", "size": SIZE})
        await self.run_job("bdc-fmt-job", manual_finalize=False, manual_dismiss=True)
        await self.qmp("blockdev-add", driver="qcow2", node_name=name,
                       file=f"file_{filename}")

    async def backup(self, target: str, filename: str, job: str, sync: str,
                     **kw: Any) -> None:
        await self.create_target(target, filename)
        await self.qmp("blockdev-backup", device="drive0", target=target, sync=sync,
                       job_id=job, filter_node_name="backup-top",
                       x_perf={"max-workers": 1}, **kw)

    async def run(self) -> None:
        file_config: dict[str, Any] = {"driver": "file", "filename": str(self.d / "img")}
        if self.failure == "intermediate":
            file_config = {"driver": "blkdebug", "image": file_config, **BLKDEBUG}
        await self.qmp("blockdev-add", node_name="drive0", driver="qcow2", file=file_config)
        await self.writes(0)
        await self.backup("ref_target_0", "fbackup0", "ref_backup_0", "full")
        await self.run_job("ref_backup_0", manual_finalize=False)
        await self.qmp("block-dirty-bitmap-add", node="drive0", name="bitmap0",
                       granularity=GRANULARITY)
        await self.writes(1)
        await self.backup("ref_target_1", "fbackup1", "ref_backup_1", "full")
        await self.run_job("ref_backup_1", manual_finalize=False)
        if self.failure == "intermediate":
            await self.qmp("human-monitor-command", command_line='qemu-io drive0 "flush"')
        await self.backup("backup_target_1", "bsync1", "backup_1", self.msync,
                          bitmap="bitmap0", bitmap_mode=self.bsync, auto_finalize=False)

        async def callback() -> None:
            await self.writes(2, "backup-top")

        await self.run_job("backup_1", manual_finalize=True, callback=callback,
                           cancel=self.failure == "simulated")
        await self.bitmaps()
        await self.writes(3)
        await self.backup("ref_target_2", "fbackup2", "ref_backup_2", "full")
        await self.run_job("ref_backup_2", manual_finalize=False)
        await self.backup("backup_target_2", "bsync2", "backup_2", "bitmap",
                          bitmap="bitmap0", bitmap_mode=self.bsync, auto_finalize=False)
        await self.run_job("backup_2", manual_finalize=True)
        await self.bitmaps()
        await self.qmp("block-dirty-bitmap-remove", node="drive0", name="bitmap0")
        await self.bitmaps()


async def _drive(d: Path, msync: str, bsync: str, failure: str | None) -> list[Any]:
    async with emulator_vm(d) as client:
        section = Section(client, d, msync, bsync, failure)

        async def listen() -> None:
            async for ev in client.events:
                section.events.append(dict(ev))

        listener = asyncio.create_task(listen())
        try:
            await section.run()
            with contextlib.suppress(Exception):
                await client.execute("quit")
        finally:
            listener.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await listener
    return section.log


def golden_section(goldens: Path, title: str) -> tuple[list[Any], list[str]]:
    """The golden's BLOCK_JOB_* event payloads and bitmap dumps in order, and its
    verification lines."""
    text = (goldens / "257.out").read_text()
    body = text.split(f"=== {title} ===", 1)[1].split("\n=== ", 1)[0]
    lines = body.splitlines()
    out: list[Any] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith('{"data"') and '"event": "BLOCK_JOB_' in line:
            ev = json.loads(line)
            out.append(("event", ev["event"], ev["data"]))
        elif line == "{":
            j = lines.index("}", i)
            out.append(("bitmaps", json.loads("\n".join(lines[i:j + 1]))["bitmaps"]))
            i = j
        i += 1
    verdicts = [ln for ln in lines if ln.startswith("qemu_img compare")]
    return out, verdicts


SECTIONS = [
    ("bitmap", "on-success", None),
    ("bitmap", "never", "simulated"),
    ("full", "always", "simulated"),
    ("bitmap", "always", "intermediate"),
    ("full", "on-success", "intermediate"),
    ("top", "always", "intermediate"),
]


def title(msync: str, bsync: str, failure: str | None) -> str:
    cond = f"with {failure} failure" if failure else "without failure"
    return f"Mode {msync}; Bitmap Sync {bsync} {cond}"


@pytest.mark.parametrize(("msync", "bsync", "failure"), SECTIONS)
def test_events_and_bitmaps_as_golden(tmp_path: Path, goldens: Path, msync: str, bsync: str,
                                      failure: str | None) -> None:
    create_qcow2(tmp_path / "img", "64M")
    got = asyncio.run(_drive(tmp_path, msync, bsync, failure))
    expected, _ = golden_section(goldens, title(msync, bsync, failure))
    assert got == expected


@requires_qemu_img
@pytest.mark.parametrize(("msync", "bsync", "failure"), SECTIONS)
def test_images_check_and_compare_as_golden(tmp_path: Path, goldens: Path, msync: str,
                                            bsync: str, failure: str | None) -> None:
    """Targets made by blockdev-create and filled by backup are sound for real qemu-img,
    and real qemu-img compare gives the golden's verdicts."""
    create_qcow2(tmp_path / "img", "64M")
    asyncio.run(_drive(tmp_path, msync, bsync, failure))
    for name in ("img", "fbackup0", "fbackup1", "fbackup2", "bsync1", "bsync2"):
        res = qemu_img("check", tmp_path / name)
        assert res.returncode == 0 and "No errors were found" in res.stdout, (name, res)
    base2 = "bsync1" if not failure or bsync == "always" else "fbackup0"
    assert qemu_img("rebase", "-u", "-b", tmp_path / "fbackup0", "-F", "qcow2",
                    tmp_path / "bsync1").returncode == 0
    assert qemu_img("rebase", "-u", "-b", tmp_path / base2, "-F", "qcow2",
                    tmp_path / "bsync2").returncode == 0
    got = []
    for a, b in (("bsync1", "fbackup1"), ("bsync2", "fbackup2"), ("img", "fbackup2")):
        rc = qemu_img("compare", tmp_path / a, tmp_path / b).returncode
        got.append((a, b, "Identical" if rc == 0 else "Mismatch"))
    _, verdicts = golden_section(goldens, title(msync, bsync, failure))
    expected = [(m[1], m[2], m[3]) for m in (
        re.match(r'qemu_img compare "TEST_DIR/PID-(\w+)" "TEST_DIR/PID-(\w+)" ==> (\w+)', v)
        for v in verdicts) if m]
    assert got == expected
