"""Shared fixtures: where the goldens are, and skips for tests that need real QEMU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# the shared helpers assert too (compare_replies): with pytest's explanations
pytest.register_assert_rewrite("tests.emulator.qemu_runner")

ROOT = Path(__file__).resolve().parent.parent
GOLDENS = ROOT / "goldens"

requires_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None,
    reason="qemu-system-x86_64 not installed (Debian package qemu-system-x86)")
requires_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img not installed (Debian package qemu-utils)")
requires_qemu_io = pytest.mark.skipif(
    shutil.which("qemu-io") is None, reason="qemu-io not installed (Debian package qemu-utils)")


@pytest.fixture
def goldens() -> Path:
    return GOLDENS
