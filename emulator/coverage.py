"""``qmpreplay commands``: what the emulator implements, and how much of a real QEMU that is.

Without ``--against`` it prints the table of implemented commands (name, family, arguments).
With ``--against QEMU_BINARY`` it sets the emulator beside the binary's ``query-qmp-schema``:
the binary's block-layer commands (implemented or not, and whether our argument schema is
the same), its block-layer events, and its transaction actions, each with the coverage in
per cent. ``--markdown PATH`` writes the same report as Markdown (``docs/commands.md``).
The exit status is 1 if an implemented command's schema differs from the binary's.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import QmpReplayError

BLOCK_EVENT = re.compile(r"^(BLOCK_|JOB_|QUORUM_)")
BLOCK_COMMAND_EXTRA = {"transaction", "query-jobs", "human-monitor-command"}


def is_block_command(name: str) -> bool:
    """QEMU's block-layer commands: a dash/underscore-separated word starting with "block"
    (block-job-*, blockdev-*, block_resize, query-named-block-nodes…), jobs, drive-*."""
    words = re.split(r"[-_]", name)
    return (any(w.startswith("block") for w in words) or name.startswith(("job-", "drive-"))
            or name in BLOCK_COMMAND_EXTRA)


@dataclass
class Table:
    """One kind of thing (commands, events, actions): the binary's names and ours."""

    title: str
    theirs: list[str]
    ours: set[str]
    notes: dict[str, str] = field(default_factory=dict)   # name -> schema difference

    @property
    def covered(self) -> list[str]:
        return [n for n in self.theirs if n in self.ours]

    @property
    def percent(self) -> float:
        return 100.0 * len(self.covered) / len(self.theirs) if self.theirs else 100.0

    def summary(self) -> str:
        return (f"{self.title}: {len(self.covered)} of {len(self.theirs)} "
                f"({self.percent:.1f}%)")

    def markdown(self) -> list[str]:
        out = [f"## {self.summary()}", "", "| name | emulator |", "|---|---|"]
        for name in self.theirs:
            mark = "✓" if name in self.ours else "—"
            if name in self.notes:
                mark += f" (schema differs: {self.notes[name]})"
            out.append(f"| `{name}` | {mark} |")
        extra = sorted(self.ours - set(self.theirs))
        if extra:
            out += ["", "Also emulated: " + ", ".join(f"`{n}`" for n in extra)]
        return [*out, ""]


def command_table() -> list[tuple[str, str, str]]:
    """(name, family, arguments) of every implemented command, sorted by family then name."""
    import emulator.commands  # noqa: F401  (registers every command family)
    from emulator.qmp.registry import COMMANDS

    rows = [(c.name, c.family, c.describe_arguments()) for c in COMMANDS.values()]
    return sorted(rows, key=lambda r: (r[1], r[0]))


def format_table(rows: list[tuple[str, str, str]]) -> str:
    width = max((len(r[0]) for r in rows), default=7)
    fam = max((len(r[1]) for r in rows), default=6)
    lines = [f"{'COMMAND':<{width}}  {'FAMILY':<{fam}}  ARGUMENTS"]
    lines += [f"{n:<{width}}  {f:<{fam}}  {a or '-'}" for n, f, a in rows]
    return "\n".join(lines) + "\n"


def transaction_actions(schema: list[dict[str, Any]]) -> list[str]:
    """The branches of the binary's TransactionAction union (``transaction``'s actions)."""
    by_name = {e["name"]: e for e in schema}
    try:
        arg = by_name[by_name["transaction"]["arg-type"]]
        array = next(m["type"] for m in arg["members"] if m["name"] == "actions")
        union = by_name[by_name[array]["element-type"]]
        return [v["case"] for v in union.get("variants", [])]
    except (KeyError, StopIteration):
        return []


def compare(binary: str, rows: list[tuple[str, str, str]]) -> list[Table]:
    from emulator.commands.transaction import ACTIONS
    from emulator.qmp.events import EMITTED
    from emulator.qmp.introspect import SchemaComparer
    from emulator.qmp.qemu_probe import query_qmp_schema

    try:
        schema = query_qmp_schema(binary)
    except (OSError, RuntimeError, ValueError) as exc:
        raise QmpReplayError(f"commands: cannot query {binary}: {exc}") from None
    comparer = SchemaComparer(schema)
    ours = {r[0] for r in rows}
    commands = Table("block-layer commands",
                     sorted(n for n in comparer.commands() if is_block_command(n)),
                     {n for n in ours if is_block_command(n)})
    for name in commands.covered:
        mismatches = comparer.compare_command(name).mismatches
        if mismatches:
            commands.notes[name] = "; ".join(mismatches)
    events = Table("block-layer events",
                   sorted(e["name"] for e in schema
                          if e.get("meta-type") == "event" and BLOCK_EVENT.match(e["name"])),
                   {e for e in EMITTED if BLOCK_EVENT.match(e)})
    actions = Table("transaction actions", transaction_actions(schema), set(ACTIONS))
    return [commands, events, actions]


def markdown(binary: str | None, rows: list[tuple[str, str, str]],
             tables: list[Table]) -> str:
    out = ["# QMP coverage of the emulator", ""]
    if binary:
        out += [f"Set beside `{binary}` (its `query-qmp-schema`), written by "
                f"`qmpreplay commands --against {binary} --markdown docs/commands.md`.", ""]
        out += [f"- {t.summary()}" for t in tables] + [""]
        for t in tables:
            out += t.markdown()
    out += ["## Implemented commands", "", "| Command | Family | Arguments |", "|---|---|---|"]
    for name, family, args in rows:
        cell = args.replace("|", "\\|") if args else "—"
        out.append(f"| `{name}` | {family} | {cell} |")
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace) -> int:
    rows = command_table()
    tables = compare(args.against, rows) if args.against else []
    sys.stdout.write(format_table(rows))
    for t in tables:
        missing = [n for n in t.theirs if n not in t.ours]
        print(f"{t.summary()}" + (f"; not emulated: {', '.join(missing)}" if missing else ""))
    differing = {n: why for t in tables for n, why in t.notes.items()}
    if args.against:
        print("schema differences: " + ("none" if not differing else str(len(differing))))
        for name, why in differing.items():
            print(f"  {name}: {why}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(args.against, rows, tables), encoding="utf-8")
    return 1 if differing else 0
