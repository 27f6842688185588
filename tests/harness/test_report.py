"""The HTML conformance report, opened in a real headless browser (Debian's chromium): one
row per section, the verdict on top, every disagreement's diff one click away, and nothing
loaded from anywhere else."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness.conform import EMULATOR, Column, Matrix, Row
from harness.replay.engine import PartResult
from harness.report import render_html
from harness.transcript import parse, parse_file
from tests.conftest import GOLDENS, requires_qemu, requires_qemu_img

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
requires_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (Debian package chromium)")


class Dom(HTMLParser):
    """What the test looks at in the page: rows, details, and anything that loads."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.details = 0
        self.loads: list[str] = []
        self.verdicts: list[str] = []
        self._verdict = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "tr" and "section" in a.get("class", "").split():
            self.rows.append(a)
        if tag == "details":
            self.details += 1
        if tag in ("script", "img", "link", "iframe") or (
                tag in ("a",) and a.get("href", "#").split(":")[0] in ("http", "https")):
            self.loads.append(tag)
        self._verdict = tag == "p" and "verdict" in a.get("class", "")

    def handle_data(self, data: str) -> None:
        if self._verdict and data.strip():
            self.verdicts.append(data.strip())
            self._verdict = False


def dump_dom(page: Path) -> str:
    """The DOM chromium builds from the page (so a malformed page would show)."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="qrchromium-") as profile:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--dump-dom",
             page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@requires_chromium
@requires_qemu
@requires_qemu_img
def test_conform_report_of_every_golden_in_a_real_browser(tmp_path: Path) -> None:
    goldens = sorted(GOLDENS.glob("*.out"))
    report = tmp_path / "report.html"
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "conform", *map(str, goldens),
                           "--html", str(report)], capture_output=True, text=True,
                          check=False, timeout=900)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    sections = [(g.name, p.line) for g in goldens for p in parse_file(g).sections()]

    dom = Dom()
    dom.feed(dump_dom(report))
    assert len(dom.rows) == len(sections)
    assert [r["id"] for r in dom.rows] == [f"s{i}" for i in range(1, len(sections) + 1)]
    disagree = [r for r in dom.rows if "disagree" in r["class"].split()]
    assert (proc.returncode == 0) == (not disagree)
    assert dom.details >= len(disagree)
    assert dom.loads == []                         # self-contained: nothing to fetch
    assert dom.verdicts and dom.verdicts[0].startswith("The emulator ")
    text = report.read_text()
    assert "<style>" in text and 'rel="stylesheet"' not in text
    agree_line = next(ln for ln in proc.stdout.splitlines() if "emulator agrees with" in ln)
    found = re.search(r" in (\d+) of (\d+) sections", agree_line)
    assert found is not None, agree_line
    agreed, compared = map(int, found.groups())
    assert compared - agreed == len(disagree)
    skipped = [r for r in dom.rows if "skipped" in r.get("data-states", "").split()]
    assert compared + len(skipped) == len(sections)


def test_report_escapes_and_puts_each_disagreement_in_details() -> None:
    golden = ('=== <b>bold</b> & "quoted" ===\n\n{"execute": "query-jobs", "arguments": {}}\n'
              '{"return": []}\n')
    transcript = parse(golden, "x.out")
    (part,) = transcript.sections()
    other = parse(golden.replace("[]", '[{"id": "<script>"}]'), "x.out").records
    columns = [Column(EMULATOR, lambda d: None), Column("QEMU 7.2.22", lambda d: None, "/q")]
    m = Matrix(["x.out"], columns)   # type: ignore[arg-type]
    row = Row("x.out", part.line, part.title, part)
    row.runs[EMULATOR] = PartResult("x.out", part.title, 1, list(part.records), other, 0.1)
    row.runs["QEMU 7.2.22"] = PartResult("x.out", part.title, 1, list(part.records),
                                         list(part.records), 0.1)
    m.rows.append(row)
    html = render_html(m)
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert html.count("<details>") == 1     # emulator vs QEMU and vs golden: the same diff
    assert "emulator vs QEMU 7.2.22 (− QEMU 7.2.22, + emulator); emulator vs golden" in html
    assert '<span class="add">+{&#34;return&#34;: [{&#34;id&#34;: &#34;&lt;script&gt;' in html
    assert "disagrees with QEMU 7.2.22 in 1 of 1 sections" in html
