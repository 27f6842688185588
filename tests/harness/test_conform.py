"""``qmpreplay conform``: the matrix of sections x {golden, emulator, QEMU…}, its verdicts,
the progress display, and the exit status (0 only if the emulator agrees with QEMU)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from harness.conform import EMULATOR, Column, Matrix, Row
from harness.replay.engine import PartResult
from harness.report import render_html, render_terminal
from harness.report.progress import Progress
from harness.transcript import parse
from tests.conftest import GOLDENS, requires_qemu

GOLDEN = """\
=== one ===

{"execute": "query-jobs", "arguments": {}}
{"return": []}

=== two ===

{"execute": "query-jobs", "arguments": {}}
{"return": []}
"""


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, check=False, env=env)


def result(part: object, actual: str, *, error: str | None = None,
           notes: list[str] | None = None) -> PartResult:
    records = list(part.records)  # type: ignore[attr-defined]
    got = parse(actual, "x.out").records if actual else []
    return PartResult("x.out", part.title, part.line, records, got, 0.1,  # type: ignore[attr-defined]
                      notes=notes or [], error=error)


def matrix(emulator: list[str], qemu: list[str], **faults: object) -> Matrix:
    transcript = parse(GOLDEN, "x.out")
    columns = [Column(EMULATOR, lambda d: None), Column("QEMU 7.2.22", lambda d: None, "/q")]
    m = Matrix(["x.out"], columns)   # type: ignore[arg-type]
    for part, emu, ref in zip(transcript.sections(), emulator, qemu, strict=True):
        row = Row("x.out", part.line, part.title, part)
        row.runs[EMULATOR] = result(part, emu, **faults.get(part.title, {}))  # type: ignore[arg-type]
        row.runs["QEMU 7.2.22"] = result(part, ref)
        m.rows.append(row)
    return m


def section(title: str, reply: str = "[]") -> str:
    return f'=== {title} ===\n\n{{"execute": "query-jobs", "arguments": {{}}}}\n' \
           f'{{"return": {reply}}}\n'


def test_agreement_is_identical_actual_transcripts_whatever_the_golden_says() -> None:
    golden_one, golden_two = section("one") + "\n", section("two")
    changed_two = section("two", '[{"id": "j"}]')
    m = matrix([golden_one, changed_two], [golden_one, changed_two])
    assert [r.state(EMULATOR) for r in m.rows] == ["pass", "fail"]
    assert [r.state("QEMU 7.2.22") for r in m.rows] == ["pass", "fail"]
    assert [r.agreement("QEMU 7.2.22") for r in m.rows] == ["same", "same"]
    assert m.all_agree
    m = matrix([golden_one, golden_two], [golden_one, changed_two])
    assert [r.agreement("QEMU 7.2.22") for r in m.rows] == ["same", "differs"]
    assert not m.all_agree and m.agreed("QEMU 7.2.22") == 1
    what = [d.what for d in m.rows[1].disagreements(m.qemus)]
    assert what == ["emulator vs QEMU 7.2.22 (− QEMU 7.2.22, + emulator)",
                    "QEMU 7.2.22 vs golden (− golden, + QEMU 7.2.22)"]


def test_a_fault_is_never_agreement_and_its_cause_is_shown() -> None:
    golden_one, golden_two = section("one") + "\n", section("two")
    m = matrix([golden_one, golden_two], [golden_one, golden_two],
               two={"notes": ["line 8: jobs not at rest after 60 s: j (running)"]})
    assert m.rows[1].state(EMULATOR) == "fault"
    assert m.rows[1].agreement("QEMU 7.2.22") == "fault" and not m.all_agree
    (only,) = m.rows[1].disagreements(m.qemus)
    assert only.notes == ["note: line 8: jobs not at rest after 60 s: j (running)"]


def test_a_skipped_section_counts_neither_way_and_says_why() -> None:
    golden_one, golden_two = section("one") + "\n", section("two")
    m = matrix([golden_one, ""], [golden_one, golden_two])
    m.rows[1].runs[EMULATOR].skipped = "drive-mirror is not emulated yet"
    assert m.rows[1].state(EMULATOR) == "skip"
    assert m.rows[1].agreement("QEMU 7.2.22") == "skip"
    assert m.rows[1].disagreements(m.qemus) == []
    assert m.all_agree and m.compared("QEMU 7.2.22") == 1 and m.skipped(EMULATOR) == 1
    text = render_terminal(m)
    assert text.splitlines()[2].split() == ["x.out:6", "two", "skipped", "pass", "skipped"]
    assert text.splitlines()[-1] == ("  emulator agrees with QEMU 7.2.22 in 1 of 1 sections "
                                     "both ran (1 skipped): conformant")
    assert "emulator skipped: drive-mirror is not emulated yet" in render_html(m)


def test_terminal_matrix_has_a_line_per_section_and_a_verdict() -> None:
    golden_one, golden_two = section("one") + "\n", section("two")
    text = render_terminal(matrix([golden_one, golden_two],
                                  [golden_one, section("two", "[1]")]))
    lines = text.splitlines()
    assert lines[0].split() == ["golden", "section", "emulator", "QEMU", "7.2.22", "emulator",
                                "=", "QEMU", "7.2.22"]
    assert lines[1].split() == ["x.out:1", "one", "pass", "pass", "same"]
    assert lines[2].split() == ["x.out:6", "two", "pass", "FAIL", "DIFFERS"]
    assert lines[-1] == "  emulator agrees with QEMU 7.2.22 in 1 of 2 sections: 1 disagree"


def test_progress_is_a_rewritten_line_on_a_tty_and_plain_lines_elsewhere() -> None:
    for tty in (True, False):
        out = io.StringIO()
        progress = Progress(2, out, tty=tty)
        progress.start("x.out:1", "one", "emulator")
        progress.done("x.out:1", "one", "emulator pass, QEMU pass")
        progress.start("x.out:6", "two", "QEMU")
        progress.done("x.out:6", "two", "emulator FAIL")
        progress.finish()
        if tty:
            assert out.getvalue().startswith("\r\033[K[0/2] x.out:1 one — emulator")
            assert "\n" not in out.getvalue() and out.getvalue().endswith("\r\033[K")
        else:
            assert out.getvalue() == ("[1/2] x.out:1 one: emulator pass, QEMU pass\n"
                                      "[2/2] x.out:6 two: emulator FAIL\n")


@requires_qemu
def test_conform_cli_against_a_version_matrix(tmp_path: Path, qemu_binary: str) -> None:
    """Two binaries make two QEMU columns, labelled by --version; exit 0 iff the emulator
    agrees with both everywhere."""
    second = tmp_path / "qemu-system-x86_64"
    second.symlink_to(qemu_binary)
    proc = cli("conform", str(GOLDENS / "283.out"), str(GOLDENS / "236.out"),
               "--qemu-binary", qemu_binary, "--qemu-binary", str(second))
    assert proc.returncode in (0, 1), proc.stderr
    header, *rows = proc.stdout.split("\n\n")[0].splitlines()
    assert "QEMU 7.2" in header and f"({second})" in header
    assert [r.split()[0] for r in rows] == ["283.out:1", "283.out:10", "236.out:1"]
    agree = re.findall(r"emulator agrees with (QEMU [^ ]+(?: \(.*\))?) in (\d+) of 3", proc.stdout)
    assert len(agree) == 2
    assert (proc.returncode == 0) == all(n == "3" for _, n in agree)
    progress = proc.stderr.splitlines()
    assert progress[0].startswith("[1/3] 283.out:1 283: emulator ")
    assert progress[-1].startswith("[3/3] 236.out:1 236: ")


def test_conform_without_qemu_is_one_line_exit_2() -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    proc = cli("conform", str(GOLDENS / "283.out"), env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "qemu-system-x86_64 not found" in proc.stderr


def test_images_are_compared_byte_for_byte_but_for_their_own_directory(tmp_path: Path) -> None:
    from harness.images import compare_images
    mine, ref = tmp_path / "qmpreplay-aaaaaaaa", tmp_path / "qmpreplay-bbbbbbbb"
    mine.mkdir()
    ref.mkdir()
    for d in (mine, ref):   # a backing file name holds the directory's own path
        (d / "1-top").write_bytes(b"QFI\xfb" + f"{d}/1-base".encode() + bytes(8))
        (d / "1-same").write_bytes(b"x" * 100)
    (ref / "qemu.log").write_text("QEMU's own log is not an image")
    (mine / "1-data").write_bytes(b"abcdef")
    (ref / "1-data").write_bytes(b"abcXef")
    (ref / "1-only-qemu").write_bytes(b"")
    images = compare_images(mine, ref, reference_label="QEMU 7.2.22")
    assert (images.compared, images.identical) == (4, 2)
    assert images.differences == ["1-data: first difference at byte 0x3",
                                  "1-only-qemu: not left by the emulator"]


def test_image_differences_make_a_section_disagree() -> None:
    from harness.images import ImageComparison
    m = matrix([section("one"), section("two")], [section("one"), section("two")])
    m.rows[1].images["QEMU 7.2.22"] = ImageComparison(2, ["PID-img: first difference at 0x0"])
    m.rows[0].images["QEMU 7.2.22"] = ImageComparison(1, [])
    assert [r.agreement("QEMU 7.2.22") for r in m.rows] == ["same", "differs"]
    assert not m.all_agree
    [disagreement] = m.rows[1].disagreements(m.qemus)
    assert disagreement.what == "images: emulator vs QEMU 7.2.22"
    text = render_terminal(m)
    assert "images left: 2 of 3 byte-identical with QEMU 7.2.22's" in text
    assert "x.out:6: PID-img: first difference at 0x0" in text


@requires_qemu
def test_conform_images_on_qemu_shut_down_as_iotests_do(qemu_binary: str,
                                                        tmp_path: Path) -> None:
    """254 stores persistent bitmaps in its snapshot overlay when the VM shuts down, after
    the golden's last line: the VM is shut down (not killed), so QEMU's overlay holds them
    too, and every image equals the emulator's; no kept directory outlives the run."""
    tmp = tmp_path / "t"
    tmp.mkdir()
    proc = cli("conform", str(GOLDENS / "254.out"), str(GOLDENS / "236.out"), "--images",
               "--qemu-binary", qemu_binary, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"images left: (\d+) of \1 byte-identical with QEMU 7\.2", proc.stdout)
    assert list(tmp.iterdir()) == []
