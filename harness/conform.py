"""``qmpreplay conform``: hold the emulator against real QEMU, section by section.

Every section of every golden runs on the emulator and on each QEMU binary given (several
binaries make a version matrix, labelled by their ``--version``). Two questions per section:
does each backend reproduce the golden, and does the emulator agree with QEMU — identical
actual transcripts, whatever the golden says, since the emulator's job is to be QEMU. The
exit status is 0 only if the emulator agrees with every QEMU on every section; a section a
recipe skips on some backend is shown as skipped, with the reason, and counts neither way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.backends import make_factory
from harness.diff import section_diff
from harness.errors import QmpReplayError
from harness.images import ImageComparison, compare_images
from harness.regen import faults
from harness.replay.engine import BackendFactory, PartResult, run_part
from harness.replay.recipe import Recipe, find_recipe
from harness.report.progress import Progress
from harness.transcript import parse_file
from harness.transcript.transcript import Part, Transcript

EMULATOR = "emulator"
# The first QEMU is the referee and runs unbounded (the engine's own timeouts apply); every
# other backend gets FACTOR times the referee's time for the section, at least FLOOR seconds,
# so that a backend that hangs or crawls costs a bounded wait and shows as a fault.
FLOOR, FACTOR = 15.0, 5.0


@dataclass(frozen=True)
class Column:
    """One backend of the matrix: the emulator or one QEMU binary."""

    label: str
    factory: BackendFactory
    binary: str | None = None

    @property
    def is_qemu(self) -> bool:
        return self.label != EMULATOR


@dataclass
class Disagreement:
    """One thing that does not match in a row, with the diff that shows it."""

    what: str                   # "emulator vs golden", "QEMU 7.2.22 vs emulator"
    diff: str
    notes: list[str]


@dataclass
class Row:
    """One golden section and what each backend made of it."""

    file: str
    line: int
    title: str
    part: Part
    runs: dict[str, PartResult] = field(default_factory=dict)
    images: dict[str, ImageComparison] = field(default_factory=dict)   # per QEMU (--images)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def state(self, label: str) -> str:
        """``pass`` (reproduces the golden), ``fail`` (differs), ``fault`` (no verdict), or
        ``skip`` (the recipe says this backend cannot run the section yet)."""
        result = self.runs[label]
        if result.skipped is not None:
            return "skip"
        return "fault" if faults(result) else ("pass" if result.passed else "fail")

    def agreement(self, qemu: str) -> str:
        """``same`` (identical actual transcripts, no faults), ``differs``, ``fault``
        (identical text, but a backend had trouble the transcript cannot show), or ``skip``
        (one side did not run it: neither agreement nor disagreement)."""
        emu, ref = self.runs[EMULATOR], self.runs[qemu]
        if emu.skipped is not None or ref.skipped is not None:
            return "skip"
        if emu.actual_text != ref.actual_text:
            return "differs"
        if qemu in self.images and self.images[qemu].differences:
            return "differs"
        return "fault" if faults(emu) or faults(ref) else "same"

    def disagreements(self, qemus: list[str]) -> list[Disagreement]:
        """Emulator vs each QEMU first (what conformance is about), then each backend vs
        the golden; a diff identical to one already listed joins its title instead."""
        out: list[Disagreement] = []

        def add(what: str, diff: str, notes: list[str]) -> None:
            same = next((d for d in out if d.diff == diff and d.notes == notes), None)
            if same is not None:
                same.what += f"; {what}"
            else:
                out.append(Disagreement(what, diff, notes))

        emu = self.runs[EMULATOR]
        for qemu in qemus:
            if self.agreement(qemu) in ("differs", "fault") and \
                    emu.actual_text != self.runs[qemu].actual_text:
                add(f"emulator vs {qemu} (− {qemu}, + emulator)",
                    _diff(self.runs[qemu].actual, emu.actual, self.file, self.line),
                    faults(emu) + faults(self.runs[qemu]))
            images = self.images.get(qemu)
            if images is not None and images.differences:
                add(f"images: emulator vs {qemu}", "\n".join(images.differences),
                    faults(emu) + faults(self.runs[qemu]))
            elif self.agreement(qemu) == "fault":
                add(f"emulator vs {qemu} (− {qemu}, + emulator)", "",
                    faults(emu) + faults(self.runs[qemu]))
        for label, result in self.runs.items():
            if self.state(label) in ("fail", "fault"):
                add(f"{label} vs golden (− golden, + {label})",
                    _diff(list(self.part.records), result.actual, self.file, self.line),
                    faults(result))
        return out


def _diff(golden: list, actual: list, file: str, line: int) -> str:
    return section_diff(golden, actual, path=file, first_line=line, max_lines=400)


@dataclass
class Matrix:
    files: list[str]
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.columns]

    @property
    def qemus(self) -> list[str]:
        return [c.label for c in self.columns if c.is_qemu]

    def reproduced(self, label: str) -> int:
        return sum(r.state(label) == "pass" for r in self.rows)

    def agreed(self, qemu: str) -> int:
        return sum(r.agreement(qemu) == "same" for r in self.rows)

    def compared(self, qemu: str) -> int:
        """Sections both sides ran (skipped ones are neither agreement nor disagreement)."""
        return sum(r.agreement(qemu) != "skip" for r in self.rows)

    def skipped(self, label: str) -> int:
        return sum(r.state(label) == "skip" for r in self.rows)

    def images(self, qemu: str) -> ImageComparison | None:
        """All the sections' images compared with this QEMU's (``--images``), or None."""
        found = [(r.where, r.images[qemu]) for r in self.rows if qemu in r.images]
        if not found:
            return None
        return ImageComparison(sum(c.compared for _, c in found),
                               [f"{where}: {d}" for where, c in found for d in c.differences])

    @property
    def all_agree(self) -> bool:
        """The exit status: no section the emulator and a QEMU both ran differs."""
        return any(self.compared(q) for q in self.qemus) and \
            all(self.agreed(q) == self.compared(q) for q in self.qemus)


def qemu_label(binary: str) -> str:
    """``QEMU 7.2.22`` from ``--version`` (the backend's preflight already ran it)."""
    proc = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30,
                          check=False)
    words = proc.stdout.split()
    if "version" in words and words.index("version") + 1 < len(words):
        return f"QEMU {words[words.index('version') + 1]}"
    return f"QEMU ({binary})"


