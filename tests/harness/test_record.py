"""``qmpreplay record``: case templates render to draft goldens; recording replays the draft
and keeps what really happened; the result replays with no recipe at all."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.record import render_template
from harness.transcript import parse
from tests.conftest import GOLDENS, requires_qemu, requires_qemu_img

ROOT = GOLDENS.parent
TEMPLATE = ROOT / "cases" / "backup-matrix.j2"
SHIPPED = GOLDENS / "backup-matrix.out"
SECTIONS = 23      # 7 valid sync/bitmap-mode pairs, 3 failures each, and 2 rejected pairs


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, check=False)


def template(tmp_path: Path, text: str, name: str = "case.j2") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_the_shipped_template_renders_a_fully_visible_draft() -> None:
    draft = render_template(TEMPLATE)
    transcript = parse(draft.text, "backup-matrix.out")
    assert len(transcript.sections()) == SECTIONS
    kinds = transcript.kinds()
    assert kinds["bare-result"] == 0 and kinds["qemu-io"] == 0   # nothing hidden
    assert kinds["bitmap-check"] > 0 and kinds["image-compare"] == 2 * 21
    assert len(draft.lines) == len(draft.text.splitlines())


@requires_qemu
@requires_qemu_img
def test_recording_the_template_on_qemu_gives_the_shipped_golden(tmp_path: Path) -> None:
    out = tmp_path / "backup-matrix.out"
    proc = cli("record", str(TEMPLATE), "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"recorded {SECTIONS} sections" in proc.stdout
    assert "expectation not met" not in proc.stderr        # the template's claims hold
    assert out.read_bytes() == SHIPPED.read_bytes()

    replayed = cli("replay", str(out), "--backend", "qemu")
    assert replayed.stdout.splitlines()[-1] == f"{SECTIONS} passed, 0 failed", \
        replayed.stdout[-3000:]

    os.utime(out, (1_000_000_000, 1_000_000_000))
    again = cli("record", str(TEMPLATE), "-o", str(out))
    assert again.returncode == 0 and "(unchanged)" in again.stdout
    assert out.stat().st_mtime == 1_000_000_000


def test_the_shipped_golden_replays_on_the_emulator() -> None:
    proc = cli("replay", str(SHIPPED), "--backend", "emulator")
    assert proc.stdout.splitlines()[-1] == f"{SECTIONS} passed, 0 failed", proc.stdout[-3000:]


@requires_qemu
def test_recording_recomputes_observations_and_inserts_unexpected_events(
        tmp_path: Path) -> None:
    case = template(tmp_path, """\
        === two jobs, one of them announced ===

        {% for node in ["a", "b", "c"] %}
        {{ qmp("blockdev-add", {"driver": "null-co", "node-name": node, "size": 1048576}) }}
        {% endfor %}
        {{ qmp("blockdev-backup", {"device": "a", "job-id": "j1", "sync": "full", "target": "b"}) }}
        {{ event("BLOCK_JOB_COMPLETED", device="j1") }}
        {{ qmp("blockdev-backup", {"device": "a", "job-id": "j2", "sync": "full", "target": "c"}) }}
        {{ qmp("query-block-jobs") }}
        {{ qmp("blockdev-add", {"driver": "null-co", "node-name": "a"}) }}
        """)
    out = tmp_path / "case.out"
    proc = cli("record", str(case), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert lines[10].startswith('{"data": {"device": "j1", "len": 1048576, "offset": 1048576')
    # j2's completion was not in the draft: it is shown where it arrived (during the
    # command that started j2, so after that command's reply)
    j2 = next(i for i, ln in enumerate(lines) if '"device": "j2"' in ln)
    assert '"job-id": "j2"' in lines[j2 - 2] and lines[j2 - 1] == '{"return": {}}'
    assert parse(out.read_text(), out).kinds()["bare-result"] == 0
    assert lines[-1] == ('{"error": {"class": "GenericError", "desc": '
                         '"Duplicate nodes with node-name=\'a\'"}}')
    replayed = cli("replay", str(out), "--backend", "qemu")
    assert replayed.returncode == 0, replayed.stdout


@requires_qemu
def test_unmet_expectations_are_recorded_as_errors_and_reported(tmp_path: Path) -> None:
    case = template(tmp_path, """\
        === a bitmap that is not as dirty as claimed ===

        {{ qmp("blockdev-add", {"driver": "null-co", "node-name": "drive0", "size": 1048576}) }}
        {{ qmp("block-dirty-bitmap-add", {"granularity": 65536, "name": "b0", "node": "drive0"}) }}
        {{ qemu_io("drive0", "write 0 128k") }}
        {{ check_bitmap("b0", 3) }}
        """)
    out = tmp_path / "case.out"
    proc = cli("record", str(case), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().endswith("expecting 3 dirty sectors; have 2. ERROR!\n")
    assert f"{out}:10: expectation not met: expecting 3 dirty sectors; have 2. ERROR!" \
        in proc.stderr


@requires_qemu
def test_no_golden_is_recorded_from_a_run_with_a_backend_fault(tmp_path: Path) -> None:
    case = template(tmp_path, """\
        {{ qmp("quit") }}
        {{ qmp("query-block-jobs") }}
        """)
    out = tmp_path / "case.out"
    proc = cli("record", str(case), "-o", str(out))
    assert proc.returncode == 2
    assert "not writing" in proc.stderr and "connection lost" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(("text", "line", "what"), [
    ("=== s ===\n\n{{ qmp('query-jobs') }}\n{{ nowhere }}\n", 4, "'nowhere' is undefined"),
    ("{% for x in [1] %}\n{{ qmp('query-jobs' }}\n{% endfor %}\n", 2, "does not parse"),
    ("=== s ===\n\n{{ qmp('query-jobs') }}\n{\"execute\": nope}\n", 4,
     "starts like JSON but does not parse"),
    ("=== s ===\n\n{% for i in range(2) %}\n{{ qmp('query-jobs') }}\n{% endfor %}\n{}\n", 6,
     "bare result '{}' with no command before it"),
    ("{{ check_bitmap('b', 1 // 0) }}\n", 1, "ZeroDivisionError"),
    ("just text\n", 1, "no runnable section"),
])
def test_a_bad_template_or_draft_is_template_line_exit_2(
        tmp_path: Path, text: str, line: int, what: str) -> None:
    case = template(tmp_path, text)
    out = tmp_path / "case.out"
    proc = cli("record", str(case), "-o", str(out), "--backend", "emulator")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"{case}:{line}: ") and what in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not out.exists()


def test_record_refuses_a_recipe_and_a_missing_template(tmp_path: Path) -> None:
    proc = cli("record", str(TEMPLATE), "-o", str(tmp_path / "x.out"), "--recipe", "r.toml")
    assert proc.returncode == 2 and "no recipe" in proc.stderr
    proc = cli("record", str(tmp_path / "absent.j2"), "-o", str(tmp_path / "x.out"))
    assert proc.returncode == 2
    assert proc.stderr == f"{tmp_path / 'absent.j2'}:1: cannot read the template: no such file\n"


def test_recording_on_the_emulator_gives_the_golden_qemu_recorded(tmp_path: Path) -> None:
    out = tmp_path / "backup-matrix.out"
    proc = cli("record", str(TEMPLATE), "-o", str(out), "--backend", "emulator")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes() == SHIPPED.read_bytes()
