"""Differential testing, as fakeredis does it: the same random command sequences go to the
emulator and to real QEMU 7.2, and their replies, events and bitmap listings must agree.

A hypothesis state machine (bitmaps, transactions, guest writes, block_resize, nodes, backup
jobs and job verbs, blockdev-mirror and drive-mirror left in READY or ended at once, external
snapshots, drive-backup with its image creation, drive0 closed and reopened with qemu-img
info/check/bitmap run on its image in between, and a qcow2 node over blkdebug with random
inject-error and set-state rules that guest writes, flushes and backups run into, as 257
does) drives both backends through the harness's Backend interface (qemu.qmp clients on
both sides, the emulator's over its socket), and also compares how many events come before
each reply. Two inputs are left out
because they crash QEMU 7.2.22 with SIGSEGV (both found by this test; see
docs/qemu-semantics.md §4): a merge with an empty source list, and a transaction that
enables a bitmap that does not exist; what the emulator answers instead is pinned by
tests/emulator/test_bitmap_qmp.py::test_qemu_crashes_are_not_copied. A backup that ignores
an error which never goes away is left out too: it retries for ever, in QEMU as well; and
so is guest I/O to a node a mirror waiting in pending keeps drained: QEMU's monitor hangs.
Any divergence this test finds becomes such a regression test and a fix in the emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import weakref
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from harness.backends.base import Backend, VmConfig
from harness.backends.emulator import EmulatorBackend
from harness.backends.qemu import QemuBackend
from tests.conftest import requires_qemu

pytestmark = [requires_qemu, pytest.mark.slow]

NODES = st.sampled_from(["drive0", "drive0", "drive0", "v2", "null0", "dbg", "nosuchnode",
                         "snap"])
# blkdebug: events the qcow2 driver above it and the request layer raise, and the rules
DEBUG_EVENTS = st.sampled_from(["read_aio", "read_aio", "write_aio", "write_aio",
                                "flush_to_disk", "cluster_alloc", "l2_update", "cow_read",
                                "cow_write", "refblock_alloc", "l2_alloc_write", "none",
                                "reftable_load"])
INJECT_RULES = st.lists(st.fixed_dictionaries(
    {"event": DEBUG_EVENTS, "errno": st.sampled_from([5, 5, 28, 1])},
    optional={"once": st.booleans(), "immediately": st.booleans(),
              # host sectors of the faulty image: header, refcount table and block, L1, L2,
              # its data clusters (0x50000-0x8ffff), clusters guest writes allocate
              "sector": st.sampled_from([0, 128, 256, 384, 512, 640, 700, 768, 896, 1024,
                                         1152, 1280, 1500]),
              "iotype": st.sampled_from(["read", "write", "write-zeroes", "flush"]),
              "state": st.sampled_from([1, 2])}), min_size=1, max_size=2)
SET_STATE_RULES = st.lists(st.fixed_dictionaries(
    {"event": DEBUG_EVENTS, "new_state": st.sampled_from([1, 2])},
    optional={"state": st.sampled_from([1, 2])}), max_size=2)
NAMES = st.sampled_from(["a", "b", "c", "a", ""])
GRANULARITIES = st.sampled_from([None, None, 512, 4096, 65536, 1 << 20, 1000, 256, 1 << 31])
OPT_BOOL = st.sampled_from([None, True, False])
SIZE = 4 << 20
REPLY_TIMEOUT = int(os.environ.get("DIFF_TIMEOUT", "30"))


def bitmap_args(node: str, name: str, **more: Any) -> dict[str, Any]:
    return {"node": node, "name": name, **{k: v for k, v in more.items() if v is not None}}


def normalize(value: Any, dirs: tuple[str, ...]) -> Any:
    """What may legitimately differ: test directories, timestamps, auto node names."""
    if isinstance(value, dict):
        return {k: ("TS" if k == "timestamp" else normalize(v, dirs)) for k, v in value.items()
                if k != "actual-size"}
    if isinstance(value, list):
        return [normalize(v, dirs) for v in value]
    if isinstance(value, str):
        for d in dirs:
            value = value.replace(d, "TEST_DIR")
        return re.sub(r"#block\d+", "#blockN", value)
    return value


class EmulatorAgreesWithQemu(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.listing: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.dirs = [Path(tempfile.mkdtemp(prefix="qmpreplay-diff-")) for _ in range(2)]
        self.backends: list[Backend] = [QemuBackend(self.dirs[0]),
                                        EmulatorBackend(self.dirs[1], transport="socket")]
        # an example hypothesis gives up on mid-way (a shrink out of time) never reaches
        # teardown: its QEMU and directories go when the machine does, or at exit
        weakref.finalize(self, remove_leftovers, list(self.dirs), self.backends)
        for backend, d in zip(self.backends, self.dirs, strict=True):
            self.run(backend.qemu_img("create", "-f", "qcow2", str(d / "img"), str(SIZE)))
            self.run(backend.qemu_img("create", "-f", "qcow2", "-o", "compat=0.10",
                                      str(d / "v2"), str(SIZE)))
            self.run(backend.qemu_img("create", "-f", "qcow2", str(d / "faulty"), str(SIZE)))
            self.run(backend.qemu_io("qcow2", str(d / "faulty"), "write -P 0x11 0 128k",
                                     "write -P 0x22 1M 64k", "write -z 2M 64k",
                                     "write -P 0x33 3M 512"))
            self.run(backend.start(VmConfig()))
        self.wire = [_count_wire(backend) for backend in self.backends]
        self.both("blockdev-add", {"driver": "qcow2", "node-name": "drive0",
                                   "file": {"driver": "file", "filename": "DIR/img"}})
        # a version 2 overlay of drive0: no zero flag, discards refused over a backing file
        self.both("blockdev-add", {"driver": "qcow2", "node-name": "v2", "backing": "drive0",
                                   "discard": "unmap",
                                   "file": {"driver": "file", "filename": "DIR/v2"}})
        self.both("blockdev-add", {"driver": "null-co", "node-name": "null0", "size": SIZE})
        self.has_null = True
        self.has_dbg = False
        self.dbg_permanent = False
        self.backup_targets: set[str] = set()   # the images backups wrote to
        self.mirroring = False   # a background-mode mirror was started
        self.f0 = False   # drive0's file is the node f0

    def run(self, coro: Any, what: str = "") -> Any:
        """A step on one side; a side that does not answer within REPLY_TIMEOUT fails the
        example (so hypothesis shows the steps) instead of hanging the run."""
        try:
            return self.loop.run_until_complete(asyncio.wait_for(coro, REPLY_TIMEOUT))
        except TimeoutError:
            raise AssertionError(f"{what or 'a step'}: no answer in {REPLY_TIMEOUT} s") \
                from None

    def both(self, command: str, arguments: dict[str, Any]) -> Any:
        """Send to both; the normalized replies must be equal; return QEMU's."""
        replies, before = [], []
        for backend, d, wire in zip(self.backends, self.dirs, self.wire, strict=True):
            args = normalize_in(arguments, str(d))
            sent = wire.events
            reply = self.run(backend.execute(command, args), f"{backend.name}: {command}")
            replies.append(self.hostless(normalize(reply, tuple(map(str, self.dirs)))))
            before.append(wire.events_at_reply - sent)
        assert replies[0] == replies[1], f"{command} {arguments}: qemu {replies[0]} " \
                                         f"!= emulator {replies[1]}"
        # What QEMU emits before a reply (synchronously, or in a bottom half the command
        # scheduled) it always does; what follows a thread-pool wait may still beat the
        # reply out, a race: so the emulator may put fewer events first, never more
        assert before[1] <= before[0], f"{command} {arguments}: events before the reply: " \
                                       f"qemu {before[0]} < emulator {before[1]}"
        return replies[0]

    def hostless(self, reply: Any) -> Any:
        """A backup target's file length: QEMU's block-copy workers run in parallel, so how
        many clusters a failing backup allocated before it stopped varies from run to run
        (its guest data is compared at the end)."""
        for node in reply.get("return", []) if isinstance(reply.get("return"), list) else []:
            image = node.get("image") if isinstance(node, dict) else None
            if node.get("drv") == "file" and isinstance(image, dict) and \
                    image.get("filename", "").removeprefix("TEST_DIR/") in self.backup_targets:
                image.pop("virtual-size", None)
        return reply

    def teardown(self) -> None:
        try:
            for backend in self.backends:
                self.run(backend.shutdown())   # quit: every cache written back
                self.run(backend.close())
            self.loop.close()
            # An image no backup wrote to: QEMU's bytes, cluster for cluster, once both
            # closed. A backup target's host layout QEMU's block-copy workers make
            # differently from run to run (thread-pool completion order): its guest data
            # must match
            for name in ("img", "v2", "faulty", "db", "snap"):
                files = [d / name for d in self.dirs]
                assert files[0].exists() == files[1].exists(), name
                if not files[0].exists():
                    continue
                if name not in self.backup_targets | {"db"}:   # backing file names
                    images = [f.read_bytes().replace(bytes(d), b"TEST_DIR")   # hold the dir
                              for f, d in zip(files, self.dirs, strict=True)]
                    assert images[0] == images[1], name
                compare = subprocess.run(["qemu-img", "compare", *map(top_layer, files)],
                                         capture_output=True, text=True)
                assert compare.returncode == 0, compare.stdout + compare.stderr
        finally:   # a failing example leaves nothing behind either
            remove_dirs(self.dirs)

    # -- bitmaps -----------------------------------------------------------------------------
    @rule(node=NODES, name=NAMES, granularity=GRANULARITIES, persistent=OPT_BOOL,
          disabled=OPT_BOOL)
    def add(self, node: str, name: str, granularity: int | None, persistent: bool | None,
            disabled: bool | None) -> None:
        self.both("block-dirty-bitmap-add", bitmap_args(node, name, granularity=granularity,
                                                        persistent=persistent,
                                                        disabled=disabled))

    @rule(verb=st.sampled_from(["remove", "clear", "enable", "disable"]), node=NODES,
          name=NAMES)
    def simple(self, verb: str, node: str, name: str) -> None:
        self.both(f"block-dirty-bitmap-{verb}", bitmap_args(node, name))

    @rule(node=NODES, dest=NAMES, sources=st.lists(st.one_of(
        NAMES, st.builds(lambda n, b: {"node": n, "name": b}, NODES, NAMES)),
        min_size=1, max_size=3))
    def merge(self, node: str, dest: str, sources: list[Any]) -> None:
        self.both("block-dirty-bitmap-merge", {"node": node, "target": dest,
                                               "bitmaps": sources})

    @rule(node=NODES, name=NAMES)
    def sha256(self, node: str, name: str) -> None:
        self.both("x-debug-block-dirty-bitmap-sha256", bitmap_args(node, name))

    @rule(actions=st.lists(st.one_of(
        st.builds(lambda n, b, g: {"type": "block-dirty-bitmap-add",
                                   "data": bitmap_args(n, b, granularity=g)},
                  NODES, NAMES, GRANULARITIES),
        st.builds(lambda v, n, b: {"type": f"block-dirty-bitmap-{v}",
                                   "data": bitmap_args(n, b)},
                  st.sampled_from(["remove", "clear", "enable", "disable"]), NODES, NAMES),
        st.builds(lambda n, t, s: {"type": "block-dirty-bitmap-merge",
                                   "data": {"node": n, "target": t, "bitmaps": s}},
                  NODES, NAMES, st.lists(NAMES, min_size=1, max_size=2)),
        st.just({"type": "abort", "data": {}})), min_size=1, max_size=4))
    def transaction(self, actions: list[dict[str, Any]]) -> None:
        existing = {(n["node-name"], b["name"]) for n in self.listing   # anonymous ones
                    for b in n.get("dirty-bitmaps", []) if "name" in b}    # can't be named
        assume(all((a["data"]["node"], a["data"]["name"]) in existing for a in actions
                   if a["type"] == "block-dirty-bitmap-enable"))
        self.both("transaction", {"actions": actions})

    # -- guest writes and nodes --------------------------------------------------------------
    @rule(pattern=st.integers(0, 255), sector=st.integers(0, SIZE // 512 - 1),
          sectors=st.sampled_from([1, 8, 128, 129, 300]), node=NODES)
    def write(self, pattern: int, sector: int, sectors: int, node: str) -> None:
        length = min(sectors, SIZE // 512 - sector) * 512
        assume(node != "dbg" or one_cluster(sector, length))
        assume(not self.mirror_pending())
        self.both("human-monitor-command", {
            "command-line": f'qemu-io {node} "write -P 0x{pattern:02x} {sector * 512} {length}"'})
        self.mirror_catches_up()

    @rule(node=NODES, sector=st.integers(0, SIZE // 512 - 1),
          sectors=st.sampled_from([1, 8, 128, 129, 300]),
          verb=st.sampled_from(["write -z", "write -z -u", "discard"]))
    def zero(self, node: str, sector: int, sectors: int, verb: str) -> None:
        length = min(sectors, SIZE // 512 - sector) * 512
        assume(node != "dbg" or one_cluster(sector, length))
        assume(not self.mirror_pending())
        self.both("human-monitor-command", {
            "command-line": f'qemu-io {node} "{verb} {sector * 512} {length}"'})
        self.mirror_catches_up()

    @rule(node=NODES, size=st.sampled_from([SIZE, SIZE, 2 << 20, SIZE + 65536, SIZE - 512,
                                            8 << 20, 1000]))
    def resize(self, node: str, size: int) -> None:
        assume(not self.mirror_pending())
        self.both("block_resize", {"node-name": node, "size": size})
        self.mirror_catches_up()

    @precondition(lambda self: not getattr(self, "has_null", False))
    @rule(size=st.sampled_from([SIZE, 1 << 20]))
    def add_null(self, size: int) -> None:
        reply = self.both("blockdev-add", {"driver": "null-co", "node-name": "null0",
                                           "size": size})
        self.has_null = "return" in reply

    @rule(node=st.sampled_from(["null0", "drive0", "dbg", "nosuchnode", "cbw"]))
    def delete(self, node: str) -> None:
        reply = self.both("blockdev-del", {"node-name": node})
        if "return" in reply and node == "null0":
            self.has_null = False
        if "return" in reply and node == "dbg":
            self.has_dbg = False

    @rule(tools=st.lists(st.one_of(
        st.just(("info", "--output=json", "DIR/img")),
        st.just(("check", "--output=json", "DIR/img")),
        st.builds(lambda verb, name: ("bitmap", verb, "DIR/img", name),
                  st.sampled_from(["--add", "--remove", "--clear", "--enable", "--disable"]),
                  NAMES),
        st.builds(lambda name, source: ("bitmap", "--merge", source, "DIR/img", name),
                  NAMES, NAMES)), max_size=3),
        read_only=OPT_BOOL, file_by_name=st.booleans())
    def reopen(self, tools: list[tuple[str, ...]], read_only: bool | None,
               file_by_name: bool) -> None:
        """Close drive0 (and v2 above it), work on its image offline, open it again: what a
        backup tool does between two incremental backups. Persistent bitmaps are stored at
        close and loaded at open; ``qemu-img bitmap``, ``info`` and ``check`` read and edit
        them in between. Its file node is defined inline or added first and named (a node
        a reopen of drive0 leaves alone)."""
        for node in ("v2", "drive0", "f0")[:3 if self.f0 else 2]:
            if "return" not in self.both("blockdev-del", {"node-name": node}):
                return
        self.f0 = False
        for argv in tools:
            self.both_tools(argv)
        file: Any = {"driver": "file", "filename": "DIR/img"}
        if file_by_name:
            self.f0 = "return" in self.both("blockdev-add", {**file, "node-name": "f0"})
            file = "f0"
        options: dict[str, Any] = {"driver": "qcow2", "node-name": "drive0", "file": file}
        if read_only is not None:
            options["read-only"] = read_only
        self.both("blockdev-add", options)
        self.both("blockdev-add", {"driver": "qcow2", "node-name": "v2", "backing": "drive0",
                                   "discard": "unmap",
                                   "file": {"driver": "file", "filename": "DIR/v2"}})

    def both_tools(self, argv: tuple[str, ...]) -> None:
        """One ``qemu-img`` run on each side: exit status and output must be equal."""
        results = []
        for backend, d in zip(self.backends, self.dirs, strict=True):
            result = self.run(backend.qemu_img(*normalize_in(list(argv), str(d))))
            output: Any = result.output
            if argv[1] == "--output=json" and result.status in (0, 2, 3):
                output = json.loads(output)
                if "img" in self.backup_targets:   # where QEMU's workers put clusters
                    output.pop("fragmented-clusters", None)
            results.append((result.status, normalize(output, tuple(map(str, self.dirs)))))
        assert results[0] == results[1], f"qemu-img {argv}: qemu {results[0]} " \
                                         f"!= emulator {results[1]}"
        event(f"qemu-img {argv[0]} {'ok' if results[0][0] == 0 else 'failed'}")

    @rule(command=st.sampled_from(["blockdev-snapshot-sync", "blockdev-snapshot",
                                   "transaction"]),
          # not null0: reading through it (copy-on-write from a backing null-co node)
          # gives whatever QEMU's buffer held — heap bytes in the overlay
          node=st.sampled_from(["drive0", "drive0", "v2", "dbg", "snap"]),
          fmt=st.sampled_from([None, None, "qcow2", "raw"]),
          mode=st.sampled_from([None, "absolute-paths", "existing"]),
          abort=st.booleans())
    def snapshot(self, command: str, node: str, fmt: str | None, mode: str | None,
                 abort: bool) -> None:
        """An external snapshot: the overlay — a new image (-sync, alone or in a
        transaction with a bitmap and maybe an abort) or a node added without a backing
        file — takes the node's place for its parents and gets it as backing."""
        if command == "blockdev-snapshot":
            self.both_tools(("create", "-q", "-f", "qcow2", "DIR/snap", str(SIZE)))
            self.both("blockdev-add", {"driver": "qcow2", "node-name": "snap", "backing": None,
                                       "file": {"driver": "file", "filename": "DIR/snap"}})
            reply = self.both(command, {"node": node, "overlay": "snap"})
        else:
            data = {k: v for k, v in {"node-name": node, "snapshot-file": "DIR/snap",
                                      "snapshot-node-name": "snap", "format": fmt,
                                      "mode": mode}.items() if v is not None}
            if command == "transaction":
                actions = [{"type": "blockdev-snapshot-sync", "data": data},
                           {"type": "block-dirty-bitmap-add",
                            "data": {"node": node, "name": "s"}}]
                reply = self.both(command, {"actions": actions + [
                    {"type": "abort", "data": {}}] * abort})
            else:
                reply = self.both(command, data)
        event(f"{command} {'done' if 'return' in reply else 'refused'}")

    # -- fault injection ---------------------------------------------------------------------
    @precondition(lambda self: not self.has_dbg)
    @rule(inject=INJECT_RULES, set_state=SET_STATE_RULES)
    def add_dbg(self, inject: list[dict[str, Any]], set_state: list[dict[str, Any]]) -> None:
        """A qcow2 node over blkdebug: its rules fail guest writes, flushes and backups."""
        blkdebug: dict[str, Any] = {"driver": "blkdebug", "inject-error": inject,
                                    "image": {"driver": "file", "filename": "DIR/faulty"}}
        if set_state:
            blkdebug["set-state"] = set_state
        reply = self.both("blockdev-add", {"driver": "qcow2", "node-name": "dbg",
                                           "file": blkdebug})
        self.has_dbg = "return" in reply
        self.dbg_permanent = any(not r.get("once") for r in inject)

    @rule(inject=INJECT_RULES, set_state=SET_STATE_RULES,
          sync=st.sampled_from(["full", "top", "bitmap"]),
          dest=st.sampled_from(["null0", "v2", "drive0"]),
          on_error=st.sampled_from([None, "report", "ignore", "stop", "enospc"]),
          workers=st.sampled_from([None, 1]))
    def faulty_backup(self, inject: list[dict[str, Any]], set_state: list[dict[str, Any]],
                      sync: str, dest: str, on_error: str | None, workers: int | None) -> None:
        """A backup of a node over fresh blkdebug rules (what 257 does, at random)."""
        if self.has_dbg:
            self.delete("dbg")
        self.add_dbg(inject, set_state)
        if sync == "bitmap":
            self.add("dbg", "fb", None, None, None)
            self.write(0x44, 1800, 100, "dbg")
        self.backup(sync, "fb" if sync == "bitmap" else None, None, None, None, "dbg", dest,
                    None, on_error, workers)

    @rule(node=NODES)
    def flush(self, node: str) -> None:
        assume(not self.mirror_pending())
        self.both("human-monitor-command", {"command-line": f'qemu-io {node} "flush"'})

    # -- jobs --------------------------------------------------------------------------------
    @rule(sync=st.sampled_from(["full", "full", "top", "bitmap", "incremental"]),
          bitmap=st.sampled_from([None, None, "a", "b"]),
          mode=st.sampled_from([None, None, "on-success", "always", "never"]),
          finalize=OPT_BOOL, dismiss=OPT_BOOL,
          source=st.sampled_from(["drive0", "dbg", "dbg"]),
          dest=st.sampled_from(["null0", "null0", "null0", "drive0", "v2", "dbg"]),
          filter_name=st.sampled_from([None, "cbw"]),
          on_error=st.sampled_from([None, None, "report", "ignore", "stop", "enospc"]),
          workers=st.sampled_from([None, 1]))
    def backup(self, sync: str, bitmap: str | None, mode: str | None, finalize: bool | None,
               dismiss: bool | None, source: str, dest: str, filter_name: str | None,
               on_error: str | None, workers: int | None) -> None:
        """blockdev-backup. With x-perf max-workers=1 QEMU's block-copy runs one task at a
        time, as the emulator always does: the target's layout is then QEMU's to the byte
        (compared at the end); with its 64 workers only the guest data is."""
        # a job that ignores an error which never goes away retries for ever, in QEMU too
        # (25,000 BLOCK_JOB_ERROR events a second)
        assume(not (on_error == "ignore" and self.dbg_permanent and "dbg" in (source, dest)))
        args = {"job-id": "j", "device": source, "target": dest, "sync": sync,
                "bitmap": bitmap, "bitmap-mode": mode, "auto-finalize": finalize,
                "auto-dismiss": dismiss, "filter-node-name": filter_name,
                "on-source-error": on_error, "on-target-error": on_error,
                "x-perf": {"max-workers": workers} if workers else None}
        reply = self.both("blockdev-backup", {k: v for k, v in args.items() if v is not None})
        if "return" in reply and not workers:
            self.backup_targets.add({"drive0": "img", "dbg": "faulty"}.get(dest, dest))
        event(("serial backup" if workers else "backup") +
              (" started" if "return" in reply else " refused"))
        self.same_events()

    @rule(sync=st.sampled_from(["full", "top", "none", "bitmap"]),
          source=st.sampled_from(["drive0", "v2", "dbg"]),
          mode=st.sampled_from([None, "absolute-paths", "existing"]),
          fmt=st.sampled_from([None, "qcow2", "raw"]),
          on_error=st.sampled_from([None, "report", "stop"]))
    def drive_backup(self, sync: str, source: str, mode: str | None, fmt: str | None,
                     on_error: str | None) -> None:
        """The legacy command: the target image is made (qemu-img create semantics, a
        backing file for sync=top and none) or opened — its file locked as file-posix locks
        it, so a target still in use refuses a second one — then the job runs as
        blockdev-backup's."""
        args = {"job-id": "j", "device": source, "target": "DIR/db", "sync": sync,
                "bitmap": "a" if sync == "bitmap" else None, "mode": mode, "format": fmt,
                "on-source-error": on_error, "on-target-error": on_error}
        reply = self.both("drive-backup", {k: v for k, v in args.items() if v is not None})
        event("drive-backup started" if "return" in reply else "drive-backup refused")
        if sync == "none" and "return" in reply:   # it copies until cancelled (fleecing)
            self.both("job-cancel", {"id": "j"})
        self.same_events()

    @rule(command=st.sampled_from(["blockdev-mirror", "blockdev-mirror", "drive-mirror"]),
          sync=st.sampled_from(["full", "full", "top", "none", "incremental"]),
          source=st.sampled_from(["drive0", "drive0", "v2", "dbg"]),
          dest=st.sampled_from(["null0", "null0", "drive0", "v2", "dbg"]),
          mode=st.sampled_from([None, "absolute-paths", "existing"]),
          copy_mode=st.sampled_from([None, "background", "write-blocking"]),
          granularity=st.sampled_from([None, None, 4096, 65536, 1000]),
          filter_name=st.sampled_from([None, "mt"]),
          finalize=OPT_BOOL, dismiss=OPT_BOOL,
          on_error=st.sampled_from([None, None, "report", "stop", "enospc"]),
          ending=st.sampled_from([None, "job-complete", "block-job-cancel", "job-cancel"]))
    def mirror(self, command: str, sync: str, source: str, dest: str, mode: str | None,
               copy_mode: str | None, granularity: int | None, filter_name: str | None,
               finalize: bool | None, dismiss: bool | None, on_error: str | None,
               ending: str | None) -> None:
        """blockdev-mirror into a node, or drive-mirror into a new image: copied until
        READY, then left mirroring (guest writes go on; the job verbs end it later) or
        ended at once by a completion (the pivot) or a cancel."""
        args: dict[str, Any] = {"job-id": "j", "device": source, "sync": sync,
                                "granularity": granularity,
                                "auto-finalize": finalize, "auto-dismiss": dismiss,
                                "on-source-error": on_error, "on-target-error": on_error}
        if command == "blockdev-mirror":
            args.update({"target": dest, "filter-node-name": filter_name,
                         "copy-mode": copy_mode})
        else:
            args.update({"target": "DIR/db", "mode": mode})
        if "dbg" in (source, args["target"]):
            # one operation in flight (a one-chunk buffer), or which of QEMU's 16 parallel
            # operations meet a blkdebug error first varies from run to run
            args.update({"granularity": 65536, "buf-size": 65536})
        reply = self.both(command, {k: v for k, v in args.items() if v is not None})
        event(f"{command} {'started' if 'return' in reply else 'refused'}")
        if "return" in reply:   # QEMU's mirror keeps up to 16 operations in flight
            self.backup_targets.add("db" if command == "drive-mirror" else
                                    {"drive0": "img", "dbg": "faulty"}.get(dest, dest))
            self.mirroring = copy_mode != "write-blocking"
        self.same_events()
        if ending is not None:
            self.job_verb(ending)

    @rule(verb=st.sampled_from(["job-cancel", "job-finalize", "job-dismiss", "job-pause",
                                "job-resume", "job-complete", "block-job-cancel"]))
    def job_verb(self, verb: str) -> None:
        reply = self.both(verb, {"device" if verb.startswith("block-") else "id": "j"})
        event(f"{verb} {'accepted' if 'return' in reply else 'refused'}")
        self.same_events()

    def mirror_in(self, *statuses: str) -> bool:
        """Whether QEMU has a mirror in one of ``statuses``."""
        return any(j["type"] == "mirror" and j["status"] in statuses for j in
                   self.run(self.backends[0].execute("query-jobs", {}))["return"])

    def mirror_pending(self) -> bool:
        """A mirror waiting in pending keeps its source drained: guest I/O to it would hang
        QEMU's monitor for ever (test_mirror_jobs.py pins what the emulator does)."""
        return self.mirror_in("pending")

    def mirror_catches_up(self) -> None:
        """A mirror in READY copies what a guest write dirtied when it next wakes (every
        100 ms, on both sides): its bitmap's count is compared once it has."""
        if self.mirroring and self.mirror_in("ready", "standby"):
            self.run(asyncio.sleep(0.25))

    def same_events(self) -> None:
        """Both backends' events until their jobs rest: the same list, in the same order."""
        lists = [self.run(self.events_until_quiet(b)) for b in self.backends]
        assert lists[0] == lists[1], f"events: qemu {lists[0]} != emulator {lists[1]}"
        for e in lists[0]:
            if e["event"] == "BLOCK_JOB_ERROR" or "error" in e.get("data", {}):
                event(f"{e['event']} {e['data'].get('error', e['data'].get('action'))}")

    async def events_until_quiet(self, backend: Backend) -> list[Any]:
        moving = {"created", "running", "waiting", "aborting"}
        events = []
        for _ in range(400):
            while not backend.events.empty():
                events.append(normalize(dict(await backend.events.get()),
                                        tuple(map(str, self.dirs))))
            jobs = (await backend.execute("query-jobs", {})).get("return", [])
            if not any(j["status"] in moving for j in jobs) and backend.events.empty():
                await asyncio.sleep(0.005)   # a finishing transition may still be in flight
                if backend.events.empty():
                    return events
            await asyncio.sleep(0.005)
        raise AssertionError(f"{backend.name}: jobs still moving: {jobs}")

    @invariant()
    def same_bitmap_listing(self) -> None:
        self.listing = self.both("query-named-block-nodes", {}).get("return", [])


class _WireCount:
    events = 0            # events received so far
    events_at_reply = 0   # ... when the last reply came


def _count_wire(backend: Backend) -> _WireCount:
    """Count the events that reach the client before each reply: the order on the wire,
    which qemu.qmp's inbound hook sees (as tests/emulator/qemu_runner.WireClient does)."""
    count = _WireCount()
    qmp = backend.qmp
    assert qmp is not None
    inbound = qmp._cb_inbound

    def hook(msg: Any) -> Any:
        msg = inbound(msg)
        if "event" in msg:
            count.events += 1
        elif "return" in msg or "error" in msg:
            count.events_at_reply = count.events
        return msg

    qmp._cb_inbound = hook  # type: ignore[method-assign]
    return count


def one_cluster(sector: int, length: int) -> bool:
    """A guest write inside one cluster is one qcow2 task. A longer one may be several
    stretches, which QEMU runs as concurrent tasks (each to its first I/O before the next
    starts) and the emulator one after the other: blkdebug rules armed by an event would see
    the order differ (docs/qemu-semantics.md §20 says what is and is not emulated)."""
    return sector * 512 // 65536 == (sector * 512 + length - 1) // 65536


def remove_dirs(dirs: list[Path]) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def remove_leftovers(dirs: list[Path], backends: list[Backend]) -> None:
    """What teardown would have closed: a QEMU still running, its socket directory."""
    for backend in backends:
        proc, sock_dir = getattr(backend, "proc", None), getattr(backend, "sock_dir", None)
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        if sock_dir:
            shutil.rmtree(sock_dir, ignore_errors=True)
    remove_dirs(dirs)


def top_layer(path: Path) -> str:
    """The image without its backing chain (a drive-backup target's backing file may be a
    node over blkdebug, whose rules would fail the reads)."""
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                                     capture_output=True, text=True, check=True).stdout)
    if info["format"] != "qcow2" or "backing-filename" not in info:
        return str(path)
    return "json:" + json.dumps({"driver": "qcow2", "backing": None,
                                 "file": {"driver": "file", "filename": str(path)}})


def normalize_in(arguments: Any, directory: str) -> Any:
    if isinstance(arguments, dict):
        return {k: normalize_in(v, directory) for k, v in arguments.items()}
    if isinstance(arguments, list):
        return [normalize_in(v, directory) for v in arguments]
    if isinstance(arguments, str):
        return arguments.replace("DIR/", directory + "/")
    return arguments


# QMPREPLAY_DIFF_EXAMPLES=2000 explores further, at random (tox -e fuzz does); the suite
# keeps it short and the same on every run (derandomized), so it checks rather than explores.
EmulatorAgreesWithQemu.TestCase.settings = settings(
    max_examples=int(os.environ.get("QMPREPLAY_DIFF_EXAMPLES", "60")),
    derandomize="QMPREPLAY_DIFF_EXAMPLES" not in os.environ,
    stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestEmulatorAgreesWithQemu = EmulatorAgreesWithQemu.TestCase
