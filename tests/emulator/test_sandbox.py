"""Sandbox: every path the emulator touches stays inside the test directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from emulator.qmp.errors import GenericError
from emulator.sandbox import Sandbox, SandboxError


def test_relative_and_absolute_paths_inside_the_root_resolve(tmp_path: Path) -> None:
    (tmp_path / "img").write_bytes(b"")
    box = Sandbox(tmp_path)
    assert box.resolve("img") == tmp_path.resolve() / "img"
    assert box.resolve(tmp_path / "img") == tmp_path.resolve() / "img"
    assert box.resolve("sub/../img") == tmp_path.resolve() / "img"
    assert box.resolve("new.qcow2", for_create=True) == tmp_path.resolve() / "new.qcow2"


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside", "a/../../outside"])
def test_paths_leaving_the_root_are_refused_with_qemus_error_shape(tmp_path: Path,
                                                                     path: str) -> None:
    with pytest.raises(SandboxError) as info:
        Sandbox(tmp_path / "root").resolve(path)
    assert info.value.desc == (f"Could not open '{path}': path is outside the emulator's "
                               "test directory")
    assert isinstance(info.value, GenericError)
    assert info.value.error_class == "GenericError"


@pytest.mark.parametrize("for_create,verb", [(False, "open"), (True, "create")])
def test_an_empty_name_is_no_file_as_for_qemu(tmp_path: Path, for_create: bool,
                                               verb: str) -> None:
    """Not the test directory itself: QEMU's open/create of '' fails with ENOENT."""
    with pytest.raises(SandboxError) as info:
        Sandbox(tmp_path).resolve("", for_create=for_create)
    assert info.value.desc == f"Could not {verb} '': No such file or directory"


def test_a_symlink_pointing_outside_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret").write_bytes(b"x")
    os.symlink(tmp_path / "secret", root / "link")
    os.symlink(tmp_path, root / "dirlink")
    box = Sandbox(root)
    for name in ("link", "dirlink/secret", "dirlink/new-file"):
        with pytest.raises(SandboxError):
            box.resolve(name, for_create=True)


def test_a_symlink_inside_the_root_is_followed(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"")
    os.symlink("real", tmp_path / "alias")
    assert Sandbox(tmp_path).resolve("alias") == tmp_path.resolve() / "real"


def test_backing_names_are_relative_to_the_image_and_checked(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    box = Sandbox(tmp_path)
    image = box.resolve("sub/top.qcow2", for_create=True)
    assert box.resolve_backing(image, "base.qcow2") == tmp_path.resolve() / "sub/base.qcow2"
    assert box.resolve_backing(image, "../base.qcow2") == tmp_path.resolve() / "base.qcow2"
    for name in ("../../base.qcow2", "/etc/passwd", ""):
        with pytest.raises(SandboxError) as info:
            box.resolve_backing(image, name)
        assert info.value.desc.startswith(f"Could not open '{name}': path is outside")


def test_the_fast_path_resolves_as_realpath_does(tmp_path: Path) -> None:
    """resolve() skips os.path.realpath for plain names below the root; the answers (and
    the refusals) are the same as realpath's."""
    root = tmp_path / "root"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "f").write_bytes(b"")
    os.symlink(root / "f", root / "lnk")
    os.symlink("/etc", root / "out")
    os.symlink("sub", root / "sublink")
    box = Sandbox(root)
    real_root = Path(os.path.realpath(root))

    def reference(raw: str) -> Path | None:
        real = Path(os.path.realpath(real_root / raw))
        return real if real == real_root or real_root in real.parents else None

    names = ["f", "lnk", "out", "out/passwd", "sub/deep/x", "sublink/deep", "missing/x/y",
             "sub/../f", "./f", "f/x", "sub/deep/", f"{real_root}/f", f"{real_root}//f",
             f"{real_root}/sub/deep", str(real_root), f"{real_root}/", "/etc/passwd"]
    for raw in names:
        try:
            got: Path | None = box.resolve(raw)
        except SandboxError:
            got = None
        assert got == reference(raw), raw
