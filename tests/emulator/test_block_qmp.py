"""blockdev-add/-del, query-block and query-named-block-nodes over QMP, against real QEMU.

Every test runs the same commands on Debian's QEMU 7.2.22 and on the emulator (each in its
own test directory with the same images) and compares the replies after normalizing the
directory, the random digits of ``#blockNNN`` names and ``actual-size`` (host allocation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import requires_qemu, requires_qemu_img
from tests.emulator.qemu_runner import compare_replies, create_qcow2, run_both, run_commands

pytestmark = [requires_qemu, requires_qemu_img]


def images(d: Path) -> None:
    create_qcow2(d / "base.qcow2", "1M")
    create_qcow2(d / "top.qcow2", "1M", "-b", "base.qcow2", "-F", "qcow2")
    (d / "r.img").write_bytes(bytes(1 << 20))


def add(**opts: Any) -> tuple[str, dict[str, Any]]:
    return ("blockdev-add", opts)


def test_blockdev_add_and_del_match_qemu(tmp_path: Path) -> None:
    cmds = [
        add(driver="null-co", **{"node-name": "target"}, size=1048576),
        add(driver="blkdebug", **{"node-name": "source"},
            image={"driver": "null-co", "node-name": "base", "size": 1048576}),
        add(driver="blkdebug", **{"node-name": "other"}, image="base",
            **{"take-child-perms": ["write"]}),
        add(driver="null-co", **{"node-name": "target"}),
        add(driver="null-co", **{"node-name": "1x"}),
        add(driver="null-co", **{"node-name": ""}),
        add(driver="null-co", **{"node-name": "#block1"}),
        add(driver="null-co"),
        add(driver="null-co", **{"node-name": "a" * 32}),
        add(driver="null-co", **{"node-name": "a" * 31}),
        add(driver="raw", file="nosuch"),
        add(driver="raw", **{"node-name": "1bad"}, file="nosuch"),
        add(driver="blkdebug", **{"node-name": "1bad"}, image="nosuch"),
        add(driver="raw", **{"node-name": "r1"}, file="base"),
        add(driver="nosuchdrv", **{"node-name": "v"}),
        add(driver="null-co", **{"node-name": "v"}, size="x"),
        add(driver="blkdebug", **{"node-name": "x"}, image="base",
            **{"take-child-perms": ["wrte"]}),
        add(driver="blkdebug", **{"node-name": "x"}, image={"driver": "null-co", "size": "s"}),
        add(driver="blkdebug", **{"node-name": "x"}, image="b",
            **{"inject-error": [{"event": "nope"}]}),
        add(driver="blkdebug", **{"node-name": "bd3"}, align=3, image={"driver": "null-co"}),
        add(driver="blkdebug", **{"node-name": "bd4"}, align=4096,
            **{"max-transfer": 1000}, image={"driver": "null-co"}),
        add(driver="file", **{"node-name": "f1"}, filename="@DIR@/nonexistent"),
        add(driver="file", **{"node-name": "f1"}, filename="@DIR@"),
        add(driver="qcow2", **{"node-name": "q1"}, file={"driver": "null-co"}),
        add(driver="null-co", **{"node-name": "on"}, **{"detect-zeroes": "unmap"}),
        add(driver="null-co", **{"node-name": "fs"}, **{"force-share": True}),
        ("blockdev-del", {"node-name": "base"}),
        ("blockdev-del", {"node-name": "nosuch"}),
        ("blockdev-del", {"node-name": "source"}),
        ("blockdev-del", {"node-name": "base"}),
        ("blockdev-del", {"node-name": "r1"}),
        ("query-named-block-nodes", None),
        ("blockdev-del", {"node-name": "other"}),
        ("query-named-block-nodes", {"flat": True}),
    ]
    compare_replies(tmp_path, cmds)


GRAPHS = {
    "qcow2-with-header-backing": {"driver": "qcow2", "node-name": "t1",
                                  "file": {"driver": "file", "filename": "@DIR@/top.qcow2"}},
    "qcow2-backing-null": {"driver": "qcow2", "node-name": "t2", "read-only": True,
                           "backing": None,
                           "file": {"driver": "file", "filename": "@DIR@/top.qcow2"}},
    "qcow2-over-blkdebug": {"driver": "qcow2", "node-name": "t3", "read-only": True,
                            "file": {"driver": "blkdebug",
                                     "image": {"driver": "file",
                                               "filename": "@DIR@/base.qcow2"}}},
    "qcow2-explicit-backing": {"driver": "qcow2", "node-name": "t4", "read-only": True,
                               "file": {"driver": "file", "filename": "@DIR@/top.qcow2"},
                               "backing": {"driver": "qcow2", "node-name": "bb",
                                           "file": {"driver": "file",
                                                    "filename": "@DIR@/base.qcow2"}}},
    "raw": {"driver": "raw", "node-name": "r1",
            "file": {"driver": "file", "filename": "@DIR@/r.img"}},
    "raw-window": {"driver": "raw", "node-name": "r2", "size": 4096, "offset": 512,
                   "read-only": True, "file": {"driver": "file", "filename": "@DIR@/r.img"}},
    "blkdebug-rules": {"driver": "blkdebug", "node-name": "b1",
                       "image": {"driver": "null-co", "read-zeroes": True},
                       "inject-error": [{"event": "read_aio", "once": True}]},
    "blkdebug-plain": {"driver": "blkdebug", "node-name": "b2",
                       "image": {"driver": "file", "filename": "@DIR@/r.img"}},
    "null-co-options": {"driver": "null-co", "node-name": "n1", "detect-zeroes": "on",
                        "cache": {"direct": True}, "latency-ns": 10},
    "null-aio": {"driver": "null-aio", "node-name": "n2", "size": 65536},
}


@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_query_named_block_nodes_match_qemu(tmp_path: Path, graph: str) -> None:
    cmds = [("blockdev-add", GRAPHS[graph]), ("query-named-block-nodes", None),
            ("query-named-block-nodes", {"flat": True}), ("query-block", None)]
    compare_replies(tmp_path, cmds, setup=images)


def test_query_block_drive_matches_qemu(tmp_path: Path) -> None:
    """-drive with a backing chain, a node-name, bitmaps on both layers."""
    cmds = [("block-dirty-bitmap-add", {"node": "drive0", "name": "b1", "persistent": True}),
            ("block-dirty-bitmap-add", {"node": "base", "name": "b0"}),
            ("block-dirty-bitmap-add", {"node": "drive0", "name": "b2", "granularity": 512,
                                        "disabled": True}),
            ("human-monitor-command", {"command-line": 'qemu-io drive0 "write 4096 512"'}),
            ("query-block", None), ("query-named-block-nodes", None)]
    drives = [{"if": "none", "id": "drive0", "file": "@DIR@/top.qcow2", "format": "qcow2",
               "cache": "writeback", "aio": "threads", "node-name": "base"}]
    compare_replies(tmp_path, cmds, drives=drives, setup=images)


def test_283_first_section(tmp_path: Path) -> None:
    """goldens/283.out lines 1-6 (the blockdev-backup that follows is the backup part's)."""
    replies = run_commands(tmp_path, [
        add(**{"node-name": "target"}, driver="null-co", size=1048576),
        add(driver="blkdebug", image={"driver": "null-co", "node-name": "base", "size": 1048576},
            **{"node-name": "source"}),
        add(driver="blkdebug", image="base", **{"node-name": "other"},
            **{"take-child-perms": ["write"]}),
        ("human-monitor-command", {"command-line": 'qemu-io backup-filter "write 0 1M"'})])
    assert replies == [{"return": {}}] * 3 + [
        {"return": "Error: Cannot find device='' nor node-name='backup-filter'\r\n"}]


def test_unsupported_driver_is_unknown(tmp_path: Path) -> None:
    """Drivers in QEMU's schema that the emulator lacks fail as a driver missing from the
    binary does (bdrv_fill_options: "Unknown driver '%s'"), after QAPI checked the options."""
    replies = run_commands(tmp_path, [
        add(driver="vmdk", **{"node-name": "v"}, file="x"),
        add(driver="vmdk", **{"node-name": "v"}, nofile="x")])
    assert replies == [{"error": {"class": "GenericError", "desc": "Unknown driver 'vmdk'"}},
                       {"error": {"class": "GenericError", "desc": "Parameter 'file' is missing"}}]


def test_node_name_conflicts_with_drive_id(tmp_path: Path) -> None:
    cmds = [add(driver="null-co", **{"node-name": "drive0"}),
            add(driver="null-co", **{"node-name": "drive1"}),
            ("blockdev-del", {"node-name": "drive1"}),
            ("query-block", None),
            ("human-monitor-command", {"command-line": 'qemu-io drive0 "read 0 512"'})]
    drives = [{"if": "none", "id": "drive0"}]
    compare_replies(tmp_path, cmds, drives=drives)


@pytest.mark.parametrize("detect_zeroes", ["unmap", "on"])
def test_drive_detect_zeroes_needs_no_discard(tmp_path: Path, detect_zeroes: str) -> None:
    """-drive takes detect-zeroes for the drive (blockdev_init), without blockdev-add's
    "not allowed without setting discard operation to unmap"; zero writes then behave as
    the setting says."""
    drives = [{"if": "none", "id": "d0", "file": "@DIR@/img", "format": "qcow2",
               "detect-zeroes": detect_zeroes}]
    compare_replies(tmp_path, [
        ("query-block", None),
        ("human-monitor-command", {"command-line": 'qemu-io d0 "write -P 0 0 64k"'}),
        ("human-monitor-command", {"command-line": 'qemu-io d0 "write -P 1 64k 64k"'}),
        ("query-named-block-nodes", {"flat": True}),
    ], drives=drives, setup=lambda d: create_qcow2(d / "img", "1M"))
    assert (tmp_path / "emu" / "img").read_bytes() == (tmp_path / "qemu" / "img").read_bytes()


def test_a_backing_edge_takes_its_blocker_along_when_moved(tmp_path: Path) -> None:
    """bdrv_replace_child_noperm detaches an edge from its old node and attaches it to the
    new one: when a backup's filter goes between a node and the overlay using it as backing
    file, the "used as backing hd" blocker moves to the filter, so blockdev-del of the node
    fails further on ("in use"); it comes back when the filter goes."""
    def setup(d: Path) -> None:
        create_qcow2(d / "base", "1M")
        create_qcow2(d / "top", "1M")

    def qcow2(name: str, **more: Any) -> dict[str, Any]:
        return {"driver": "qcow2", "node-name": name,
                "file": {"driver": "file", "filename": f"@DIR@/{name}"}, **more}

    steps: list[tuple[Any, ...]] = [
        ("cmd", "blockdev-add", qcow2("base")),
        ("cmd", "blockdev-add", qcow2("top", backing="base")),
        ("cmd", "blockdev-add", {"driver": "null-co", "node-name": "null", "size": 1 << 20}),
        ("cmd", "blockdev-del", {"node-name": "base"}),
        ("cmd", "blockdev-backup", {"job-id": "j", "device": "base", "target": "null",
                                    "sync": "full", "auto-finalize": False}),
        ("wait", "BLOCK_JOB_PENDING", {"id": "j"}),
        ("cmd", "blockdev-del", {"node-name": "base"}),
        ("cmd", "job-finalize", {"id": "j"}),
        ("rest", "j"),
        ("cmd", "blockdev-del", {"node-name": "base"}),
        ("cmd", "blockdev-del", {"node-name": "top"}),
    ]
    real, mine = run_both(tmp_path, steps, setup)
    assert mine == real
