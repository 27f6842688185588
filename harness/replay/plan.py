"""Compile one section of a golden into executable steps, using idioms and the recipe.

Everything the golden shows is replayed as shown; what it only hints at (bare results) is
resolved by iotests idioms the replayer knows by itself, else by the recipe. A bare result
that neither explains is an error at its line: a case never guesses.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from harness.errors import RecipeError
from harness.replay import steps as s
from harness.replay.recipe import Recipe
from harness.transcript.records import (
    BareResult,
    BitmapCheck,
    BitmapDump,
    Command,
    Event,
    ImageCompare,
    JsonRecord,
    QemuIo,
    Record,
    Reply,
    Text,
)
from harness.transcript.transcript import Part

Json = Any
GOLDEN_PREFIX = "TEST_DIR/PID-"
ANCHORS = (Command, Text, QemuIo)   # records extra steps can be anchored to


@dataclass
class Plan:
    part: Part
    steps: list[s.Step]
    variables: dict[str, Json]
    qemu_io_device: str | None
    image_format: str


def compile_part(part: Part, recipe: Recipe, golden_path: str) -> Plan:
    return _Compiler(part, recipe, golden_path).compile()


class _Compiler:
    def __init__(self, part: Part, recipe: Recipe, golden_path: str) -> None:
        self.part = part
        self.recipe = recipe
        self.path = golden_path
        self.records = part.records
        self.vars = recipe.variables(part.title)
        self.device = recipe.qemu_io_device or self.default_device()
        self.fmt = recipe.images[0].format if recipe.images else "qcow2"
        self.steps: list[s.Step] = []
        self.queued: list[tuple[str, dict[str, Json]]] = []   # idiom steps for coming ``{}``
        self.sequence = [line.strip() for line in
                         recipe.expand(recipe.sequence or "", self.vars).splitlines()
                         if line.strip() and not line.strip().startswith("#")]

    def error(self, record: Record, message: str) -> RecipeError:
        return RecipeError(self.path, record.line, message)

    def default_device(self) -> str | None:
        """The drive qemu-io talks to: the recipe's first -drive, else the first added node."""
        if self.recipe.drives:
            return str(self.recipe.drives[0].get("id", "drive0"))
        for r in self.records:
            if isinstance(r, Command) and r.name == "blockdev-add":
                return str(r.arguments.get("node-name"))
        return None

    def compile(self) -> Plan:
        i = 0
        while i < len(self.records):
            record = self.records[i]
            self.extra_steps(record, before=True)
            i = self.one(i)
            self.extra_steps(record, before=False)
        if self.sequence:
            raise RecipeError(self.recipe.path or self.path, 1,
                              f"section '{self.part.title}': {len(self.sequence)} sequence "
                              f"action(s) left over, first {self.sequence[0]!r}")
        return Plan(self.part, self.steps, self.vars, self.device, self.fmt)

    def one(self, i: int) -> int:
        record = self.records[i]
        nxt = self.records[i + 1] if i + 1 < len(self.records) else None
        if isinstance(record, Command):
            reply = nxt if isinstance(nxt, Reply) else None
            self.steps.append(s.Execute((record, *([reply] if reply else [])),
                                        command=record, reply=reply,
                                        poll=record.name in self.recipe.poll))
            i += 2 if reply else 1
            if record.name == "blockdev-create" and reply is not None \
                    and reply.value == {"return": {}}:
                return self.job_outcome(i, record)
            return i
        if isinstance(record, QemuIo):
            assert isinstance(nxt, Reply)  # the parser guarantees the reply
            if self.device is None:
                raise self.error(record, "qemu-io echo but no drive to address: name it in "
                                         "the recipe ([qemu-io] device = \"drive0\")")
            self.steps.append(s.QemuIoCommand((record, nxt), echo=record, reply=nxt,
                                              device=self.device))
            return i + 2
        if isinstance(record, Event):
            self.steps.append(s.ExpectEvent((record,), event=record))
        elif isinstance(record, BareResult):
            self.steps.append(self.hidden(i, record))
        elif isinstance(record, BitmapDump):
            self.steps.append(s.DumpBitmaps((record,), dump=record,
                                            source=self.recipe.bitmap_source))
        elif isinstance(record, BitmapCheck):
            node = self.recipe.bitmap_node or self.device
            if node is None:
                raise self.error(record, "bitmap check but no node: set [bitmaps] node")
            self.steps.append(s.CheckBitmap((record,), check=record, node=node))
        elif isinstance(record, ImageCompare):
            self.steps.append(self.compare(record))
        elif isinstance(record, Text) and (probe := self.probe_for(record)):
            return self.probe(i, record, probe)
        elif isinstance(record, JsonRecord):
            raise self.error(record, "JSON that is not a command, reply, event or bitmap "
                                     "dump: say which query it shows with a [[probe]] in "
                                     "the recipe")
        else:
            self.verbatim(record)
        return i + 1

    def job_outcome(self, i: int, command: Command) -> int:
        """iotests' blockdev_create waits for its job with run_job, which prints "Job
        failed: <error>" when the job aborts and nothing when it succeeds: that line (or its
        absence) is recomputed from the backend's job, never taken from the golden."""
        nxt = self.records[i] if i < len(self.records) else None
        failed = nxt if isinstance(nxt, Text) and nxt.text.startswith("Job failed: ") else None
        job_id = str(command.arguments.get("job-id", ""))
        self.steps.append(s.JobOutcome((failed,) if failed else (), job_id=job_id))
        return i + (1 if failed else 0)

    def verbatim(self, record: Record) -> None:
        """Consecutive verbatim records make one step: each step run costs a coroutine."""
        last = self.steps[-1] if self.steps else None
        if isinstance(last, s.Verbatim):
            last.records += (record,)
        else:
            self.steps.append(s.Verbatim((record,)))

    # -- bare results ----------------------------------------------------------------------
    def hidden(self, i: int, bare: BareResult) -> s.Step:
        if bare.value == {} and self.create_target_starts(i):
            self.queue_create_target(i, bare)
        if bare.value == {} and self.queued:
            name, arguments = self.queued.pop(0)
            return s.Hidden((bare,), bare=bare, name=name, arguments=arguments,
                            shows_reply=False)
        action = self.recipe.hidden.get(bare.text)
        if action is not None:
            action = self.recipe.expand(action, self.vars)
        elif self.sequence:
            action = self.sequence.pop(0)
        else:
            raise self.error(bare, f"bare result {bare.text!r} with no command before it: "
                                   f"name the step behind it in the recipe's [hidden] table "
                                   f"or its sequence")
        name, arguments = parse_action(action)
        return s.Hidden((bare,), bare=bare, name=name, arguments=arguments,
                        shows_reply=isinstance(bare.value, dict) and (
                            "return" in bare.value or "error" in bare.value),
                        poll=name in self.recipe.poll)

    def create_target_starts(self, i: int) -> bool:
        """iotests' Drive.create_target(): ``{}`` then ``job-dismiss`` of bdc-file-job."""
        nxt = self.records[i + 1] if i + 1 < len(self.records) else None
        return (isinstance(nxt, Command) and nxt.name == "job-dismiss"
                and nxt.arguments.get("id") == "bdc-file-job")

    def queue_create_target(self, i: int, bare: BareResult) -> None:
        """blockdev-create the file, add it, blockdev-create the format, add it.

        The target node is the ``target`` of the next blockdev-backup in the section; its
        file, format and size come from the recipe (the drive's image by default).
        """
        target = next((r.arguments.get("target") for r in self.records[i:]
                       if isinstance(r, Command) and r.name == "blockdev-backup"), None)
        if not isinstance(target, str):
            raise self.error(bare, "create-target idiom with no blockdev-backup after it "
                                   "to name the target node")
        file = self.recipe.target_file(target)
        if file is None:
            raise self.error(bare, f"create-target idiom for node '{target}': give its file "
                                   f"in the recipe's [targets] table")
        path = GOLDEN_PREFIX + self.recipe.expand(file, self.vars)
        image = self.recipe.images[0] if self.recipe.images else None
        size = parse_size(image.size) if image else 0
        file_node = f"file_{path.rsplit('/', 1)[-1]}"
        self.queued += [
            ("blockdev-create", {"job-id": "bdc-file-job",
                                 "options": {"driver": "file", "filename": path, "size": 0}}),
            ("blockdev-add", {"driver": "file", "node-name": file_node, "filename": path}),
            ("blockdev-create", {"job-id": "bdc-fmt-job",
                                 "options": {"driver": self.fmt, "file": file_node,
                                             "size": size}}),
            ("blockdev-add", {"driver": self.fmt, "node-name": target, "file": file_node}),
        ]

    # -- comparisons, probes, extra steps ----------------------------------------------------
    def compare(self, record: ImageCompare) -> s.Step:
        name = record.image.removeprefix(GOLDEN_PREFIX)
        base = self.recipe.rebase.get(name)
        rebase = GOLDEN_PREFIX + self.recipe.expand(base, self.vars) if base else None
        return s.CompareImages((record,), compare=record, rebase=rebase, fmt=self.fmt)

    def probe_for(self, record: Text) -> Any:
        return next((p for p in self.recipe.probes if p.match.search(record.text)), None)

    def probe(self, i: int, record: Text, probe: Any) -> int:
        nxt = self.records[i + 1] if i + 1 < len(self.records) else None
        covers: tuple[Record, ...] = (record,)
        if probe.next_json is not None:
            if not isinstance(nxt, JsonRecord):
                raise self.error(record, "probe with next_json but no JSON after this line")
            covers = (record, nxt)
        self.steps.append(s.Probe(covers, query=probe.query, arguments=probe.arguments,
                                  text=probe.text, next_json=probe.next_json))
        return i + len(covers)

    def extra_steps(self, record: Record, *, before: bool) -> None:
        if not self.recipe.steps or not isinstance(record, ANCHORS):
            return
        label = record.name if isinstance(record, Command) else record.text
        for extra in self.recipe.steps:
            if extra.before == before and extra.anchor.search(label):
                name, arguments = parse_action(self.recipe.expand(extra.action, self.vars))
                self.steps.append(s.Extra((), name=name, arguments=arguments,
                                          until=extra.until))


def parse_action(action: str) -> tuple[str, dict[str, Json]]:
    """A recipe action: a QMP command as JSON, or an HMP command line."""
    text = action.strip()
    if text.startswith("{"):
        value = json.loads(text)
        return value["execute"], dict(value.get("arguments", {}))
    shlex.split(text)  # reject unbalanced quotes early
    return "human-monitor-command", {"command-line": text}


SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``64M`` → 67108864, as qemu-img reads sizes."""
    text = text.strip()
    unit = text[-1].lower() if text and text[-1].isalpha() else ""
    return int(float(text[:len(text) - len(unit)]) * SUFFIXES[unit])
