"""Dirty-bitmap commands over QMP, compared with real QEMU 7.2 command by command.

The scripts exercise every block-dirty-bitmap-* command and x-debug-block-dirty-bitmap-sha256
with QEMU's checks (names, granularity, persistence, lookups, merge sources, sizes) on
null-co, blkdebug and qcow2 nodes, with writes through HMP qemu-io so the counts and hashes
come from real dirty tracking.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import requires_qemu, requires_qemu_img
from tests.emulator.qemu_runner import c, compare_replies, create_qcow2, io, run_commands

pytestmark = [requires_qemu, requires_qemu_img]


def sha(node: str, name: str) -> tuple[str, dict[str, Any]]:
    return c("x-debug-block-dirty-bitmap-sha256", node=node, name=name)


def test_add_checks_and_counts(tmp_path: Path) -> None:
    cmds = [
        c("blockdev-add", driver="null-co", **{"node-name": "n"}, size=1049088),
        c("block-dirty-bitmap-add", node="n", name="a"),
        c("block-dirty-bitmap-add", node="n", name="b", granularity=512),
        c("block-dirty-bitmap-add", node="n", name="c", granularity=4294967296),
        c("block-dirty-bitmap-add", node="n", name="c", granularity=2147483648),
        c("block-dirty-bitmap-add", node="n", name="d", granularity=1000),
        c("block-dirty-bitmap-add", node="n", name="d", granularity=256),
        c("block-dirty-bitmap-add", node="n", name="e", persistent=True),
        c("block-dirty-bitmap-add", node="n", name=""),
        c("block-dirty-bitmap-add", node="nosuch", name="x"),
        c("block-dirty-bitmap-add", node="n", name="a"),
        c("block-dirty-bitmap-add", node="n", name="x" * 1024),
        c("block-dirty-bitmap-add", node="n", name="y" * 1023, disabled=True),
        sha("n", "a"),
        io("n", "write 1048576 512"), io("n", "write 65536 70000"), io("n", "write -z 300000 512"),
        c("query-named-block-nodes"),
        sha("n", "a"), sha("n", "b"), sha("n", "c"), sha("n", "y" * 1023),
        sha("n", "zz"), sha("zz", "a"),
    ]
    compare_replies(tmp_path, cmds)


def test_remove_clear_enable_disable_merge(tmp_path: Path) -> None:
    cmds = [
        c("blockdev-add", driver="null-co", **{"node-name": "n"}, size=4 << 20),
        c("blockdev-add", driver="null-co", **{"node-name": "m"}, size=4 << 20),
        c("blockdev-add", driver="null-co", **{"node-name": "big"}, size=8 << 20),
        c("block-dirty-bitmap-add", node="n", name="a"),
        c("block-dirty-bitmap-add", node="n", name="b", granularity=4096),
        c("block-dirty-bitmap-add", node="m", name="ext", granularity=131072),
        c("block-dirty-bitmap-add", node="big", name="big"),
        io("n", "write 0 4k"), io("m", "write 1M 64k"),
        c("block-dirty-bitmap-disable", node="n", name="a"),
        io("n", "write 2M 4k"),
        c("block-dirty-bitmap-disable", node="n", name="nosuch"),
        c("block-dirty-bitmap-enable", node="nosuch", name="a"),
        c("block-dirty-bitmap-merge", node="n", target="a",
          bitmaps=["b", {"node": "m", "name": "ext"}]),
        c("block-dirty-bitmap-merge", node="n", target="a", bitmaps=["b", "zz"]),
        c("block-dirty-bitmap-merge", node="n", target="a",
          bitmaps=[{"node": "nosuch", "name": "x"}]),
        c("block-dirty-bitmap-merge", node="n", target="a",
          bitmaps=[{"node": "big", "name": "big"}]),
        c("block-dirty-bitmap-merge", node="n", target="zz", bitmaps=[]),
        c("query-named-block-nodes"),
        sha("n", "a"), sha("n", "b"),
        c("block-dirty-bitmap-enable", node="n", name="a"),
        c("block-dirty-bitmap-clear", node="n", name="b"),
        c("block-dirty-bitmap-clear", node="n", name="nosuch"),
        c("block-dirty-bitmap-remove", node="n", name="b"),
        c("block-dirty-bitmap-remove", node="n", name="b"),
        c("block-dirty-bitmap-remove", node="x", name="b"),
        c("query-named-block-nodes", flat=True),
    ]
    compare_replies(tmp_path, cmds)


def test_default_granularity_follows_cluster_size(tmp_path: Path) -> None:
    """bdrv_get_default_bitmap_granularity over qcow2 clusters of 512 B, 32 KiB and 2 MiB."""
    def setup(d: Path) -> None:
        for cs in ("512", "32k", "2M"):
            create_qcow2(d / f"c{cs}.qcow2", "4M", "-o", f"cluster_size={cs}")

    cmds: list[tuple[str, Any]] = []
    for cs in ("512", "32k", "2M"):
        cmds += [c("blockdev-add", driver="qcow2", **{"node-name": f"q{cs}"},
                   file={"driver": "file", "filename": f"@DIR@/c{cs}.qcow2"}),
                 c("block-dirty-bitmap-add", node=f"q{cs}", name="d"),
                 c("block-dirty-bitmap-add", node=f"q{cs}", name="p", persistent=True,
                   granularity=256 * 1024)]
    cmds.append(c("query-named-block-nodes", flat=True))
    compare_replies(tmp_path, cmds, setup=setup)


def test_writes_through_filter_and_raw(tmp_path: Path) -> None:
    """Writes through blkdebug and raw mark the bitmaps of every node they pass."""
    cmds = [
        c("blockdev-add", driver="raw", **{"node-name": "r"},
          file={"driver": "blkdebug", "node-name": "dbg", "align": 4096,
                "image": {"driver": "null-co", "node-name": "n", "size": 1 << 20}}),
        c("block-dirty-bitmap-add", node="r", name="top", granularity=512),
        c("block-dirty-bitmap-add", node="dbg", name="mid", granularity=512),
        c("block-dirty-bitmap-add", node="n", name="low", granularity=512),
        io("r", "write 5000 100"),
        io("dbg", "write 70000 10"),
        c("query-named-block-nodes", flat=True),
    ]
    compare_replies(tmp_path, cmds)


def test_qemu_crashes_are_not_copied(tmp_path: Path) -> None:
    """Two QEMU 7.2 crashes found while comparing (both SIGSEGV in the real binary): a merge
    with an empty ``bitmaps`` list (hbitmap_free(NULL) in block_dirty_bitmap_merge) and a
    transaction whose block-dirty-bitmap-enable/-disable fails its lookup (the abort
    dereferences the missing bitmap). The emulator answers instead of dying."""
    replies = run_commands(tmp_path, [
        c("blockdev-add", driver="null-co", **{"node-name": "n"}),
        c("block-dirty-bitmap-add", node="n", name="b"),
        c("block-dirty-bitmap-merge", node="n", target="b", bitmaps=[]),
        c("transaction", actions=[{"type": "block-dirty-bitmap-enable",
                                   "data": {"node": "n", "name": "nosuch"}}]),
    ])
    assert replies[2:] == [
        {"return": {}},
        {"error": {"class": "GenericError", "desc": "Dirty bitmap 'nosuch' not found"}}]
