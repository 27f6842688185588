"""qemu-io commands: the emulator prints what the real qemu-io prints (timing aside)."""

from __future__ import annotations

import errno
import re
import subprocess
from pathlib import Path

import pytest

from emulator import img, qemu_io
from emulator.qcow2 import FileIO, Qcow2Image
from emulator.sandbox import Sandbox
from tests.conftest import requires_qemu_img, requires_qemu_io


class ImageTarget:
    """An IOTarget over a qcow2 image with no backing file (what a BlockBackend gives)."""

    def __init__(self, image: Qcow2Image) -> None:
        self.image = image

    def pread(self, offset: int, length: int) -> bytes:
        return self.image.read(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        self.image.write(offset, data)

    def pwrite_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        self.image.write_zeroes(offset, length, may_unmap=may_unmap)

    def pdiscard(self, offset: int, length: int) -> None:
        self.image.discard(offset, length)

    def flush(self) -> None:
        self.image.flush()

    def length(self) -> int:
        return self.image.size


class FailingTarget(ImageTarget):
    def pread(self, offset: int, length: int) -> bytes:
        raise OSError(errno.EIO, "injected")

    def pwrite(self, offset: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "injected")


# Commands whose output is compared with the real qemu-io, in this order on one image.
COMMANDS = """\
write -P 0x49 0 64k
write -z 64k 64k
write -z -u 128k 64k
read -P 0x49 0 64k
read -P 0x48 0 64k
read -P 0 64k 512
read 0 1
write 0 100
write 1 512
read 64M 512
write 64M 512
write 63M 2M
read -v 0 32
read -v 0 17
flush
length
write -P 300 0 512
write -P abc 0 512
write -P 010 0 5
write -P 0x 0 5
write -P -1 0 5
write abc 512
write 0 abc
write 0
write
read
foo
write -x 0 1
w -x 0 1
write 0 -1
write 0 1k1
write 0 1.5k
write 0 1.
write 0 1.k
write 0 0
read 0 0
write 0 3G
read 0 2G
read 0 2147483137
write 0 0x
write 0k 512
write 4k 1K
write 0 1b
write 0 1e
write 0 0x1000
write 0 010
write 0 +5
write -z -P 1 0 512
write -u 0 512
write -n 0 512
write -z -n 0 3G
write -b -z 0 512
write -f -c 0 512
write -b 1 512
write -c 0 511
read -b 1 512
read -P 0x49 -v 0 16
read -q 0 512
write -q 0 512
read 0 1.00048828125k
read 0 1.0009k
read 0 .5k
read 0 0.k
read 0 1kB
read 0 1.5b
read 0 0.0b
read 0 0x10K
read 0 00x10
read 0 1..5k
read 0 18446744073709551616
read 0 9223372036854775807
read 9223372036854775807 1
write 0 16E
write 0 8E
write 0 7E
write 0 1.5e3k
write 0 0x1.8
read -l 10 0 512
read -P 0xcd -s 100 -l 20 0 512
read -P 0xcd -s 600 0 512
read -P 0xcd -l 600 0 512
read -l 5 -P 0 0 10
r 0 1
w 0 1
write 0 1 2
write 0 512 -P 5
write -P
write -P 1
write -- 0 5
write -zu 0 512
write -P1 0 5
read -vP 1 0 5
flush x
write -P 0x41 1M 100k
write -z 1M 1000
write -z 2M 100k
write -z 4M 4M
read -P 0 4M 4M
read -C 0 512
discard 0 64k
d 0 1
discard -x 0 1
discard 0
discard 64M 1
discard -q 1M 512
discard 0 3G
discard 2M 1M
read -P 0 2M 1M
""".splitlines()


@requires_qemu_img
@requires_qemu_io
def test_every_command_prints_what_the_real_qemu_io_prints(tmp_path: Path) -> None:
    mine_path, real_path = tmp_path / "mine.qcow2", tmp_path / "real.qcow2"
    Qcow2Image.create(FileIO.create(mine_path), 64 << 20)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", real_path, "64M"], check=True)
    image = Qcow2Image.open(FileIO(mine_path))
    image.refcounts.pass_discard.add("request")   # qemu-io's discard=unmap
    target = ImageTarget(image)
    for command in COMMANDS:
        real = subprocess.run(["qemu-io", "-c", command, real_path], capture_output=True,
                              text=True)
        # qemu-io writes errors to stderr first; run() returns them in that order too
        expected = _stable(real.stderr + real.stdout)
        assert _stable(qemu_io.run(target, command)) == expected, command
    image.close()   # the metadata caches are written back, as each qemu-io did at exit
    # Same clusters in the same places, and the same bytes: the clusters guest discards
    # freed are punched out of both files (discard=unmap).
    assert mine_path.read_bytes() == real_path.read_bytes()
    box = Sandbox(tmp_path)
    assert img.map_image(box, "mine.qcow2") == img.map_image(box, "real.qcow2")
    assert img.compare(box, "mine.qcow2", "real.qcow2").exit_code == 0
    assert subprocess.run(["qemu-img", "check", mine_path]).returncode == 0


def _stable(text: str) -> str:
    """Timing made stable, including -C's machine-readable line."""
    text = qemu_io.filter_timing(text)
    return re.sub(r"^(\d+),1,[0-9:.]+,[0-9.inf]+,[0-9.inf]+$", r"\1,1,T,R,R", text,
                  flags=re.MULTILINE)


def test_statistics_line_is_formatted_like_qemu_io(tmp_path: Path) -> None:
    Qcow2Image.create(FileIO.create(tmp_path / "a.qcow2"), 1 << 20)
    target = ImageTarget(Qcow2Image.open(FileIO(tmp_path / "a.qcow2")))
    ticks = iter([10.0, 10.5])
    out = qemu_io.run(target, "write -P 1 0 1536", clock=lambda: next(ticks))
    assert out == ("wrote 1536/1536 bytes at offset 0\n"
                   "1.500 KiB, 1 ops; 00.50 sec (3 KiB/sec and 2.0000 ops/sec)\n")
    assert qemu_io.filter_timing(out).endswith(
        "X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)\n")


def test_io_errors_print_the_strerror_text(tmp_path: Path) -> None:
    Qcow2Image.create(FileIO.create(tmp_path / "a.qcow2"), 1 << 20)
    target = FailingTarget(Qcow2Image.open(FileIO(tmp_path / "a.qcow2")))
    assert qemu_io.run(target, "read 0 512") == "read failed: Input/output error\n"
    assert qemu_io.run(target, "write 0 512") == "write failed: No space left on device\n"
    assert qemu_io.run(target, "") == ""


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("512", 512), ("64k", 65536), ("64K", 65536), ("1M", 1 << 20), ("2G", 2 << 30),
    ("1T", 1 << 40), ("0x10000", 65536), ("010", 10), ("1.5k", 1536), ("1.", 1),
    ("1.0009k", 1025), ("+5", 5), ("0.0b", 0), ("7E", 7 << 60),
    ("abc", -errno.EINVAL), ("-1", -errno.EINVAL), ("1.5", -errno.EINVAL),
    (".5k", -errno.EINVAL), ("0x1.8", -errno.EINVAL), ("1.5e3k", -errno.EINVAL),
    ("", -errno.EINVAL), ("8E", -errno.ERANGE), ("18446744073709551616", -errno.ERANGE),
])
def test_cvtnum_follows_qemu_strtosz(text: str, value: int) -> None:
    assert qemu_io.cvtnum(text) == value


