"""Readable differences between a golden section and what a backend did.

Text is diffed line by line (unified, each hunk headed by the golden's file and line);
where a changed line belongs to a JSON record, deepdiff names the exact path that changed,
e.g. ``root['data']['len']: 393216 → 458752``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from typing import Any

from harness.transcript.records import JsonRecord, Record

RED, GREEN, CYAN, YELLOW, BOLD, RESET = ("\033[31m", "\033[32m", "\033[36m", "\033[33m",
                                         "\033[1m", "\033[0m")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def explain_json(golden: Any, actual: Any) -> list[str]:
    """One line per changed path: ``root[...]: golden → actual``."""
    from deepdiff import DeepDiff  # only when something differs: it imports numpy (~0.2 s)
    diff = DeepDiff(golden, actual, verbose_level=2)
    out = []
    for kind in ("values_changed", "type_changes"):
        for path, change in diff.get(kind, {}).items():
            out.append(f"{path}: {_short(change['old_value'])} → {_short(change['new_value'])}")
    for kind, verb in (("dictionary_item_removed", "missing"),
                       ("iterable_item_removed", "missing"),
                       ("dictionary_item_added", "unexpected"),
                       ("iterable_item_added", "unexpected")):
        for path, value in diff.get(kind, {}).items():
            out.append(f"{path}: {verb} {_short(value)}")
    return out


def _line_owners(records: Sequence[Record]) -> list[Record]:
    owners: list[Record] = []
    for r in records:
        owners += [r] * len(r.lines)
    return owners


def section_diff(golden: Sequence[Record], actual: Sequence[Record], *, path: str,
                 first_line: int, color: bool = False, context: int = 3,
                 max_lines: int = 200) -> str:
    """A unified diff of the section, hunks headed ``@@ FILE:LINE @@``, JSON explained."""
    g_lines = [ln for r in golden for ln in r.lines]
    a_lines = [ln for r in actual for ln in r.lines]
    g_owner, a_owner = _line_owners(golden), _line_owners(actual)

    def paint(code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if color else text

    out: list[str] = []
    matcher = difflib.SequenceMatcher(None, g_lines, a_lines, autojunk=False)
    for group in matcher.get_grouped_opcodes(context):
        out.append(paint(CYAN, f"@@ {path}:{first_line + group[0][1]} @@"))
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                out += [f" {ln}" for ln in g_lines[i1:i2]]
                continue
            out += [paint(RED, f"-{ln}") for ln in g_lines[i1:i2]]
            out += [paint(GREEN, f"+{ln}") for ln in a_lines[j1:j2]]
            if tag == "replace":
                out += [paint(YELLOW, f"    {line}") for line in
                        _explain_block(g_owner[i1:i2], a_owner[j1:j2])]
    if len(out) > max_lines:
        out = [*out[:max_lines], f"... ({len(out) - max_lines} more diff lines)"]
    return "\n".join(out)


def _explain_block(golden: Sequence[Record], actual: Sequence[Record]) -> list[str]:
    """Pair the JSON records a replaced block touches, in order, and deepdiff each pair."""
    def unique_json(records: Sequence[Record]) -> list[JsonRecord]:
        seen: list[JsonRecord] = []
        for r in records:
            if isinstance(r, JsonRecord) and (not seen or seen[-1] is not r):
                seen.append(r)
        return seen
    lines = []
    for g, a in zip(unique_json(golden), unique_json(actual), strict=False):
        if g.kind == a.kind:
            where = f"line {g.line}: " if g.line else ""
            lines += [f"{where}{change}" for change in explain_json(g.value, a.value)]
    return lines
