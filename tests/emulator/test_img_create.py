"""qemu-img create's command line against the real qemu-img: -o option lists (QemuOpts:
unknown names, typed values, flags, ",," escapes, repeated -o), the "Formatting" line, the
qcow2 options read as blockdev-create's (compat=0.10 makes a version 2 image; enum values
checked after the line is printed, in QAPI member order), file-posix's preallocation, -o
help, and which files are left behind (a failed qcow2 creation deletes even a file that was
there): stdout, stderr, exit code and the bytes of every file must match."""

from __future__ import annotations

import hashlib
import io
import subprocess
from pathlib import Path

import pytest

from emulator import img
from emulator.sandbox import Sandbox
from tests.conftest import requires_qemu_img
from tests.emulator.test_img import mine, real

CASES = [
    ('-f', 'qcow2', '-o', 'compat=0.10', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compat=v2', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compat=1.1', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compat=v3', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compat=0.9', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compat=0.10,lazy_refcounts=on', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compat=0.10,refcount_bits=8', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4k', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compat=0.10,cluster_size=512', '-b', 'base', '-F', 'qcow2', 'x'),
    ('-f', 'qcow2', '-o', 'foo=1', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'foo', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'lazy_refcounts', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'nolazy_refcounts', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'lazy_refcounts=yes', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'lazy_refcounts=maybe', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'cluster_size=abc', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'cluster_size=-1', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'cluster_size=99999999999999999999', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'cluster_size=0x1000', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'cluster_size=1.5k', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'refcount_bits=abc', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'refcount_bits=0x10', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'refcount_bits=99999999999999999999', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'refcount_bits=18446744073709551615', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'size=2M', 'x'),
    ('-f', 'qcow2', '-o', 'size=2M', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'size=1000', 'x'),
    ('-f', 'qcow2', 'x', '1000'),
    ('-f', 'raw', 'x', '1000'),
    ('-f', 'qcow2', '-o', 'preallocation=off', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'preallocation=bogus', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compression_type=zlib', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compression_type=lz4', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compat=0.9,preallocation=bogus', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'preallocation=bogus,compat=0.9', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'extended_l2=off', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'nocow=on', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'extent_size_hint=2M', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'cluster_size=4k', '-o', 'cluster_size=8k', 'x', '1M'),
    ('-f', 'qcow2', '-o', '', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'cluster_size=4k,', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'cluster_size=4k,,', 'x', '1M'),
    ('-f', 'qcow2', '-o', ',cluster_size=4k', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'backing_file=base,backing_fmt=qcow2', 'x'),
    ('-f', 'qcow2', '-o', 'backing_file=base', '-F', 'qcow2', 'x'),
    ('-f', 'qcow2', '-o', 'backing_file=a,,b', '-u', '-F', 'qcow2', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'id=foo', 'x', '1M'),
    ('-f', 'raw', '-o', 'preallocation=off', 'x', '1M'),
    ('-f', 'raw', '-o', 'cluster_size=4k', 'x', '1M'),
    ('-f', 'raw', '-o', 'size=1M', 'x'),
    ('-f', 'raw', '-b', 'base', 'x', '1M'),
    ('-f', 'raw', '-F', 'qcow2', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'data_file_raw=on', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compat=0.10,extended_l2=on', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'encrypt.format=luks', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'encrypt=on', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'encrypt=off', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'encrypt.iter-time=abc', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compat=', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'backing_fmt=qcow2', 'x', '1M'),
    ('-f', 'qcow2', '-u', '-b', 'nonexist', '-F', 'qcow2', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'refcount_bits=-16', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'size=-1', 'x'),
    ('-f', 'qcow2', '-o', 'help', 'x'),
    ('-f', 'qcow2', '-o', 'help'),
    ('-f', 'raw', '-o', '?', 'x'),
    ('-f', 'nosuch', '-o', 'help', 'x'),
    ('-f', 'raw', '-o', 'preallocation=full', 'x', '100k'),
    ('-f', 'raw', '-o', 'preallocation=falloc', 'x', '100k'),
    ('-f', 'raw', '-o', 'preallocation=metadata', 'x', '100k'),
    ('-f', 'raw', '-o', 'preallocation=bogus', 'x', '100k'),
    ('-f', 'raw', '-o', 'extent_size_hint=8G', 'x', '100k'),
    ('-f', 'qcow2', '-o', 'extent_size_hint=8G', 'x', '100k'),
    ('-f', 'raw', '-o', 'nocow=maybe', 'x', '100k'),
    ('-f', 'qcow2', '-o', 'encryption=on', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'encrypt.format=aes', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'encrypt.format=bogus', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'encrypt.key-secret=s', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compat=0.10', '-b', 'base', '-F', 'qcow2', 'x'),
    ('-f', 'qcow2', '-o', 'compat=0.10,size=4M', '-b', 'base', '-F', 'qcow2', 'x'),
    ('-f', 'qcow2', '-o', 'compat=0.10', '-u', '-b', 'nonexist', '-F', 'qcow2', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compat=0.10', '-u', '-b', 'nonexist', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compat=0.10', '-b', 'base', 'x'),
    ('-f', 'qcow2', '-o', 'backing_fmt=bogus', '-u', '-b', 'b', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'cluster_size=2M,compat=0.10', 'x', '1T'),
    ('-f', 'qcow2', '-o', 'cluster_size=512', 'x', '100T'),
    ('-f', 'qcow2', '-o', 'cluster_size=512', 'base'),
    ('-f', 'qcow2', '-o', 'compat=0.9', 'base', '1M'),
    ('-f', 'file', 'x', '1M'),
    ('-f', 'file', '-o', 'preallocation=full', 'x', '3000'),
    ('-f', 'qcow2', '-o', 'lazy_refcounts=on', '-o', 'refcount_bits=1', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'size=0', 'x'),
    ('-f', 'qcow2', '-o', 'size=1k,size=2k', 'x'),
    ('-f', 'qcow2', '-o', 'refcount_bits=16,,', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'backing_file=', '-F', 'qcow2', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'backing_file=x', '-F', 'qcow2', 'x', '1M'),
    ('-q', '-f', 'qcow2', '-o', 'compat=0.9', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'compat=0.9', 'base', '1M'),
    ('-f', 'qcow2', '-o', 'cluster_size=3k', 'base', '1M'),
    ('-f', 'qcow2', '-o', 'encryption=on,encrypt.format=luks', 'base', '1M'),
    ('-f', 'qcow2', '-o', 'extent_size_hint=8G', 'base', '1M'),
    ('-f', 'raw', '-o', 'preallocation=metadata', 'base', '1M'),
    ('-f', 'raw', '-o', 'preallocation=bogus', 'base', '1M'),
    ('-f', 'qcow2', '-o', 'encryption=yes', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'encryption=off,encrypt.format=luks', 'x', '1M'),
    ('-f', 'qcow2', '-o', 'encryption=on,encrypt.key-secret=s', 'x', '1M'),
    # qcow2 preallocation: a truncate from 0 (preallocate_co; qcow2_refcount_area then the
    # data clusters); small clusters make many L2 tables and refcount blocks
    ('-f', 'qcow2', '-o', 'preallocation=metadata', 'x', '0'),
    ('-f', 'qcow2', '-o', 'preallocation=metadata', 'x', '1048064'),
    ('-f', 'qcow2', '-o', 'preallocation=metadata', 'x', '3G'),
    ('-f', 'qcow2', '-o', 'cluster_size=512,preallocation=metadata', 'x', '40M'),
    ('-f', 'qcow2', '-o', 'refcount_bits=1,cluster_size=512,preallocation=metadata', 'x', '5M'),
    ('-f', 'qcow2', '-o', 'lazy_refcounts=on,preallocation=metadata', 'x', '3M'),
    ('-f', 'qcow2', '-o', 'preallocation=falloc', 'x', '0'),
    ('-f', 'qcow2', '-o', 'preallocation=falloc', 'x', '1048064'),
    ('-f', 'qcow2', '-o', 'cluster_size=512,preallocation=falloc', 'x', '40M'),
    ('-f', 'qcow2', '-o', 'refcount_bits=64,cluster_size=1024,preallocation=falloc', 'x', '7M'),
    ('-f', 'qcow2', '-o', 'preallocation=full', 'x', '1048064'),
    ('-f', 'qcow2', '-o', 'cluster_size=512,compat=0.10,preallocation=full', 'x', '3M'),
    ('-f', 'qcow2', '-o', 'preallocation=metadata', '-b', 'base', '-F', 'qcow2', 'x'),
]


def _files(root: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(root.iterdir())}


@requires_qemu_img
@pytest.mark.parametrize("argv", CASES, ids=" ".join)
def test_create_like_qemu_img(tmp_path: Path, argv: tuple[str, ...]) -> None:
    outcomes = []
    for side in ("qemu", "emu"):
        root = tmp_path / side
        root.mkdir()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "base", "1M"], cwd=root,
                       check=True)
        run = real if side == "qemu" else mine
        outcomes.append((run(root, "create", *argv), _files(root)))
    assert outcomes[1] == outcomes[0]


@pytest.mark.parametrize("argv", [("-f", "vmdk", "-o", "foo=1", "x", "1M"),
                                  ("-f", "vmdk", "-o", "help", "x")])
def test_formats_not_emulated_say_so_before_their_options(tmp_path: Path,
                                                          argv: tuple[str, ...]) -> None:
    """The emulator knows the creation options of qcow2, raw and file only."""
    out, err = io.StringIO(), io.StringIO()
    assert img.main(["create", *argv], sandbox=Sandbox(tmp_path), stdout=out, stderr=err) == 1
    assert err.getvalue().endswith("Creating vmdk images is not emulated\n")
    assert not list(tmp_path.iterdir())
