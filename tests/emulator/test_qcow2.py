"""The qcow2 library against the real qemu-img / qemu-io / qemu-system-x86_64."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator import img
from emulator.qcow2 import FileIO, Qcow2Error, Qcow2Image, Status, StoredBitmap
from emulator.sandbox import Sandbox
from tests.conftest import requires_qemu, requires_qemu_img

MiB = 1 << 20


class RecordingIO(FileIO):
    """A FileIO that remembers debug events and host reads, as blkdebug would see them."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.log: list[tuple[str, int, int] | str] = []

    def debug_event(self, event: str) -> None:
        self.log.append(event)

    def pread(self, offset: int, length: int) -> bytes:
        self.log.append(("pread", offset, length))
        return super().pread(offset, length)


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)


def qemu_io(path: Path, *commands: str, discard: str = "ignore") -> None:
    """Run qemu-io. With discard=ignore (blockdev-add's default) guest discards do nothing
    and freed clusters keep their bytes; with unmap (qemu-io's own default) discards reach
    qcow2, and the clusters they free are punched out of the file as well."""
    argv = ["qemu-io", f"--discard={discard}"]
    for command in commands:
        argv += ["-c", command]
    subprocess.run([*argv, str(path)], capture_output=True, check=True)


def new_image(path: Path, size: int = 64 * MiB, **options: object) -> Qcow2Image:
    Qcow2Image.create(FileIO.create(path), size, **options)  # type: ignore[arg-type]
    return Qcow2Image.open(FileIO(path))


def apply(image: Qcow2Image, command: str) -> None:
    """The qemu-io commands these tests replay, done directly on the image."""
    words = command.split()
    offset, length = int(words[-2]), int(words[-1])
    if words[0] == "discard":
        image.discard(offset, length)
    elif "-z" in words:
        image.write_zeroes(offset, length, may_unmap="-u" in words)
    else:
        image.write(offset, bytes([int(words[2], 0)]) * length)


# -- the on-disk format is QEMU's, byte for byte ------------------------------------------------
@requires_qemu_img
@pytest.mark.parametrize("options", [
    {}, {"cluster_size": 512}, {"cluster_size": 4096}, {"cluster_size": 8192},
    {"cluster_size": 2 * MiB}, {"lazy_refcounts": True, "refcount_bits": 8},
    {"refcount_bits": 1}, {"refcount_bits": 64},
])
def test_create_writes_the_same_bytes_as_qemu_img(tmp_path: Path, options: dict) -> None:
    Qcow2Image.create(FileIO.create(tmp_path / "mine"), 64 * MiB, **options)
    opts = ",".join(f"{k}={'on' if v is True else v}" for k, v in options.items())
    real = qemu_img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []),
                    tmp_path / "real", "64M")
    assert real.returncode == 0, real.stderr
    assert (tmp_path / "mine").read_bytes() == (tmp_path / "real").read_bytes()


@requires_qemu_img
def test_create_with_backing_file_matches_qemu_img(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "base", "64M")
    Qcow2Image.create(FileIO.create(tmp_path / "mine"), 64 * MiB, backing_file="base",
                      backing_format="qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base", "-F", "qcow2", tmp_path / "real")
    assert (tmp_path / "mine").read_bytes() == (tmp_path / "real").read_bytes()


WRITES = [
    "write -P 0x49 0 65536", "write -P 0x6c 1048576 65536", "write -P 0x6f 33554432 65536",
    "write -P 0x76 67043328 65536", "write -P 0x65 0 65536", "write -P 0x77 1015808 65536",
    "write -P 0x72 33587200 65536", "write -P 0x69 67010560 65536", "write -P 0x11 5000 70000",
    "write -z 2097152 65536", "write -z 1048576 65536", "write -z -u 0 65536",
    "write -z 3000 1000", "write -P 0x12 1050000 512", "write -z 10485760 4194304",
    "write -P 0x13 10485860 300000",
]


@requires_qemu_img
def test_guest_writes_lay_out_the_file_exactly_like_qemu(tmp_path: Path) -> None:
    image = new_image(tmp_path / "mine")
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "real", "64M")
    for command in WRITES:
        apply(image, command)
    image.close()   # the metadata caches are written back, as when qemu-io exits
    qemu_io(tmp_path / "real", *WRITES)
    assert (tmp_path / "mine").read_bytes() == (tmp_path / "real").read_bytes()
    assert qemu_img("check", tmp_path / "mine").returncode == 0


