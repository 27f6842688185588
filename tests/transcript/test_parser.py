"""The transcript language: every record kind, the byte round trip, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import TranscriptError
from harness.transcript import parse, parse_file, render
from harness.transcript.records import (
    BareResult,
    BitmapCheck,
    BitmapDump,
    Blank,
    Command,
    Event,
    Heading,
    ImageCompare,
    JsonRecord,
    QemuIo,
    Reply,
    Section,
    Text,
)
from tests.conftest import GOLDENS

ALL_GOLDENS = sorted(GOLDENS.glob("*.out"))


@pytest.mark.parametrize("path", ALL_GOLDENS, ids=lambda p: p.name)
def test_every_golden_round_trips_byte_for_byte(path: Path) -> None:
    assert render(parse_file(path)) == path.read_bytes().decode()


@pytest.mark.parametrize("path", ALL_GOLDENS, ids=lambda p: p.name)
def test_json_records_format_like_iotests(path: Path) -> None:
    """Records rebuilt from their payload print exactly as iotests' log()/qmp_log() did."""
    for r in parse_file(path).records:
        if isinstance(r, JsonRecord):
            assert type(r).make(r.value, r.indent).lines == r.lines, r.line


def kinds(text: str) -> list[tuple[str, int]]:
    return [(r.kind, r.line) for r in parse(text).records]


def test_section_and_headings() -> None:
    text = "\n=== Mode bitmap ===\n\n--- Write #0 ---\n-- Sync mode top tests --\n"
    t = parse(text)
    assert [type(r) for r in t.records] == [Blank, Section, Blank, Heading, Heading]
    assert t.records[1].title == "Mode bitmap"  # type: ignore[attr-defined]
    assert t.records[3].payload() == {"marker": "---", "title": "Write #0"}
    assert t.records[4].payload() == {"marker": "--", "title": "Sync mode top tests"}


def test_inner_triple_equals_is_a_heading_not_a_section() -> None:
    """219 prints ``=== Testing … ===`` right after text: no fresh VM there."""
    t = parse("Pause/resume in RUNNING\n=== Testing job-pause/job-resume ===\n")
    assert isinstance(t.records[1], Heading)
    assert t.records[1].marker == "==="  # type: ignore[attr-defined]


def test_command_reply_event_and_bare_results() -> None:
    text = "\n".join([
        '{"execute": "job-dismiss", "arguments": {"id": "bdc-file-job"}}',
        '{"return": {}}',
        "{}",
        '{"return": ""}',
        '{"data": {"id": "j", "type": "backup"}, "event": "BLOCK_JOB_PENDING", '
        '"timestamp": {"microseconds": "USECS", "seconds": "SECS"}}',
        '{"error": {"class": "GenericError", "desc": "x"}}',
    ]) + "\n"
    t = parse(text)
    assert [type(r) for r in t.records] == [Command, Reply, BareResult, BareResult, Event,
                                            BareResult]
    cmd = t.records[0]
    assert isinstance(cmd, Command) and cmd.name == "job-dismiss"
    assert cmd.arguments == {"id": "bdc-file-job"}
    assert isinstance(t.records[4], Event) and t.records[4].name == "BLOCK_JOB_PENDING"


def test_qemu_io_echo_needs_its_reply() -> None:
    t = parse('write -P0x49 0x0000000 0x10000\n{"return": ""}\nwrite me a letter\n')
    assert [type(r) for r in t.records] == [QemuIo, Reply, Text]
    assert t.records[0].payload() == "write -P0x49 0x0000000 0x10000"


def test_pretty_json_blocks() -> None:
    dump = json.dumps({"bitmaps": {"drive0": [{"count": 0}]}}, indent=2, sort_keys=True)
    cmd = json.dumps({"execute": "transaction", "arguments": {"actions": []}}, indent=2)
    text = f"{dump}\n{cmd}\n{{\n  \"return\": {{}}\n}}\n[\n  1\n]\n"
    t = parse(text)
    assert [type(r) for r in t.records] == [BitmapDump, Command, Reply, JsonRecord]
    assert t.records[0].indent == 2  # type: ignore[attr-defined]
    assert t.records[1].line == 1 + len(dump.split("\n"))


