"""QEMU's own goldens 236 and 254 reproduced by driving the emulator over QMP.

Each test runs the commands of tests/qemu-iotests/236 (resp. 254) from QEMU 7.2 through
qemu.qmp over a UNIX socket, writes the log the way iotests.py does (qmp_log: execute then
sorted arguments; replies and listings sorted; TEST_DIR/PID- filtering), and compares it
with goldens/236.out (254.out) byte for byte. 254 also checks the images with real qemu-img.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.conftest import GOLDENS, requires_qemu_img
from tests.emulator.qemu_runner import create_qcow2, emulator_vm, execute, qemu_img


def ordered(obj: Any) -> Any:
    """iotests.ordered_qmp."""
    if isinstance(obj, list):
        return [ordered(x) for x in obj]
    if isinstance(obj, dict):
        return OrderedDict((k, ordered(v)) for k, v in sorted(obj.items()))
    return obj


class Log:
    def __init__(self, test_dir: Path) -> None:
        self.lines: list[str] = []
        self.prefix = os.path.join(str(test_dir), f"{os.getpid()}-")

    def __call__(self, msg: Any, indent: int | None = None) -> None:
        if isinstance(msg, dict | list):
            text = json.dumps(msg, sort_keys=not isinstance(msg, OrderedDict), indent=indent)
        else:
            text = msg
        self.lines.append(text.replace(self.prefix, "TEST_DIR/PID-"))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


async def with_vm(root: Path, drives: list[dict[str, Any]],
                  body: Callable[[Any], Awaitable[None]]) -> None:
    async with emulator_vm(root, drives) as client:
        await body(client)


async def qmp(client: Any, cmd: str, **args: Any) -> dict:
    return await execute(client, cmd, args)


async def qmp_log(client: Any, log: Log, cmd: str, indent: int | None = None,
                  **args: Any) -> dict:
    log(OrderedDict((("execute", cmd), ("arguments", ordered(args)))), indent=indent)
    result = await qmp(client, cmd, **args)
    log(result, indent=indent)
    return result


async def hmp_qemu_io(client: Any, drive: str, cmd: str) -> dict:
    line = f'qemu-io {drive} "{cmd}"'
    return await qmp(client, "human-monitor-command", **{"command-line": line})


def drive(path: Path, opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """iotests VM.add_drive with CACHEMODE=writeback AIOMODE=threads, as if=none."""
    return {"if": "none", "id": "drive0", "file": str(path), "format": "qcow2",
            "cache": "writeback", "aio": "threads", **(opts or {})}


@requires_qemu_img
def test_236_golden(tmp_path: Path) -> None:
    log = Log(tmp_path)
    img = tmp_path / f"{os.getpid()}-img"
    granularity = 64 * 1024

    async def body(vm: Any) -> None:
        async def query_bitmaps() -> dict:
            res = await qmp(vm, "query-block")
            return {"bitmaps": {d["device"]: d.get("inserted", {}).get("dirty-bitmaps", [])
                                for d in res["return"]}}

        async def tx(actions: list[dict]) -> None:
            await qmp_log(vm, log, "transaction", indent=2, actions=actions)

        def bm(name: str, **extra: Any) -> dict:
            return {"node": "drive0", "name": name, **extra}

        async def writes(patterns: list[tuple[str, str, str]]) -> None:
            for p in patterns:
                cmd = "write -P{} {} {}".format(*p)
                log(cmd)
                log(await hmp_qemu_io(vm, "drive0", cmd))

        log("\n--- Adding preliminary bitmaps A & B ---\n")
        await qmp_log(vm, log, "block-dirty-bitmap-add", node="drive0", name="bitmapA",
                      granularity=granularity)
        await qmp_log(vm, log, "block-dirty-bitmap-add", node="drive0", name="bitmapB",
                      granularity=granularity)
        log("\n--- Emulating writes ---\n")
        await writes([("0x5d", "0", "64k"), ("0xd5", "1M", "64k"), ("0xdc", "32M", "64k"),
                      ("0xcd", "0x3ff0000", "64k")])
        log(await query_bitmaps(), indent=2)
        log("\n--- Submitting & Aborting Transaction ---\n")
        await tx([{"type": "block-dirty-bitmap-disable", "data": bm("bitmapB")},
                  {"type": "block-dirty-bitmap-add",
                   "data": bm("bitmapC", granularity=granularity)},
                  {"type": "block-dirty-bitmap-clear", "data": bm("bitmapA")},
                  {"type": "abort", "data": {}}])
        log(await query_bitmaps(), indent=2)
        log("\n--- Disabling B & Adding C ---\n")
        await tx([{"type": "block-dirty-bitmap-disable", "data": bm("bitmapB")},
                  {"type": "block-dirty-bitmap-add",
                   "data": bm("bitmapC", granularity=granularity)},
                  {"type": "block-dirty-bitmap-disable", "data": bm("bitmapC")},
                  {"type": "block-dirty-bitmap-enable", "data": bm("bitmapC")}])
        log("\n--- Emulating further writes ---\n")
        await writes([("0xab", "0", "64k"), ("0xad", "0x00f8000", "64k"),
                      ("0x1d", "0x2008000", "64k"), ("0xea", "0x3fe0000", "64k")])
        log("\n--- Disabling A & C ---\n")
        await tx([{"type": "block-dirty-bitmap-disable", "data": bm("bitmapA")},
                  {"type": "block-dirty-bitmap-disable", "data": bm("bitmapC")}])
        log(await query_bitmaps(), indent=2)
        log("\n--- Submitting & Aborting Merge Transaction ---\n")
        add_d = {"type": "block-dirty-bitmap-add",
                 "data": bm("bitmapD", disabled=True, granularity=granularity)}
        merge = {"type": "block-dirty-bitmap-merge",
                 "data": {"node": "drive0", "target": "bitmapD",
                          "bitmaps": ["bitmapB", "bitmapC"]}}
        await tx([add_d, merge, {"type": "abort", "data": {}}])
        log(await query_bitmaps(), indent=2)
        log("\n--- Creating D as a merge of B & C ---\n")
        await tx([add_d, merge])
        log(await query_bitmaps(), indent=2)
        a = await qmp(vm, "x-debug-block-dirty-bitmap-sha256", node="drive0", name="bitmapA")
        d = await qmp(vm, "x-debug-block-dirty-bitmap-sha256", node="drive0", name="bitmapD")
        assert a["return"]["sha256"] == d["return"]["sha256"]
        log("\n--- Removing bitmaps A, B, C, and D ---\n")
        for name in ("bitmapA", "bitmapB", "bitmapC", "bitmapD"):
            await qmp_log(vm, log, "block-dirty-bitmap-remove", node="drive0", name=name)
        log("\n--- Final Query ---\n")
        log(await query_bitmaps(), indent=2)
        log("\n--- Done ---\n")

    log("--- Preparing image & VM ---\n")
    create_qcow2(img, "64M")
    asyncio.run(with_vm(tmp_path, [drive(img)], body))
    assert log.text() == (GOLDENS / "236.out").read_text()


@requires_qemu_img
def test_254_golden(tmp_path: Path) -> None:
    """External snapshot with bitmap copying and moving: bitmap1 is stored into the base
    image when blockdev-snapshot-sync's commit reopens it read-only; bitmap2 is not (removed
    in the same transaction); the new top image gets both persistent bitmaps at quit."""
    log = Log(tmp_path)
    disk = tmp_path / f"{os.getpid()}-disk"
    top = tmp_path / f"{os.getpid()}-top"
    create_qcow2(disk, str(1024 * 1024))

    async def body(vm: Any) -> None:
        await qmp_log(vm, log, "block-dirty-bitmap-add", node="drive0", name="bitmap0")
        await qmp_log(vm, log, "block-dirty-bitmap-add", node="drive0", name="bitmap1",
                      persistent=True)
        await qmp_log(vm, log, "block-dirty-bitmap-add", node="drive0", name="bitmap2",
                      persistent=True)
        await hmp_qemu_io(vm, "drive0", "write 0 512K")

        def copy(name: str, persistent: bool) -> list[dict]:
            add: dict[str, Any] = {"node": "snap", "name": name}
            if persistent:
                add["persistent"] = True
            return [{"type": "block-dirty-bitmap-add", "data": add},
                    {"type": "block-dirty-bitmap-merge",
                     "data": {"node": "snap", "target": name,
                              "bitmaps": [{"node": "base", "name": name}]}}]

        await qmp_log(vm, log, "transaction", indent=2, actions=[
            {"type": "blockdev-snapshot-sync",
             "data": {"device": "drive0", "snapshot-file": str(top),
                      "snapshot-node-name": "snap"}},
            *copy("bitmap0", False), *copy("bitmap1", True), *copy("bitmap2", True),
            {"type": "block-dirty-bitmap-remove", "data": {"node": "base", "name": "bitmap2"}}])
        result = (await qmp(vm, "query-block"))["return"][0]
        log("query-block: device = {}, node-name = {}, dirty-bitmaps:".format(
            result["device"], result["inserted"]["node-name"]))
        log(result["inserted"]["dirty-bitmaps"], indent=2)
        log("\nbitmaps in backing image:")
        log(result["inserted"]["image"]["backing-image"]["format-specific"]["data"]["bitmaps"],
            indent=2)

    asyncio.run(with_vm(tmp_path, [drive(disk, {"node-name": "base"})], body))
    assert log.text() == (GOLDENS / "254.out").read_text()
    for image, names in ((disk, ["bitmap1"]), (top, ["bitmap2", "bitmap1"])):
        info = json.loads(qemu_img("info", "--output=json", image).stdout)
        stored = info["format-specific"]["data"]["bitmaps"]
        assert [b["name"] for b in stored] == names
        assert all(b["flags"] == ["auto"] for b in stored)
        assert qemu_img("check", image).returncode == 0
    top_info = json.loads(qemu_img("info", "--output=json", top).stdout)
    assert top_info["backing-filename"] == str(disk)
