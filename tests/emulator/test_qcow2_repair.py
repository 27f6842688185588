"""qcow2 repair against real QEMU 7.2: ``qemu-img check [-r leaks|all]`` and the repair of a
dirty (lazy refcounts) image opened read-write. Broken images are made with the real tools
(a qemu-io killed mid-session, bytes patched at offsets read from the header); one copy goes
to real QEMU, one to the emulator, and stdout, stderr, the exit status and every byte of the
resulting file must be the same."""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from emulator import qemu_io as emulated_qemu_io
from emulator.qcow2 import FileIO, Qcow2Error, Qcow2Image
from emulator.qcow2.check import FIX_ERRORS, FIX_LEAKS
from emulator.sandbox import Sandbox
from tests.conftest import requires_qemu, requires_qemu_img, requires_qemu_io
from tests.emulator.qemu_runner import c, io, on_both, run_commands
from tests.emulator.test_img import mine, real

COPIED = 1 << 63
OFFSET_MASK = 0x00FFFFFFFFFFFE00
WRITES = ("write -P 1 0 128k", "write -P 2 1M 64k")


# -- making broken images ---------------------------------------------------------------------
def _create(path: Path, size: str = "4M", opts: str | None = None) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", *(["-o", opts] if opts else [])]
    subprocess.run([*argv, str(path), size], check=True)


def _qemu_io(path: Path, *commands: str, kill: bool = False) -> None:
    """Real qemu-io; with ``kill`` it dies by SIGKILL after the commands (nothing flushed)."""
    argv = ["qemu-io"]
    for command in (*commands, *(["sigraise 9"] if kill else [])):
        argv += ["-c", command]
    subprocess.run([*argv, str(path)], capture_output=True, check=not kill)


def _u64(path: Path, offset: int) -> int:
    with path.open("rb") as f:
        f.seek(offset)
        value: int = struct.unpack(">Q", f.read(8))[0]
    return value


