"""``qmpreplay parse``: summarize goldens, dump their records, check the byte round trip."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.errors import TranscriptError
from harness.transcript import parse_file, render
from harness.transcript.transcript import Transcript


def summary(t: Transcript) -> str:
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(t.kinds().items(), key=lambda kv: -kv[1]))
    sections = t.sections()
    lines = [f"{t.path}: {len(t.records)} records, {len(sections)} runnable "
             f"section{'s' if len(sections) != 1 else ''} ({kinds})"]
    lines += [f"  {p.line:>5}  {p.title}" for p in sections]
    return "\n".join(lines)


def first_difference(a: str, b: str) -> int:
    for no, (x, y) in enumerate(zip(a.split("\n"), b.split("\n"), strict=False), 1):
        if x != y:
            return no
    return min(a.count("\n"), b.count("\n")) + 1


def run(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            t = parse_file(path)
        except TranscriptError as exc:
            print(exc, file=sys.stderr)
            status = 2
            continue
        if args.json:
            for r in t.records:
                print(json.dumps({"file": t.path, "kind": r.kind, "line": r.line,
                                  "payload": r.payload()}))
        else:
            print(summary(t))
        if args.check_roundtrip:
            original = Path(path).read_bytes().decode("utf-8")
            rendered = render(t)
            if rendered != original:
                print(f"{path}:{first_difference(original, rendered)}: round trip differs",
                      file=sys.stderr)
                status = status or 1
            elif not args.json:
                print("  round trip: identical")
    return status
