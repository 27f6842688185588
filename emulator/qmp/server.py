"""The asyncio transport around :class:`QMPSession`: UNIX sockets and in-process pairs.

Like QEMU's ``-qmp unix:PATH,server=on,wait=off`` monitor, a server talks to one client at
a time (a second client's connect succeeds but gets its greeting only when the first one
leaves), reads requests as they arrive, runs in-band requests one after another in order,
runs out-of-band requests at once, writes events the moment the Machine emits them, and
drops queued requests when the client goes away.  After ``quit`` the reply is the last thing
a client reads.

Entry points::

    server = QMPServer(machine)
    await server.start_unix("/run/x/qmp.sock")        # listen
    sock = server.socketpair()                         # or: in-process, for
    await QMPClient().connect(sock)                    #     qemu.qmp.QMPClient
    async with serve_in_process(machine) as (reader, writer): ...
    async with in_process_client(machine) as client: ...  # a connected QMPClient
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import select
import socket
import stat
from collections.abc import AsyncIterator
from typing import Any

from emulator.qmp.protocol import QMPSession, Request

log = logging.getLogger("emulator.qmp.server")

READ_SIZE = 65536
CLOSE_GRACE = 5.0  # seconds close() lets running commands finish


class QMPServer:
    """Serves one Machine's QMP monitor to one connection at a time."""

    def __init__(self, machine: Any, *, offer_oob: bool = True) -> None:
        import emulator.commands  # noqa: F401  (registers every command family)

        self.machine = machine
        self.offer_oob = offer_oob
        self._turn = asyncio.Lock()
        self._server: asyncio.AbstractServer | None = None
        self._path: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closed = asyncio.Event()

    # -- listening ------------------------------------------------------------------------
    async def start_unix(self, path: str | os.PathLike[str]) -> None:
        """Listen on a UNIX socket at ``path``, created with mode 0600."""
        self._path = os.fspath(path)
        sock = bind_unix_socket(self._path)
        self._server = await asyncio.start_unix_server(self.serve_connection, sock=sock,
                                                       limit=READ_SIZE)

    def socketpair(self) -> socket.socket:
        """Serve one end of a new socket pair (needs a running loop); returns the client end,
        which ``qemu.qmp.QMPClient.connect()`` accepts as is."""
        server_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._spawn(self._serve_socket(server_end))
        return client_end

    async def _serve_socket(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=READ_SIZE)
        await self.serve_connection(reader, writer)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop listening, end every connection, remove the socket file."""
        self._closed.set()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):  # EOF for each session: it winds down
            writer.close()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=CLOSE_GRACE)
            for task in pending:  # a command that does not finish
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(self._path).st_mode):
                    os.unlink(self._path)
            self._path = None

    def stop(self) -> None:
        """Make wait_closed() return (the owner then calls close())."""
        self._closed.set()

    async def wait_closed(self) -> None:
        """Wait until the server should end: a client quit, or stop() was called."""
        await self._closed.wait()

    # -- one connection -----------------------------------------------------------------------
    async def serve_connection(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        """Run a QMP session on a connected stream until the client leaves or quits."""
        task = asyncio.current_task()
        if task is not None and task not in self._tasks:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._writers.add(writer)
        try:
            async with self._turn:
                if not self._closed.is_set() and not self.machine.shutdown_requested:
                    await self._session(reader, writer)
        except asyncio.CancelledError:
            pass  # close() gave up waiting: end quietly, this is the connection's top level
        except Exception:
            log.exception("QMP connection failed")
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _session(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self.machine, QMPSession(self.machine, offer_oob=self.offer_oob),
                           reader, writer)
        await conn.run()
        if self.machine.shutdown_requested:
            self._closed.set()


QMP_REQ_QUEUE_LEN_MAX = 8
MAX_BUFFERED = 1 << 20  # unparsed input held while reading is suspended


def peer_hung_up(writer: asyncio.StreamWriter) -> bool:
    """Has the client closed its socket (POLLHUP), as opposed to only ending its writes?
    QEMU drops a hung-up client at once; a half-closed one is served to the end."""
    if writer.is_closing():
        return True
    sock = writer.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return sock is not None
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLHUP)
    return any(ev & select.POLLHUP for _, ev in poller.poll(0))


class _Connection:
    """monitor/qmp.c's reading, queueing and dispatching for one session.

    The parse loop takes one message at a time from the bytes read so far; an out-of-band
    request runs at once, an in-band one (parse errors included) joins the queue that the
    dispatcher works off in order.  Like QEMU, parsing is suspended after queueing an in-band
    request while OOB is off (until that request is done) and while the queue is full when
    OOB is on; a client that hangs up loses everything not yet dispatched, a client that only
    ends its writes is served to the end of its input."""

    def __init__(self, machine: Any, session: QMPSession, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.machine = machine
        self.session = session
        self.reader = reader
        self.writer = writer
        self.queue: collections.deque[Request] = collections.deque()
        self.suspend_cnt = 0
        self.eof = False
        self.closing = False
        # each event is cleared only by the task that waits for it
        self.queued = asyncio.Event()   # -> dispatcher: a request, or closing
        self.wake = asyncio.Event()     # -> parse loop: input, EOF, or a resume
        self.drained = asyncio.Event()  # -> reader: the parse loop consumed input

    def on_event(self, msg: dict[str, Any]) -> None:
        line = self.session.event_line(msg)
        if line is not None and not self.writer.is_closing():
            self.writer.write(line)

    async def run(self) -> None:
        self.writer.write(self.session.greeting())
        self.machine.add_event_listener(self.on_event)
        reading = asyncio.create_task(self._read())
        dispatcher = asyncio.create_task(self._dispatcher())
        try:
            await self._parse_loop(dispatcher)
        finally:
            self.closing = True
            self.queue.clear()  # the client is gone: queued requests are dropped
            self.queued.set()
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading
            try:
                await dispatcher  # a command already running completes
            except Exception:
                log.exception("QMP dispatcher failed")
            self.machine.remove_event_listener(self.on_event)

    async def _read(self) -> None:
        try:
            while True:
                while self.session.buffered > MAX_BUFFERED:
                    self.drained.clear()
                    if self.session.buffered > MAX_BUFFERED:
                        await self.drained.wait()
                data = await self.reader.read(READ_SIZE)
                if not data:
                    break
                self.session.feed(data)
                self.wake.set()
        except ConnectionError:
            pass
        self.eof = True
        self.wake.set()

    async def _parse_loop(self, dispatcher: asyncio.Task[None]) -> None:
        while not dispatcher.done():
            if peer_hung_up(self.writer):
                return
            if self.suspend_cnt or not self.session.has_input:
                if not self.suspend_cnt and self.eof:
                    return  # half-closed, and all its input is parsed
                self.wake.clear()
                if self.suspend_cnt or (not self.session.has_input and not self.eof):
                    await _first(self.wake.wait(), dispatcher)
                continue
            requests = self.session.parse()
            self.drained.set()
            for request in requests:
                if request.oob:
                    await self._reply(request)
                    continue
                if (not self.session.oob_enabled
                        or len(self.queue) == QMP_REQ_QUEUE_LEN_MAX - 1):
                    self.suspend_cnt += 1
                self.queue.append(request)
                self.queued.set()

    async def _dispatcher(self) -> None:
        while True:
            while not self.queue:
                if self.closing:
                    return
                self.queued.clear()
                if not self.queue and not self.closing:
                    await self.queued.wait()
            request = self.queue.popleft()
            oob_enabled = self.session.oob_enabled
            if oob_enabled and len(self.queue) == QMP_REQ_QUEUE_LEN_MAX - 1:
                self._resume()
            await self._reply(request)
            if not oob_enabled:
                self._resume()
            if self.machine.shutdown_requested:  # quit: the reply was the last word
                self.writer.close()
                return

    def _resume(self) -> None:
        self.suspend_cnt -= 1
        self.wake.set()

    async def _reply(self, request: Request) -> None:
        reply = await self.session.execute(request)
        if reply is None or self.writer.is_closing():
            return
        self.writer.write(reply)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()


async def _first(aw: Any, task: asyncio.Task[None]) -> None:
    """Wait for ``aw`` or until ``task`` ends, whichever comes first."""
    fut = asyncio.ensure_future(aw)
    await asyncio.wait({fut, task}, return_when=asyncio.FIRST_COMPLETED)
    if not fut.done():
        fut.cancel()


def bind_unix_socket(path: str) -> socket.socket:
    """A listening UNIX socket at ``path``, mode 0600; a stale socket file is replaced, any
    other file is left alone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: a leftover
        else:
            raise OSError(f"{path} is in use by another server")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(1)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def serve_in_process(machine: Any) -> AsyncIterator[
        tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client stream pair talking to ``machine`` in this process (no socket file)."""
    server = QMPServer(machine)
    reader, writer = await asyncio.open_unix_connection(sock=server.socketpair(),
                                                        limit=READ_SIZE)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        await server.close()


@contextlib.asynccontextmanager
async def in_process_client(machine: Any, name: str | None = None) -> AsyncIterator[Any]:
    """A negotiated ``qemu.qmp.QMPClient`` connected to ``machine`` in this process."""
    from qemu.qmp import QMPClient

    server = QMPServer(machine)
    client = QMPClient(name)
    await client.connect(server.socketpair())
    try:
        yield client
    finally:
        await client.disconnect()
        await server.close()
