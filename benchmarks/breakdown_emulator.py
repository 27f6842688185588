"""Where the emulator's CPU time goes on a golden, by entry point (no profiler overhead).

Wraps the entry points the harness calls — each QMP command (by name), each qemu-img
subcommand, job steps run from the event loop, machine start and close — with a timer,
replays the golden once to warm up and once measured, and prints seconds and calls per entry
point, biggest first, and the total against the replay's wall time. Run:
``python benchmarks/breakdown_emulator.py [goldens/257.out] [--transport socket]``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import emulator.commands  # noqa: E402,F401
from emulator import img  # noqa: E402
from emulator.block.layer import BlockLayer  # noqa: E402
from emulator.jobs.manager import Scheduled  # noqa: E402
from emulator.machine import Machine  # noqa: E402
from emulator.qmp import registry  # noqa: E402
from harness.backends import make_factory  # noqa: E402
from harness.replay.runner import replay_file  # noqa: E402

SECONDS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
_depth = [0]


def _timed(key: Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _depth[0]:
            return fn(*args, **kwargs)
        _depth[0] += 1
        started = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            name = key(*args, **kwargs)
            SECONDS[name] += time.process_time() - started
            CALLS[name] += 1
            _depth[0] -= 1
    return wrapper


def _install() -> None:
    original_check = registry.Command.check

    def check(self: registry.Command, arguments: dict[str, Any]) -> Any:
        return _timed(lambda *a: "argument checking", original_check)(self, arguments)

    async def call(self: registry.Command, vm: Any, checked: dict[str, Any]) -> Any:
        started = time.process_time()
        _depth[0] += 1
        try:
            result = self.handler(vm, checked) if self.boxed else self.handler(
                vm, **{k.replace("-", "_"): v for k, v in checked.items()})
        finally:
            _depth[0] -= 1
        if asyncio.iscoroutine(result):
            result = await result
        name = "qmp " + self.name
        if self.name == "human-monitor-command":
            name = "hmp " + checked["command-line"].split()[0]
        SECONDS[name] += time.process_time() - started
        CALLS[name] += 1
        return result

    registry.Command.check = check  # type: ignore[method-assign]
    registry.Command.call = call  # type: ignore[method-assign]
    img.main = _timed(lambda argv, **kw: "qemu-img " + argv[0], img.main)
    Scheduled.fire = _timed(lambda self: "job steps (event loop)", Scheduled.fire)
    Machine.__init__ = _timed(lambda *a, **k: "machine start", Machine.__init__)
    BlockLayer.close_all = _timed(lambda self: "close_all (quit)", BlockLayer.close_all)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("golden", nargs="?", default=str(ROOT / "goldens" / "257.out"))
    parser.add_argument("--transport", default="direct", choices=("direct", "socket"))
    parser.add_argument("--repeat", type=int, default=3, help="measured runs (each entry: "
                        "its least time over the runs; the machine may be shared)")
    args = parser.parse_args()
    factory = make_factory("emulator", transport=args.transport)
    asyncio.run(replay_file(args.golden, factory))
    _install()
    best: dict[str, float] = {}
    best_cpu = float("inf")
    for _ in range(args.repeat):
        SECONDS.clear()
        CALLS.clear()
        started = time.process_time()
        asyncio.run(replay_file(args.golden, factory))
        best_cpu = min(best_cpu, time.process_time() - started)
        for name, seconds in SECONDS.items():
            best[name] = min(best.get(name, float("inf")), seconds)
    for name, seconds in sorted(best.items(), key=lambda kv: -kv[1]):
        print(f"{seconds * 1000:8.1f} ms  {CALLS[name]:6d}  {seconds / CALLS[name] * 1e6:8.1f} us"
              f"  {name}")
    print(f"{sum(best.values()) * 1000:8.1f} ms in the emulator; the replay took "
          f"{best_cpu * 1000:.1f} ms of CPU time (least of {args.repeat} runs each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