@requires_qemu_img
def test_discard_frees_and_zeroes_clusters_like_qemu(tmp_path: Path) -> None:
    commands = [*WRITES[:9], "discard 0 65536", "discard 1000000 200000", "discard 100 1000",
                "write -P 0x14 5000 200000", "discard 67043328 65536"]
    image = new_image(tmp_path / "mine")
    image.refcounts.pass_discard.add("request")   # qemu-io's discard=unmap
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "real", "64M")
    for command in commands:
        apply(image, command)
    image.close()
    qemu_io(tmp_path / "real", *commands, discard="unmap")
    # freed clusters are punched out of both files too: the same bytes
    assert (tmp_path / "mine").read_bytes() == (tmp_path / "real").read_bytes()
    assert img.map_image(Sandbox(tmp_path), "mine") == img.map_image(Sandbox(tmp_path), "real")
    assert qemu_img("compare", tmp_path / "mine", tmp_path / "real").returncode == 0
    assert qemu_img("check", tmp_path / "mine").returncode == 0


@requires_qemu_img
def test_refcount_blocks_and_table_grow_like_qemu(tmp_path: Path) -> None:
    """512-byte clusters: 128 KiB per refcount block, 8 MiB per refcount table cluster."""
    image = new_image(tmp_path / "mine", 32 * MiB, cluster_size=512)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", tmp_path / "real", "32M")
    commands = [f"write -P {i % 250 + 1} {i * 524288 + (i % 3) * 100} 200000"
                for i in range(60)]
    for command in commands:
        apply(image, command)
    assert image.header.refcount_table_clusters > 1
    image.close()
    qemu_io(tmp_path / "real", *commands)
    assert (tmp_path / "mine").read_bytes() == (tmp_path / "real").read_bytes()
    check = Qcow2Image.open(FileIO(tmp_path / "mine"), read_only=True).check()
    assert check.corruptions == check.leaks == 0


# -- reading what QEMU wrote -------------------------------------------------------------------
@requires_qemu_img
def test_reads_images_written_by_real_qemu(tmp_path: Path) -> None:
    path = tmp_path / "real.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qemu_io(path, "write -P 0x49 0 64k", "write -P 0x6c 1M 64k", "write -z 1M 4k",
            "write -P 0x11 2M 64k", "write -z 2M 64k", "write -z -u 3M 64k")
    image = Qcow2Image.open(FileIO(path), read_only=True)
    assert image.read(0, 65536) == b"\x49" * 65536
    assert image.read(MiB, 65536) == bytes(4096) + b"\x6c" * 61440
    assert image.read(2 * MiB, 65536) == bytes(65536)
    assert image.block_status(0, 64 * MiB) == (Status.DATA, 65536)
    assert image.block_status(65536, 64 * MiB) == (Status.UNALLOCATED, MiB - 65536)
    assert image.block_status(2 * MiB, 64 * MiB) == (Status.ZERO, 65536)
    assert image.block_status(3 * MiB, 65536) == (Status.ZERO, 65536)


@requires_qemu_img
def test_block_status_agrees_with_real_qemu_img_map(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "base", "64M")
    qemu_io(tmp_path / "base", "write -P 1 0 1M", "write -P 2 8M 64k")
    image = Qcow2Image.open(FileIO(tmp_path / "base"))
    for command in WRITES:
        apply(image, command)
    image.flush()   # qemu-img reads the file: the metadata caches are written back first
    real = json.loads(qemu_img("map", "--output=json", tmp_path / "base").stdout)
    assert img.map_image(Sandbox(tmp_path), "base") == real
    for entry in real:
        status, _, host = image.map_extent(entry["start"], entry["length"])
        expected = Status.DATA if entry["data"] else (
            Status.ZERO if entry["present"] else Status.UNALLOCATED)
        assert status is expected and host == entry.get("offset"), entry