def _put(path: Path, offset: int, fmt: str, value: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


class _Layout:
    """Where things are in an image, from its header (16-bit refcounts for refcount_entry)."""

    def __init__(self, path: Path) -> None:
        head = path.read_bytes()[:104]
        self.cluster_size = 1 << struct.unpack_from(">I", head, 20)[0]
        self.l1_offset = struct.unpack_from(">Q", head, 40)[0]
        self.reftable = struct.unpack_from(">Q", head, 48)[0]
        self.path = path

    def refcount_entry(self, cluster: int) -> int:
        per_block = self.cluster_size // 2
        block = _u64(self.path, self.reftable + 8 * (cluster // per_block))
        return block + 2 * (cluster % per_block)

    def l2_entry(self, index: int) -> int:
        return (_u64(self.path, self.l1_offset) & OFFSET_MASK) + 8 * index


def _set_refcount(path: Path, cluster: int, value: int) -> None:
    _put(path, _Layout(path).refcount_entry(cluster), ">H", value)


def _mark_dirty(path: Path) -> None:
    _put(path, 72, ">Q", _u64(path, 72) | 1)


def _killed(opts: str = "lazy_refcounts=on", size: str = "4M",
            writes: tuple[str, ...] = WRITES) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        _create(path, size, opts)
        _qemu_io(path, *writes, kill=True)
    return build


def _patched(patch: Callable[[Path], None], opts: str | None = None, *,
             dirty: bool = False) -> Callable[[Path], None]:
    """A clean image with WRITES, then ``patch``; ``dirty``: the dirty bit set too."""
    def build(path: Path) -> None:
        _create(path, "4M", opts)
        _qemu_io(path, *WRITES)
        patch(path)
        if dirty:
            _mark_dirty(path)
    return build


def _leaks(path: Path) -> None:
    """A data cluster counted twice, two appended clusters referenced by nobody."""
    end = path.stat().st_size // 65536
    with path.open("ab") as f:
        f.write(b"\x55" * 2 * 65536)
    _set_refcount(path, end, 1)
    _set_refcount(path, end + 1, 3)
    _set_refcount(path, 5, 2)


def _zeroed(path: Path) -> None:
    """A data cluster without a refcount (only a rebuild repairs that), one leak."""
    _set_refcount(path, 5, 0)
    _set_refcount(path, 6, 2)


def _double_reference(path: Path) -> None:
    """Two L2 entries pointing at one cluster whose refcount is 1."""
    layout = _Layout(path)
    _put(path, layout.l2_entry(5), ">Q", _u64(path, layout.l2_entry(0)))


def _copied_flags(path: Path) -> None:
    layout = _Layout(path)
    _put(path, layout.l2_entry(1), ">Q", _u64(path, layout.l2_entry(1)) & ~COPIED)
    _put(path, layout.l1_offset, ">Q", _u64(path, layout.l1_offset) & ~COPIED)


def _copied_and_leak(path: Path) -> None:
    layout = _Layout(path)
    _put(path, layout.l2_entry(1), ">Q", _u64(path, layout.l2_entry(1)) & ~COPIED)
    _set_refcount(path, 2, 2)


def _refblock_outside(path: Path) -> None:
    _put(path, _Layout(path).reftable + 8, ">Q", 0x100000)


def _reserved_l2_bits(path: Path) -> None:
    entry = _Layout(path).l2_entry(0)
    _put(path, entry, ">Q", _u64(path, entry) | 0x100)


def _unaligned_prealloc(path: Path) -> None:
    """A zero cluster with a host offset inside a cluster: repaired into a plain zero one."""
    entry = _Layout(path).l2_entry(1)
    _put(path, entry, ">Q", (_u64(path, entry) + 0x200) | 1)


def _unaligned_data(path: Path) -> None:
    entry = _Layout(path).l2_entry(1)
    _put(path, entry, ">Q", _u64(path, entry) + 0x200)


def _beyond_end(path: Path) -> None:
    _put(path, _Layout(path).l2_entry(3), ">Q", COPIED | 0x10000000)


def _reserved_l1_bits(path: Path) -> None:
    offset = _Layout(path).l1_offset
    _put(path, offset, ">Q", _u64(path, offset) | 1 << 60)


def _unaligned_refblock(path: Path) -> None:
    offset = _Layout(path).reftable
    _put(path, offset, ">Q", _u64(path, offset) | 0x400)


def _reserved_reftable_bits(path: Path) -> None:
    """The rebuild this asks for would place a refcount block where the masked entry still
    points: QEMU's overlap check stops it."""
    offset = _Layout(path).reftable
    _put(path, offset, ">Q", _u64(path, offset) | 1)


def _corrupt_bit_and_leaks(path: Path) -> None:
    _leaks(path)
    _put(path, 72, ">Q", _u64(path, 72) | 2)


def _compressed_copied(path: Path) -> None:
    _create(path)
    _qemu_io(path, "write -c -P 1 2M 64k", "write -P 1 0 64k")
    entry = _Layout(path).l2_entry(32)
    _put(path, entry, ">Q", _u64(path, entry) | COPIED)


def _overflow(path: Path) -> None:
    _create(path, "4M", "refcount_bits=1")
    _qemu_io(path, *WRITES)
    _double_reference(path)


def _with_bitmap(patch: Callable[[Path], None], *, dirty: bool = False,
                 opts: str | None = None) -> Callable[[Path], None]:
    """A persistent bitmap (stored cleanly: qemu-img writes it anew when it closes the image
    it opened read-write), then ``patch``."""
    def build(path: Path) -> None:
        _create(path, "4M", opts)
        _qemu_io(path, "write -P 1 0 128k")
        subprocess.run(["qemu-img", "bitmap", "--add", str(path), "b0"], check=True)
        _qemu_io(path, "write -P 2 1M 64k")
        patch(path)
        if dirty:
            _mark_dirty(path)
    return build


def _killed_with_bitmap(path: Path) -> None:
    """Killed while the bitmap was loaded: it stays in use (inconsistent) in the image."""
    _create(path, "4M", "lazy_refcounts=on")
    subprocess.run(["qemu-img", "bitmap", "--add", str(path), "b0"], check=True)
    _qemu_io(path, "write -P 2 1M 64k", kill=True)


def _both_zeroed_and_leaky(path: Path) -> None:
    _zeroed(path)
    _set_refcount(path, 7, 3)


BUILDS: dict[str, Callable[[Path], None]] = {
    "dirty": _killed(),
    "dirty-512-byte-clusters-1-bit-refcounts": _killed(
        "lazy_refcounts=on,cluster_size=512,refcount_bits=1", "8M",
        ("write -c -P 3 6M 64k", "write -P 2 3M 1M", "discard 3M 64k", "write -P 1 0 300k",
         "write -z 7M 64k", "write -P 4 5M 200k")),
    "dirty-8-bit-refcounts": _killed("lazy_refcounts=on,cluster_size=4k,refcount_bits=8", "8M",
                                     ("write -P 1 0 300k", "write -P 2 3M 1M")),
    "dirty-64-bit-refcounts": _killed("lazy_refcounts=on,refcount_bits=64"),
    # ~170 refcount blocks: the rebuilt refcount table takes three clusters
    "dirty-grown-refcount-table": _killed("lazy_refcounts=on,cluster_size=512", "64M",
                                          ("write -P 1 0 20M", "write -P 2 30M 1M")),
    "leaks": _patched(_leaks),
    "corrupt-bit-and-leaks": _patched(_corrupt_bit_and_leaks),
    "zeroed-refcount": _patched(_zeroed),
    "double-reference": _patched(_double_reference),
    "copied-flags": _patched(_copied_flags),
    "copied-flag-and-leak": _patched(_copied_and_leak),
    "refblock-outside-image": _patched(_refblock_outside),
    "reserved-l2-bits": _patched(_reserved_l2_bits),
    "reserved-l1-bits": _patched(_reserved_l1_bits),
    "unaligned-preallocated-cluster": _patched(_unaligned_prealloc),
    "unaligned-data-cluster": _patched(_unaligned_data),
    "cluster-beyond-end": _patched(_beyond_end),
    "compressed-cluster-copied": _compressed_copied,
    "refcount-overflow": _overflow,
    "v2-zeroed-and-leaky": _patched(_both_zeroed_and_leaky, "compat=0.10"),
    "bitmap-leaks": _with_bitmap(_leaks),
    "bitmap-zeroed-refcount": _with_bitmap(_zeroed),
    "dirty-in-use-bitmap": _killed_with_bitmap,
}

CHECKS = {
    "check": (),
    "leaks": ("-r", "leaks"),
    "all": ("-r", "all"),
    "all-json": ("-r", "all", "--output=json"),
    "leaks-json": ("--output=json", "--repair=leaks"),
    "all-quiet": ("-q", "-r", "all"),
}


def _copies(tmp_path: Path, build: Callable[[Path], None]) -> tuple[Path, Path]:
    """The broken image, built once, as tmp_path/real/a.qcow2 and tmp_path/mine/a.qcow2."""
    src = tmp_path / "src.qcow2"
    build(src)
    roots = tmp_path / "real", tmp_path / "mine"
    for root in roots:
        root.mkdir()
        shutil.copy(src, root / "a.qcow2")
    return roots


def _same_files(real_root: Path, mine_root: Path) -> bool:
    return (real_root / "a.qcow2").read_bytes() == (mine_root / "a.qcow2").read_bytes()


# -- qemu-img check ---------------------------------------------------------------------------
@requires_qemu_img
@requires_qemu_io
@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_check_and_repair_like_qemu_img(tmp_path: Path, name: str, check: str) -> None:
    real_root, mine_root = _copies(tmp_path, BUILDS[name])
    expected = real(real_root, "check", *CHECKS[check], "a.qcow2")
    assert mine(mine_root, "check", *CHECKS[check], "a.qcow2") == expected
    assert _same_files(real_root, mine_root)


@requires_qemu_img
@requires_qemu_io
def test_repairs_what_the_scenarios_claim(tmp_path: Path) -> None:
    """The scenarios reach the paths they are named after (on real QEMU)."""
    real_root, _ = _copies(tmp_path, BUILDS["zeroed-refcount"])
    _, out, err = real(real_root, "check", "-r", "all", "a.qcow2")
    assert "Rebuilding refcount structure\n" in err and "    1 corruptions\n" in out
    _, _, err = real(real_root, "check", "-r", "all", "a.qcow2")
    assert err == ""
    path = tmp_path / "leaky.qcow2"
    _patched(_leaks)(path)
    code, out, err = real(tmp_path, "check", "-r", "leaks", "leaky.qcow2")
    assert (code, out.count("    3 leaked clusters\n")) == (0, 1)
    assert "Repairing cluster 5 refcount=2 reference=1\n" in err


@requires_qemu_img
@requires_qemu_io
def test_plain_check_of_an_unaligned_refcount_block(tmp_path: Path) -> None:
    """Read-only, QEMU's qcow2_get_refcount signals a non-fatal corruption once, then each
    refcount of that block is an internal error."""
    real_root, mine_root = _copies(tmp_path, _patched(_unaligned_refblock))
    expected = real(real_root, "check", "a.qcow2")
    assert "qcow2: Image is corrupt: Refblock offset 0x20400 unaligned" in expected[2]
    assert mine(mine_root, "check", "a.qcow2") == expected


@requires_qemu_img
@requires_qemu_io
@pytest.mark.parametrize("patch", [_unaligned_refblock, _reserved_reftable_bits],
                         ids=["unaligned-refblock", "reserved-bits-in-reftable"])
def test_repairs_qemu_would_abort_are_refused(tmp_path: Path,
                                              patch: Callable[[Path], None]) -> None:
    """Where QEMU's repair would run into its metadata overlap checks (and mark the image
    corrupt), the emulator refuses with its own message and writes nothing."""
    real_root, mine_root = _copies(tmp_path, _patched(patch))
    before = (mine_root / "a.qcow2").read_bytes()
    code, _, err = real(real_root, "check", "-r", "all", "a.qcow2")
    assert code == 1 and "qcow2: Marking image as corrupt" in err
    code, out, err = mine(mine_root, "check", "-r", "all", "a.qcow2")
    assert (code, out) == (1, "")
    assert err.startswith("qemu-img: The emulator does not repair ")
    assert (mine_root / "a.qcow2").read_bytes() == before


# -- a dirty image opened read-write ----------------------------------------------------------
OPENS: dict[str, Callable[[Path], None]] = {
    "dirty": _killed(),
    "dirty-512-byte-clusters-1-bit-refcounts": BUILDS["dirty-512-byte-clusters-1-bit-refcounts"],
    "dirty-grown-refcount-table": BUILDS["dirty-grown-refcount-table"],
    "dirty-in-use-bitmap": _killed_with_bitmap,
    "dirty-bitmap-zeroed-and-leaky": _with_bitmap(_both_zeroed_and_leaky, dirty=True,
                                                  opts="lazy_refcounts=on"),
    "dirty-leaks-only": _patched(_leaks, "lazy_refcounts=on", dirty=True),
    "dirty-unrepairable-reserved-bits": _patched(_reserved_l2_bits, "lazy_refcounts=on",
                                                 dirty=True),
    "dirty-unaligned-preallocated": _patched(_unaligned_prealloc, "lazy_refcounts=on",
                                             dirty=True),
}


@requires_qemu_img
@requires_qemu_io
@pytest.mark.parametrize("name", sorted(OPENS))
def test_dirty_image_opened_by_qemu_io(tmp_path: Path, name: str) -> None:
    """qemu-io opens the image read-write: qcow2_do_open repairs it first (its messages on
    stderr), then the commands run on the repaired image."""
    real_root, mine_root = _copies(tmp_path, OPENS[name])
    commands = ["read 1M 64k", "write -P 5 2M 64k", "read -P 5 2M 64k"]
    argv = ["qemu-io"] + [arg for command in commands for arg in ("-c", command)]
    done = subprocess.run([*argv, "a.qcow2"], capture_output=True, text=True, cwd=real_root)
    code, printed = emulated_qemu_io.offline(Sandbox(mine_root), "a.qcow2", None, commands)
    assert (code, emulated_qemu_io.filter_timing(printed)) == (
        done.returncode, emulated_qemu_io.filter_timing(done.stderr + done.stdout))
    assert _same_files(real_root, mine_root)


@requires_qemu_img
@requires_qemu_io
@pytest.mark.parametrize("argv", [("rebase", "-u", "-b", "", "a.qcow2"),
                                  ("bitmap", "--add", "a.qcow2", "b1"),
                                  ("info", "--output=json", "a.qcow2")],
                         ids=["rebase", "bitmap", "info"])
def test_dirty_image_opened_by_other_qemu_img_verbs(tmp_path: Path,
                                                    argv: tuple[str, ...]) -> None:
    """Read-write opens repair (and print what the repair prints), read-only ones do not."""
    real_root, mine_root = _copies(tmp_path, _killed())
    assert mine(mine_root, *argv) == real(real_root, *argv)
    assert _same_files(real_root, mine_root)


@requires_qemu
@requires_qemu_img
@requires_qemu_io
def test_dirty_image_added_to_a_vm(tmp_path: Path) -> None:
    """blockdev-add opens the image read-write: repaired, then written and closed."""
    def setup(directory: Path) -> None:
        _killed()(directory / "a.qcow2")

    commands = [c("blockdev-add", driver="qcow2", **{"node-name": "n"},
                  file={"driver": "file", "filename": "a.qcow2"}),
                io("n", "write -P 7 3M 64k"), c("blockdev-del", **{"node-name": "n"})]
    qemu, emu = on_both(tmp_path, lambda d, q: run_commands(d, commands, qemu=q), setup)
    assert emu == qemu
    assert (tmp_path / "qemu" / "a.qcow2").read_bytes() == \
        (tmp_path / "emu" / "a.qcow2").read_bytes()


@requires_qemu
@requires_qemu_img
@requires_qemu_io
@pytest.mark.parametrize("options", [
    {"cache-clean-interval": 1 << 40},   # an option refused: no repair at all
    {"l2-cache-size": 65536},            # the repair works with the node's cache sizes
], ids=["refused-option", "small-cache"])
def test_dirty_image_repaired_after_the_options(tmp_path: Path, options: dict) -> None:
    """qcow2_do_open takes the node's options, loads the bitmaps and updates the header
    before it repairs a dirty image: an option it refuses leaves the image as it was."""
    def setup(directory: Path) -> None:
        _killed()(directory / "a.qcow2")

    commands = [c("blockdev-add", driver="qcow2", **{"node-name": "n"}, **options,
                  file={"driver": "file", "filename": "a.qcow2"}),
                c("blockdev-del", **{"node-name": "n"})]
    qemu, emu = on_both(tmp_path, lambda d, q: run_commands(d, commands, qemu=q), setup)
    assert emu == qemu
    assert (tmp_path / "qemu" / "a.qcow2").read_bytes() == \
        (tmp_path / "emu" / "a.qcow2").read_bytes()


# -- without QEMU -----------------------------------------------------------------------------
def _stale_image(path: Path) -> None:
    """An emulator-made lazy-refcounts image left as a killed process leaves it: the L2
    tables written back, the refcount blocks not, the dirty bit set."""
    Qcow2Image.create(FileIO.create(path), 4 << 20, lazy_refcounts=True)
    image = Qcow2Image.open(FileIO(path))
    image.write(0, b"\1" * 131072)
    image.tables.cache.flush()


def test_open_repairs_a_dirty_image_and_check_finds_it_clean(tmp_path: Path) -> None:
    _stale_image(tmp_path / "a")
    before = Qcow2Image.open(FileIO(tmp_path / "a"), read_only=True).check()
    assert before.messages[:2] == ["ERROR cluster 5 refcount=0 reference=1",
                                   "ERROR cluster 6 refcount=0 reference=1"]
    lines: list[str] = []
    image = Qcow2Image.open(FileIO(tmp_path / "a"), report=lines.append)
    assert lines == [line + "\n" for line in before.messages[:2]] + [
        "Rebuilding refcount structure\n", "Repairing cluster 1 refcount=1 reference=0\n",
        "Repairing cluster 2 refcount=1 reference=0\n"]
    image.close()
    after = Qcow2Image.open(FileIO(tmp_path / "a"), read_only=True)
    assert after.check().corruptions == 0 and not after.get_info()["is_dirty"]
    assert after.read(0, 131072) == b"\1" * 131072


def test_check_mode_leaves_a_dirty_image_alone(tmp_path: Path) -> None:
    _stale_image(tmp_path / "a")
    before = (tmp_path / "a").read_bytes()
    image = Qcow2Image.open(FileIO(tmp_path / "a"), check_mode=True)
    leaks_only = image.check(FIX_LEAKS)
    assert leaks_only.ret < 0 and "ERROR need to rebuild refcount structures" in \
        leaks_only.messages
    assert (tmp_path / "a").read_bytes() == before
    repaired = image.check(FIX_LEAKS | FIX_ERRORS)
    assert repaired.ret == 0 and repaired.corruptions_fixed == 2
    assert image.check().messages == []


def test_unknown_repair_mode_is_a_usage_error(tmp_path: Path) -> None:
    assert mine(tmp_path, "check", "-r", "some", "a.qcow2") == (
        1, "", "qemu-img: Unknown option value for -r (expecting 'leaks' or 'all'): some\n"
               "Try 'qemu-img --help' for more information\n")


def test_a_corrupt_image_opens_read_write_only_to_be_checked(tmp_path: Path) -> None:
    Qcow2Image.create(FileIO.create(tmp_path / "a"), 1 << 20)
    _put(tmp_path / "a", 72, ">Q", 2)
    with pytest.raises(Qcow2Error, match="Image is corrupt; cannot be opened read/write"):
        Qcow2Image.open(FileIO(tmp_path / "a"))
    image = Qcow2Image.open(FileIO(tmp_path / "a"), check_mode=True)
    assert image.check(FIX_LEAKS).ret == 0
    assert not image.corrupt and _u64(tmp_path / "a", 72) == 0
