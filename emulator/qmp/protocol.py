"""A QMP session without I/O: bytes in, requests out; requests in, reply bytes out.

The transport (:mod:`emulator.qmp.server`) owns the socket and the order of execution; this
object owns what QEMU's monitor keeps per connection: the JSON stream, the negotiation state
and the capabilities.  Use::

    session = QMPSession(machine)
    send(session.greeting())
    session.feed(data)                        # bytes from the client
    while session.has_input:
        for request in session.parse():       # parse errors come out as requests too
            reply = await session.execute(request)   # None: nothing to send
    line = session.event_line(event)          # None until negotiation is complete

``parse()`` stops after the byte that completes a message, because QEMU's monitor reads
one byte at a time and stops reading while it is suspended (always after an in-band request
when OOB is off), so later bytes are parsed in the state the earlier request left behind.
``request.oob`` marks what QEMU runs at once, ahead of queued in-band requests: any object
with "exec-oob" and no "execute", even when OOB was not negotiated (the reply then says
"QMP input member 'exec-oob' is unexpected").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from emulator.qmp.dispatch import dispatch, is_oob, parse_error_response
from emulator.qmp.errors import CommandNotFound, GenericError, error_object
from emulator.qmp.json_writer import encode_message

# VersionTriple in QAPI member order: the order QEMU inserts the keys, which decides the
# wire order of keys sharing a QDict bucket ("minor" and "micro" do)
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 22}
QEMU_PACKAGE = "Debian 1:7.2+dfsg-7+deb12u18+b3"
CAPABILITIES = ("oob",)

if TYPE_CHECKING:
    from emulator.qmp.json_streamer import JSONMessageParser

log = logging.getLogger("emulator.qmp")


@dataclass
class Request:
    """One parsed message: a JSON value, or the parser's error description."""

    value: Any = None
    error: str | None = None
    oob: bool = False


class QMPSession:
    """Per-connection state of a QMP monitor."""

    def __init__(self, machine: Any, *, offer_oob: bool = True) -> None:
        self.machine = machine
        self.offered = {"oob"} if offer_oob else set()
        self.negotiated = False
        self.capabilities: set[str] = set()
        self._parsed: list[Request] = []
        self._input = b""
        self._pos = 0
        self._parser: JSONMessageParser | None = None

    @property
    def parser(self) -> JSONMessageParser:
        """The JSON stream, made (and its modules imported) when bytes first arrive: a
        session driven with request dicts (the direct transport) never needs it."""
        if self._parser is None:
            from emulator.qmp.json_streamer import JSONMessageParser
            self._parser = JSONMessageParser(self._on_message)
        return self._parser

    @property
    def oob_enabled(self) -> bool:
        return "oob" in self.capabilities

    def greeting(self) -> bytes:
        """The banner QEMU sends on connect."""
        return encode_message({"QMP": {
            "version": {"qemu": dict(QEMU_VERSION), "package": QEMU_PACKAGE},
            "capabilities": [c for c in CAPABILITIES if c in self.offered]}})

    def feed(self, data: bytes) -> None:
        """Buffer bytes from the client (parse() consumes them)."""
        self._input = self._input[self._pos:] + data
        self._pos = 0

    @property
    def has_input(self) -> bool:
        return self._pos < len(self._input)

    @property
    def buffered(self) -> int:
        """Bytes fed but not parsed yet."""
        return len(self._input) - self._pos

    def parse(self) -> list[Request]:
        """Consume buffered bytes up to and including the first byte that completes a
        message (one byte can complete two: "1}"); [] when the buffer ran out first."""
        self._pos = self.parser.feed(self._input, lambda: bool(self._parsed), self._pos)
        out, self._parsed = self._parsed, []
        return out

    def receive(self, data: bytes) -> list[Request]:
        """feed() and parse() everything: all the messages the bytes complete."""
        self.feed(data)
        out: list[Request] = []
        while self.has_input:
            out += self.parse()
        return out

    def _on_message(self, value: Any, error: str | None) -> None:
        self._parsed.append(Request(value, error, error is None and is_oob(value)))

    async def execute(self, request: Request) -> bytes | None:
        """Answer one request; None when the command sends no reply."""
        if request.error is not None:
            return encode_message(parse_error_response(request.error))
        rsp = await dispatch(self.machine, request.value, allow_oob=self.oob_enabled,
                             negotiating=not self.negotiated, session=self)
        if rsp is None:
            return None
        try:
            return encode_message(rsp)
        except (TypeError, RecursionError) as exc:  # a handler returned something odd
            log.exception("cannot send QMP reply")
            bad = {"error": error_object(GenericError(f"internal error in the emulator: {exc}"))}
            if isinstance(request.value, dict) and "id" in request.value:
                bad["id"] = request.value["id"]
            return encode_message(bad)

    def negotiate(self, enable: list[str]) -> None:
        """qmp_capabilities in negotiation mode (qmp_caps_accept)."""
        if self.negotiated:
            raise CommandNotFound(
                "Capabilities negotiation is already complete, command ignored")
        unavailable = [cap for cap in enable if cap not in self.offered]
        if unavailable:
            raise GenericError(f"Capability {', '.join(unavailable)} not available")
        self.capabilities = set(enable)
        self.negotiated = True

    def event_line(self, event: dict[str, Any]) -> bytes | None:
        """An event as this session sends it: only once negotiation is complete."""
        return encode_message(event) if self.negotiated else None