# -- events and caching -------------------------------------------------------------------------
def test_read_raises_read_aio_once_per_contiguous_host_read(tmp_path: Path) -> None:
    image = new_image(tmp_path / "a")
    image.write(0, b"a" * 65536)
    image.write(65536, b"b" * 65536)  # contiguous with the first on the host
    image.write(10 * MiB, b"c" * 65536)
    image.write_zeroes(20 * MiB, 65536)
    image.close()
    io = RecordingIO(tmp_path / "a")
    image = Qcow2Image.open(io)
    io.log.clear()
    data = image.read(0, 64 * MiB)
    assert data[:131072] == b"a" * 65536 + b"b" * 65536
    assert data[10 * MiB:10 * MiB + 65536] == b"c" * 65536
    assert data.count(0) == 64 * MiB - 3 * 65536
    assert io.log == ["l2_load", ("pread", 0x40000, 65536),
                      "read_aio", ("pread", 0x50000, 131072),
                      "read_aio", ("pread", 0x70000, 65536)]
    io.log.clear()
    image.read(0, 64 * MiB)
    assert io.log == ["read_aio", ("pread", 0x50000, 131072),
                      "read_aio", ("pread", 0x70000, 65536)]
    io.log.clear()
    assert image.read(20 * MiB, 65536) == bytes(65536)
    assert image.read(30 * MiB, 65536, lambda o, n: b"x" * n) == b"x" * 65536
    assert io.log == ["read_backing_aio"]


def test_partial_write_over_backing_copies_on_write(tmp_path: Path) -> None:
    base = bytes(range(256)) * 4096  # 1 MiB
    image = new_image(tmp_path / "top", MiB, cluster_size=4096)
    image.write(5000, b"\xff" * 100, lambda o, n: base[o:o + n])
    expected = bytearray(base)
    expected[5000:5100] = b"\xff" * 100
    assert image.read(0, MiB, lambda o, n: base[o:o + n]) == expected
    assert image.block_status(4096, 4096) == (Status.DATA, 4096)
    assert image.block_status(0, 4096) == (Status.UNALLOCATED, 4096)


def test_big_sparse_image_stays_small_and_fast(tmp_path: Path) -> None:
    image = new_image(tmp_path / "a")
    for offset in (0, MiB, 32 * MiB, 64 * MiB - 65536):
        image.write(offset, b"\x49" * 65536)
    assert (tmp_path / "a").stat().st_size <= 600 * 1024
    start = time.perf_counter()
    for _ in range(20):
        image.read(0, 64 * MiB)
        offset = 0
        while offset < image.size:
            offset += image.block_status(offset, image.size - offset)[1]
    assert time.perf_counter() - start < 5
    assert image.block_status(65536, image.size) == (Status.UNALLOCATED, MiB - 65536)


def test_unsupported_and_broken_images_raise_qcow2_error(tmp_path: Path) -> None:
    (tmp_path / "raw").write_bytes(b"not qcow2" * 100)
    with pytest.raises(Qcow2Error, match="Image is not in qcow2 format"):
        Qcow2Image.open(FileIO(tmp_path / "raw"))
    with pytest.raises(Qcow2Error, match="Cluster size must be a power of two"):
        Qcow2Image.create(FileIO.create(tmp_path / "x"), MiB, cluster_size=3072)