def make_columns(binaries: list[str] | None, qemu_img: str | None) -> list[Column]:
    from harness.backends.qemu import find_tool
    columns = [Column(EMULATOR, make_factory(EMULATOR))]
    wanted: list[str | None] = list(binaries) if binaries else [None]
    for given in wanted:
        binary = find_tool(given, "qemu-system-x86_64", "qemu-system-x86")
        factory = make_factory("qemu", binary, qemu_img)
        label = qemu_label(binary)
        if any(c.label == label for c in columns):
            label = f"{label} ({binary})"
        columns.append(Column(label, factory, binary))
    return columns


async def run_matrix(goldens: list[tuple[Transcript, Recipe]], columns: list[Column],
                     progress: Progress, *, images: bool = False) -> Matrix:
    """Every section on every column, the referee QEMU first; with ``images`` each QEMU's
    test directory is kept (its VM shut down as iotests do) and its images compared with
    the emulator's, byte for byte."""
    matrix = Matrix([Path(t.path).name for t, _ in goldens], columns)
    started = time.monotonic()
    referee = next(c for c in columns if c.is_qemu)
    order = [referee, *(c for c in columns if c is not referee)]
    for transcript, recipe in goldens:
        for part in transcript.sections():
            row = Row(Path(transcript.path).name, part.line, part.title, part)
            limit: float | None = None
            for column in order:
                progress.start(row.where, row.title, column.label)
                row.runs[column.label] = await _run_bounded(transcript, part, recipe,
                                                            column, limit, referee.label,
                                                            images)
                if column is referee:
                    limit = max(FLOOR, FACTOR * row.runs[referee.label].seconds)
            row.runs = {c.label: row.runs[c.label] for c in columns}
            if images:
                _compare_images(row)
            matrix.rows.append(row)
            progress.done(row.where, row.title, ", ".join(
                f"{label} {row.state(label)}" for label in matrix.labels))
    progress.finish()
    matrix.seconds = time.monotonic() - started
    return matrix


def _compare_images(row: Row) -> None:
    """The emulator's images against each QEMU's; then the kept directories go."""
    mine = row.runs[EMULATOR].test_dir
    for label, result in row.runs.items():
        if label != EMULATOR and mine is not None and result.test_dir is not None:
            images = compare_images(Path(mine), Path(result.test_dir), reference_label=label)
            pid = f"{os.getpid()}-"   # the images' prefix (TEST_DIR/PID-...) in this process
            images.differences = [d.replace(pid, "PID-") for d in images.differences]
            row.images[label] = images
    for result in row.runs.values():
        if result.test_dir is not None:
            shutil.rmtree(result.test_dir, ignore_errors=True)


async def _run_bounded(transcript: Transcript, part: Part, recipe: Recipe, column: Column,
                       limit: float | None, referee: str, keep_dir: bool) -> PartResult:
    started = time.monotonic()
    try:
        return await asyncio.wait_for(run_part(transcript, part, recipe, column.factory,
                                               keep_dir=keep_dir), limit)
    except TimeoutError:
        return PartResult(transcript.path, part.title, part.line, list(part.records), [],
                          time.monotonic() - started,
                          error=f"did not finish within {limit:.0f} s ({FACTOR:.0f}× "
                                f"{referee}'s time, at least {FLOOR:.0f} s)")


def run(args: argparse.Namespace) -> int:
    from harness.report import render_html, render_terminal
    goldens = [(parse_file(path), find_recipe(path)) for path in args.files]
    columns = make_columns(args.qemu_binary, args.qemu_img)
    total = sum(len(t.sections()) for t, _ in goldens)
    if total == 0:
        raise QmpReplayError("conform: no runnable section in " + ", ".join(args.files))
    progress = Progress(total, sys.stderr)
    matrix = asyncio.run(run_matrix(goldens, columns, progress, images=args.images))
    print(render_terminal(matrix, color=sys.stdout.isatty()))
    if args.html:
        Path(args.html).write_text(render_html(matrix), encoding="utf-8")
        print(f"HTML report: {args.html}")
    return 0 if matrix.all_agree else 1
