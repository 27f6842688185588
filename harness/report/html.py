"""The conformance matrix as one self-contained HTML page (jinja2, inline CSS, no script).

The page opens with the verdict and the per-backend and per-golden counts, then one table row
per section; every disagreement's diff sits in a ``<details>`` one click away, coloured by
line kind, so the page reads at a glance and still holds the whole evidence.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from harness.regen import faults

if TYPE_CHECKING:
    from harness.conform import Matrix, Row

TEMPLATES = Path(__file__).parent
_EXPLAIN = re.compile(r"^    (line \d+: )?root[\[:]")
WORDS = {"pass": "pass", "fail": "FAIL", "fault": "FAULT", "same": "same", "differs": "DIFFERS",
         "skip": "skipped"}


def diff_lines(diff: str) -> list[tuple[str, str]]:
    """Each line of a ``section_diff`` with its CSS class: hunk, del, add, why or ctx."""
    out = []
    for line in diff.split("\n"):
        if line.startswith("@@"):
            kind = "hunk"
        elif _EXPLAIN.match(line):
            kind = "why"
        elif line.startswith("-"):
            kind = "del"
        elif line.startswith("+"):
            kind = "add"
        else:
            kind = "ctx"
        out.append((kind, line))
    return out


@dataclass
class FileSummary:
    name: str
    sections: int
    reproduced: dict[str, int]
    agreed: dict[str, int]


def _row_view(row: Row, matrix: Matrix, index: int) -> dict[str, Any]:
    states = [(label, row.state(label)) for label in matrix.labels]
    agreements = [(q, row.agreement(q)) for q in matrix.qemus]
    return {
        "id": f"s{index}", "where": row.where, "title": row.title,
        "cells": [(WORDS[s], s) for _, s in states + agreements],
        "kind": ("disagree" if any(a in ("differs", "fault") for _, a in agreements)
                 else "skipped" if all(a == "skip" for _, a in agreements) else "agree"),
        "agreement_states": [WORDS[a].lower() for _, a in agreements],
        "faults": [f"{label}: {f}" for label, r in row.runs.items() for f in faults(r)][:4],
        "skips": [f"{label} skipped: {r.skipped}" for label, r in row.runs.items()
                  if r.skipped is not None],
        "disagreements": [{"what": d.what, "notes": d.notes, "lines": diff_lines(d.diff)}
                          for d in row.disagreements(matrix.qemus)],
    }


def _file_summaries(matrix: Matrix) -> list[FileSummary]:
    out = []
    for name in matrix.files:
        rows = [r for r in matrix.rows if r.file == name]
        out.append(FileSummary(
            name, len(rows),
            {label: sum(r.state(label) == "pass" for r in rows) for label in matrix.labels},
            {q: sum(r.agreement(q) == "same" for r in rows) for q in matrix.qemus}))
    return out


def render_html(matrix: Matrix) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    return env.get_template("conform.html.j2").render(
        matrix=matrix, total=len(matrix.rows),
        rows=[_row_view(r, matrix, i) for i, r in enumerate(matrix.rows, 1)],
        files=_file_summaries(matrix),
        binaries=[(c.label, c.binary) for c in matrix.columns],
        generated=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))