def test_cvtnum_warns_about_suffixed_hex_like_qemu() -> None:
    warnings: list[str] = []
    assert qemu_io.cvtnum("0x1k", warnings.append) == 1024
    assert warnings == ["qemu-io: warning: Using a multiplier suffix on hex numbers is "
                        "deprecated: 0x1k\n"]


@requires_qemu_img
@requires_qemu_io
@pytest.mark.parametrize("fmt,options", [("qcow2", "lazy_refcounts=on,cluster_size=512"),
                                         ("qcow2", "refcount_bits=1"), ("raw", "")])
def test_info_prints_what_the_real_qemu_io_prints(tmp_path: Path, fmt: str,
                                                  options: str) -> None:
    path = tmp_path / "img"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *(["-o", options] if options else []),
                    path, "3G"], check=True)
    real = subprocess.run(["qemu-io", "-f", fmt, "-c", "info", path], capture_output=True,
                          text=True, check=True).stdout
    assert qemu_io.offline(Sandbox(tmp_path), "img", fmt, ["info"]) == (0, real)
    assert real.startswith(f"format name: {fmt}\n")


@requires_qemu_img
@requires_qemu_io
def test_map_and_alloc_print_what_the_real_qemu_io_prints(tmp_path: Path) -> None:
    """Allocation in this layer only (the backing file's clusters are not this image's),
    zero clusters allocated, discarded ones not, runs merged, counts cut at the end."""
    for who in ("real", "mine"):
        base = tmp_path / f"{who}-base"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "8M"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", "-c",
                        "write -P 2 4M 64k", base], check=True, capture_output=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F",
                        "qcow2", tmp_path / f"{who}-top", "6M"], check=True)
    commands = ["map", "alloc 0", "alloc 0 8M", "alloc 5M 2M", "alloc x", "a 0 64k",
                "write -P 3 512k 64k", "write -z 2M 128k", "write -z -u 3M 64k", "map",
                "alloc 0 4M", "discard 512k 64k", "map", "alloc 0 0", "map x"]
    for command in commands:
        real = subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, tmp_path / "real-top"],
                              capture_output=True, text=True)
        _, mine = qemu_io.offline(Sandbox(tmp_path), "mine-top", "qcow2", [command])
        assert _stable(mine) == _stable(real.stderr + real.stdout), command


