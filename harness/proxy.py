"""``qmpreplay proxy``: record a live QMP session between any client and QEMU as a golden.

The proxy listens on a UNIX socket, and for the one client that connects it opens QEMU's QMP
socket and forwards every byte both ways unchanged (greeting and capabilities negotiation
included), so qemu.qmp, qmp-shell or anything else works as if connected directly. A copy of
each direction is split into JSON messages and logged in iotests conventions: commands as
``qmp_log`` prints them, each followed by its reply, events (timestamps filtered) after the
reply of the command during which they arrived, test-dir paths as ``TEST_DIR/PID-…`` with
``--test-dir``, ``qmp_capabilities`` left out. When the session ends the golden is written.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import json
import os
import re
import signal
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import QmpReplayError
from harness.regen import write_if_changed
from harness.transcript.format import ordered_qmp
from harness.transcript.normalize import FILTERS, Context, Normalizer
from harness.transcript.records import Command, Event, Record, Reply
from harness.transcript.render import render_records

Json = Any
CHUNK = 65536
UNHEARD = "qmp_capabilities"
NETWORK = re.compile(r"^(tcp:|inet:|vsock:|[\w.\-\[\]]*:\d+$)")


class JsonFramer:
    """Split a byte stream into JSON values by bracket depth, as QEMU's JSON streamer does:
    QMP needs no newlines between messages (legacy clients send none)."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.buf: list[str] = []
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.junk = 0            # characters that belonged to no JSON value

    def feed(self, data: bytes) -> list[Json]:
        out = []
        for ch in self.decoder.decode(data):
            if self.depth == 0:
                if ch in "{[":
                    self.depth, self.buf = 1, [ch]
                elif not ch.isspace():
                    self.junk += 1
                continue
            self.buf.append(ch)
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    text = "".join(self.buf)
                    try:
                        out.append(json.loads(text))
                    except ValueError:
                        self.junk += len(text)
        return out


@dataclass
class InFlight:
    """A command sent to QEMU whose reply has not come back yet."""

    name: str
    arguments: dict[str, Json]
    id: str | None
    events: list[Json] = field(default_factory=list)   # arrived while it was in flight


class SessionLog:
    """The golden being written: fed every message of both directions, in wire order."""

    def __init__(self, test_dir: str | None = None) -> None:
        names = ("testfiles", "timestamps") if test_dir else ("timestamps",)
        ctx = Context(Path(os.path.abspath(test_dir or os.sep)), "")
        self.norm = Normalizer(ctx, names)
        self.records: list[Record] = []
        self.in_flight: list[InFlight] = []
        self.commands = self.events = 0
        self.warnings: list[str] = []

    def from_client(self, msg: Json) -> None:
        if not isinstance(msg, dict) or not isinstance(
                name := msg.get("execute", msg.get("exec-oob")), str):
            self.warnings.append(f"client sent a message that is not a command: {msg!r:.80}")
            return
        arguments = msg.get("arguments") if isinstance(msg.get("arguments"), dict) else {}
        key = json.dumps(msg["id"], sort_keys=True) if "id" in msg else None
        self.in_flight.append(InFlight(name, arguments or {}, key))

    def from_server(self, msg: Json) -> None:
        if not isinstance(msg, dict) or "QMP" in msg:
            return                                   # the greeting
        if "event" in msg:
            if self.in_flight:
                self.in_flight[0].events.append(msg)
            else:
                self._event(msg)
        elif "return" in msg or "error" in msg:
            self._reply(msg)

    def _event(self, msg: Json) -> None:
        self.records.append(Event.make(self.norm.json(msg)))
        self.events += 1

    def _reply(self, msg: Json) -> None:
        key = json.dumps(msg["id"], sort_keys=True) if "id" in msg else None
        command = next((c for c in self.in_flight if c.id == key), None)
        if command is None:
            self.warnings.append(f"a reply that answers no command was not recorded: "
                                 f"{msg!r:.80}")
            return
        self.in_flight.remove(command)
        if command.name != UNHEARD:
            self.records.append(self.command_record(command))
            reply = {k: v for k, v in msg.items() if k != "id"}
            self.records.append(Reply.make(self.norm.json(reply)))
            self.commands += 1
        for event in command.events:
            self._event(event)

    def command_record(self, command: InFlight) -> Command:
        """As ``qmp_log`` prints it — unless its key spelling (``_`` → ``-``) would change
        what replay sends, then with the keys as they were sent."""
        arguments = self.norm.json(command.arguments)
        logged = ordered_qmp(arguments)
        reverse = FILTERS["iotests-keys"].reverse
        assert reverse is not None
        if reverse(logged, self.norm.ctx) == arguments:
            return Command.make({"execute": command.name, "arguments": arguments})
        value = {"execute": command.name, "arguments": arguments}
        text = json.dumps({"execute": command.name,
                           "arguments": json.loads(json.dumps(arguments, sort_keys=True))})
        return Command((text,), value=value)

    def finish(self) -> list[Record]:
        """Commands still waiting for a reply when the session ended are logged alone."""
        for command in self.in_flight:
            if command.name != UNHEARD:
                self.records.append(self.command_record(command))
                self.commands += 1
            for event in command.events:
                self._event(event)
        self.in_flight = []
        return self.records

    def text(self) -> str:
        return render_records(self.records) + "\n" if self.records else ""


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                sink: Callable[[Json], None]) -> None:
    """Forward bytes unchanged; log each complete message before it goes on."""
    framer = JsonFramer()
    while data := await reader.read(CHUNK):
        for message in framer.feed(data):
            sink(message)
        writer.write(data)
        await writer.drain()


