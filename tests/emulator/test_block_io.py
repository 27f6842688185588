"""Node I/O with QEMU's request semantics (block/io.c, block/blkdebug.c, block/qcow2.c).

Event order and flush behaviour follow block/io.c bdrv_co_flush: FLUSH_TO_OS on the primary
child, FLUSH_TO_DISK only when the node was written since its last flush; qcow2 raises
READ_AIO on its file child before each host data read (docs/qemu-semantics.md section 7).
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from emulator.block import perm as P
from emulator.block.drivers.blkdebug import BlkdebugNode
from emulator.block.layer import BlockLayer
from tests.conftest import requires_qemu_img


class EventLog:
    """Wraps a blkdebug node's debug-event hook to record what it sees."""

    def __init__(self, node: BlkdebugNode) -> None:
        self.events: list[str] = []
        orig = node.drv_debug_event

        def hook(event: str) -> None:
            self.events.append(event)
            orig(event)

        node.drv_debug_event = hook  # type: ignore[method-assign]


def writable(layer: BlockLayer, node: str):
    blk = layer.temporary_backend(layer.find_node(node))
    blk.set_perm(P.CONSISTENT_READ | P.WRITE, P.ALL)
    return blk


def test_blkdebug_inject_once_on_state() -> None:
    """Rules fire in their state; a one-shot read error fails one request."""
    layer = BlockLayer()
    layer.blockdev_add({
        "driver": "blkdebug", "node-name": "dbg",
        "image": {"driver": "null-co", "size": 1 << 20},
        "inject-error": [{"event": "read_aio", "state": 3, "errno": 5, "once": True,
                          "immediately": True}],
        "set-state": [{"event": "flush_to_disk", "state": 1, "new_state": 2},
                      {"event": "read_aio", "state": 2, "new_state": 3}]})
    dbg = layer.find_node("dbg")
    assert dbg.state == 1
    dbg.drv_debug_event("flush_to_disk")
    assert dbg.state == 2
    dbg.drv_debug_event("read_aio")     # 2 -> 3, the inject rule is not active yet
    assert dbg.state == 3 and dbg.active_rules == []
    dbg.pread(0, 512)
    dbg.drv_debug_event("read_aio")     # activates the inject rule
    with pytest.raises(OSError) as e:
        dbg.pread(0, 512)
    assert e.value.errno == errno.EIO
    dbg.pread(0, 512)                   # once: gone


def test_blkdebug_sector_and_iotype() -> None:
    layer = BlockLayer()
    layer.blockdev_add({
        "driver": "blkdebug", "node-name": "dbg", "image": {"driver": "null-co"},
        "inject-error": [{"event": "none", "sector": 8, "iotype": "write", "errno": 28}]})
    dbg = layer.find_node("dbg")
    dbg.pread(4096, 512)
    blk = writable(layer, "dbg")
    blk.pwrite(0, b"x" * 4096)
    with pytest.raises(OSError) as e:
        blk.pwrite(4096, b"x" * 512)
    assert e.value.errno == errno.ENOSPC


def test_blkdebug_align_pads_requests_and_dirties_aligned_range() -> None:
    """An unaligned write through blkdebug align=4096 becomes a read-modify-write of
    whole blocks; the node's bitmap records the aligned range (bdrv_co_write_req_finish)."""
    layer = BlockLayer()
    layer.blockdev_add({"driver": "blkdebug", "node-name": "dbg", "align": 4096,
                        "image": {"driver": "null-co", "node-name": "base"}})
    dbg, base = layer.find_node("dbg"), layer.find_node("base")
    bm_dbg = dbg.create_dirty_bitmap(512, "a")
    bm_base = base.create_dirty_bitmap(512, "b")
    seen: list[tuple[str, int, int]] = []
    orig_r, orig_w = base.drv_preadv, base.drv_pwritev
    base.drv_preadv = lambda o, n: seen.append(("r", o, n)) or orig_r(o, n)  # type: ignore
    base.drv_pwritev = lambda o, d, f: seen.append(("w", o, len(d))) or orig_w(o, d, f)  # type: ignore
    writable(layer, "dbg").pwrite(5000, b"y" * 100)
    assert seen == [("r", 4096, 4096), ("w", 4096, 4096)]
    assert bm_dbg.bitmap.dirty_ranges() == [(4096, 4096)]
    assert bm_base.bitmap.dirty_ranges() == [(4096, 4096)]


