"""Micro-benchmarks of the emulator's hot paths, driven through QMP as a client would.

Each case builds a fresh Machine in a temporary directory and times one kind of work 257
does many times: a full backup of a 64 MiB qcow2 image with a few data clusters to a new
target (block-copy, copy-before-write, qcow2 zero and data writes), query-named-block-nodes
with a backup running, HMP qemu-io writes, blockdev-create of a qcow2 target, and
``qemu-img compare``. Prints microseconds per operation (best of --repeat). Run:
``python benchmarks/micro_emulator.py [--repeat 5] [case ...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import emulator.commands  # noqa: E402,F401  (registers every command)
from emulator import img  # noqa: E402
from emulator.machine import Machine  # noqa: E402
from emulator.qmp.dispatch import dispatch  # noqa: E402
from emulator.qmp.protocol import QMPSession  # noqa: E402
from emulator.sandbox import Sandbox  # noqa: E402


class Vm:
    def __init__(self, root: Path) -> None:
        self.sandbox = Sandbox(root)
        self.machine = Machine(sandbox=self.sandbox)
        self.session = QMPSession(self.machine)
        self.session.negotiate([])
        self.events: list[dict[str, Any]] = []
        self.machine.add_event_listener(self.events.append)

    async def qmp(self, command: str, /, **arguments: Any) -> Any:
        request = {"execute": command, **({"arguments": arguments} if arguments else {})}
        reply = await dispatch(self.machine, request, allow_oob=False, negotiating=False,
                               session=self.session)
        assert reply is not None and "error" not in reply, reply
        return reply["return"]

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    def qemu_img(self, *argv: str) -> str:
        out = io.StringIO()
        status = img.main(list(argv), sandbox=self.sandbox, stdout=out, stderr=out)
        assert status in (0, 1), out.getvalue()
        return out.getvalue()

    def close(self) -> None:
        self.machine.block.close_all()


async def _prepared(root: Path) -> Vm:
    vm = Vm(root)
    vm.qemu_img("create", "-f", "qcow2", str(root / "img"), "64M")
    await vm.qmp("blockdev-add", driver="qcow2", **{"node-name": "drive0"},
                 file={"driver": "file", "filename": str(root / "img")})
    for i, off in enumerate(("0", "0x100000", "0x2000000", "0x3ff0000")):
        await vm.qmp("human-monitor-command",
                     **{"command-line": f'qemu-io drive0 "write -P{i + 1} {off} 0x10000"'})
    return vm


async def _create_target(vm: Vm, root: Path, name: str) -> None:
    path = str(root / name)
    await vm.qmp("blockdev-create", **{"job-id": "c1"},
                 options={"driver": "file", "filename": path, "size": 0})
    await vm.settle()
    await vm.qmp("job-dismiss", id="c1")
    await vm.qmp("blockdev-add", driver="file", **{"node-name": name + "-file"}, filename=path)
    await vm.qmp("blockdev-create", **{"job-id": "c2"},
                 options={"driver": "qcow2", "file": name + "-file", "size": 64 << 20})
    await vm.settle()
    await vm.qmp("job-dismiss", id="c2")
    await vm.qmp("blockdev-add", driver="qcow2", **{"node-name": name},
                 file={"driver": "file", "filename": path})


async def case_backup(root: Path, n: int) -> float:
    vm = await _prepared(root)
    total = 0.0
    for i in range(n):
        await _create_target(vm, root, f"t{i}")
        started = time.perf_counter()
        await vm.qmp("blockdev-backup", device="drive0", target=f"t{i}", sync="full",
                     **{"job-id": f"b{i}", "x-perf": {"max-workers": 1}})
        await vm.settle()
        total += time.perf_counter() - started
        assert any(e["event"] == "BLOCK_JOB_COMPLETED" for e in vm.events)
        vm.events.clear()
    vm.close()
    return total / n


async def case_query(root: Path, n: int) -> float:
    vm = await _prepared(root)
    for i in range(4):
        await _create_target(vm, root, f"t{i}")
    await vm.qmp("block-dirty-bitmap-add", node="drive0", name="bitmap0")
    started = time.perf_counter()
    for _ in range(n):
        await vm.qmp("query-named-block-nodes")
    seconds = time.perf_counter() - started
    vm.close()
    return seconds / n


async def case_qemu_io(root: Path, n: int) -> float:
    vm = await _prepared(root)
    started = time.perf_counter()
    for i in range(n):
        off = (i * 0x18000) % (60 << 20)
        await vm.qmp("human-monitor-command",
                     **{"command-line": f'qemu-io drive0 "write -P0x{i % 256:x} {off} 0x10000"'})
    seconds = time.perf_counter() - started
    vm.close()
    return seconds / n


async def case_create(root: Path, n: int) -> float:
    vm = Vm(root)
    started = time.perf_counter()
    for i in range(n):
        await _create_target(vm, root, f"t{i}")
    seconds = time.perf_counter() - started
    vm.close()
    return seconds / n


async def case_compare(root: Path, n: int) -> float:
    vm = await _prepared(root)
    vm.close()
    vm.qemu_img("create", "-f", "qcow2", str(root / "other"), "64M")
    started = time.perf_counter()
    for _ in range(n):
        vm.qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(root / "img"),
                    str(root / "other"))
    return (time.perf_counter() - started) / n


CASES: dict[str, tuple[Callable[[Path, int], Coroutine[Any, Any, float]], int]] = {
    "backup": (case_backup, 10),
    "query": (case_query, 200),
    "qemu-io": (case_qemu_io, 200),
    "create": (case_create, 20),
    "compare": (case_compare, 50),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(CASES))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cprofile", metavar="FILE", help="profile the last run of each case")
    args = parser.parse_args()
    for name in args.cases:
        fn, n = CASES[name]
        best = float("inf")
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                best = min(best, asyncio.run(fn(Path(tmp), n)))
        print(f"{name:8} {best * 1e6:10.1f} us per operation (best of {args.repeat})")
        if args.cprofile:
            import cProfile
            import pstats
            with tempfile.TemporaryDirectory() as tmp:
                prof = cProfile.Profile()
                prof.runcall(asyncio.run, fn(Path(tmp), n))
            prof.dump_stats(f"{args.cprofile}.{name}")
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
