"""Records back to text: the exact inverse of the parser for golden input."""

from __future__ import annotations

from collections.abc import Iterable

from harness.transcript.records import Record
from harness.transcript.transcript import Transcript


def render_records(records: Iterable[Record]) -> str:
    """The lines of the records, joined, without a final newline."""
    return "\n".join(line for record in records for line in record.lines)


def render(transcript: Transcript) -> str:
    text = render_records(transcript.records)
    return text + "\n" if transcript.trailing_newline else text