@requires_qemu_img
@requires_qemu_io
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("commands", [
    ["read 0 512"], ["read -P 1 0 512"], ["read -q -P 1 0 512"], ["nosuch"], ["read 0"],
    ["flush"], ["length"], ["map"], ["info"], ["alloc 0 512"], ["write -z -u 0"],
    ["read -P 1 0 512", "read 0 512"], ["write -P 7 0 4k", "read -P 7 0 4k"],
    ["read -P 0 0 512", "discard -x 0 1", "length"],
])
def test_exit_status_is_qemu_ios(tmp_path: Path, fmt: str, commands: list[str]) -> None:
    """command_loop: qemu-io exits 1 when any command returned an error (usage and parse
    errors, failed I/O, a pattern that does not verify, an unknown command), else 0."""
    for name in ("real", "mine"):
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, tmp_path / name, "1M"],
                       check=True)
    real = subprocess.run(["qemu-io", "-f", fmt, *(a for c in commands for a in ("-c", c)),
                           tmp_path / "real"], capture_output=True, text=True)
    status, printed = qemu_io.offline(Sandbox(tmp_path), "mine", fmt, commands)
    assert status == real.returncode
    # stderr is unbuffered, stdout is not: the same lines, interleaved differently
    assert sorted(_stable(printed).splitlines()) == \
        sorted(_stable(real.stderr + real.stdout).splitlines())


@requires_qemu_img
@requires_qemu_io
@pytest.mark.parametrize("fmt,commands", [
    ("qcow2", ["write -P 0x33 3M 512"]),                  # handle_alloc_space: ZERO_RANGE
    ("qcow2", ["write -P 1 0 1M", "write -z -u 0 1M"]),   # zero flag and discards
    ("raw", ["write -P 1 0 1M", "write -z 64k 128k"]),   # FALLOC_FL_ZERO_RANGE
    ("raw", ["write -P 1 0 1M", "write -z -u 64k 128k"]),   # MAY_UNMAP: a hole
    ("raw", ["write -P 1 0 64k", "write -z 3M 1M"]),      # the file's last MiB
])
def test_zero_writes_allocate_as_file_posix_does(tmp_path: Path, fmt: str,
                                                 commands: list[str]) -> None:
    """handle_aiocb_write_zeroes(_unmap): the same bytes, and the same blocks allocated
    (what SEEK_DATA, qemu-img map and actual-size see)."""
    for name in ("real", "mine"):
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, tmp_path / name, "4M"],
                       check=True)
    subprocess.run(["qemu-io", "-f", fmt, *(a for c in commands for a in ("-c", c)),
                    tmp_path / "real"], check=True, capture_output=True)
    assert qemu_io.offline(Sandbox(tmp_path), "mine", fmt, commands)[0] == 0
    assert (tmp_path / "mine").read_bytes() == (tmp_path / "real").read_bytes()
    maps = [subprocess.run(["qemu-img", "map", "--output=json", "-f", fmt, tmp_path / name],
                           capture_output=True, text=True, check=True).stdout
            for name in ("real", "mine")]
    assert maps[1] == maps[0]
    assert (tmp_path / "mine").stat().st_blocks == (tmp_path / "real").stat().st_blocks