def test_max_transfer_splits() -> None:
    layer = BlockLayer()
    layer.blockdev_add({"driver": "blkdebug", "node-name": "dbg", "max-transfer": 65536,
                        "image": {"driver": "null-co", "node-name": "base"}})
    base = layer.find_node("base")
    seen: list[tuple[int, int]] = []
    orig = base.drv_preadv
    base.drv_preadv = lambda o, n: seen.append((o, n)) or orig(o, n)  # type: ignore
    layer.find_node("dbg").pread(0, 150000)
    assert seen == [(0, 65536), (65536, 65536), (131072, 18928)]


def test_writes_through_filter_mark_both_nodes() -> None:
    layer = BlockLayer()
    layer.blockdev_add({"driver": "blkdebug", "node-name": "dbg",
                        "image": {"driver": "null-co", "node-name": "base"}})
    top = layer.find_node("dbg").create_dirty_bitmap(65536, "t")
    low = layer.find_node("base").create_dirty_bitmap(65536, "l")
    writable(layer, "dbg").pwrite(65536 * 5, b"z" * 10)
    assert top.count() == low.count() == 65536


def test_failed_write_still_dirties() -> None:
    """bdrv_co_write_req_finish sets dirty bits whatever the driver returned."""
    layer = BlockLayer()
    layer.blockdev_add({"driver": "blkdebug", "node-name": "dbg", "image": {"driver": "null-co"},
                        "inject-error": [{"event": "none", "iotype": "write"}]})
    bm = layer.find_node("dbg").create_dirty_bitmap(65536, "x")
    with pytest.raises(OSError):
        writable(layer, "dbg").pwrite(0, b"a")
    assert bm.count() == 65536


def test_backend_checks_length() -> None:
    layer = BlockLayer()
    layer.blockdev_add({"driver": "null-co", "node-name": "n", "size": 4096})
    blk = writable(layer, "n")
    with pytest.raises(OSError) as e:
        blk.pwrite(4000, b"x" * 200)
    assert e.value.errno == errno.EIO


@requires_qemu_img
def test_qcow2_over_blkdebug_events(tmp_path: Path) -> None:
    """qcow2 reads raise READ_AIO on its file child only for allocated data; a flush raises
    FLUSH_TO_OS always, then writes back the metadata caches (the refcount block the L2
    table depends on first), and FLUSH_TO_DISK only after a write since the last flush."""
    img = tmp_path / "img"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(img), "64M"], check=True,
                   capture_output=True)
    layer = BlockLayer()
    layer.blockdev_add({"driver": "qcow2", "node-name": "drive0",
                        "file": {"driver": "blkdebug", "node-name": "dbg",
                                 "image": {"driver": "file", "filename": str(img)}}})
    log = EventLog(layer.find_node("dbg"))
    blk = writable(layer, "drive0")
    blk.pwrite(0, b"I" * 65536)
    log.events.clear()
    blk.flush()
    assert log.events == ["flush_to_os", "refblock_update_part", "l2_update", "flush_to_disk"]
    log.events.clear()
    blk.flush()
    assert log.events == ["flush_to_os"]
    log.events.clear()
    assert blk.pread(0, 2) == b"II"
    assert blk.pread(1 << 20, 65536) == bytes(65536)
    assert log.events == ["read_aio"]
    blk.unref()
    layer.blockdev_del("drive0")
    check = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


@requires_qemu_img
def test_is_allocated_above_backing_chain(tmp_path: Path) -> None:
    """bdrv_is_allocated_above over top -> base: allocation in either layer counts; with
    base=None the whole chain is searched, with base=the backing node only the top."""
    base, top = tmp_path / "base", tmp_path / "top"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(base), "1M"], check=True,
                   capture_output=True)
    subprocess.run(["qemu-io", "-c", "write 0 64k", str(base)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True, capture_output=True)
    subprocess.run(["qemu-io", "-c", "write 128k 64k", str(top)], check=True,
                   capture_output=True)
    layer = BlockLayer()
    layer.blockdev_add({"driver": "qcow2", "node-name": "top",
                        "file": {"driver": "file", "filename": str(top)}})
    bs = layer.find_node("top")
    backing = bs.backing.bs
    assert bs.is_allocated_above(None, 0, 1 << 20) == (True, 65536)
    assert bs.is_allocated_above(None, 65536, 1 << 20) == (False, 65536)
    assert bs.is_allocated_above(None, 131072, 1 << 20) == (True, 65536)
    assert bs.is_allocated_above(backing, 0, 1 << 20) == (False, 131072)
    assert bs.is_allocated(131072, 1 << 20) == (True, 65536)
    assert blk_read(layer, "top", 0, 4) == b"\xcd" * 4
    layer.close_all()


def blk_read(layer: BlockLayer, node: str, offset: int, length: int) -> bytes:
    blk = layer.temporary_backend(layer.find_node(node))
    try:
        return blk.pread(offset, length)
    finally:
        blk.unref()
