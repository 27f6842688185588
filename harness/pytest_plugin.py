"""pytest plugin: goldens as test files, each ``=== section ===`` as a test item."""

from __future__ import annotations
