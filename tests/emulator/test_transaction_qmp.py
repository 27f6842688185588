"""transaction over QMP against real QEMU: rollback of every bitmap action, completion-mode,
the abort action, blockdev-snapshot-sync (errors, the new overlay, the base reopened
read-only with its persistent bitmaps stored) and blockdev-snapshot (an existing overlay)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import requires_qemu, requires_qemu_img
from tests.emulator.qemu_runner import c, compare_replies, create_qcow2, io, qemu_img

pytestmark = [requires_qemu, requires_qemu_img]


def act(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


def test_rollback_of_every_bitmap_action(tmp_path: Path) -> None:
    setup = [
        c("blockdev-add", driver="null-co", **{"node-name": "n"}, size=4 << 20),
        c("block-dirty-bitmap-add", node="n", name="a"),
        c("block-dirty-bitmap-add", node="n", name="b", disabled=True),
        c("block-dirty-bitmap-add", node="n", name="c"),
        io("n", "write 0 64k"), io("n", "write 1M 64k"),
    ]
    failing = [
        [act("block-dirty-bitmap-clear", node="n", name="a"),
         act("block-dirty-bitmap-enable", node="n", name="b"),
         act("block-dirty-bitmap-disable", node="n", name="c"),
         act("block-dirty-bitmap-add", node="n", name="d", granularity=512),
         act("block-dirty-bitmap-merge", node="n", target="b", bitmaps=["a", "c"]),
         act("block-dirty-bitmap-remove", node="n", name="c"),
         act("abort")],
        [act("block-dirty-bitmap-remove", node="n", name="a"),
         act("block-dirty-bitmap-add", node="n", name="a")],
        [act("block-dirty-bitmap-remove", node="n", name="a"),
         act("block-dirty-bitmap-remove", node="n", name="a")],
        [act("block-dirty-bitmap-merge", node="n", target="a", bitmaps=["c"]),
         act("block-dirty-bitmap-clear", node="n", name="zz")],
        [act("block-dirty-bitmap-add", node="n", name="e"),
         act("block-dirty-bitmap-add", node="n", name="e")],
    ]
    cmds = list(setup)
    for actions in failing:
        cmds += [c("transaction", actions=actions), c("query-named-block-nodes", flat=True)]
    cmds += [c("x-debug-block-dirty-bitmap-sha256", node="n", name=x) for x in "abc"]
    cmds += [c("transaction", actions=[act("block-dirty-bitmap-remove", node="n", name="a"),
                                       act("block-dirty-bitmap-add", node="n", name="f")]),
             c("query-named-block-nodes", flat=True)]
    compare_replies(tmp_path, cmds)


def test_completion_mode_and_kinds(tmp_path: Path) -> None:
    cmds = [
        c("blockdev-add", driver="null-co", **{"node-name": "n"}),
        c("transaction", actions=[act("block-dirty-bitmap-add", node="n", name="b")],
          properties={"completion-mode": "grouped"}),
        c("transaction", actions=[act("abort")], properties={"completion-mode": "grouped"}),
        c("transaction", actions=[act("block-dirty-bitmap-add", node="n", name="b")],
          properties={"completion-mode": "individual"}),
        c("transaction", actions=[]),
        c("transaction", actions=[{"type": "nosuch", "data": {}}]),
        c("transaction", actions=[{"type": "abort"}]),
        c("transaction", actions=[act("block-dirty-bitmap-add", node="n")]),
        c("query-named-block-nodes", flat=True),
    ]
    compare_replies(tmp_path, cmds)


def test_blockdev_snapshot_sync(tmp_path: Path) -> None:
    def setup(d: Path) -> None:
        create_qcow2(d / "disk", "1M")

    drives = [{"if": "none", "id": "drive0", "file": "@DIR@/disk", "format": "qcow2",
               "cache": "writeback", "aio": "threads", "node-name": "base"}]
    cmds = [
        c("block-dirty-bitmap-add", node="base", name="p", persistent=True),
        c("block-dirty-bitmap-add", node="base", name="q", persistent=True, disabled=True),
        io("drive0", "write 0 64k"),
        c("blockdev-snapshot-sync", device="base", **{"snapshot-file": "@DIR@/top"}),
        c("blockdev-snapshot-sync", **{"node-name": "base", "snapshot-file": "@DIR@/top"}),
        c("blockdev-snapshot-sync", **{"node-name": "base", "snapshot-file": "@DIR@/top",
                                       "snapshot-node-name": "drive0"}),
        c("blockdev-snapshot-sync", **{"snapshot-file": "@DIR@/top"}),
        c("blockdev-snapshot-sync", device="drive0", **{"snapshot-file": "@DIR@/top",
                                                       "snapshot-node-name": "1x"}),
        c("query-named-block-nodes", flat=True),
        c("transaction", actions=[
            act("blockdev-snapshot-sync", device="drive0", **{"snapshot-file": "@DIR@/top2",
                                                             "snapshot-node-name": "s2"}),
            act("abort")]),
        c("query-block"),
        c("blockdev-snapshot-sync", device="drive0", **{"snapshot-file": "@DIR@/top",
                                                       "snapshot-node-name": "snap"}),
        io("drive0", "write 64k 64k"),
        c("query-block"),
        c("query-named-block-nodes"),
        c("block-dirty-bitmap-remove", node="base", name="p"),
        c("block-dirty-bitmap-clear", node="base", name="q"),
        c("block-dirty-bitmap-enable", node="base", name="q"),
        c("blockdev-del", **{"node-name": "base"}),
    ]
    compare_replies(tmp_path, cmds, drives=drives, setup=setup)
    infos = {}
    for kind in ("qemu", "emu"):
        for name in ("disk", "top"):
            out = qemu_img("info", "--output=json", tmp_path / kind / name)
            info = json.loads(out.stdout.replace(str(tmp_path / kind), "TEST_DIR"))
            info.pop("actual-size", None)
            infos[kind, name] = info
            assert qemu_img("check", tmp_path / kind / name).returncode == 0
    assert infos["emu", "disk"] == infos["qemu", "disk"]
    assert infos["emu", "top"] == infos["qemu", "top"]


def test_snapshot_of_a_node_whose_flush_fails(tmp_path: Path) -> None:
    """external_snapshot_prepare flushes the old top first; a failure is QERR_IO_ERROR's
    text whatever the errno (found by the differential test's snapshot rule)."""
    def setup(d: Path) -> None:
        create_qcow2(d / "disk", "1M")

    for errno in (5, 28):
        cmds = [
            c("blockdev-add", driver="qcow2", **{"node-name": "dbg"}, file={
                "driver": "blkdebug", "image": {"driver": "file", "filename": "@DIR@/disk"},
                "inject-error": [{"event": "flush_to_disk", "errno": errno}]}),
            io("dbg", "write 0 512"),
            c("blockdev-snapshot-sync", **{"node-name": "dbg", "snapshot-file": "@DIR@/top",
                                           "snapshot-node-name": "top"}),
            c("transaction", actions=[act("blockdev-snapshot-sync", **{
                "node-name": "dbg", "snapshot-file": "@DIR@/top", "format": "raw"})]),
            c("query-named-block-nodes", flat=True),
        ]
        (tmp_path / str(errno)).mkdir()
        compare_replies(tmp_path / str(errno), cmds, setup=setup)


def test_snapshots_reopen_what_the_old_top_opened(tmp_path: Path) -> None:
    """Each snapshot reopens the old top read-only (bdrv_reopen_set_read_only), and with it
    the children it opened itself, not one it was given by name: that file node stays
    writable. A child's options are rebuilt at every reopen (qdict_clone_shallow from the
    second on), so the two blkdebug keys of one QDict bucket swap places in the json: name
    at every second snapshot, as in QEMU."""
    def setup(d: Path) -> None:
        create_qcow2(d / "base", "1M")
        create_qcow2(d / "faulty", "1M")

    cmds = [
        c("blockdev-add", driver="file", **{"node-name": "f"}, filename="@DIR@/base"),
        c("blockdev-add", driver="qcow2", **{"node-name": "b"}, file="f"),
        c("blockdev-snapshot-sync", **{"node-name": "b", "snapshot-file": "@DIR@/s",
                                       "snapshot-node-name": "s"}),
        c("blockdev-add", driver="qcow2", **{"node-name": "dbg"}, file={
            "driver": "blkdebug", "image": {"driver": "file", "filename": "@DIR@/faulty"},
            "inject-error": [{"event": "read_aio", "errno": 5}]}),
    ]
    for i in range(4):
        cmds += [c("blockdev-snapshot-sync", **{"node-name": "dbg",
                                                "snapshot-file": f"@DIR@/top{i}",
                                                "snapshot-node-name": f"top{i}"}),
                 c("query-named-block-nodes", flat=True)]
    compare_replies(tmp_path, cmds, setup=setup)


def test_blockdev_snapshot(tmp_path: Path) -> None:
    """blockdev-snapshot: an overlay added with blockdev-add goes above a node (a drive's
    root, here, so the drive writes to it); its errors, in a transaction and rolled back."""
    def setup(d: Path) -> None:
        create_qcow2(d / "base", "1M")
        create_qcow2(d / "top", "1M", backing=Path("base"))   # relative: the same bytes
        create_qcow2(d / "top2", "1M")

    def qcow2(name: str, **more: Any) -> dict[str, Any]:
        return {"driver": "qcow2", "node-name": name,
                "file": {"driver": "file", "filename": f"@DIR@/{name}"}, **more}

    drives = [{"if": "none", "id": "drive0", "file": "@DIR@/base", "format": "qcow2",
               "cache": "writeback", "aio": "threads", "node-name": "base"}]
    cmds = [
        c("blockdev-add", **qcow2("top", backing=None)),
        c("blockdev-add", **qcow2("top2")),
        c("blockdev-add", driver="null-co", **{"node-name": "null0"}),
        c("block-dirty-bitmap-add", node="base", name="b0"),
        io("drive0", "write -P 1 0 64k"),
        c("blockdev-snapshot", node="nosuch", overlay="top"),
        c("blockdev-snapshot", node="base", overlay="nosuch"),
        c("blockdev-snapshot", node="base", overlay="null0"),   # no backing support
        c("blockdev-snapshot", node="base", overlay="top2"),    # has a backing image
        c("blockdev-snapshot", node="base", overlay="base"),    # in use
        c("transaction", actions=[act("blockdev-snapshot", node="base", overlay="top"),
                                  act("abort")]),
        c("query-named-block-nodes", flat=True),
        c("blockdev-snapshot", node="drive0", overlay="top"),
        c("query-block"),
        io("drive0", "write -P 2 64k 64k"),
        io("drive0", "read -P 1 0 64k"),
        c("blockdev-snapshot", node="base", overlay="top"),
        c("query-named-block-nodes"),
        c("blockdev-del", **{"node-name": "base"}),
        c("blockdev-del", **{"node-name": "top"}),
    ]
    compare_replies(tmp_path, cmds, drives=drives, setup=setup)
    for name in ("base", "top"):
        assert (tmp_path / "emu" / name).read_bytes() == (tmp_path / "qemu" / name).read_bytes()
