"""``qmpreplay regen`` and pytest ``--regen``/``--strict-goldens``, on real QEMU (and the
emulator where it is ready): goldens are restored byte for byte, untouched goldens keep their
bytes and mtime, and nothing is written from a run that had a backend fault."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.transcript.format import log_command, log_json
from tests.conftest import GOLDENS, requires_qemu, requires_qemu_img

ROOT = GOLDENS.parent
OLD = 1_000_000_000          # an mtime no write can produce by accident


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, check=False, cwd=cwd)


def project(tmp_path: Path, *names: str) -> Path:
    """A copy of goldens (and their recipes) laid out as a project: goldens/ and cases/."""
    (tmp_path / "goldens").mkdir()
    (tmp_path / "cases").mkdir()
    for name in names:
        shutil.copy(GOLDENS / f"{name}.out", tmp_path / "goldens")
        if (ROOT / "cases" / f"{name}.toml").exists():
            shutil.copy(ROOT / "cases" / f"{name}.toml", tmp_path / "cases")
    return tmp_path / "goldens"


def break_257(path: Path) -> None:
    """Change two numbers: an event's ``len`` and a bitmap dump's ``count``."""
    text = path.read_text()
    text = text.replace('"len": 393216, "offset": 65536', '"len": 458752, "offset": 65536', 1)
    at = text.index('"count": 393216')
    text = text[:at] + '"count": 327680' + text[at + len('"count": 393216'):]
    path.write_text(text)
    os.utime(path, (OLD, OLD))


def regen_restores_257(tmp_path: Path, backend: str) -> None:
    golden = project(tmp_path, "257") / "257.out"
    break_257(golden)
    broken = golden.read_bytes()

    shown = cli("regen", str(golden), "--backend", backend)
    assert shown.returncode == 1, shown.stderr[-2000:]
    assert golden.read_bytes() == broken and golden.stat().st_mtime == OLD
    assert "root['data']['len']: 458752 → 393216" in shown.stdout
    assert "root['bitmaps']['drive0'][0]['count']: 327680 → 393216" in shown.stdout
    assert "2 of 22 sections changed" in shown.stdout and "not written" in shown.stdout

    accepted = cli("regen", str(golden), "--backend", backend, "--accept")
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    assert "golden rewritten" in accepted.stdout
    assert golden.read_bytes() == (GOLDENS / "257.out").read_bytes()
    assert not list(golden.parent.glob(".*.tmp"))


@requires_qemu
@requires_qemu_img
def test_regen_accept_restores_257_byte_for_byte_on_qemu(tmp_path: Path) -> None:
    regen_restores_257(tmp_path, "qemu")


def test_regen_accept_restores_257_byte_for_byte_on_the_emulator(tmp_path: Path) -> None:
    regen_restores_257(tmp_path, "emulator")


@requires_qemu
def test_untouched_golden_keeps_its_bytes_and_mtime(tmp_path: Path) -> None:
    golden = project(tmp_path, "283") / "283.out"
    os.utime(golden, (OLD, OLD))
    proc = cli("regen", str(golden), "--backend", "qemu", "--accept")
    assert proc.returncode == 0, proc.stderr
    assert "reproduced exactly" in proc.stdout and "unchanged" in proc.stdout
    assert golden.stat().st_mtime == OLD
    assert golden.read_bytes() == (GOLDENS / "283.out").read_bytes()


def golden(*steps: tuple[str, dict[str, object], object]) -> str:
    """Commands as qmp_log prints them, each followed by the reply the golden claims."""
    return "".join(f"{log_command(name, args)}\n{log_json(reply)}\n"
                   for name, args, reply in steps)


CHANGED = {"return": {"changed": "so that a rewrite would happen"}}
GIB = 1 << 30
CRASH = golden(("blockdev-add", {"driver": "null-co", "node-name": "a"}, CHANGED),
               ("quit", {}, {"return": {}}),
               ("query-block-jobs", {}, {"return": []}))
STUCK = golden(("blockdev-add", {"driver": "null-co", "node-name": "src", "size": GIB}, CHANGED),
               ("blockdev-add", {"driver": "null-co", "node-name": "dst", "size": GIB},
                {"return": {}}),
               ("blockdev-backup", {"device": "src", "job-id": "slow", "speed": 1,
                                    "sync": "full", "target": "dst"}, {"return": {}}),
               ("query-block-jobs", {}, {"return": []}))


@requires_qemu
@pytest.mark.parametrize(("text", "recipe", "why"), [
    (CRASH, "", "connection lost"),
    (STUCK, "timeout = 1\n", "jobs not at rest"),
], ids=["qemu-gone", "stuck-job"])
def test_no_golden_is_written_from_a_run_with_a_backend_fault(
        tmp_path: Path, text: str, recipe: str, why: str) -> None:
    golden = tmp_path / "fault.out"
    golden.write_text(text)
    os.utime(golden, (OLD, OLD))
    (tmp_path / "fault.toml").write_text(recipe)
    proc = cli("regen", str(golden), "--backend", "qemu", "--recipe",
               str(tmp_path / "fault.toml"), "--accept")
    assert proc.returncode == 2
    assert f"regen: not writing {golden}" in proc.stderr and "backend fault" in proc.stderr
    assert why in proc.stderr
    assert "Traceback" not in proc.stderr
    assert golden.read_text() == text and golden.stat().st_mtime == OLD


def test_a_malformed_golden_is_one_line_exit_2(tmp_path: Path) -> None:
    golden = tmp_path / "bad.out"
    golden.write_text('{"execute": "query-jobs"}\n{"return": [}\n')
    proc = cli("regen", str(golden), "--backend", "emulator", "--accept")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"{golden}:2: ") and proc.stderr.count("\n") == 1
    assert golden.read_text() == '{"execute": "query-jobs"}\n{"return": [}\n'


# -- the pytest plugin ------------------------------------------------------------------------
def pytest_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "-q", *args], capture_output=True, text=True, check=False,
                          cwd=tmp_path)


@requires_qemu
@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["in-process", "xdist"])
def test_pytest_regen_rewrites_only_changed_goldens(tmp_path: Path, workers: list[str]) -> None:
    goldens = project(tmp_path, "283", "236")
    changed = goldens / "283.out"
    changed.write_text(changed.read_text().replace("node-name='backup-filter'",
                                                   "node-name='elsewhere'"))
    for path in goldens.iterdir():
        os.utime(path, (OLD, OLD))
    proc = pytest_run(tmp_path, "goldens", "--qmp-backend", "qemu", "--regen", *workers)
    assert proc.returncode == 1, proc.stdout[-3000:]      # the changed section still fails
    assert "1 failed, 2 passed" in proc.stdout
    assert f"{changed}: rewritten (1 of 2 sections that ran changed)" in proc.stdout
    assert changed.read_bytes() == (GOLDENS / "283.out").read_bytes()
    untouched = goldens / "236.out"
    assert f"{untouched}: reproduced (1 sections ran); unchanged" in proc.stdout
    assert untouched.stat().st_mtime == OLD


@requires_qemu
def test_pytest_regen_keeps_the_sections_a_run_did_not_select(tmp_path: Path) -> None:
    goldens = project(tmp_path, "283")
    golden = goldens / "283.out"
    text = golden.read_text().replace("node-name='backup-filter'", "node-name='elsewhere'")
    text = text.replace('"size": 1048576}}\n{"return": {}}', '"size": 1048576}}\n'
                        '{"return": {"first": "section"}}', 1)
    golden.write_text(text)
    proc = pytest_run(tmp_path, "goldens", "--qmp-backend", "qemu", "--regen", "-k", "filter")
    assert "rewritten (1 of 1 sections that ran changed)" in proc.stdout, proc.stdout[-2000:]
    assert golden.read_text() == (GOLDENS / "283.out").read_text().replace(
        '"size": 1048576}}\n{"return": {}}', '"size": 1048576}}\n'
        '{"return": {"first": "section"}}', 1)


def test_strict_goldens_warns_about_unselected_sections_and_orphan_cases(
        tmp_path: Path) -> None:
    project(tmp_path, "283", "236")
    (tmp_path / "cases" / "orphan.toml").write_text("")
    (tmp_path / "cases" / "draft-only.j2").write_text("")
    proc = pytest_run(tmp_path, "goldens", "--strict-goldens", "-k", "236", "--co")
    assert "2 of 2 sections of 283.out not selected by this run: '283'; 'copy-before-write" \
        in proc.stdout, proc.stdout
    assert "236.out not selected" not in proc.stdout
    assert "recipe orphan.toml has no golden orphan.out" in proc.stdout
    assert "case template draft-only.j2 has no golden draft-only.out" in proc.stdout
    assert "recipe 236.toml" not in proc.stdout
    quiet = pytest_run(tmp_path, "goldens", "-k", "236", "--co")
    assert "GoldenCoverageWarning" not in quiet.stdout


@requires_qemu
def test_pytest_regen_never_writes_from_a_run_with_a_backend_fault(tmp_path: Path) -> None:
    (tmp_path / "goldens").mkdir()
    golden = tmp_path / "goldens" / "crash.out"
    golden.write_text(CRASH)
    os.utime(golden, (OLD, OLD))
    proc = pytest_run(tmp_path, "goldens", "--qmp-backend", "qemu", "--regen")
    assert proc.returncode == 1
    assert f"{golden}: not rewritten: 1 section(s) had a backend fault" in proc.stdout
    assert golden.read_text() == CRASH and golden.stat().st_mtime == OLD


@requires_qemu
def test_a_golden_its_recipe_skips_on_the_backend_is_left_alone(tmp_path: Path) -> None:
    golden = project(tmp_path, "283") / "283.out"
    (tmp_path / "cases" / "283.toml").write_text('[skip]\nqemu = "not on this host"\n')
    os.utime(golden, (OLD, OLD))
    proc = cli("regen", str(golden), "--backend", "qemu", "--accept")
    assert proc.returncode == 2
    assert proc.stderr.endswith("no section runs on qemu: not on this host\n")
    assert "skipped" in proc.stderr and golden.stat().st_mtime == OLD
