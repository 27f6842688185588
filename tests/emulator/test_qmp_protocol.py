"""The sans-I/O QMP session: framing, negotiation, requests, events — no sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.machine import Machine, event_message
from emulator.qmp.json_writer import to_json
from emulator.qmp.protocol import QMPSession

GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
            b'"package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}\r\n')


@pytest.fixture
def session(tmp_path: Path) -> QMPSession:
    import emulator.commands  # noqa: F401

    return QMPSession(Machine(tmp_path))


def run(session: QMPSession, data: bytes) -> list[bytes | None]:
    async def go() -> list[bytes | None]:
        return [await session.execute(r) for r in session.receive(data)]

    return asyncio.run(go())


def test_greeting(session: QMPSession, tmp_path: Path) -> None:
    assert session.greeting() == GREETING
    no_oob = QMPSession(Machine(tmp_path), offer_oob=False)
    assert no_oob.greeting().endswith(b'"capabilities": []}}\r\n')
    assert run(no_oob, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}') \
        == [b'{"error": {"class": "GenericError", "desc": "Capability oob not available"}}\r\n']


def test_negotiation_and_events(session: QMPSession) -> None:
    event = event_message("STOP", now_us=1_500_000)
    assert session.event_line(event) is None
    assert run(session, b'{"execute": "query-status"}') == [
        b'{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation '
        b"with 'qmp_capabilities'\"}}\r\n"]
    assert run(session, b'{"execute": "qmp_capabilities", "id": null}') == [
        b'{"return": {}, "id": null}\r\n']
    assert session.negotiated and not session.oob_enabled
    assert session.event_line(event) == \
        b'{"timestamp": {"seconds": 1, "microseconds": 500000}, "event": "STOP"}\r\n'
    with_data = event_message("X", {"a": 1}, now_us=0)
    assert session.event_line(with_data) == \
        b'{"timestamp": {"seconds": 0, "microseconds": 0}, "event": "X", "data": {"a": 1}}\r\n'


def test_parse_stops_after_each_message(session: QMPSession) -> None:
    session.feed(b'{"execute": "a"} {"exec-oob": "b"}1}')
    first = session.parse()
    assert [r.value for r in first] == [{"execute": "a"}]
    assert session.has_input
    second = session.parse()
    assert [(r.value, r.oob) for r in second] == [({"exec-oob": "b"}, True)]
    third = session.parse()  # one byte ("}") completes two messages: 1, and "}"
    assert [(r.value, r.error) for r in third] == [
        (1, None), (None, "JSON parse error, expecting value")]
    assert not session.has_input and session.parse() == []


def test_oob_flag_is_syntactic(session: QMPSession) -> None:
    reqs = session.receive(b'{"exec-oob": 1}{"exec-oob": "x", "execute": "y"}[]')
    assert [r.oob for r in reqs] == [True, False, False]


messages = st.lists(st.sampled_from([
    b'{"execute": "query-status"}', b'{"execute": "query-version", "id": [1, "x"]}',
    b"garbage ", b"}", b'{"a": "\xc3\xa9"}', b"\xff", b" \n", b"01", b"'sq'",
]), max_size=8)


@settings(max_examples=200, deadline=None)
@given(messages, st.data())
def test_split_points_do_not_matter(tmp_path_factory: pytest.TempPathFactory,
                                    parts: list[bytes], data: st.DataObject) -> None:
    """Whatever way the bytes arrive, the same requests come out."""
    machine = Machine(tmp_path_factory.mktemp("m"))
    stream = b"".join(parts)
    whole = [(r.value, r.error) for r in QMPSession(machine).receive(stream)]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    session = QMPSession(machine)
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    split = [(r.value, r.error) for piece in pieces for r in session.receive(piece)]
    assert to_json(split) == to_json(whole)
