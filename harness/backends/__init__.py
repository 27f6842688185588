"""Backends: where a case runs. ``make_factory`` builds one per section from CLI options."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.backends.base import Backend, ToolResult, VmConfig

__all__ = ["Backend", "BackendFactory", "ToolResult", "VmConfig", "make_factory"]


@dataclass(frozen=True)
class BackendFactory:
    """Makes a fresh backend for each section; ``name`` is what recipes refer to."""

    name: str
    make: Callable[[Path], Backend]
    in_process: bool = False   # the VM runs in this interpreter (sections compete for it)
    preload: Callable[[], None] | None = None   # imports to do once, before workers fork

    def __call__(self, test_dir: Path) -> Backend:
        return self.make(test_dir)


def make_factory(backend: str, qemu_binary: str | None = None,
                 qemu_img: str | None = None, transport: str = "direct",
                 ) -> BackendFactory:
    """A factory of fresh backends; checks up front that the tools it needs exist."""
    if backend == "qemu":
        from harness.backends.qemu import QemuBackend, find_tool, preflight
        binary = find_tool(qemu_binary, "qemu-system-x86_64", "qemu-system-x86")
        img = find_tool(qemu_img, "qemu-img", "qemu-utils")
        preflight(binary)
        preflight(img)
        return BackendFactory("qemu", lambda test_dir: QemuBackend(test_dir, binary, img))
    if backend == "emulator":
        from harness.backends.emulator import EmulatorBackend
        return BackendFactory("emulator", lambda test_dir: EmulatorBackend(test_dir, transport),
                              in_process=True, preload=EmulatorBackend.preload)
    raise ValueError(f"unknown backend {backend!r}")
