"""Where a QEMU coroutine would have waited in the I/O the emulator does synchronously.

QEMU's requests give up the CPU on the way: file-posix hands each one to its thread pool (and
null-co with ``latency-ns`` sleeps on a timer), so the main loop — and the monitor's reply to
the command running — goes on before the request completes; blkdebug fails a request
(``immediately=off``) only after aio_co_schedule, a bottom half that still runs before that
reply. The emulator's requests finish at once and leave a note of the first such wait here;
a job asks for it at its next yield point (nothing it does in between is visible) and yields
the way QEMU's coroutine did: see Job.wait_for_io.
"""

from __future__ import annotations

THREAD = "thread"   # the request went to a worker thread (or a timer): after the reply
BH = "bh"           # the coroutine was rescheduled by a bottom half: before the reply

_first: str | None = None


def note(kind: str) -> None:
    """A request would have waited here; only the first wait since the last take counts."""
    global _first
    if _first is None:
        _first = kind


def pending() -> str | None:
    """The first wait noted since the last take, left in place."""
    return _first


def take(replacement: str | None = None) -> str | None:
    """The first wait noted since the last take (``replacement`` is noted instead)."""
    global _first
    first, _first = _first, replacement
    return first
