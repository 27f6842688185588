"""Progress of a long run: sections done / total and the section running now.

On a terminal it is one line rewritten in place (so the screen keeps only the matrix at the
end); anywhere else — CI logs, pipes — a plain line per finished section, which reads well
in a log and never fills it with carriage returns.
"""

from __future__ import annotations

import shutil
from typing import TextIO


class Progress:
    def __init__(self, total: int, stream: TextIO, tty: bool | None = None) -> None:
        self.total = total
        self.count = 0
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty

    def _counter(self) -> str:
        width = len(str(self.total))
        return f"[{self.count:>{width}}/{self.total}]"

    def start(self, where: str, title: str, backend: str) -> None:
        """A section starts on one backend: on a terminal, show it."""
        if self.tty:
            columns = shutil.get_terminal_size((100, 20)).columns
            line = f"{self._counter()} {where} {title} — {backend}"
            if len(line) >= columns:
                line = line[:columns - 2] + "…"
            self.stream.write(f"\r\033[K{line}")
            self.stream.flush()

    def done(self, where: str, title: str, outcome: str) -> None:
        """A section has run on every backend."""
        self.count += 1
        if not self.tty:
            self.stream.write(f"{self._counter()} {where} {title}: {outcome}\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
