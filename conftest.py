"""Project-wide pytest configuration.

The qmpreplay plugin itself is loaded through its ``pytest11`` entry point (installed with the
package), so ``pytest goldens/`` works from any directory. This file only keeps helper
directories out of test collection and offers fixtures every test directory may use.
"""

from __future__ import annotations

import shutil

import pytest

collect_ignore = ["benchmarks", "build"]


@pytest.fixture(scope="session")
def qemu_binary() -> str:
    """The real qemu-system-x86_64, or a skip that says which Debian package provides it."""
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        pytest.skip("qemu-system-x86_64 not installed (Debian package qemu-system-x86)")
    return path


@pytest.fixture(scope="session")
def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        pytest.skip("qemu-img not installed (Debian package qemu-utils)")
    return path
