"""blkdebug fault injection (block/blkdebug.c, QEMU 7.2), on the block layer directly.

Rules run on debug events raised by the node above (qcow2 raises READ_AIO on its file child
before each data read; a flush raises FLUSH_TO_OS and, only after writes since the last flush,
FLUSH_TO_DISK). The first inject rule that fires replaces the active list; set-state applies
after all rules of the event ran; an I/O request fails with the first active rule that
matches its offset and type (``once`` removes the rule). Last, the trace of
docs/qemu-semantics.md §7 (257's intermediate failure) step by step.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from emulator.block.backend import BlockBackend
from emulator.block.drivers.blkdebug import BlkdebugNode
from emulator.block.layer import BlockLayer
from emulator.block.perm import ALL, CONSISTENT_READ, WRITE
from emulator.sandbox import Sandbox
from tests.conftest import requires_qemu, requires_qemu_img, requires_qemu_io
from tests.emulator.qemu_runner import c, compare_replies, create_qcow2, run_commands


def open_drive(d: Path, **blkdebug: Any) -> tuple[BlockLayer, BlockBackend, BlkdebugNode]:
    layer = BlockLayer(sandbox=Sandbox(d))
    bs = layer.add_blockdev({"driver": "qcow2", "node-name": "drive0", "file": {
        "driver": "blkdebug", "node-name": "dbg",
        "image": {"driver": "file", "filename": str(d / "img")}, **blkdebug}})
    blk = BlockBackend(layer.graph, perm=CONSISTENT_READ | WRITE, shared_perm=ALL)
    blk.insert_bs(bs)
    dbg = layer.find_node("dbg")
    assert isinstance(dbg, BlkdebugNode)
    return layer, blk, dbg


@pytest.fixture
def img(tmp_path: Path) -> Path:
    create_qcow2(tmp_path / "img", "4M")
    layer, blk, _ = open_drive(tmp_path)
    blk.pwrite(0, b"\x11" * 65536)            # guest cluster 0
    blk.pwrite(1 << 20, b"\x22" * 65536)      # guest cluster 16
    blk.unref()
    layer.close_all()
    return tmp_path


def test_set_state_on_flush_needs_writes(img: Path) -> None:
    """FLUSH_TO_DISK reaches blkdebug only when the qcow2 node was written since its last
    flush (bdrv_co_flush's flushed_gen check)."""
    _, blk, dbg = open_drive(img, **{"set-state": [{"event": "flush_to_disk", "state": 1,
                                                    "new_state": 2},
                                                   {"event": "flush_to_disk", "state": 2,
                                                    "new_state": 3}]})
    assert dbg.state == 1
    blk.flush()                 # nothing written since open: FLUSH_TO_OS only
    assert dbg.state == 1
    blk.pwrite(0, b"x")
    blk.flush()
    assert dbg.state == 2
    blk.flush()
    assert dbg.state == 2


def test_inject_once_then_succeed(img: Path) -> None:
    _, blk, _ = open_drive(img, **{"inject-error": [{"event": "read_aio", "errno": 5,
                                                     "once": True}]})
    with pytest.raises(OSError) as e:
        blk.pread(0, 65536)
    assert e.value.errno == 5
    assert blk.pread(0, 65536) == b"\x11" * 65536


def test_inject_without_once_keeps_failing(img: Path) -> None:
    _, blk, _ = open_drive(img, **{"inject-error": [{"event": "read_aio", "errno": 28}]})
    for _ in range(3):
        with pytest.raises(OSError) as e:
            blk.pread(1 << 20, 4096)
        assert e.value.errno == 28


def test_zero_clusters_raise_no_read_aio(img: Path) -> None:
    """An unallocated cluster reads as zeroes without a host read: the rule stays idle."""
    _, blk, _ = open_drive(img, **{"inject-error": [{"event": "read_aio", "errno": 5}]})
    assert blk.pread(65536, 65536) == bytes(65536)


def test_sector_matches_host_offsets(img: Path) -> None:
    """``sector`` is a host offset in the file under blkdebug (qemu-img's layout: header,
    refcount table and block, L1, L2, then guest cluster 0 at 0x50000, cluster 16 at
    0x60000)."""
    _, blk, dbg = open_drive(img, **{"inject-error": [{"event": "read_aio", "errno": 5,
                                                       "sector": 0x60000 // 512}]})
    assert blk.pread(0, 65536) == b"\x11" * 65536       # host 0x50000: no match
    with pytest.raises(OSError):
        blk.pread(1 << 20, 512)                          # host 0x60000
    assert dbg.active_rules                              # not once: still active


def test_iotype_write_spares_reads(img: Path) -> None:
    _, blk, _ = open_drive(img, **{"inject-error": [{"event": "read_aio", "errno": 5,
                                                     "iotype": "write"}]})
    assert blk.pread(0, 512) == b"\x11" * 512           # activates the rule; reads pass
    with pytest.raises(OSError):
        blk.pwrite(0, b"\x33" * 512)


def test_flush_iotype(img: Path) -> None:
    """A "flush" rule fails the flush that reaches blkdebug's flush_to_disk."""
    _, blk, _ = open_drive(img, **{"inject-error": [{"event": "flush_to_os", "errno": 5,
                                                     "iotype": "flush", "once": True}]})
    blk.pwrite(0, b"y")
    with pytest.raises(OSError):
        blk.flush()
    blk.flush()


def test_state_gates_rules_and_set_state_applies_after(img: Path) -> None:
    """Both rules of one event see the old state: read_aio in state 1 moves to 2 but the
    state-2 inject rule does not fire on that same event."""
    _, blk, dbg = open_drive(img, **{
        "set-state": [{"event": "read_aio", "state": 1, "new_state": 2}],
        "inject-error": [{"event": "read_aio", "state": 2, "errno": 5, "once": True}]})
    assert blk.pread(0, 512) == b"\x11" * 512
    assert dbg.state == 2
    with pytest.raises(OSError):
        blk.pread(0, 512)
    assert blk.pread(0, 512) == b"\x11" * 512


def test_257_intermediate_failure_trace(img: Path) -> None:
    """§7: the HMP flush moves 1->2; the job's first data read raises READ_AIO in state 2
    (-> 3) and succeeds; the next data read activates the once-rule and fails; then
    reads work again."""
    _, blk, dbg = open_drive(img, **{
        "set-state": [{"event": "flush_to_disk", "state": 1, "new_state": 2},
                      {"event": "read_aio", "state": 2, "new_state": 3}],
        "inject-error": [{"event": "read_aio", "errno": 5, "state": 3,
                          "immediately": False, "once": True}]})
    assert blk.pread(0, 65536) == b"\x11" * 65536       # state 1: nothing happens
    assert dbg.state == 1
    blk.pwrite(2 << 20, b"\x44" * 65536)
    blk.flush()
    assert dbg.state == 2
    assert blk.pread(0, 65536) == b"\x11" * 65536
    assert dbg.state == 3
    with pytest.raises(OSError) as e:
        blk.pread(1 << 20, 65536)
    assert e.value.errno == 5
    assert blk.pread(1 << 20, 65536) == b"\x22" * 65536
    assert dbg.state == 3


# -- json: filenames of blkdebug nodes --------------------------------------------------------
RULES = [{"errno": 5, "event": "read_aio", "state": 1, "sector": 3},   # errno before event:
         {"event": "write_aio", "errno": 28, "once": True}]            # the client's order
SET_STATE = [{"event": "read_aio", "new_state": 2},                    # must not matter
             {"new_state": 1, "state": 2, "event": "write_aio"}]


def _blkdebug(**more: Any) -> dict[str, Any]:
    return {"driver": "blkdebug", "inject-error": RULES, "set-state": SET_STATE,
            "image": {"driver": "file", "filename": "@DIR@/img"}, **more}


@requires_qemu
@requires_qemu_img
@pytest.mark.parametrize("definition", [
    pytest.param(_blkdebug(**{"node-name": "top"}), id="blockdev-add-blkdebug"),
    pytest.param({"driver": "qcow2", "node-name": "top", "file": _blkdebug()}, id="qcow2-file"),
    pytest.param({"driver": "qcow2", "node-name": "top", "file": {
        "driver": "blkdebug", "inject-error": [{"event": "read_aio", "errno": 5}],
        "image": {"driver": "file", "filename": "@DIR@/img"}}}, id="qcow2-file-one-rule"),
    pytest.param({"driver": "raw", "node-name": "top", "file": {"driver": "raw",
                                                                "file": _blkdebug()}},
                 id="raw-raw-file"),
    pytest.param({"driver": "qcow2", "node-name": "top", "file": {
        "driver": "file", "filename": "@DIR@/top"}, "backing": {
        "driver": "qcow2", "file": _blkdebug()}}, id="qcow2-backing"),
])
def test_json_filenames_keep_qdict_order(tmp_path: Path, definition: dict[str, Any]) -> None:
    """The rules' flattened keys share QDict buckets (``inject-error.N.errno`` and
    ``.event`` do): QEMU writes them in bs->options order, which qdict_flatten and each
    child's qdict_extract_subqdict make (block.c), whatever order the client used."""
    def setup(d: Path) -> None:
        create_qcow2(d / "img", "1M")
        create_qcow2(d / "top", "1M")
    commands = [c("blockdev-add", **definition), c("query-named-block-nodes")]
    compare_replies(tmp_path, commands, setup=setup)
    assert run_commands(tmp_path / "emu", commands[:1]) == [{"return": {}}]


@requires_qemu
@requires_qemu_img
@pytest.mark.parametrize("rule", [
    {"event": "none", "errno": 5},                      # the header struct
    {"event": "none", "errno": 28, "sector": 384},     # the L1 table (a fresh 64M image's)
    {"event": "none", "errno": 1, "sector": 128},      # the refcount table
    {"event": "reftable_load", "errno": 5},            # the event before that read
    {"event": "reftable_load", "errno": 5, "sector": 384},   # ... which the L1 read precedes
    {"event": "none", "errno": 5, "sector": 1},        # nothing qcow2 reads at open
], ids=["header", "l1", "reftable", "reftable-event", "l1-before-reftable", "unread"])
@pytest.mark.parametrize("backing", [False, True], ids=["", "backing"])
def test_qcow2_open_reads_meet_rules_in_qemu_order(tmp_path: Path, rule: dict[str, Any],
                                                   backing: bool) -> None:
    """qcow2_do_open reads the header, the L1 table, the refcount table (after REFTABLE_LOAD),
    the header extensions and the backing file name, in that order, each failure with its
    own text ("Could not read L1 table: No space left on device")."""
    def setup(d: Path) -> None:
        create_qcow2(d / "base", "64M")
        create_qcow2(d / "img", "64M", backing=d / "base" if backing else None)
    commands = [c("blockdev-add", driver="qcow2", **{"node-name": "top"}, file={
        "driver": "blkdebug", "inject-error": [rule],
        "image": {"driver": "file", "filename": "@DIR@/img"}}),
        c("query-named-block-nodes", flat=True)]
    compare_replies(tmp_path, commands, setup=setup)


@requires_qemu
@requires_qemu_img
@pytest.mark.parametrize("rule", [
    {"event": "read_aio", "errno": 5},                  # every read after the first data read
    {"event": "read_aio", "errno": 28, "iotype": "write"},   # every write
    {"event": "read_aio", "errno": 5, "sector": 256},    # the refcount block, read at close
    {"event": "read_aio", "errno": 5, "sector": 0},      # the header: the directory update
], ids=["reads", "writes", "refcount-block", "header"])
def test_close_survives_failing_metadata_io(tmp_path: Path, rule: dict[str, Any]) -> None:
    """qcow2_inactivate stores persistent bitmaps and flushes the caches; a failure is
    printed ("Lost persistent bitmaps during inactivation of node ...") and blockdev-del
    still succeeds, the image left as QEMU leaves it."""
    commands = [
        c("blockdev-add", driver="qcow2", **{"node-name": "top"}, file={
            "driver": "blkdebug", "inject-error": [rule],
            "image": {"driver": "file", "filename": "@DIR@/img"}}),
        c("block-dirty-bitmap-add", node="top", name="b", persistent=True),
        c("human-monitor-command", **{"command-line": 'qemu-io top "write -P 7 1M 64k"'}),
        c("human-monitor-command", **{"command-line": 'qemu-io top "read 0 64k"'}),
        c("human-monitor-command", **{"command-line": 'qemu-io top "write -P 8 3M 64k"'}),
        c("blockdev-del", **{"node-name": "top"})]

    def setup(d: Path) -> None:
        create_qcow2(d / "img", "4M")
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", str(d / "img")],
                       check=True, capture_output=True)
    compare_replies(tmp_path, commands, setup=setup)
    assert (tmp_path / "emu" / "img").read_bytes() == (tmp_path / "qemu" / "img").read_bytes()


@requires_qemu
@requires_qemu_img
@pytest.mark.parametrize("immediately", [False, True])
@pytest.mark.parametrize("write", [
    "write -P 0x44 921600 153600",     # new clusters (failing), then guest 1M in place
    "write -P 0x44 1036288 153600",    # guest 1M in place, then new clusters (failing)
], ids=["fail-first", "fail-last"])
def test_split_write_runs_its_stretches_as_tasks(tmp_path: Path, immediately: bool,
                                                  write: str) -> None:
    """qcow2_co_pwritev_part starts a task per host stretch; a stretch that fails after a
    wait (blkdebug's default, immediately=off) does not stop the next one, which writes;
    one that fails at once does (the image bytes are compared with QEMU's)."""
    rule = {"event": "none", "errno": 5, "sector": 1152, "immediately": immediately}
    commands = [
        c("blockdev-add", driver="qcow2", **{"node-name": "top"}, file={
            "driver": "blkdebug", "inject-error": [rule],
            "image": {"driver": "file", "filename": "@DIR@/img"}}),
        c("human-monitor-command", **{"command-line": f'qemu-io top "{write}"'}),
        c("blockdev-del", **{"node-name": "top"})]

    def setup(d: Path) -> None:
        create_qcow2(d / "img", "4M")
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 128k",
                        "-c", "write -P 0x22 1M 64k", "-c", "write -P 0x33 3M 64k",
                        str(d / "img")], check=True, capture_output=True)
    compare_replies(tmp_path, commands, setup=setup)
    assert (tmp_path / "emu" / "img").read_bytes() == (tmp_path / "qemu" / "img").read_bytes()


@requires_qemu
@requires_qemu_img
@requires_qemu_io
@pytest.mark.parametrize("rule", [
    {"event": "reftable_load", "errno": 28, "iotype": "flush"},   # open: the first header sync
    {"event": "reftable_load", "errno": 5, "iotype": "write", "sector": 0},   # its write
    {"event": "reftable_load", "errno": 5, "sector": 1408},  # open: the directory read
    {"event": "read_aio", "errno": 5},                       # query: the directory read
    {"event": "read_aio", "errno": 5, "iotype": "flush"},    # close: the directory's sync
    {"event": "none", "errno": 5},                           # nothing fails
], ids=["open-flush", "open-header", "open-directory", "query", "close-flush", "none"])
def test_persistent_bitmaps_meet_failing_io(tmp_path: Path, rule: dict[str, Any]) -> None:
    """Stored bitmaps read and written as qcow2-bitmap.c does (found by the differential
    test): a read-write open marks them in use in place, each header update synced
    ("Can't update bitmap directory: No space left on device"); node listings read the
    directory, never the bitmaps ("Failed to read bitmap directory: Input/output error");
    closing reads the directory once and rewrites only the bitmaps the node holds, the
    in-use one it could not load staying as it is. Replies and image bytes as QEMU's."""
    commands = [
        c("blockdev-add", driver="qcow2", **{"node-name": "top"}, file={
            "driver": "blkdebug", "inject-error": [rule],
            "image": {"driver": "file", "filename": "@DIR@/img"}}),
        c("human-monitor-command", **{"command-line": 'qemu-io top "read 0 64k"'}),
        c("query-named-block-nodes", flat=True),
        c("block-dirty-bitmap-add", node="top", name="new", persistent=True),
        c("blockdev-del", **{"node-name": "top"})]

    def setup(d: Path) -> None:
        create_qcow2(d / "img", "4M")
        subprocess.run(["qemu-img", "bitmap", "--add", d / "img", "b"], check=True)
        # a crash leaves "b" in use (qemu-io's abort: opened read-write, then SIGABRT)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "abort", d / "img"],
                       capture_output=True)
        subprocess.run(["qemu-img", "bitmap", "--add", d / "img", "a"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", d / "img"],
                       check=True, capture_output=True)   # the directory is now at 0xb0000
    compare_replies(tmp_path, commands, setup=setup)
    assert (tmp_path / "emu" / "img").read_bytes() == (tmp_path / "qemu" / "img").read_bytes()


@requires_qemu_io
@requires_qemu_img
@pytest.mark.parametrize("rule", [
    {"event": "l2_update", "errno": 5},        # the caches cannot be written back at close
    {"event": "cluster_alloc", "errno": 28},   # the write itself fails
    {"event": "none", "errno": 5},
], ids=["close", "write", "none"])
def test_offline_qemu_io_on_a_json_filename(tmp_path: Path, rule: dict[str, Any]) -> None:
    """qemu-io opens a json:{...} file name as the options it holds (here qcow2 over
    blkdebug); what closing prints comes after the commands' output, with the tool's name
    (error_report: "qemu-io: Failed to flush the L2 table cache: ...")."""
    import json

    from emulator import qemu_io
    name = "json:" + json.dumps({"driver": "qcow2", "file": {
        "driver": "blkdebug", "inject-error": [rule],
        "image": {"driver": "file", "filename": "img"}}})
    outputs, images = [], []
    for side in ("real", "mine"):
        (tmp_path / side).mkdir()
        create_qcow2(tmp_path / side / "img", "4M")
        if side == "real":
            real = subprocess.run(["qemu-io", "-c", "write -P 7 0 64k", name],
                                  cwd=tmp_path / side, capture_output=True, text=True)
            outputs.append((real.returncode, real.stdout + real.stderr))
        else:
            outputs.append(qemu_io.offline(Sandbox(tmp_path / side), name, None,
                                           ["write -P 7 0 64k"]))
        images.append((tmp_path / side / "img").read_bytes())
    def timeless(out: tuple[int, str]) -> tuple[int, str]:
        return out[0], re.sub(r"; [\d:.]+ sec \(.*\)", "; TIME", out[1])
    assert timeless(outputs[1]) == timeless(outputs[0])
    assert images[0] == images[1]