async def proxy(listen: str, connect: str, log: SessionLog,
                ready: Callable[[], None] = lambda: None) -> bool:
    """Serve one session; returns whether a client came. Ends on SIGINT/SIGTERM too."""
    finished = asyncio.Event()
    came = False

    async def session(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        nonlocal came
        if came:                                  # one session per golden
            c_writer.close()
            return
        came = True
        try:
            s_reader, s_writer = await asyncio.open_unix_connection(connect)
        except OSError as exc:
            log.warnings.append(f"cannot connect to {connect}: {exc.strerror or exc}")
            c_writer.close()
            finished.set()
            return
        pumps = [asyncio.ensure_future(_pump(c_reader, s_writer, log.from_client)),
                 asyncio.ensure_future(_pump(s_reader, c_writer, log.from_server))]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (s_writer, c_writer):
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            finished.set()

    _clear_stale_socket(listen)
    server = await asyncio.start_unix_server(session, path=listen)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, finished.set)
    try:
        ready()
        await finished.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        server.close()
        await server.wait_closed()
        Path(listen).unlink(missing_ok=True)
    return came


def _clear_stale_socket(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise QmpReplayError(f"proxy: {path} exists and is not a socket; refusing to replace it")
    os.unlink(path)


def run(args: argparse.Namespace) -> int:
    for option, value in (("--listen", args.listen), ("--connect", args.connect)):
        if NETWORK.match(value):
            raise QmpReplayError(f"proxy: {option} takes the path of a UNIX socket, "
                                 f"not {value!r}")
    if args.test_dir and not os.path.isdir(args.test_dir):
        raise QmpReplayError(f"proxy: --test-dir {args.test_dir}: no such directory")
    log = SessionLog(args.test_dir)

    def ready() -> None:
        print(f"qmpreplay proxy: listening on {args.listen}, forwarding to {args.connect}",
              flush=True)

    try:
        came = asyncio.run(proxy(args.listen, args.connect, log, ready))
    except OSError as exc:
        raise QmpReplayError(f"proxy: cannot listen on {args.listen}: "
                             f"{exc.strerror or exc}") from None
    log.finish()
    for warning in log.warnings:
        print(f"qmpreplay proxy: {warning}", file=sys.stderr)
    if not came or not log.records:
        print("qmpreplay proxy: nothing recorded; no golden written", file=sys.stderr)
        return 1
    write_if_changed(args.output, log.text())
    print(f"qmpreplay proxy: recorded {log.commands} commands and {log.events} events "
          f"into {args.output}")
    return 0
