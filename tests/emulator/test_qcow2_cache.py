"""qcow2's metadata caches (block/qcow2-cache.c) against real QEMU 7.2.

QEMU's own trace points are the referee: ``qemu-img``/``qemu-io --trace
bdrv_co_pwritev_part`` prints every write request that reaches the image file, so the
emulator's writes to its file (recorded at the system call) must be the same requests in the
same order — metadata written back when QEMU writes it back (new L2 tables and refcount
blocks, flushes, a full cache, close), as whole tables, dependencies first. Then a behaviour a
guest can see: an error injected on an L2 write-back surfaces where QEMU's does.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from emulator import img, qemu_io
from emulator.sandbox import Sandbox
from tests.conftest import requires_qemu, requires_qemu_img, requires_qemu_io
from tests.emulator.qemu_runner import qemu_img, run_both

# "blk_co_pwritev blk 0x.. bs 0x.. offset N bytes N" names the format node of a
# BlockBackend; "bdrv_co_pwritev_part bs 0x.. offset N bytes N" is any node's write request
_TRACE = re.compile(r"^(blk_co_pwritev|bdrv_co_pwritev_part) (?:blk \S+ )?bs (\S+) "
                    r"offset (\d+) bytes (\d+)")
_TRACE_ARGS = ("--trace", "bdrv_co_pwritev_part", "--trace", "blk_co_pwritev")

Writes = list[tuple[int, int]]


def qemu_file_writes(argv: list[str]) -> Writes:
    """The write requests real QEMU sent to the image file: those of the one node written
    (image creation writes nothing else), else of the node that is no BlockBackend's root."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    roots: set[str] = set()
    requests = []
    for line in proc.stderr.splitlines():
        m = _TRACE.match(line)
        if m is None:
            continue
        kind, bs, offset, nbytes = m.groups()
        if kind == "blk_co_pwritev":
            roots.add(bs)
        else:
            requests.append((bs, int(offset), int(nbytes)))
    if len({bs for bs, _, _ in requests}) == 1:
        roots = set()
    return [(offset, nbytes) for bs, offset, nbytes in requests if bs not in roots]


def emulator_file_requests(monkeypatch: pytest.MonkeyPatch, path: Path,
                           run: Callable[[], None]) -> Writes:
    """What ``run`` asks the file node of ``path`` to write, data and zeroes alike (a zero
    write is one request, whatever the file driver does for it), as QEMU's
    bdrv_co_pwritev_part trace point sees them; the requests still run."""
    from emulator.block.drivers.file import FileNode

    writes: Writes = []
    target = os.path.realpath(path)
    real_pwrite, real_zeroes = os.pwrite, FileNode.drv_pwrite_zeroes
    in_zeroes = [False]

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if not in_zeroes[0] and os.readlink(f"/proc/self/fd/{fd}") == target:
            writes.append((offset, len(data)))
        return real_pwrite(fd, data, offset)

    def pwrite_zeroes(node: FileNode, offset: int, length: int, flags: int) -> None:
        if node.host_path == target:
            writes.append((offset, length))
        in_zeroes[0] = True
        try:
            real_zeroes(node, offset, length, flags)
        finally:
            in_zeroes[0] = False

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(FileNode, "drv_pwrite_zeroes", pwrite_zeroes)
    try:
        run()
    finally:
        monkeypatch.undo()
    return writes


SCENARIOS = {
    # a new L2 table and refcount updates; in-place writes, partial clusters (zeroed with
    # handle_alloc_space), zero clusters, unmapping zero writes, a flush between
    "64k-clusters": ("64M", [], [
        "write -P 1 0 4k", "write -P 2 70k 10k", "write -P 3 200k 64k", "write -z 100k 4k",
        "write -z 1M 256k", "flush", "write -P 4 1M 4k", "write -P 5 32k 1k",
        "write -z -u 200k 64k", "write -P 6 5M 3M", "flush", "write -P 7 5M 1k"]),
    # 512-byte clusters: a refcount block per 128 KiB of file, so new refcount blocks, a
    # grown refcount table and a full four-block refcount cache (write-back on eviction)
    "512-byte-clusters": ("16M", ["-o", "cluster_size=512"],
                          [f"write -P {i % 250 + 1} {i * 32}k 32k" for i in range(320)]),
    # lazy refcounts: the dirty bit set (and synced) before the first L2 update, refcount
    # blocks left out of flushes while dirty, the bit cleared again at close
    "lazy-refcounts": ("64M", ["-o", "lazy_refcounts=on"], [
        "write -P 1 0 4k", "write -P 2 70k 10k", "flush", "write -P 3 200k 64k",
        "write -z 1M 256k", "flush", "write -P 4 5M 1M", "write -z -u 200k 64k"]),
    # copy-on-write from a backing file (perform_cow: the L2 table waits for a file flush)
    "backing-file": ("64M", ["-b", "base", "-F", "qcow2"], [
        "write -P 1 0 4k", "write -P 2 70k 10k", "write -P 3 200k 64k", "flush",
        "write -P 4 1M 4k", "write -P 5 32k 1k", "write -P 6 5M 1M", "write -z 300k 4k"]),
}


