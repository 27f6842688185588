"""block-copy's fast paths change nothing anyone can see.

Runs generated backup scenarios twice in the emulator — with the deferred and merged zero
writes and the zero-extent fast-forward (emulator/jobs/zero_run.py, BlockCopyState.
zero_extent_end / fast_forward_zeroes), and with them switched off, which is one task after
the other as before — and requires the same replies, the same events in the same order and
byte-identical image files. Scenarios vary the source's data and zero clusters, backing files
(sync=top), sync bitmaps, max-chunk, rate limits, blkdebug below the source or the target,
and guest writes through the filter while the job runs.
"""

from __future__ import annotations

import asyncio
import io
import random
from pathlib import Path
from typing import Any

import pytest

import emulator.commands  # noqa: F401  (registers the commands)
from emulator import img
from emulator.jobs import block_copy
from emulator.jobs.zero_run import ZeroRun
from emulator.machine import Machine
from emulator.qmp.dispatch import dispatch
from emulator.qmp.protocol import QMPSession
from emulator.sandbox import Sandbox

MiB = 1 << 20
SIZE = 16 * MiB


def _qemu_img(root: Path, *argv: str) -> None:
    out = io.StringIO()
    assert img.main(list(argv), sandbox=Sandbox(root), stdout=out, stderr=out) == 0, \
        out.getvalue()


def _qemu_io(root: Path, name: str, command: str) -> None:
    from emulator import qemu_io
    assert qemu_io.offline(Sandbox(root), str(root / name), "qcow2", [command])[0] == 0


def _node(root: Path, name: str, rule: dict[str, Any] | None) -> dict[str, Any]:
    file: dict[str, Any] = {"driver": "file", "filename": str(root / name)}
    if rule is not None:
        file = {"driver": "blkdebug", "image": file, "inject-error": [rule]}
    return {"driver": "qcow2", "node-name": name, "file": file}


