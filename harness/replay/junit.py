"""JUnit XML for CI dashboards: one testcase per section, the diff as the failure text."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from harness.diff import section_diff
from harness.replay.engine import PartResult


def write_junit(path: str | Path, results: list[PartResult]) -> None:
    suite = ET.Element("testsuite", name="qmpreplay", tests=str(len(results)),
                       failures=str(sum(r.failed for r in results)),
                       skipped=str(sum(r.skipped is not None for r in results)),
                       time=f"{sum(r.seconds for r in results):.3f}")
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=Path(r.golden_path).name,
                             name=r.title, time=f"{r.seconds:.3f}")
        if r.skipped is not None:
            ET.SubElement(case, "skipped", message=r.skipped)
        elif not r.passed:
            failure = ET.SubElement(case, "failure", message=r.error or "transcript differs")
            failure.text = "\n".join(
                [*(r.notes or []),
                 section_diff(r.golden, r.actual, path=Path(r.golden_path).name,
                              first_line=r.line)])
    ET.ElementTree(suite).write(path, encoding="unicode", xml_declaration=True)