@requires_qemu_img
@requires_qemu_io
@pytest.mark.parametrize("cache", ["writeback", "writethrough"])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_file_writes_are_qemus_request_for_request(tmp_path: Path, name: str, cache: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    size, options, commands = SCENARIOS[name]
    if "-b" in options:
        qemu_img("create", "-f", "qcow2", tmp_path / "base", size)
        subprocess.run(["qemu-io", "-c", "write -P 9 0 8M", str(tmp_path / "base")],
                       check=True, capture_output=True)
    real, mine = tmp_path / "real", tmp_path / "mine"
    created = qemu_file_writes(["qemu-img", *_TRACE_ARGS, "create", "-f", "qcow2",
                                *options, str(real), size])
    box = Sandbox(tmp_path)
    mine.touch()
    assert emulator_file_requests(monkeypatch, mine, lambda: img.main(
        ["create", "-q", "-f", "qcow2", *options, str(mine), size], sandbox=box)) == created

    written = qemu_file_writes(["qemu-io", "-t", cache, *_TRACE_ARGS, "-f", "qcow2",
                                *[a for c in commands for a in ("-c", c)], str(real)])

    def replay() -> None:
        qemu_io.offline(box, str(mine), "qcow2", commands, cache=cache)

    assert emulator_file_requests(monkeypatch, mine, replay) == written
    assert mine.read_bytes() == real.read_bytes()


@requires_qemu
@requires_qemu_img
def test_l2_write_error_surfaces_at_write_back_like_qemu(tmp_path: Path) -> None:
    """An error injected on the target's first L2 table write-back ("l2_update"): the table
    exists already, so the backup's writes only dirty it in the cache and the job succeeds;
    the error goes to the next flush (qemu-io's output, not QMP), and the image written back
    at close is consistent. Write-through caches failed the job instead."""
    def setup(d: Path) -> None:
        qemu_img("create", "-f", "qcow2", d / "src", "4M")
        qemu_img("create", "-f", "qcow2", d / "dst", "4M")
        for path, command in ((d / "src", "write -P 0x11 0 1M"), (d / "dst", "write 3M 64k")):
            subprocess.run(["qemu-io", "-c", command, str(path)], check=True,
                           capture_output=True)

    target = {"driver": "qcow2", "node-name": "dst", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": "@DIR@/dst"},
        "inject-error": [{"event": "l2_update", "errno": 5, "once": True}]}}
    steps = [
        ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "src", "file": {
            "driver": "file", "filename": "@DIR@/src"}}),
        ("cmd", "blockdev-add", target),
        ("cmd", "blockdev-backup", {"job-id": "j", "device": "src", "target": "dst",
                                    "sync": "full"}),
        ("rest", "j"),
        ("hmp", 'qemu-io dst "flush"'),
        ("cmd", "blockdev-del", {"node-name": "dst"}),
    ]
    real, mine = run_both(tmp_path, steps, setup)
    assert mine == real
    assert ("event", "BLOCK_JOB_COMPLETED", {"device": "j", "len": 4 << 20,
                                             "offset": 4 << 20, "speed": 0,
                                             "type": "backup"}) in mine
    for kind in ("qemu", "emu"):
        check = qemu_img("check", tmp_path / kind / "dst")
        assert check.returncode == 0, check.stdout + check.stderr


@requires_qemu
@requires_qemu_img
@pytest.mark.parametrize("snapshot", [False, True])
def test_a_reopen_empties_the_caches_like_qemu(tmp_path: Path, snapshot: bool) -> None:
    """qcow2_update_options_commit swaps in new caches at every reopen, even of a node that
    is read-only already: after a snapshot, a sync=top backup of the old top reads its L2
    table again, through the blkdebug rule the first backup set off, and its block status
    fails — the job aborts with no BLOCK_JOB_ERROR. Without the snapshot the table is still
    cached and the copy's read is what fails (found by the differential test)."""
    def setup(d: Path) -> None:
        for name in ("faulty", "snap"):
            qemu_img("create", "-q", "-f", "qcow2", d / name, "4M")
        subprocess.run(["qemu-io", "-c", "write -P 1 0 64k", str(d / "faulty")], check=True,
                       capture_output=True)

    def backup(sync: str) -> list[tuple[Any, ...]]:
        return [("cmd", "blockdev-backup", {"job-id": "j", "device": "dbg", "target": "null0",
                                            "sync": sync}), ("rest", "j")]

    steps = [
        ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "null0", "size": 4 << 20}),
        ("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "dbg", "file": {
            "driver": "blkdebug", "image": {"driver": "file", "filename": "@DIR@/faulty"},
            "inject-error": [{"event": "read_aio", "errno": 5}]}}),
        *backup("full"),
    ]
    if snapshot:
        steps += [("cmd", "blockdev-add", {"driver": "qcow2", "node-name": "snap",
                                           "backing": None, "file": {
                                               "driver": "file", "filename": "@DIR@/snap"}}),
                  ("cmd", "blockdev-snapshot", {"node": "dbg", "overlay": "snap"})]
    steps += backup("top")
    real, mine = run_both(tmp_path, steps, setup)
    assert mine == real
    errors = [r for r in mine if r[:2] == ("event", "BLOCK_JOB_ERROR")]
    assert len(errors) == (1 if snapshot else 2)