def test_bitmap_check_and_image_compare() -> None:
    text = ("= Checking Bitmap (anonymous) =\nexpecting 7 dirty sectors; have 6. ERROR!\n"
            'qemu_img compare "TEST_DIR/PID-a" "TEST_DIR/PID-b" ==> Mismatch, OK!\n')
    check, compare = parse(text).records
    assert isinstance(check, BitmapCheck)
    assert (check.name, check.expected, check.have, check.ok) == ("(anonymous)", 7, 6, False)
    assert isinstance(compare, ImageCompare)
    assert (compare.identical, compare.expect_identical) == (False, False)
    assert compare.image == "TEST_DIR/PID-a"


def test_free_text() -> None:
    t = parse("Launching VM...\nJob failed: Input/output error\n")
    assert [type(r) for r in t.records] == [Text, Text]


def test_file_without_final_newline_round_trips() -> None:
    assert render(parse("Launching VM...\n{}")) == "Launching VM...\n{}"


def test_sections_group_records_and_preamble_is_runnable_only_if_it_acts() -> None:
    t = parse_file(GOLDENS / "257.out")
    assert len(t.sections()) == 22
    assert t.parts()[0].title == "257" and not t.parts()[0].runnable
    assert t.sections()[-1].title == "API failure tests"
    t283 = parse_file(GOLDENS / "283.out")
    assert [p.title for p in t283.sections()] == [
        "283", "copy-before-write filter should be gone after job-finalize"]


# --- bad input: one line FILE:LINE: what, exit 2, never a traceback -------------------------

def golden_with_line(no: int, replacement: str) -> str:
    lines = (GOLDENS / "257.out").read_text().split("\n")
    lines[no - 1] = replacement
    return "\n".join(lines)


BAD_INPUTS = {
    "cut-json": (golden_with_line(7, '{"return": '), 7, "does not parse"),
    "truncated-pretty": ("{}\n{\n  \"bitmaps\": {}\n", 2, "never closed"),
    "pretty-cut-by-blank": ("{\n  \"bitmaps\": {}\n\nfoo\n}\n", 1, "never closed"),
    "json-like-garbage": ("ok\n{this is not json}\n", 2, "does not parse"),
    "non-numeric-check": ("= Checking Bitmap b =\nexpecting six dirty sectors; have 6. OK!\n",
                          2, "is not a number"),
    "check-without-body": ("= Checking Bitmap b =\n", 1, "no 'expecting"),
    "check-verdict-lies": ("= Checking Bitmap b =\nexpecting 6 dirty sectors; have 5. OK!\n",
                           2, "contradicts"),
    "unknown-compare-outcome": ('qemu_img compare "a" "b" ==> Similar, OK!\n', 1,
                                "unknown compare outcome"),
    "malformed-compare": ('qemu_img compare a b\n', 1, "malformed image comparison"),
    "empty": ("", 1, "empty transcript"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_located_error(name: str, tmp_path: Path) -> None:
    text, line, what = BAD_INPUTS[name]
    path = tmp_path / f"{name}.out"
    path.write_text(text)
    with pytest.raises(TranscriptError) as info:
        parse_file(path)
    assert info.value.line == line
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert what in str(info.value)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args],
                          capture_output=True, text=True, check=False)


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_cli_reports_bad_input_in_one_line_with_status_2(name: str, tmp_path: Path) -> None:
    text, line, _ = BAD_INPUTS[name]
    path = tmp_path / f"{name}.out"
    path.write_text(text)
    proc = run_cli("parse", str(path))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"{path}:{line}: ")
    assert "Traceback" not in proc.stderr


def test_cli_not_utf8_and_missing_file(tmp_path: Path) -> None:
    binary = tmp_path / "bin.out"
    binary.write_bytes(b"ok\n\xff\xfe\n")
    proc = run_cli("parse", str(binary), str(tmp_path / "missing.out"))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"{binary}:2: not UTF-8 (byte 0xff at offset 3)",
        f"{tmp_path / 'missing.out'}:1: cannot read: No such file or directory"]


def test_cli_roundtrip_and_json_dump() -> None:
    proc = run_cli("parse", *map(str, ALL_GOLDENS), "--check-roundtrip")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("round trip: identical") == len(ALL_GOLDENS)
    proc = run_cli("parse", str(GOLDENS / "283.out"), "--json")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows[0] == {"file": str(GOLDENS / "283.out"), "kind": "command", "line": 1,
                       "payload": {"execute": "blockdev-add", "arguments": {
                           "driver": "null-co", "node-name": "target", "size": 1048576}}}
    assert {r["kind"] for r in rows} == {"command", "reply", "blank", "section"}
