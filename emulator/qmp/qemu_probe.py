"""Ask the real QEMU: a raw QMP connection to ``qemu-system-x86_64 -machine none -S``.

The referee for the wire layer.  Tests send the same raw bytes here and to the emulator
and compare the replies; ``qmpreplay commands --against`` reads the binary's
``query-qmp-schema`` through it.  Blocking sockets, no QMP library: the point is to see
exactly the bytes QEMU writes.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import time
from types import TracebackType
from typing import Any, Self

QEMU_ARGS = ["-machine", "none", "-nodefaults", "-display", "none", "-S"]


class RawQMP:
    """A client socket that sends bytes and collects whatever comes back."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:  # the socket file exists a moment before the server listens
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(path)
                break
            except ConnectionRefusedError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_lines(self, count: int, timeout: float = 5.0) -> list[bytes]:
        """Exactly ``count`` lines (each ending in "\\r\\n"), or fewer if the peer closes or
        nothing comes for ``timeout`` seconds."""
        lines: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(lines) < count:
            if b"\n" in self.buffer:
                line, _, self.buffer = self.buffer.partition(b"\n")
                lines.append(line + b"\n")
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._fill(remaining):
                break
        return lines

    def read_quiet(self, quiet: float = 0.3) -> bytes:
        """Everything that arrives until the line has been quiet for ``quiet`` seconds."""
        while self._fill(quiet):
            pass
        out, self.buffer = self.buffer, b""
        return out

    def _fill(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionError:
            return False
        if not data:
            return False
        self.buffer += data
        return True

    def close(self) -> None:
        self.sock.close()


class ServerProcess:
    """A process serving QMP on ``self.path``, a socket in a private directory (``self.dir``,
    removed on close) that the process creates; :meth:`command_line` says how to start it."""

    name = "server"
    start_timeout = 10.0

    def command_line(self) -> list[str]:
        raise NotImplementedError

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="qmpreplay-qmp-")
        self.path = os.path.join(self.dir, "qmp.sock")
        self.proc = subprocess.Popen(self.command_line(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + self.start_timeout
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.close()
                raise RuntimeError(f"{self.name} did not start: {err.strip()}")
            time.sleep(0.02)

    def connect(self) -> RawQMP:
        return RawQMP(self.path)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class QemuMonitor(ServerProcess):
    """``qemu-system-x86_64 -machine none -nodefaults -display none -S -qmp unix:...``."""

    def __init__(self, binary: str | None = None) -> None:
        found = binary or shutil.which("qemu-system-x86_64")
        if found is None:
            raise OSError("qemu-system-x86_64 not found")
        self.binary = self.name = found
        super().__init__()

    def command_line(self) -> list[str]:
        return [self.binary, *QEMU_ARGS, "-qmp", f"unix:{self.path},server=on,wait=off"]


def query_qmp_schema(binary: str | None = None) -> list[dict[str, Any]]:
    """The binary's ``query-qmp-schema`` return value."""
    with QemuMonitor(binary) as qemu:
        conn = qemu.connect()
        try:
            conn.read_lines(1)
            conn.send(b'{"execute": "qmp_capabilities"}\n'
                      b'{"execute": "query-qmp-schema"}\n')
            lines = conn.read_lines(2, timeout=20)
        finally:
            conn.close()
    if len(lines) < 2:
        raise RuntimeError("no reply to query-qmp-schema")
    reply = json.loads(lines[1])
    if "return" not in reply:
        raise RuntimeError(f"query-qmp-schema failed: {reply}")
    return reply["return"]  # type: ignore[no-any-return]


# -- differential exchanges ------------------------------------------------------------------
SYNC_ID = "qmpreplay-sync"
# 0xFF ends any token with a lexical error (or is one), which resets QEMU's JSON streamer;
# "\n" ends the error recovery; then a command whose reply marks the end of a step.
SYNC = b'\xff\n{"execute": "query-status", "id": "' + SYNC_ID.encode() + b'"}\n'
_TIMESTAMP = re.compile(rb'\{"seconds": \d+, "microseconds": \d+\}')


def normalize(line: bytes) -> bytes:
    """Mask event timestamps (the only bytes two honest servers may disagree on)."""
    return _TIMESTAMP.sub(b'{"seconds": SECS, "microseconds": USECS}', line)


def exchange(path: str, steps: list[bytes], *, negotiate: bool = True,
             timeout: float = 5.0) -> list[bytes]:
    """Send each step's raw bytes on a fresh connection to the server at ``path``; return
    the normalized greeting and every line received, one list entry per line.  After each
    step a sync sequence (one "stray" error, then a query-status with a marker id) tells
    where the step's output ends, however broken the step left the JSON stream."""
    conn = RawQMP(path, timeout)
    try:
        out = [normalize(line) for line in conn.read_lines(1, timeout)]
        if negotiate:
            conn.send(b'{"execute": "qmp_capabilities"}\n')
            out += conn.read_lines(1, timeout)
        for step in steps:
            conn.send(step + SYNC)
            while True:
                lines = conn.read_lines(1, timeout)
                if not lines:
                    out.append(b"<EOF or timeout>\n")
                    return out
                out.append(normalize(lines[0]))
                if SYNC_ID.encode() in lines[0]:
                    break
    except (BrokenPipeError, ConnectionResetError):
        out.append(b"<connection closed>\n")
    finally:
        conn.close()
    return out