# -- rebase -u ----------------------------------------------------------------------------------
@requires_qemu_img
def test_set_backing_changes_only_the_header_like_rebase_u(tmp_path: Path) -> None:
    for name in ("mine", "real"):
        qemu_img("create", "-q", "-f", "qcow2", tmp_path / name, "64M")
        qemu_io(tmp_path / name, "write -P 7 0 64k")
    Qcow2Image.open(FileIO(tmp_path / "mine")).set_backing("base.qcow2", "qcow2")
    qemu_img("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "real")
    assert (tmp_path / "mine").read_bytes() == (tmp_path / "real").read_bytes()
    Qcow2Image.open(FileIO(tmp_path / "mine")).set_backing(None, None)
    qemu_img("rebase", "-u", "-b", "", tmp_path / "real")
    assert (tmp_path / "mine").read_bytes() == (tmp_path / "real").read_bytes()


# -- persistent bitmaps -------------------------------------------------------------------------
@requires_qemu_img
def test_stored_bitmaps_are_listed_by_real_qemu_img_info(tmp_path: Path) -> None:
    image = new_image(tmp_path / "a")
    image.write(0, b"x" * 65536)
    dirty = 0b1011 | 1 << 1023
    image.store_bitmaps([StoredBitmap("bitmap0", 65536, dirty=dirty),
                         StoredBitmap("b1", 131072, auto=False)])
    image.flush()   # the old directory's refcounts are still only in the cache
    info = json.loads(qemu_img("info", "--output=json", tmp_path / "a").stdout)
    assert info["format-specific"]["data"]["bitmaps"] == [
        {"flags": ["auto"], "name": "bitmap0", "granularity": 65536},
        {"flags": [], "name": "b1", "granularity": 131072}]
    assert qemu_img("check", tmp_path / "a").returncode == 0
    loaded = Qcow2Image.open(FileIO(tmp_path / "a")).load_bitmaps()
    assert [(b.name, b.granularity, b.dirty, b.auto) for b in loaded] == [
        ("bitmap0", 65536, dirty, True), ("b1", 131072, 0, False)]
    image.remove_bitmap("bitmap0")
    image.remove_bitmap("b1")
    image.flush()
    assert qemu_img("check", tmp_path / "a").stdout.startswith("No errors")
    assert "bitmaps" not in json.loads(
        qemu_img("info", "--output=json", tmp_path / "a").stdout)["format-specific"]["data"]


@requires_qemu_img
def test_marking_bitmaps_in_use_shows_in_real_qemu_img_info(tmp_path: Path) -> None:
    image = new_image(tmp_path / "a")
    image.store_bitmaps([StoredBitmap("b", 65536, dirty=1)])
    loaded = Qcow2Image.open(FileIO(tmp_path / "a")).load_bitmaps(mark_in_use=True)
    assert loaded[0].dirty == 1 and not loaded[0].in_use
    info = json.loads(qemu_img("info", "--output=json", tmp_path / "a").stdout)
    assert info["format-specific"]["data"]["bitmaps"][0]["flags"] == ["in-use", "auto"]
    again = Qcow2Image.open(FileIO(tmp_path / "a")).load_bitmaps()
    assert again[0].in_use and again[0].dirty == 0


@requires_qemu_img
@requires_qemu
def test_loads_bitmaps_that_real_qemu_recorded(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qemu_img("bitmap", "--add", path, "b0")
    qemu_img("bitmap", "--add", "-g", "128k", "--disable", path, "b1")
    script = [{"execute": "qmp_capabilities"},
              {"execute": "blockdev-add", "arguments": {
                  "driver": "qcow2", "node-name": "d",
                  "file": {"driver": "file", "filename": str(path)}}},
              {"execute": "human-monitor-command",
               "arguments": {"command-line": 'qemu-io d "write -P 1 1M 64k"'}},
              {"execute": "human-monitor-command",
               "arguments": {"command-line": 'qemu-io d "write -P 1 10M 1k"'}},
              {"execute": "quit"}]
    subprocess.run([shutil.which("qemu-system-x86_64") or "", "-machine", "none", "-nodefaults",
                    "-display", "none", "-S", "-qmp", "stdio"],
                   input="\n".join(map(json.dumps, script)) + "\n", capture_output=True,
                   text=True, timeout=120, check=True)
    bitmaps = Qcow2Image.open(FileIO(path), read_only=True).load_bitmaps()
    assert [(b.name, b.granularity, b.auto, b.in_use) for b in bitmaps] == [
        ("b0", 65536, True, False), ("b1", 131072, False, False)]
    assert bitmaps[0].dirty == 1 << 16 | 1 << 160
    assert bitmaps[1].dirty == 0


# -- properties ---------------------------------------------------------------------------------
OPERATIONS = st.lists(st.tuples(st.sampled_from(["write", "zero", "unmap", "discard"]),
                                st.integers(0, 1 << 20), st.integers(0, 40000),
                                st.integers(1, 255)), max_size=25)


@requires_qemu_img
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=OPERATIONS, cluster_bits=st.sampled_from([9, 12, 16]))
def test_random_io_matches_a_model_and_real_qemu(tmp_path: Path, operations: list,
                                                 cluster_bits: int) -> None:
    """Random writes, zero writes and discards: the data equals a bytearray model, the
    clusters are laid out as qemu-io lays them out for the same commands, and qemu-img
    check finds nothing."""
    size = 1 << 20
    mine, real = tmp_path / "mine", tmp_path / "real"
    image = new_image(mine, size, cluster_size=1 << cluster_bits)
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={1 << cluster_bits}", real,
             str(size))
    model = bytearray(size)
    commands = []
    for kind, offset, length, pattern in operations:
        offset = min(offset, size)
        length = min(length, size - offset)
        command = {"write": f"write -P {pattern}", "zero": "write -z", "unmap": "write -z -u",
                   "discard": "discard"}[kind] + f" {offset} {length}"
        apply(image, command)
        commands.append(command)
        if kind == "discard":
            cluster = 1 << cluster_bits
            start, end = -(-offset // cluster) * cluster, offset + length
            end = end if end == size else end - end % cluster
            model[start:max(start, end)] = bytes(max(0, end - start))
        else:
            model[offset:offset + length] = bytes([pattern if kind == "write" else 0]) * length
    assert image.read(0, size) == model
    image.close()
    if commands:
        qemu_io(real, *commands, discard="unmap")
    box = Sandbox(tmp_path)
    assert img.map_image(box, "mine") == img.map_image(box, "real")
    assert img.compare(box, "mine", "real").exit_code == 0
    check = qemu_img("check", mine)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("order", range(7))
def test_first_fit_search_matches_the_cluster_by_cluster_scan(order: int) -> None:
    """Refcounts._alloc_noref finds free runs with bytes.find; QEMU's alloc_clusters_noref
    looks at one cluster at a time. Same offset, same free_cluster_index afterwards."""
    import random

    from emulator.qcow2.header import Header
    from emulator.qcow2.refcounts import Refcounts, set_refcount

    class NullIO:
        unobserved = True

        def pread(self, offset: int, length: int) -> bytes:
            return bytes(length)

    def scan(rc: Refcounts, size: int) -> int:
        nb, found = -(-size >> rc.cluster_bits), 0
        while found < nb:
            index = rc.free_cluster_index
            rc.free_cluster_index += 1
            found = found + 1 if rc.get(index) == 0 else 0
        return (rc.free_cluster_index - nb) << rc.cluster_bits

    rnd = random.Random(order)
    header = Header(cluster_bits=9, size=0, refcount_table_offset=512,
                    refcount_table_clusters=1, refcount_order=order)
    for _ in range(200):
        fast, slow = Refcounts(NullIO(), header), Refcounts(NullIO(), header)  # type: ignore
        fast.table, slow.table = [0] * 64, [0] * 64
        for t in range(rnd.randint(1, 3)):
            if rnd.random() < 0.8:
                block = bytearray(512)
                for _ in range(rnd.randint(0, 200)):
                    set_refcount(block, rnd.randrange(fast.block_entries), order,
                                 rnd.randint(0, min(3, fast.max_refcount)))
                for rc in (fast, slow):
                    rc.table[t] = (t + 1) * 512
                    rc.cache.get_empty((t + 1) * 512, bytearray(block))
        fast.free_cluster_index = slow.free_cluster_index = rnd.randrange(4 * fast.block_entries)
        size = rnd.randint(1, 5) * 512
        assert fast._alloc_noref(size) == scan(slow, size)
        assert fast.free_cluster_index == slow.free_cluster_index


@given(st.lists(st.sampled_from([0, 1, 0x8000000000050000, 0x50000]), min_size=1,
                max_size=300), st.data())
def test_count_equal_matches_a_loop(entries: list[int], data: st.DataObject) -> None:
    """L2 runs counted with memcmp equal the entry-by-entry count."""
    from array import array

    from emulator.qcow2.tables import _count_equal

    table = array("Q", entries)
    start = data.draw(st.integers(0, len(entries) - 1))
    limit = data.draw(st.integers(1, len(entries) - start))
    expected = 0
    while expected < limit and table[start + expected] == table[start]:
        expected += 1
    assert _count_equal(table, start, limit, table[start]) == expected


@given(st.integers(0, 3 * 4096 // 8), st.lists(st.tuples(st.integers(0, 3 * 4096),
                                                          st.integers(1, 255)), max_size=4))
def test_refcount_table_masking_matches_rstrip(entries: int, nonzero: list[tuple[int, int]]
                                               ) -> None:
    """The refcount table masks exactly the entries up to the last non-zero byte."""
    from emulator.qcow2.refcounts import REFT_OFFSET_MASK, _entries_in_use, _load_table

    raw = bytearray(8 * entries)
    for pos, value in nonzero:
        if pos < len(raw):
            raw[pos] = value
    assert _entries_in_use(bytes(raw)) == -(-len(bytes(raw).rstrip(b"\0")) // 8)
    expected = [int.from_bytes(raw[i:i + 8], "big") & REFT_OFFSET_MASK
                for i in range(0, len(raw), 8)]
    assert _load_table(bytes(raw)).tolist() == expected
