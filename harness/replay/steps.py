"""Executable steps: what each golden record asks the replayer to do.

A step covers one or more golden records and appends the actual records that stand in for
them. Observations (replies, events, bitmap dumps and checks, comparisons) are recomputed
from the backend; expectations the golden states ("expecting N", the wanted compare outcome)
are carried over, so a changed backend shows up as changed numbers and ``ERROR!`` lines.

Steps are never compared or printed (``describe`` says what one does), so their dataclasses
generate only ``__init__``: every run imports this module, and the rest cost ~1 ms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from harness.replay.engine import PartRun

Json = Any


@dataclass(repr=False, eq=False)
class Step:
    records: tuple[Record, ...]

    @property
    def line(self) -> int:
        return self.records[0].line if self.records else 0

    async def run(self, r: PartRun) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


@dataclass(repr=False, eq=False)
class Verbatim(Step):
    """Headings, blank lines and free text: printed by the script itself, copied as is."""

    async def run(self, r: PartRun) -> None:
        r.actual.extend(self.records)


@dataclass(repr=False, eq=False)
class Execute(Step):
    """A visible QMP command and, if the golden logged it, its reply."""

    command: Command = field(kw_only=True)
    reply: Reply | None = field(default=None, kw_only=True)
    poll: bool = field(default=False, kw_only=True)

    async def run(self, r: PartRun) -> None:
        await r.settle()
        arguments = r.norm.reverse(self.command.arguments)
        r.actual.append(Command.make({"execute": self.command.name, "arguments":
                                      r.norm.json(arguments, self.command.arguments)},
                                     self.command.indent, line=self.command.line))
        golden = self.reply.value if self.reply is not None else None
        reply = await r.execute_shown(self.command.name, arguments, golden if self.poll
                                      else None, lambda reply: reply)
        if self.reply is not None:
            r.actual.append(Reply.make(r.norm.json(reply, self.reply.value), self.reply.indent,
                                       line=self.reply.line))

    def describe(self) -> str:
        return f"execute {self.command.name}"


@dataclass(repr=False, eq=False)
class JobOutcome(Step):
    """run_job's verdict on a job the golden waited for: "Job failed: <error>" or nothing."""

    job_id: str = field(kw_only=True)

    async def run(self, r: PartRun) -> None:
        await r.settle()
        jobs = (await r.execute("query-jobs", {})).get("return", [])
        error = next((j.get("error") for j in jobs if j.get("id") == self.job_id), None)
        if error is not None:
            r.actual.append(Text.make(r.norm.text(f"Job failed: {error}")))

    def describe(self) -> str:
        return f"the outcome of job {self.job_id}"


@dataclass(repr=False, eq=False)
class ExpectEvent(Step):
    event: Event = field(kw_only=True)

    async def run(self, r: PartRun) -> None:
        got = await r.wait_event(self.event.value)
        if got is not None:
            r.actual.append(Event.make(r.norm.json(got, self.event.value), self.event.indent,
                                       line=self.event.line))

    def describe(self) -> str:
        return f"wait for {self.event.name}"


@dataclass(repr=False, eq=False)
class QemuIoCommand(Step):
    """An echoed qemu-io command, run over HMP on the top node of the drive."""

    echo: QemuIo = field(kw_only=True)
    reply: Reply = field(kw_only=True)
    device: str = field(kw_only=True)

    async def run(self, r: PartRun) -> None:
        await r.settle()
        node = r.jobs.top_node(self.device)
        r.actual.append(self.echo)
        reply = await r.execute("human-monitor-command", {
            "command-line": f'qemu-io {node} "{self.echo.command}"'})
        r.actual.append(Reply.make(r.norm.json(reply, self.reply.value), self.reply.indent,
                                   line=self.reply.line))

    def describe(self) -> str:
        return f"qemu-io {self.device} {self.echo.command!r}"


@dataclass(repr=False, eq=False)
class Hidden(Step):
    """A bare result: the step behind it is an idiom or comes from the recipe."""

    bare: BareResult = field(kw_only=True)
    name: str = field(kw_only=True)               # QMP command (HMP goes via human-monitor)
    arguments: dict[str, Json] = field(kw_only=True)
    shows_reply: bool = field(kw_only=True)       # golden logged the whole reply, not .return
    poll: bool = field(default=False, kw_only=True)

    def shown(self, reply: Json) -> Json:
        return reply if self.shows_reply or "return" not in reply else reply["return"]

    async def run(self, r: PartRun) -> None:
        await r.settle()
        arguments = r.norm.reverse(self.arguments)
        shown = await r.execute_shown(self.name, arguments,
                                      self.bare.value if self.poll else None, self.shown)
        r.actual.append(BareResult.make(r.norm.json(shown, self.bare.value), self.bare.indent,
                                        line=self.bare.line))

    def describe(self) -> str:
        return f"hidden {self.name} {self.arguments}"


