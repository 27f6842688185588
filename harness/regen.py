"""``qmpreplay regen``: rerun a case and rewrite its golden from what really happened.

The new text is ``FileResult.actual_text()``: observations (replies, events, bitmap dumps,
"have M", compare outcomes) recomputed, expectations ("expecting N", the wanted compare
outcome) kept, so a changed QEMU shows as changed numbers and ``ERROR!`` lines. The golden is
replaced only with ``--accept``, only if it changed (an untouched file keeps its bytes and
mtime), atomically (temp file + rename), and never from a run in which a backend failed: a
crash or a stuck job frozen into a golden would make the reference itself wrong.

Exit status: 0 reproduced (or accepted and written), 1 differs (not accepted), 2 bad input or
a backend fault (nothing written). The run/fault/write helpers here are shared by ``conform``
and ``record``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from harness.backends import make_factory
from harness.diff import BOLD, CYAN, GREEN, RED, RESET, YELLOW, section_diff
from harness.errors import QmpReplayError
from harness.replay.cli import default_jobs
from harness.replay.engine import PartResult
from harness.replay.recipe import find_recipe
from harness.replay.runner import FileResult, replay_transcript
from harness.transcript import parse_file

MAX_DIFF_LINES = 5000


def faults(result: PartResult) -> list[str]:
    """What went wrong beyond the transcript: the error, and every note (a stuck job, a VM
    gone, a failing hidden step or image tool). A run with any of these must not become a
    golden — the transcript cannot show what went wrong."""
    found = ([f"error: {result.error}"] if result.error else []) + \
        [f"note: {n}" for n in result.notes]
    return [" ".join(f.split()) for f in found]          # one line each, for one-line errors


def write_if_changed(path: str | Path, text: str) -> bool:
    """Replace ``path`` with ``text`` atomically unless it already holds exactly that;
    returns whether it wrote. The new file keeps the old one's permission bits."""
    path = Path(path)
    data = text.encode("utf-8")
    try:
        old: bytes | None = path.read_bytes()
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        old = None
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    if old == data:
        return False
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def file_diff(result: FileResult, color: bool = False) -> str:
    """The whole file's diff, golden → actual, hunks headed by golden line numbers."""
    return section_diff(result.transcript.records, result.actual_records(),
                        path=Path(result.transcript.path).name, first_line=1, color=color,
                        max_lines=MAX_DIFF_LINES)


def _status_line(result: PartResult, color: bool) -> str:
    bad = faults(result)
    if result.skipped is not None:
        word, code, bad = "skipped", CYAN, [f"{result.backend}: {result.skipped}"]
    else:
        word, code = ("fault", YELLOW) if bad else (("same", GREEN) if result.passed
                                                      else ("changed", RED))
    mark = f"{code}{BOLD}{word:<7}{RESET}" if color else f"{word:<7}"
    line = f"{mark} {Path(result.golden_path).name}:{result.line:<5} {result.title}"
    return "\n".join([line, *(f"        {f}" for f in bad)])


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    transcript = parse_file(path)
    recipe = find_recipe(path, args.recipe)
    factory = make_factory(args.backend, args.qemu_binary, args.qemu_img)
    color = sys.stdout.isatty()
    started = time.monotonic()

    def progress(result: PartResult) -> None:
        print(_status_line(result, sys.stderr.isatty()), file=sys.stderr, flush=True)

    result = asyncio.run(replay_transcript(transcript, recipe, factory, on_result=progress,
                                           jobs=default_jobs(args.backend)))
    skipped = [r for r in result.results if r.skipped is not None]
    result.results = [r for r in result.results if r.skipped is None]   # keep golden text
    if not result.results:
        why = f": {skipped[0].skipped}" if skipped else ""
        raise QmpReplayError(f"regen: {path}: no section runs on {args.backend}{why}")
    bad = [r for r in result.results if faults(r)]
    changed = [r for r in result.results if not r.passed and not faults(r)]
    took = f"{time.monotonic() - started:.2f} s"
    if bad:
        raise QmpReplayError(
            f"regen: not writing {path}: {len(bad)} section(s) had a backend fault on "
            f"{args.backend} (first: line {bad[0].line}, {faults(bad[0])[0]})")
    text = result.actual_text()
    if text.encode("utf-8") == path.read_bytes():
        print(f"{path}: reproduced exactly on {args.backend} ({len(result.results)} sections"
              f"{f', {len(skipped)} skipped' if skipped else ''}, {took}); unchanged")
        return 0
    print(file_diff(result, color))
    lines = ", ".join(str(r.line) for r in changed[:10]) + (" …" if len(changed) > 10 else "")
    summary = (f"{path}: {len(changed)} of {len(result.results)} sections changed on "
               f"{args.backend} (line {lines}; {took})"
               f"{f'; {len(skipped)} skipped, kept as they are' if skipped else ''}")
    if not args.accept:
        print(f"{summary}; not written (run with --accept to replace the golden)")
        return 1
    write_if_changed(path, text)
    print(f"{summary}; golden rewritten")
    return 0
