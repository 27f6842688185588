"""The one place where the emulator turns a path from a client into a file on disk.

A test transcript names image files; the emulator must never touch anything outside the test
directory, whatever the transcript (or a backing-file name stored in an image header) says.
Every open, create and delete goes through `Sandbox.resolve`.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from emulator.qmp.errors import GenericError


class SandboxError(GenericError):
    """A path that leaves the test directory; a GenericError so QMP reports it like QEMU would
    report an unopenable file."""

    def __init__(self, path: str | os.PathLike[str], *, verb: str = "open",
                 reason: str = "path is outside the emulator's test directory") -> None:
        super().__init__(f"Could not {verb} '{os.fspath(path)}': {reason}")
        self.path = os.fspath(path)


class Sandbox:
    """Resolves client paths against `root`, refusing anything that ends up outside it.

    Symlinks are resolved before the check (a link inside the root pointing outside is refused),
    so the check holds for the file the OS will actually open.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.realpath(root))

    def resolve(self, path: str | os.PathLike[str], *, for_create: bool = False) -> Path:
        """The real path of `path` (relative paths are taken relative to the root).

        `for_create` says the file need not exist yet; the check is the same either way,
        because the existing prefix of the path (and a dangling link's target) is what the
        OS follows when it creates the file.
        """
        raw = os.fspath(path)
        if not raw:   # names no file at all: what open(2) and creat(2) say of it
            raise SandboxError(raw, verb="create" if for_create else "open",
                               reason=os.strerror(errno.ENOENT))
        below = self._below_root(raw)
        if below is not None:
            return below
        real = Path(os.path.realpath(self.root / raw))
        if real != self.root and self.root not in real.parents:
            raise SandboxError(raw)
        return real

    def _below_root(self, raw: str) -> Path | None:
        """os.path.realpath for the common case, a plain name below the root (which is a
        real path already): only the components below the root need checking, and when
        none is a symlink the path is its own real path. None: take the general way."""
        root = str(self.root)
        if raw.startswith(root + "/"):
            rest = raw[len(root) + 1:]
        elif raw.startswith("/"):
            return None
        else:
            rest = raw
        parts = rest.split("/")
        if any(part in ("", ".", "..") for part in parts):
            return None
        current = root
        for part in parts:
            current += "/" + part
            try:
                mode = os.lstat(current).st_mode
            except OSError:
                continue   # realpath keeps what does not exist (yet) as written
            if stat.S_ISLNK(mode):
                return None
        return Path(current)

    def resolve_backing(self, image: str | os.PathLike[str], backing_file: str) -> Path:
        """Where the backing file named in `image`'s header lives: like QEMU's
        bdrv_get_full_backing_filename, a relative name is relative to the image's directory."""
        if not backing_file:
            raise SandboxError(backing_file)
        base = Path(os.fspath(image)).parent
        try:
            return self.resolve(base / backing_file)
        except SandboxError:
            raise SandboxError(backing_file) from None