def scenario(seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)
    clusters = SIZE // 65536
    writes = []
    for _ in range(rnd.randint(0, 12)):
        kind = rnd.choice(["data", "data", "zero", "run"])
        start = rnd.randrange(clusters) * 65536
        length = 65536 * (rnd.randint(2, 40) if kind == "run" else rnd.randint(1, 2))
        length = min(length, SIZE - start)
        writes.append((kind, start, length, rnd.randrange(1, 256)))
    rules = [None, None, {"event": "read_aio", "once": True},
             {"event": "read_aio", "state": 0, "iotype": "read", "once": True},
             {"event": "none", "iotype": "block-status", "once": True}]
    return {
        "backing": rnd.random() < 0.3,
        "writes": writes,
        "sync": rnd.choice(["full", "full", "top", "bitmap"]),
        "bitmap_writes": [(rnd.randrange(clusters) * 65536, rnd.randint(1, 3) * 65536)
                          for _ in range(rnd.randint(1, 4))],
        "max_chunk": rnd.choice([0, 0, 65536, 3 * 65536, 5 * MiB // 2]),
        "speed": rnd.choice([0, 0, 0, 0, 0, 32 * MiB]),
        "source_rule": rnd.choice(rules),
        "target_rule": rnd.choice([None, None, {"event": "write_aio", "once": True},
                                   {"event": "l2_update", "once": True}]),
        "guest_writes": [(rnd.randrange(clusters) * 65536, rnd.randrange(1, 256))
                         for _ in range(rnd.randint(0, 2))],
    }


async def _run(root: Path, sc: dict[str, Any]) -> list[Any]:
    if sc["backing"]:
        _qemu_img(root, "create", "-f", "qcow2", str(root / "base"), str(SIZE))
        _qemu_io(root, "base", f"write -P 7 0 {2 * MiB}")
        _qemu_img(root, "create", "-f", "qcow2", "-b", str(root / "base"), "-F", "qcow2",
                  str(root / "src"))
    else:
        _qemu_img(root, "create", "-f", "qcow2", str(root / "src"), str(SIZE))
    for kind, start, length, pattern in sc["writes"]:
        flag = "-z" if kind == "zero" else f"-P {pattern}"
        _qemu_io(root, "src", f"write {flag} {start} {length}")
    _qemu_img(root, "create", "-f", "qcow2", str(root / "dst"), str(SIZE))

    machine = Machine(sandbox=Sandbox(root))
    session = QMPSession(machine)
    session.negotiate([])
    log: list[Any] = []
    machine.add_event_listener(lambda e: log.append(("event", e["event"], e.get("data"))))

    async def qmp(command: str, /, **args: Any) -> None:
        request = {"execute": command, **({"arguments": args} if args else {})}
        reply = await dispatch(machine, request, allow_oob=False, negotiating=False,
                               session=session)
        log.append(("reply", command, reply))

    await qmp("blockdev-add", **_node(root, "src", sc["source_rule"]))
    await qmp("blockdev-add", **_node(root, "dst", sc["target_rule"]))
    extra: dict[str, Any] = {}
    if sc["sync"] == "bitmap":
        await qmp("block-dirty-bitmap-add", node="src", name="b0")
        for start, length in sc["bitmap_writes"]:
            await qmp("human-monitor-command",
                      **{"command-line": f'qemu-io src "write -P 9 {start} {length}"'})
        extra = {"bitmap": "b0", "bitmap-mode": "on-success"}
    perf = {"max-workers": 1, **({"max-chunk": sc["max_chunk"]} if sc["max_chunk"] else {})}
    await qmp("blockdev-backup", device="src", target="dst", sync=sc["sync"], speed=sc["speed"],
              **{"job-id": "j", "filter-node-name": "top", "x-perf": perf}, **extra)
    for offset, pattern in sc["guest_writes"]:
        await qmp("human-monitor-command",
                  **{"command-line": f'qemu-io top "write -P {pattern} {offset} 64k"'})
    for _ in range(5000):
        if any(r[0] == "event" and r[1] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
               for r in log):
            break
        await qmp("query-jobs")
        await asyncio.sleep(0.001 if sc["speed"] else 0)
    await qmp("query-named-block-nodes")
    await qmp("quit")
    machine.block.close_all()
    if sc["speed"]:   # how often a rate-limited job was polled is the clock's business
        log = [e for e in log if e[:2] != ("reply", "query-jobs")]
    files = {name: (root / name).read_bytes().replace(str(root).encode(), b"ROOT")
             for name in ("src", "dst")}
    return [_drop_polls(log), files]


def _drop_polls(log: list[Any]) -> list[Any]:
    """Consecutive identical polls are one observation (their number is timing)."""
    out: list[Any] = []
    for entry in log:
        if out and entry[0] == "reply" and entry[1] == "query-jobs" and out[-1] == entry:
            continue
        out.append(entry)
    return out


def _slow(monkeypatch: pytest.MonkeyPatch) -> None:
    """One task after the other, each write issued at once: the code without fast paths."""
    monkeypatch.setattr(ZeroRun, "defer", lambda self, task: False)
    monkeypatch.setattr(block_copy.BlockCopyState, "zero_extent_end", lambda self, off: 0)


@pytest.mark.parametrize("seed", range(40))
def test_fast_paths_are_invisible(seed: int, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    sc = scenario(seed)
    (tmp_path / "fast").mkdir()
    (tmp_path / "slow").mkdir()
    fast = asyncio.run(_run(tmp_path / "fast", sc))
    with monkeypatch.context() as m:
        _slow(m)
        slow = asyncio.run(_run(tmp_path / "slow", sc))
    fast_log = [_rename(e, tmp_path / "fast") for e in fast[0]]
    slow_log = [_rename(e, tmp_path / "slow") for e in slow[0]]
    assert fast_log == slow_log
    assert fast[1] == slow[1]


def _rename(value: Any, root: Path) -> Any:
    """The test directory's path replaced by ROOT, everywhere in a logged value."""
    if isinstance(value, str):
        return value.replace(str(root), "ROOT")
    if isinstance(value, dict):
        return {k: _rename(v, root) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_rename(v, root) for v in value)
    return value
