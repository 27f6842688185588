"""Differential testing, as fakeredis does it: the same random command sequences go to the
emulator and to real QEMU 7.2, and their replies, events and bitmap listings must agree.

A hypothesis state machine (bitmaps, transactions, guest writes, nodes, backup jobs and job
verbs) drives both backends through the harness's Backend interface
(qemu.qmp clients on both sides). Two inputs are left out because they crash QEMU 7.2.22
with SIGSEGV (both found by this test; see docs/qemu-semantics.md §4): a merge with an empty
source list, and a transaction that enables a bitmap that does not exist; what the emulator
answers instead is pinned by tests/emulator/test_bitmap_qmp.py::test_qemu_crashes_are_not_copied.
Any divergence this test finds becomes such a regression test and a fix in the emulator.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
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

NODES = st.sampled_from(["drive0", "drive0", "drive0", "v2", "null0", "nosuchnode"])
NAMES = st.sampled_from(["a", "b", "c", "a", ""])
GRANULARITIES = st.sampled_from([None, None, 512, 4096, 65536, 1 << 20, 1000, 256, 1 << 31])
OPT_BOOL = st.sampled_from([None, True, False])
SIZE = 4 << 20


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
        self.backends: list[Backend] = [QemuBackend(self.dirs[0]), EmulatorBackend(self.dirs[1])]
        for backend, d in zip(self.backends, self.dirs, strict=True):
            self.run(backend.qemu_img("create", "-f", "qcow2", str(d / "img"), str(SIZE)))
            self.run(backend.qemu_img("create", "-f", "qcow2", "-o", "compat=0.10",
                                      str(d / "v2"), str(SIZE)))
            self.run(backend.start(VmConfig()))
        self.both("blockdev-add", {"driver": "qcow2", "node-name": "drive0",
                                   "file": {"driver": "file", "filename": "DIR/img"}})
        # a version 2 overlay of drive0: no zero flag, discards refused over a backing file
        self.both("blockdev-add", {"driver": "qcow2", "node-name": "v2", "backing": "drive0",
                                   "discard": "unmap",
                                   "file": {"driver": "file", "filename": "DIR/v2"}})
        self.both("blockdev-add", {"driver": "null-co", "node-name": "null0", "size": SIZE})
        self.has_null = True

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def both(self, command: str, arguments: dict[str, Any]) -> Any:
        """Send to both; the normalized replies must be equal; return QEMU's."""
        replies = []
        for backend, d in zip(self.backends, self.dirs, strict=True):
            args = normalize_in(arguments, str(d))
            replies.append(normalize(self.run(backend.execute(command, args)),
                                     tuple(map(str, self.dirs))))
        assert replies[0] == replies[1], f"{command} {arguments}: qemu {replies[0]} " \
                                         f"!= emulator {replies[1]}"
        return replies[0]

    def teardown(self) -> None:
        try:
            for backend in self.backends:
                self.run(backend.shutdown())   # quit: every cache written back
                self.run(backend.close())
            self.loop.close()
            # drive0: QEMU's bytes, cluster for cluster, once both closed. v2 may be a
            # backup's target, whose host layout QEMU's block-copy workers make differently
            # from run to run (thread-pool completion order): its guest data must match
            img = [d / "img" for d in self.dirs]
            assert img[0].read_bytes() == img[1].read_bytes()
            compare = subprocess.run(["qemu-img", "compare",
                                      *(str(d / "v2") for d in self.dirs)],
                                     capture_output=True, text=True)
            assert compare.returncode == 0, compare.stdout + compare.stderr
        finally:   # a failing example leaves nothing behind either
            for d in self.dirs:
                shutil.rmtree(d, ignore_errors=True)

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
        self.both("human-monitor-command", {
            "command-line": f'qemu-io {node} "write -P 0x{pattern:02x} {sector * 512} {length}"'})

    @rule(node=NODES, sector=st.integers(0, SIZE // 512 - 1),
          sectors=st.sampled_from([1, 8, 128, 129, 300]),
          verb=st.sampled_from(["write -z", "write -z -u", "discard"]))
    def zero(self, node: str, sector: int, sectors: int, verb: str) -> None:
        length = min(sectors, SIZE // 512 - sector) * 512
        self.both("human-monitor-command", {
            "command-line": f'qemu-io {node} "{verb} {sector * 512} {length}"'})

    @precondition(lambda self: not getattr(self, "has_null", False))
    @rule(size=st.sampled_from([SIZE, 1 << 20]))
    def add_null(self, size: int) -> None:
        reply = self.both("blockdev-add", {"driver": "null-co", "node-name": "null0",
                                           "size": size})
        self.has_null = "return" in reply

    @rule(node=st.sampled_from(["null0", "drive0", "nosuchnode", "cbw"]))
    def delete(self, node: str) -> None:
        reply = self.both("blockdev-del", {"node-name": node})
        if "return" in reply and node == "null0":
            self.has_null = False

    # -- jobs --------------------------------------------------------------------------------
    @rule(sync=st.sampled_from(["full", "full", "top", "bitmap", "incremental"]),
          bitmap=st.sampled_from([None, None, "a", "b"]),
          mode=st.sampled_from([None, None, "on-success", "always", "never"]),
          finalize=OPT_BOOL, dismiss=OPT_BOOL,
          dest=st.sampled_from(["null0", "null0", "null0", "drive0", "v2"]),
          filter_name=st.sampled_from([None, "cbw"]))
    def backup(self, sync: str, bitmap: str | None, mode: str | None, finalize: bool | None,
               dismiss: bool | None, dest: str, filter_name: str | None) -> None:
        args = {"job-id": "j", "device": "drive0", "target": dest, "sync": sync,
                "bitmap": bitmap, "bitmap-mode": mode, "auto-finalize": finalize,
                "auto-dismiss": dismiss, "filter-node-name": filter_name}
        reply = self.both("blockdev-backup", {k: v for k, v in args.items() if v is not None})
        event("backup started" if "return" in reply else "backup refused")
        self.same_events()

    @rule(verb=st.sampled_from(["job-cancel", "job-finalize", "job-dismiss", "job-pause",
                                "job-resume", "job-complete"]))
    def job_verb(self, verb: str) -> None:
        reply = self.both(verb, {"id": "j"})
        event(f"{verb} {'accepted' if 'return' in reply else 'refused'}")
        self.same_events()

    def same_events(self) -> None:
        """Both backends' events until their jobs rest: the same list, in the same order."""
        lists = [self.run(self.events_until_quiet(b)) for b in self.backends]
        assert lists[0] == lists[1], f"events: qemu {lists[0]} != emulator {lists[1]}"

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


def normalize_in(arguments: Any, directory: str) -> Any:
    if isinstance(arguments, dict):
        return {k: normalize_in(v, directory) for k, v in arguments.items()}
    if isinstance(arguments, list):
        return [normalize_in(v, directory) for v in arguments]
    if isinstance(arguments, str):
        return arguments.replace("DIR/", directory + "/")
    return arguments


# QMPREPLAY_DIFF_EXAMPLES=2000 explores further (tox -e fuzz does); the suite keeps it short.
EmulatorAgreesWithQemu.TestCase.settings = settings(
    max_examples=int(os.environ.get("QMPREPLAY_DIFF_EXAMPLES", "60")),
    stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestEmulatorAgreesWithQemu = EmulatorAgreesWithQemu.TestCase
