"""The conformance matrix for a terminal: one line per section, a summary under it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.diff import BOLD, CYAN, GREEN, RED, RESET, YELLOW

if TYPE_CHECKING:
    from harness.conform import Matrix

TITLE_WIDTH = 60
MARKS = {"pass": ("pass", GREEN), "fail": ("FAIL", RED), "fault": ("FAULT", YELLOW),
         "same": ("same", GREEN), "differs": ("DIFFERS", RED), "skip": ("skipped", CYAN)}


def _cell(state: str, width: int, color: bool) -> str:
    word, code = MARKS[state]
    text = f"{word:<{width}}"
    return f"{code}{text}{RESET}" if color else text


def _title(title: str) -> str:
    return title if len(title) <= TITLE_WIDTH else title[:TITLE_WIDTH - 1] + "…"


def render_terminal(matrix: Matrix, color: bool = False) -> str:
    agree_heads = [f"emulator = {q}" for q in matrix.qemus]
    heads = ["golden", "section", *matrix.labels, *agree_heads]
    where_w = max([len(heads[0]), *(len(r.where) for r in matrix.rows)])
    title_w = max([len(heads[1]), *(len(_title(r.title)) for r in matrix.rows)])
    widths = [max(len(h), 7) for h in heads[2:]]
    bold = (lambda s: f"{BOLD}{s}{RESET}") if color else (lambda s: s)
    lines = [bold("  ".join([f"{heads[0]:<{where_w}}", f"{heads[1]:<{title_w}}",
                             *(f"{h:<{w}}" for h, w in zip(heads[2:], widths, strict=True))
                             ]).rstrip())]
    for row in matrix.rows:
        states = [row.state(label) for label in matrix.labels]
        states += [row.agreement(q) for q in matrix.qemus]
        cells = [_cell(s, w, color) for s, w in zip(states, widths, strict=True)]
        lines.append("  ".join([f"{row.where:<{where_w}}", f"{_title(row.title):<{title_w}}",
                                *cells]).rstrip())
    n = len(matrix.rows)
    lines += ["", f"{n} sections of {', '.join(matrix.files)} in {matrix.seconds:.1f} s"]
    label_w = max(len(label) for label in matrix.labels)
    for label in matrix.labels:
        skipped = matrix.skipped(label)
        lines.append(f"  {label:<{label_w}}  reproduces the golden in "
                     f"{matrix.reproduced(label):>{len(str(n))}} of {n} sections"
                     f"{f' ({skipped} skipped)' if skipped else ''}")
    for q in matrix.qemus:
        agreed, compared = matrix.agreed(q), matrix.compared(q)
        verdict = "conformant" if agreed == compared else f"{compared - agreed} disagree"
        if color:
            verdict = f"{GREEN if agreed == compared else RED}{BOLD}{verdict}{RESET}"
        both = f" both ran ({n - compared} skipped)" if compared != n else ""
        lines.append(f"  emulator agrees with {q} in {agreed} of {compared} sections{both}: "
                     f"{verdict}")
        images = matrix.images(q)
        if images is not None:
            lines.append(f"  images left: {images.identical} of {images.compared} "
                         f"byte-identical with {q}'s")
            lines += [f"    {d}" for d in images.differences]
    return "\n".join(lines)
