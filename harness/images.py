"""The images two backends left in their test directories, compared byte for byte.

Both directories hold the same file names (the same ``PID-`` prefix, from this process);
each image's own directory path (in backing file names) is replaced by ``TEST_DIR`` first,
so only what the backends did to the images can differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.backends.qemu import LOG_NAME


@dataclass
class ImageComparison:
    """How many images both directories hold, and a line per one that differs."""

    compared: int = 0
    differences: list[str] = field(default_factory=list)

    @property
    def identical(self) -> int:
        return self.compared - len(self.differences)


BOOKKEEPING = (LOG_NAME,)   # what a backend keeps in the test directory for itself


def _contents(directory: Path) -> dict[str, bytes]:
    path = str(directory).encode()
    return {f.name: f.read_bytes().replace(path, b"TEST_DIR")
            for f in sorted(directory.iterdir()) if f.is_file() and f.name not in BOOKKEEPING}


def compare_images(mine: Path, reference: Path, *, mine_label: str = "emulator",
                   reference_label: str = "QEMU") -> ImageComparison:
    """Compare every file of ``reference`` with the file of the same name in ``mine``."""
    ours, theirs = _contents(mine), _contents(reference)
    result = ImageComparison()
    for name in sorted(theirs.keys() | ours.keys()):
        if name not in ours or name not in theirs:
            missing = mine_label if name not in ours else reference_label
            result.compared += 1
            result.differences.append(f"{name}: not left by the {missing}")
            continue
        a, b = ours[name], theirs[name]
        result.compared += 1
        if a == b:
            continue
        first = _first_difference(a, b)
        sizes = "" if len(a) == len(b) else f" ({mine_label} {len(a)} bytes, " \
                                            f"{reference_label} {len(b)})"
        result.differences.append(f"{name}: first difference at byte {first:#x}{sizes}")
    return result


def _first_difference(a: bytes, b: bytes) -> int:
    """The offset of the first byte that differs (or the shorter length): bisection over
    slices compared at C speed, not a Python loop over megabytes of equal bytes."""
    lo, hi = 0, min(len(a), len(b))   # a[:lo] == b[:lo]; the difference is before hi
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo
