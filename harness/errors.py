"""One error hierarchy for the harness: every expected failure is a QmpReplayError.

The CLI prints such an error as a single line and exits 2; anything else is a bug.
"""

from __future__ import annotations

from pathlib import Path


class QmpReplayError(Exception):
    """An expected failure with a message fit for one line on stderr."""

    located = False  # True when str(self) already starts with FILE:LINE


class LocatedError(QmpReplayError):
    """An error in an input file, printed as ``FILE:LINE: message``."""

    located = True

    def __init__(self, path: str | Path, line: int, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        super().__init__(f"{self.path}:{line}: {message}")


class TranscriptError(LocatedError):
    """A golden transcript that cannot be read or parsed."""


class RecipeError(LocatedError):
    """A recipe (cases/*.toml) or case template that is malformed or does not fit its golden."""


class BackendError(QmpReplayError):
    """A backend that cannot be started or used (no QEMU binary, a crash at start)."""
