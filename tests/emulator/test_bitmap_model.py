"""The dirty-bitmap model (emulator/block/dirty_bitmap.py) against QEMU 7.2's behaviour.

Expected hashes and counts were taken from the real binary (Debian QEMU 7.2.22): a null-co
node of 1049088 bytes with bitmaps of granularity 64 KiB, 512 and 2 GiB, after the HMP
qemu-io writes ``write 1048576 512``, ``write 65536 70000``, ``write -z 300000 512``.
``count`` is dirty granules x granularity, not clipped at the end of the disk
(util/hbitmap.c hbitmap_count) — the 2 GiB bitmap of a 1 MiB disk reports 2147483648.
"""

from __future__ import annotations

import pytest

from emulator.block.dirty_bitmap import HBitmap, default_granularity
from emulator.block.errors import GenericError
from emulator.block.layer import BlockLayer

SIZE = 1049088
WRITES = [(1048576, 512), (65536, 70000), (300000, 512)]
EMPTY_64K = "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
QEMU_RESULTS = {  # granularity bits -> (sha256, count) from the real binary
    16: ("6e8f47ff59e2269dc58b6b64bba2aca1388c9821ccc6bc170d40399fb9df681a", 262144),
    9: ("1af7d48d6e01bae9b6cf5c2043721debe39344c2436a9ec28f462c810f43b4c8", 71680),
    31: ("7c9fa136d4413fa6173637e883b6998d32e1d675f88cddff9dcbcf331820f4b8", 2147483648),
}


def test_empty_hash_matches_qemu() -> None:
    assert HBitmap(SIZE, 16).sha256() == EMPTY_64K


@pytest.mark.parametrize("gbits", sorted(QEMU_RESULTS))
def test_hash_and_count_match_qemu(gbits: int) -> None:
    hb = HBitmap(SIZE, gbits)
    for off, n in WRITES:
        hb.set(off, n)
    assert (hb.sha256(), hb.count()) == QEMU_RESULTS[gbits]


def test_next_dirty_and_zero() -> None:
    hb = HBitmap(1 << 20, 16)
    hb.set(65536 * 3, 1)
    hb.set(65536 * 4, 65536)
    assert hb.next_dirty(0, 1 << 20) == 65536 * 3
    assert hb.next_dirty(65536 * 3 + 10, 1 << 20) == 65536 * 3 + 10
    assert hb.next_zero(65536 * 3, 1 << 20) == 65536 * 5
    assert hb.next_dirty_area(0, 1 << 20, 1 << 30) == (65536 * 3, 65536 * 2)
    assert hb.next_dirty_area(0, 1 << 20, 65536) == (65536 * 3, 65536)
    assert hb.dirty_ranges() == [(196608, 131072)]
    hb.reset(65536 * 3, 65536)
    assert hb.count() == 65536


def test_status_keeps_qemu_72_quirk() -> None:
    """hbitmap_status in 7.2 returns false for a dirty run ending inside the range."""
    hb = HBitmap(1 << 20, 16)
    hb.set(0, 65536)
    assert hb.status(0, 131072) == (False, 65536)
    assert hb.status(0, 65536) == (True, 65536)
    assert hb.status(65536, 65536) == (False, 65536)


def test_merge_different_granularity() -> None:
    a, b = HBitmap(1 << 20, 16), HBitmap(1 << 20, 12)
    b.set(4096 * 17, 4096)
    a.merge_from(b)
    assert a.count() == 65536 and a.get(65536)


def test_default_granularity() -> None:
    """bdrv_get_default_bitmap_granularity: cluster size clamped to [4K, 64K]."""
    assert default_granularity(None) == 65536
    assert default_granularity(512) == 4096
    assert default_granularity(2 << 20) == 65536
    assert default_granularity(32768) == 32768


def _node() -> tuple[BlockLayer, object]:
    layer = BlockLayer()
    layer.blockdev_add({"driver": "null-co", "node-name": "n", "size": 1 << 20})
    return layer, layer.find_node("n")


def test_bitmaps_newest_first_and_writes_mark_enabled_only() -> None:
    _layer, bs = _node()
    a = bs.create_dirty_bitmap(65536, "a")
    b = bs.create_dirty_bitmap(65536, "b")
    b.disabled = True
    assert [m["name"] for m in bs.query_dirty_bitmaps()] == ["b", "a"]
    bs.pwrite(4096, b"x" * 512)
    assert a.count() == 65536 and b.count() == 0
    with pytest.raises(GenericError, match="Bitmap already exists: a"):
        bs.create_dirty_bitmap(65536, "a")


def test_successor_abdicate_and_reclaim() -> None:
    """block/dirty-bitmap.c: the successor records while the parent is frozen."""
    _layer, bs = _node()
    bm = bs.create_dirty_bitmap(65536, "bm")
    bm.persistent = True
    bs.pwrite(0, b"a" * 512)
    succ = bm.create_successor()
    assert bm.busy and bm.disabled and not succ.disabled and bm.recording()
    assert [i.get("name") for i in bs.query_dirty_bitmaps()] == [None, "bm"]
    with pytest.raises(GenericError, match="currently in use"):
        bm.create_successor()
    bs.pwrite(1 << 19, b"b" * 512)
    assert (bm.count(), succ.count()) == (65536, 65536)
    bm.reclaim()
    assert not bm.busy and not bm.disabled and bm.count() == 131072
    assert bs.dirty_bitmaps == [bm]
    succ = bm.create_successor()
    bs.pwrite(65536 * 3, b"c")
    new = bm.abdicate()
    assert new is succ and new.name == "bm" and new.persistent and new.count() == 65536
    assert bs.dirty_bitmaps == [new]
    with pytest.raises(GenericError, match="Cannot relinquish control"):
        new.abdicate()
    with pytest.raises(GenericError, match="Cannot reclaim a successor"):
        new.reclaim()


def test_check_texts() -> None:
    _layer, bs = _node()
    bm = bs.create_dirty_bitmap(65536, "x")
    bm.busy = True
    with pytest.raises(GenericError) as e:
        bm.check(7)
    assert e.value.desc == ("Bitmap 'x' is currently in use by another operation and cannot "
                            "be used")
    bm.busy, bm.readonly = False, True
    with pytest.raises(GenericError, match=r"^Bitmap 'x' is readonly and cannot be modified$"):
        bm.check(7)
    bm.readonly, bm.inconsistent = False, True
    with pytest.raises(GenericError, match=r"^Bitmap 'x' is inconsistent and cannot be used$"):
        bm.check(7)


def test_merge_size_mismatch_text() -> None:
    layer = BlockLayer()
    layer.blockdev_add({"driver": "null-co", "node-name": "a", "size": 1 << 20})
    layer.blockdev_add({"driver": "null-co", "node-name": "b", "size": 2 << 20})
    da = layer.find_node("a").create_dirty_bitmap(65536, "x")
    db = layer.find_node("b").create_dirty_bitmap(65536, "y")
    with pytest.raises(GenericError) as e:
        da.merge(db)
    assert e.value.desc == ("Bitmaps are of different sizes (destination size is 1048576, "
                            "source size is 2097152) and can't be merged")
