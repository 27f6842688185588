"""Replay on the emulator: the main job, through both transports, and as pytest items."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness.backends import make_factory
from harness.backends.base import Backend
from harness.replay.recipe import find_recipe
from harness.replay.runner import replay_transcript
from harness.transcript import parse_file
from tests.conftest import GOLDENS

EMULATED = ["257", "236", "254", "283"]


def replay(name: str, transport: str = "direct") -> str:
    path = GOLDENS / f"{name}.out"
    result = asyncio.run(replay_transcript(parse_file(path), find_recipe(path),
                                           make_factory("emulator", transport=transport)))
    failed = [(r.title, r.error, r.notes) for r in result.results if not r.passed]
    assert not failed, failed
    return result.actual_text()


@pytest.mark.parametrize("name", EMULATED)
def test_golden_passes_on_the_emulator_through_both_transports(name: str) -> None:
    """The direct transport is only a shortcut: the wire path must give the same transcript."""
    direct = replay(name, "direct")
    assert direct == (GOLDENS / f"{name}.out").read_text()
    assert replay(name, "socket") == direct


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, check=False, cwd=cwd)


def test_main_job_ends_with_22_passed() -> None:
    proc = cli("replay", str(GOLDENS / "257.out"))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.splitlines()[-1] == "22 passed, 0 failed"
    assert proc.stdout.count("\nPASS  ") + proc.stdout.startswith("PASS  ") == 22


def test_changed_bitmap_count_fails_on_its_line_on_the_emulator(tmp_path: Path) -> None:
    lines = (GOLDENS / "257.out").read_text().split("\n")
    index = next(i for i, ln in enumerate(lines) if '"count": 655360,' in ln)
    lines[index] = lines[index].replace("655360", "655361")
    (tmp_path / "257.out").write_text("\n".join(lines))
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "257.toml").write_text((GOLDENS.parent / "cases/257.toml").read_text())
    proc = cli("replay", str(tmp_path / "257.out"), "-k", "never with simulated")
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-1] == "0 passed, 1 failed"
    assert "root['bitmaps']['drive0'][0]['count']: 655361 → 655360" in proc.stdout


def run_pytest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:randomly", *args],
                          capture_output=True, text=True, check=False, cwd=GOLDENS.parent)


def test_pytest_collects_sections_as_items_named_after_their_titles() -> None:
    proc = run_pytest("goldens/257.out", "goldens/283.out", "--collect-only", "-q")
    items = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    assert len(items) == 24
    assert "goldens/257.out::Mode top; Bitmap Sync always with intermediate failure" in items
    assert "goldens/283.out::copy-before-write filter should be gone after job-finalize" in items


def test_pytest_runs_goldens_with_k_x_and_xdist() -> None:
    proc = run_pytest("goldens/257.out", "--qmp-backend", "emulator", "-k",
                      "always and intermediate", "-x", "-q")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "3 passed, 19 deselected" in proc.stdout
    proc = run_pytest("goldens/257.out", "goldens/236.out", "-n", "2", "-q")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "23 passed" in proc.stdout


def test_pytest_shows_the_diff_of_a_failing_section(tmp_path: Path) -> None:
    goldens = tmp_path / "goldens"
    goldens.mkdir()
    text = (GOLDENS / "283.out").read_text().replace("'write'", "'resize'")
    (goldens / "283.out").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "pytest", str(goldens), "-q",
                           "-p", "no:cacheprovider"], capture_output=True, text=True,
                          check=False, cwd=tmp_path)
    assert proc.returncode == 1
    assert "1 failed, 1 passed" in proc.stdout
    assert "@@ 283.out:" in proc.stdout and "root['error']['desc']" in proc.stdout


def test_a_worker_that_dies_fails_only_the_section_it_held(tmp_path: Path) -> None:
    """A forked worker killed mid-run (SIGKILL, as the OOM killer would): its section fails
    with the signal named, the other worker replays every other section, and its test
    directory is removed all the same."""
    emulator = make_factory("emulator")
    parent = os.getpid()
    flag = tmp_path / "killed"

    def make(test_dir: Path) -> Backend:
        if os.getpid() != parent:
            try:
                os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        return emulator.make(test_dir)

    factory = dataclasses.replace(emulator, make=make)
    path = GOLDENS / "257.out"
    tempfile.tempdir = str(tmp_path)   # where the run's scratch directory goes
    try:
        result = asyncio.run(replay_transcript(parse_file(path), find_recipe(path), factory,
                                               jobs=2, keyword="Mode top"))
    finally:
        tempfile.tempdir = None
    errors = [r.error for r in result.results if not r.passed]
    assert errors == ["the worker process replaying this section died (signal 9)"]
    assert sum(r.passed for r in result.results) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["killed"]   # no test directory is left


JOB_OUTCOME_GOLDEN = "\n".join([
    "=== blockdev-create outcomes ===",
    '{"execute": "blockdev-create", "arguments": {"job-id": "job0", "options": {"driver": '
    '"file", "filename": "TEST_DIR/PID-t.qcow2", "size": 0}}}',
    '{"return": {}}',
    '{"execute": "job-dismiss", "arguments": {"id": "job0"}}',
    '{"return": {}}',
    '{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": '
    '"TEST_DIR/PID-t.qcow2", "node-name": "node0"}}',
    '{"return": {}}',
    '{"execute": "blockdev-create", "arguments": {"job-id": "job0", "options": {"driver": '
    '"qcow2", "file": "node0", "size": 1234}}}',
    '{"return": {}}',
    "Job failed: Image size must be a multiple of 512 bytes",
    '{"execute": "job-dismiss", "arguments": {"id": "job0"}}',
    '{"return": {}}',
    '{"execute": "blockdev-create", "arguments": {"job-id": "job0", "options": {"driver": '
    '"qcow2", "file": "node0", "size": 1048576}}}',
    '{"return": {}}',
    '{"execute": "job-dismiss", "arguments": {"id": "job0"}}',
    '{"return": {}}', ""])


@pytest.mark.parametrize("golden,passes", [
    (JOB_OUTCOME_GOLDEN, True),
    # the failure left out: the emulator's job still fails, and says so
    (JOB_OUTCOME_GOLDEN.replace("Job failed: Image size must be a multiple of 512 bytes\n",
                                ""), False),
    # a failure claimed where the job succeeds, and another text
    (JOB_OUTCOME_GOLDEN.replace('"size": 1048576}}}\n{"return": {}}\n',
                                '"size": 1048576}}}\n{"return": {}}\nJob failed: x\n'), False),
    (JOB_OUTCOME_GOLDEN.replace("multiple of 512", "multiple of 4096"), False),
], ids=["as-golden", "failure-left-out", "failure-claimed", "other-text"])
def test_blockdev_create_outcomes_are_recomputed(tmp_path: Path, golden: str,
                                                 passes: bool) -> None:
    """iotests' blockdev_create waits with run_job: "Job failed: <error>" when the job aborts,
    nothing when it succeeds. The replayer recomputes that line from the backend's job, so a
    golden that says otherwise fails (it used to be copied as free text)."""
    path = tmp_path / "create.out"
    path.write_text(golden)
    result = asyncio.run(replay_transcript(parse_file(path), find_recipe(path),
                                           make_factory("emulator")))
    assert [r.passed for r in result.results] == [passes]
