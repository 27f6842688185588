"""The pytest side of ``--regen`` and ``--strict-goldens`` (kept out of the plugin module so
that a plain ``pytest goldens/`` imports none of it).

``--regen``: every section item ships its actual text as a user property (which crosses from
xdist workers to the controller); at the end the controller puts each golden together again —
sections that ran give their actual text, the rest their golden text — and rewrites it
atomically if it changed and no section of it had a backend fault.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from harness.pytest_plugin import REGEN_PROPERTY as PROPERTY
from harness.regen import write_if_changed
from harness.transcript import parse_file
from harness.transcript.render import render_records
from harness.transcript.transcript import Transcript


class RegenPlugin:
    """Collects section outcomes on the controller and rewrites goldens at session end."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.runs: dict[str, dict[tuple[int, str], dict[str, Any]]] = {}
        self.outcomes: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        for name, value in report.user_properties:
            if name == PROPERTY and isinstance(value, dict):
                self.runs.setdefault(value["path"], {})[(value["line"], value["title"])] = value

    def pytest_sessionfinish(self) -> None:
        for path, runs in sorted(self.runs.items()):
            self.outcomes.append(regenerate(Path(path), runs))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.outcomes:
            terminalreporter.section("qmpreplay --regen")
            for line in self.outcomes:
                terminalreporter.write_line(line)


def regenerate(path: Path, runs: dict[tuple[int, str], dict[str, Any]]) -> str:
    """Rewrite one golden from its sections' actual texts; say what happened, in one line."""
    bad = [r for r in runs.values() if r["faults"]]
    if bad:
        first = min(bad, key=lambda r: r["line"])
        return (f"{path}: not rewritten: {len(bad)} section(s) had a backend fault "
                f"(line {first['line']}: {first['faults'][0]})")
    transcript = parse_file(path)
    texts, changed = [], 0
    for part in transcript.parts():
        golden = render_records(part.records)
        run = runs.get((part.line, part.title))
        texts.append(run["text"] if run is not None else golden)
        changed += run is not None and run["text"] != golden
    text = "\n".join(texts) + ("\n" if transcript.trailing_newline else "")
    if not write_if_changed(path, text):
        return f"{path}: reproduced ({len(runs)} sections ran); unchanged"
    return f"{path}: rewritten ({changed} of {len(runs)} sections that ran changed)"


def coverage_warnings(root: Path, collected: dict[str, Transcript],
                      selected: set[tuple[str, int]]) -> Iterable[tuple[str, str, int]]:
    """(message, file, line) for golden sections no item of this run selected, and for
    recipes and case templates with no golden."""
    collected = {str(Path(p).resolve()): t for p, t in collected.items()}
    selected = {(str(Path(p).resolve()), line) for p, line in selected}
    projects = {root.resolve(), *(_project_of(Path(p)) for p in collected)}
    seen: dict[str, Transcript | None] = dict(collected)
    for project in sorted(p for p in projects if p is not None):
        for golden in sorted((project / "goldens").rglob("*.out")):
            seen.setdefault(str(golden), None)
    for path, transcript in sorted(seen.items()):
        if transcript is None:
            try:
                transcript = parse_file(path)
            except Exception:  # a broken golden is reported when collected
                continue
        sections = transcript.sections()
        missing = [p for p in sections if (path, p.line) not in selected]
        if missing:
            titles = "; ".join(f"'{p.title}'" for p in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            yield (f"{len(missing)} of {len(sections)} sections of {Path(path).name} not "
                   f"selected by this run: {titles}{more}", path, missing[0].line)
    stems = {Path(p).stem for p in seen}
    for project in sorted(p for p in projects if p is not None):
        for case in sorted((project / "cases").glob("*")):
            if case.suffix in (".toml", ".j2") and case.stem not in stems:
                kind = "recipe" if case.suffix == ".toml" else "case template"
                yield f"{kind} {case.name} has no golden {case.stem}.out", str(case), 1


def _project_of(golden: Path) -> Path | None:
    """The directory above a golden that holds ``cases/`` (as recipes are found)."""
    for base in golden.resolve().parents:
        if (base / "cases").is_dir():
            return base
        if (base / "pyproject.toml").exists() or (base / ".git").exists():
            break
    return None

