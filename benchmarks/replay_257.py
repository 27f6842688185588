"""Speed of replaying goldens/257.out: the emulator against real QEMU, in one run.

Prints, for whole ``qmpreplay replay`` processes (start-up included): wall time of each
backend (best of --repeat runs), the emulator's speed-up over QEMU, time per section, peak
RSS, and how time grows when the transcript is ten times longer. Run: ``tox -e bench`` or
``python benchmarks/replay_257.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "goldens" / "257.out"
RECIPE = ROOT / "cases" / "257.toml"
QEMU_RUNNER_SECONDS = (3.8, 4.2)   # QEMU's own iotests runner on 257, measured on this host


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    summary: str
    sections: dict[str, float]


def replay(golden: Path, backend: str, extra: tuple[str, ...] = ()) -> Run:
    """One whole ``qmpreplay replay`` process; its wall time, peak RSS and per-section times."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        argv = [sys.executable, "-m", "harness.cli", "replay", str(golden), "--backend",
                backend, "-q", "--junit-xml", str(junit), *extra]
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=ROOT)
        assert proc.stdout is not None
        output = proc.stdout.read().decode()
        _, _, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        sections = {}
        if junit.exists():
            for case in ET.parse(junit).getroot().iter("testcase"):
                sections[case.get("name", "?")] = float(case.get("time", "0"))
    lines = output.strip().splitlines()
    return Run(seconds, usage.ru_maxrss / 1024, lines[-1] if lines else "(no output)", sections)


def best_of(n: int, golden: Path, backend: str, extra: tuple[str, ...] = ()) -> Run:
    runs = []
    for i in range(n):
        print(f"  {backend}: run {i + 1}/{n} ...", end="\r", flush=True, file=sys.stderr)
        runs.append(replay(golden, backend, extra))
    print(" " * 40, end="\r", file=sys.stderr)
    return min(runs, key=lambda r: r.seconds)


def longer_golden(tmp: Path, times: int) -> Path:
    """257.out with its sections repeated ``times`` times (and its recipe beside it)."""
    text = GOLDEN.read_text()
    head, body = text.split("\n=== ", 1)
    (tmp / "cases").mkdir(exist_ok=True)
    shutil.copy(RECIPE, tmp / "cases" / f"257x{times}.toml")
    path = tmp / f"257x{times}.out"
    path.write_text(head + ("\n=== " + body) * times)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best of)")
    parser.add_argument("--no-qemu", action="store_true", help="measure the emulator only")
    args = parser.parse_args()

    # Installed packages carry bytecode (pip compiles on install); give the source tree the
    # same, even where PYTHONDONTWRITEBYTECODE keeps imports from writing it.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "harness", "emulator"],
                   cwd=ROOT, check=True)
    print(f"replaying {GOLDEN.relative_to(ROOT)} (22 sections), best of {args.repeat}")
    emu = best_of(args.repeat, GOLDEN, "emulator")
    print(f"emulator   {emu.seconds:7.3f} s   peak RSS {emu.peak_rss_mb:6.1f} MB   {emu.summary}")
    # The floor under any whole-process figure: the interpreter, the imports and parsing
    # the golden, with no section selected (so nothing of the emulator runs).
    floor = best_of(args.repeat, GOLDEN, "emulator", ("-k", "no section has this title"))
    print(f"floor      {floor.seconds:7.3f} s   (start-up: interpreter, imports, parsing; "
          "no section run)")
    qemu = None
    if not args.no_qemu and shutil.which("qemu-system-x86_64"):
        qemu = best_of(args.repeat, GOLDEN, "qemu")
        print(f"qemu       {qemu.seconds:7.3f} s   peak RSS {qemu.peak_rss_mb:6.1f} MB   "
              f"{qemu.summary}   (-j default)")
        qemu1 = best_of(args.repeat, GOLDEN, "qemu", ("-j", "1"))
        print(f"qemu -j 1  {qemu1.seconds:7.3f} s   peak RSS {qemu1.peak_rss_mb:6.1f} MB   "
              f"{qemu1.summary}")
        print(f"speed-up of the emulator over QEMU: {qemu.seconds / emu.seconds:6.1f}x "
              f"(over QEMU -j 1: {qemu1.seconds / emu.seconds:.1f}x; target >= 25x, i.e. "
              f"{qemu.seconds / 25:.3f} s, against a start-up floor of {floor.seconds:.3f} s "
              f"= QEMU/{qemu.seconds / floor.seconds:.0f})")
        lo, hi = QEMU_RUNNER_SECONDS
        print(f"QEMU's own iotests runner on 257: {lo}-{hi} s here; qmpreplay on QEMU: "
              f"{qemu.seconds:.2f} s (-j 1: {qemu1.seconds:.2f} s)")

    print("\ntime per section (s):  emulator" + ("      qemu" if qemu else ""))
    for title, seconds in emu.sections.items():
        other = f"{qemu.sections.get(title, float('nan')):10.3f}" if qemu else ""
        print(f"  {title[:52]:52} {seconds:8.3f}{other}")

    with tempfile.TemporaryDirectory() as tmp:
        ten = best_of(max(1, args.repeat - 1), longer_golden(Path(tmp), 10), "emulator")
    print(f"\n10x the transcript (220 sections): {ten.seconds:.3f} s = "
          f"{ten.seconds / emu.seconds:.2f}x the time (target <= 10.5x); "
          f"peak RSS {ten.peak_rss_mb:.1f} MB (target <= 120 MB); {ten.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
