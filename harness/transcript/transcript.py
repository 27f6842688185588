"""A parsed golden: its records in order, grouped into sections for replay."""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from harness.transcript.records import Blank, Event, Heading, Record, Section, Text


@dataclass(frozen=True)
class Part:
    """A run of records replayed on one fresh backend: a ``=== section ===`` and its body.

    Records before the first section form the preamble part, titled after the file's stem;
    it is runnable only if it does something (goldens 236, 254, 219 have no sections at all).
    """

    title: str
    line: int
    records: tuple[Record, ...]
    index: int

    @property
    def runnable(self) -> bool:
        return any(not isinstance(r, Blank | Text | Heading | Section) for r in self.records)

    @property
    def end_line(self) -> int:
        last = self.records[-1] if self.records else None
        return last.line + len(last.lines) - 1 if last else self.line


@dataclass
class Transcript:
    path: str
    records: list[Record]
    trailing_newline: bool = True

    @property
    def name(self) -> str:
        return Path(self.path).name

    def parts(self) -> list[Part]:
        """Every part in file order; rendering all parts gives the whole file back."""
        groups: list[list[Record]] = [[]]
        for record in self.records:
            if isinstance(record, Section):
                groups.append([])
            groups[-1].append(record)
        parts = []
        stem = Path(self.path).stem
        for index, group in enumerate(groups):
            if not group:
                continue
            head = group[0]
            title = head.title if isinstance(head, Section) else stem
            parts.append(Part(title, head.line, tuple(group), index))
        return parts

    def sections(self) -> list[Part]:
        """The runnable parts: what replay runs and pytest collects."""
        return [p for p in self.parts() if p.runnable]

    def kinds(self) -> Counter[str]:
        return Counter(r.kind for r in self.records)

    @functools.cached_property
    def event_names(self) -> frozenset[str]:
        """The names of the events this golden logs anywhere."""
        return frozenset(r.name for r in self.records if isinstance(r, Event))
