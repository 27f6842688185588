"""``qmpreplay replay``: one line per section, a diff per failure, ``N passed, M failed``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

from harness.backends import make_factory
from harness.diff import BOLD, GREEN, RED, RESET, YELLOW, section_diff
from harness.replay.engine import PartResult
from harness.replay.runner import replay_file


def format_result(result: PartResult, color: bool) -> str:
    name = Path(result.golden_path).name
    mark, paint = (("SKIP", YELLOW) if result.skipped else ("PASS", GREEN) if result.passed
                   else ("FAIL", RED))
    if color:
        mark = f"{paint}{BOLD}{mark}{RESET}"
    head = f"{mark}  {name}:{result.line:<5} {result.title}  ({result.seconds:.2f} s)"
    if result.skipped:
        return f"{head}  {result.skipped}"
    if result.passed:
        return head
    body = []
    if result.error:
        body.append(f"error: {result.error}")
    body += [f"note: {n}" for n in result.notes]
    diff = section_diff(result.golden, result.actual, path=name, first_line=result.line,
                        color=color)
    if diff:
        body.append(diff)
    return head + "\n" + "\n".join("    " + ln for b in body for ln in b.split("\n"))


def default_jobs(backend: str) -> int:
    """Sections at once: QEMU's are separate processes and overlap well even beyond the
    CPUs (they mostly wait); the emulator's run in forked workers, one per CPU."""
    cpus = os.cpu_count() or 1
    return min(4, cpus) if backend == "qemu" else cpus


def run(args: argparse.Namespace) -> int:
    factory = make_factory(args.backend, args.qemu_binary, args.qemu_img, args.transport)
    jobs = default_jobs(args.backend) if args.jobs is None else args.jobs
    color = sys.stdout.isatty()
    started = time.monotonic()
    all_results: list[PartResult] = []

    def report(result: PartResult) -> bool:
        all_results.append(result)
        if not (args.quiet and not result.failed):
            print(format_result(result, color), flush=True)
        return not (result.failed and args.exitfirst)

    async def main() -> None:
        for path in args.files:
            await replay_file(path, factory, recipe=args.recipe, keyword=args.keyword,
                              on_result=report, jobs=jobs)
            if args.exitfirst and any(r.failed for r in all_results):
                break

    asyncio.run(main())
    passed = sum(r.passed for r in all_results)
    failed = sum(r.failed for r in all_results)
    skipped = len(all_results) - passed - failed
    if args.junit_xml:
        from harness.replay.junit import write_junit
        write_junit(args.junit_xml, all_results)
    print(f"{len(all_results)} sections of {', '.join(Path(f).name for f in args.files)} "
          f"on {args.backend} in {time.monotonic() - started:.2f} s")
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return 0 if failed == 0 and passed else 1
