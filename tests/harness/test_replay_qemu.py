"""Replay on real QEMU: the referee proves the replayer (and the replayer the goldens)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.backends import make_factory
from harness.replay.runner import replay_file
from tests.conftest import GOLDENS, requires_qemu

pytestmark = requires_qemu


def replay(path: Path, **kw: object) -> list:
    return asyncio.run(replay_file(path, make_factory("qemu"), **kw))  # type: ignore[arg-type]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, check=False, env=env)


def test_257_passes_every_section_on_qemu() -> None:
    proc = cli("replay", str(GOLDENS / "257.out"), "--backend", "qemu")
    assert proc.stdout.splitlines()[-1] == "22 passed, 0 failed", proc.stdout[-3000:]
    assert proc.returncode == 0


@pytest.mark.parametrize("name", ["219", "236", "254", "283"])
def test_qemu_goldens_pass(name: str) -> None:
    results = replay(GOLDENS / f"{name}.out")
    assert results and all(r.passed for r in results), [r.notes for r in results]


def test_intermediate_failures_are_deterministic() -> None:
    """The one-shot injected read error must fail the job in every run (-machine none -S)."""
    for _ in range(3):
        results = replay(GOLDENS / "257.out", keyword="intermediate failure")
        assert len(results) == 7
        assert all(r.passed for r in results), [r.title for r in results if not r.passed]


def test_changed_event_len_fails_on_its_line_with_a_deepdiff(tmp_path: Path) -> None:
    lines = (GOLDENS / "257.out").read_text().split("\n")
    # the BLOCK_JOB_COMPLETED of the failed backup in "never with intermediate failure"
    index = next(i for i, ln in enumerate(lines) if '"len": 393216, "offset": 65536' in ln)
    lines[index] = lines[index].replace('"len": 393216', '"len": 458752')
    golden = tmp_path / "257.out"
    golden.write_text("\n".join(lines))
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "257.toml").write_text((GOLDENS.parent / "cases/257.toml").read_text())
    proc = cli("replay", str(golden), "--backend", "qemu", "-k", "never with intermediate")
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-1] == "0 passed, 1 failed"
    assert f"@@ 257.out:{index - 2} @@" in proc.stdout or f"257.out:{index + 1}" in proc.stdout
    assert f"line {index + 1}: root['data']['len']: 458752 → 393216" in proc.stdout


def test_missing_qemu_is_one_line_naming_the_debian_packages() -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    proc = cli("replay", str(GOLDENS / "283.out"), "--backend", "qemu", env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert "qemu-system-x86_64 not found" in proc.stderr and "qemu-system-x86" in proc.stderr


@pytest.mark.parametrize("binary", ["/bin/false", "/nonexistent/qemu"])
def test_broken_qemu_binary_is_one_line_exit_2(binary: str) -> None:
    proc = cli("replay", str(GOLDENS / "283.out"), "--backend", "qemu", "--qemu-binary", binary)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and binary in proc.stderr
    assert "apt-get install -y qemu-system-x86 qemu-utils" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_junit_report(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    proc = cli("replay", str(GOLDENS / "283.out"), "--backend", "qemu", "--junit-xml",
               str(report))
    assert proc.returncode == 0
    text = report.read_text()
    assert 'tests="2"' in text and 'failures="0"' in text
    assert 'name="copy-before-write filter should be gone after job-finalize"' in text
