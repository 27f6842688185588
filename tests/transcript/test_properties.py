"""Property-based round trip: generated transcripts parse back to the same records."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from harness.transcript import parse, render
from harness.transcript.records import (
    BareResult,
    BitmapCheck,
    BitmapDump,
    Blank,
    Command,
    Event,
    ImageCompare,
    QemuIo,
    Record,
    Reply,
    Section,
    Text,
)
from harness.transcript.render import render_records

names = st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters='"'),
                min_size=1, max_size=12)
scalars = st.one_of(st.integers(-2**63, 2**64), st.booleans(), st.none(), names)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(names, inner, max_size=3)), max_leaves=8)
indents = st.sampled_from([None, 2])

command = st.builds(lambda n, a, i: Command.make({"execute": n, "arguments": a}, i),
                    names, st.dictionaries(names, json_values, max_size=3), indents)
reply = st.builds(lambda v, i: Reply.make({"return": v}, i), json_values, indents)
error = st.builds(lambda d: Reply.make({"error": {"class": "GenericError", "desc": d}}), names)
event = st.builds(lambda n, d: Event.make({"event": n, "data": d, "timestamp": {
    "microseconds": "USECS", "seconds": "SECS"}}), names, st.dictionaries(names, json_values))
dump = st.builds(lambda b: BitmapDump.make({"bitmaps": b}, 2),
                 st.dictionaries(names, st.lists(st.dictionaries(names, scalars), max_size=2)))
check = st.builds(BitmapCheck.make, names, st.integers(0, 10**6), st.integers(0, 10**6))
compare = st.builds(ImageCompare.make, names, names, st.booleans(), st.booleans())
text = st.builds(Text.make, st.sampled_from(["Launching VM...", "Job failed: Input/output error",
                                             "query-block: device = drive0, dirty-bitmaps:"]))
io = st.builds(lambda off: QemuIo.make(f"write -P0x49 0x{off:07x} 0x10000"),
               st.integers(0, 2**26))


@st.composite
def transcripts(draw: st.DrawFn) -> list[Record]:
    """Records in the orders iotests prints them (a reply follows its command or echo)."""
    out: list[Record] = []
    for _ in range(draw(st.integers(1, 12))):
        choice = draw(st.integers(0, 8))
        if choice == 0:
            out += [Blank.make(), Section.make(draw(names)), Blank.make()]
        elif choice == 1:
            out += [draw(command), draw(st.one_of(reply, error))]
        elif choice == 2:
            out += [draw(io), Reply.make({"return": ""})]
        elif choice == 3:
            out.append(BareResult.make({}))
        else:
            out.append(draw(st.sampled_from([event, dump, check, compare, text]).flatmap(
                lambda s: s)))
    return out


@settings(max_examples=300, deadline=None)
@given(transcripts())
def test_generated_transcripts_round_trip(records: list[Record]) -> None:
    text = render_records(records) + "\n"
    parsed = parse(text)
    assert render(parsed) == text
    assert [type(r) for r in parsed.records] == [type(r) for r in records]
    assert [r.payload() for r in parsed.records] == [r.payload() for r in records]
