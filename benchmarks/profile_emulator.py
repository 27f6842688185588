"""Profile the emulator on a golden, in this process (start-up imports excluded).

Replays the golden once to warm up (imports, compiled regexes), then ``--repeat`` times
timed; prints the best wall time and the number of sections passed. With ``--cprofile FILE``
the last timed run is profiled with cProfile (stats saved to FILE, the top printed); with
``--pyinstrument`` with pyinstrument (``pip install pyinstrument``). Run:
``python benchmarks/profile_emulator.py goldens/257.out --repeat 5 --cprofile /tmp/p``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.backends import make_factory  # noqa: E402
from harness.replay.runner import replay_file  # noqa: E402


def run_once(golden: str, transport: str) -> tuple[float, int, int]:
    factory = make_factory("emulator", transport=transport)
    started = time.perf_counter()
    results = asyncio.run(replay_file(golden, factory))
    seconds = time.perf_counter() - started
    return seconds, sum(r.passed for r in results), len(results)


def _emulator_seconds(frame: object) -> float:
    """Time of the outermost frames that are emulator code (everything they call)."""
    path = getattr(frame, "file_path", None) or ""
    if "/emulator/" in path:
        return float(frame.time)  # type: ignore[attr-defined]
    return sum(_emulator_seconds(child) for child in frame.children)  # type: ignore[attr-defined]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("golden", nargs="?", default=str(ROOT / "goldens" / "257.out"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--transport", default="direct", choices=("direct", "socket"))
    parser.add_argument("--cprofile", metavar="FILE")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--pyinstrument", action="store_true")
    args = parser.parse_args()

    run_once(args.golden, args.transport)
    times = []
    for _ in range(args.repeat):
        seconds, passed, total = run_once(args.golden, args.transport)
        times.append(seconds)
    print(f"{args.golden}: best {min(times):.3f} s, median {sorted(times)[len(times) // 2]:.3f} s"
          f" of {len(times)} runs; {passed}/{total} sections passed")
    if args.cprofile:
        prof = cProfile.Profile()
        prof.runcall(run_once, args.golden, args.transport)
        prof.dump_stats(args.cprofile)
        pstats.Stats(args.cprofile).sort_stats(args.sort).print_stats(args.top)
    if args.pyinstrument:
        from pyinstrument import Profiler
        profiler = Profiler(interval=0.0005)
        profiler.start()
        run_once(args.golden, args.transport)
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False, show_all=False))
        emulator = _emulator_seconds(profiler.last_session.root_frame())
        total = profiler.last_session.duration
        print(f"inside emulator/: {emulator:.3f} s of {total:.3f} s sampled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
