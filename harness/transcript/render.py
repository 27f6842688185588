"""Records back to text: the exact inverse of the parser for golden input."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from harness.transcript.records import Record
from harness.transcript.transcript import Transcript


def render_records(records: Iterable[Record]) -> str:
    """The lines of the records, joined, without a final newline."""
    return "\n".join([line for record in records for line in record.lines])


def same_text(a: Sequence[Record], b: Sequence[Record]) -> bool:
    """``render_records(a) == render_records(b)``, without rendering when the records line
    up one for one (as they do wherever a section passes)."""
    if [x.lines for x in a] == [y.lines for y in b]:
        return True
    return render_records(a) == render_records(b)


def render(transcript: Transcript) -> str:
    text = render_records(transcript.records)
    return text + "\n" if transcript.trailing_newline else text