@dataclass(repr=False, eq=False)
class Extra(Step):
    """A recipe step with no trace in the golden (its result is not printed)."""

    name: str = field(kw_only=True)
    arguments: dict[str, Json] = field(kw_only=True)
    until: str | None = field(default=None, kw_only=True)

    async def run(self, r: PartRun) -> None:
        await r.settle()
        if self.until is not None:
            await r.poll_until(self.name, r.norm.reverse(self.arguments), self.until)
            return
        reply = await r.execute(self.name, r.norm.reverse(self.arguments))
        if "error" in reply or reply.get("return", "") not in ("", {}):
            r.note(f"hidden step {self.name} {self.arguments} returned {reply}")


@dataclass(repr=False, eq=False)
class DumpBitmaps(Step):
    """``{"bitmaps": …}``: every node's (or drive's) dirty bitmaps, as iotests lists them."""

    dump: BitmapDump = field(kw_only=True)
    source: str = field(kw_only=True)

    async def run(self, r: PartRun) -> None:
        await r.settle()
        bitmaps = await r.query_bitmaps(self.source)
        r.actual.append(BitmapDump.make(r.norm.json({"bitmaps": bitmaps}, self.dump.value),
                                        self.dump.indent, line=self.dump.line))


@dataclass(repr=False, eq=False)
class CheckBitmap(Step):
    """``expecting N dirty sectors; have M``: N from the golden, M from the live bitmap."""

    check: BitmapCheck = field(kw_only=True)
    node: str = field(kw_only=True)

    async def run(self, r: PartRun) -> None:
        await r.settle()
        bitmaps = (await r.query_bitmaps("nodes")).get(self.node, [])
        name = "" if self.check.name == "(anonymous)" else self.check.name
        # iotests' get_bitmap(): first in list order with that name; the anonymous one
        # it looks for is the recording successor.
        found = next((b for b in bitmaps if b.get("name", "") == name
                      and (name or b.get("recording"))), None)
        if found is None:
            r.actual.append(Text.make(f"= Checking Bitmap {self.check.name} =\n"
                                      f"no such bitmap on node '{self.node}'"))
            return
        have = found["count"] // found["granularity"]
        r.actual.append(BitmapCheck.make(self.check.name, self.check.expected, have))


@dataclass(repr=False, eq=False)
class CompareImages(Step):
    """``qemu_img compare A B``, after the VM is shut down and an optional rebase."""

    compare: ImageCompare = field(kw_only=True)
    rebase: str | None = field(kw_only=True)     # golden-form path of the new backing file
    fmt: str = field(kw_only=True)

    async def run(self, r: PartRun) -> None:
        await r.shutdown_vm()
        image = r.norm.reverse(self.compare.image)
        reference = r.norm.reverse(self.compare.reference)
        if self.rebase:
            result = await r.backend.qemu_img("rebase", "-u", "-b", r.norm.reverse(self.rebase),
                                              "-F", self.fmt, image)
            if result.status != 0:
                r.note(f"qemu-img rebase failed ({result.status}): {result.output.strip()}")
        result = await r.backend.qemu_img("compare", image, reference)
        if result.status >= 2:
            r.note(f"qemu-img compare failed ({result.status}): {result.output.strip()}")
        r.actual.append(ImageCompare.make(self.compare.image, self.compare.reference,
                                          result.status == 0, self.compare.expect_identical))


@dataclass(repr=False, eq=False)
class Probe(Step):
    """A line (and/or the JSON after it) recomputed from a query, as the recipe says."""

    query: str = field(kw_only=True)
    arguments: dict[str, Json] = field(kw_only=True)
    text: str | None = field(kw_only=True)
    next_json: str | None = field(kw_only=True)

    async def run(self, r: PartRun) -> None:
        await r.settle()
        reply = await r.execute(self.query, self.arguments)
        value = reply.get("return", reply)
        head = self.records[0]
        if self.text is not None:
            r.actual.append(Text.make(r.norm.text(r.render_template(self.text, value))))
        else:
            r.actual.append(head)
        if self.next_json is not None:
            golden = self.records[-1]
            assert isinstance(golden, JsonRecord)
            computed = r.evaluate(self.next_json, value)
            r.actual.append(JsonRecord.make(r.norm.json(computed, golden.value), golden.indent,
                                            line=golden.line))
