"""Typed records: one per logical line group of an iotests-style golden.

A record keeps the exact source lines it came from (so rendering is byte-exact) and its
parsed payload (so replay and diff work on meaning, not text). Records built from live
output get their lines from :mod:`harness.transcript.format`, which writes JSON the way
iotests' ``log()`` and ``qmp_log()`` do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from harness.transcript import format as fmt

Json = Any


@dataclass(frozen=True)
class Record:
    """Base of every record: its first line number (1-based; 0 if synthesized) and lines."""

    kind: ClassVar[str] = "record"
    lines: tuple[str, ...]
    line: int = field(default=0, kw_only=True)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def payload(self) -> Json:
        """The parsed meaning of the record, as plain JSON (what ``parse --json`` prints)."""
        return self.text


@dataclass(frozen=True)
class Blank(Record):
    kind: ClassVar[str] = "blank"

    @classmethod
    def make(cls) -> Blank:
        return cls(("",))

    def payload(self) -> Json:
        return None


@dataclass(frozen=True)
class Text(Record):
    """Free text, compared verbatim (219's ``Launching VM...``, ``Job failed: …``)."""

    kind: ClassVar[str] = "text"

    @classmethod
    def make(cls, text: str) -> Text:
        return cls(tuple(text.split("\n")))


@dataclass(frozen=True)
class Section(Record):
    """``=== title ===`` after a blank line or at the top: a fresh backend and test dir."""

    kind: ClassVar[str] = "section"
    title: str = field(default="", kw_only=True)

    @classmethod
    def make(cls, title: str) -> Section:
        return cls((f"=== {title} ===",), title=title)

    def payload(self) -> Json:
        return self.title


@dataclass(frozen=True)
class Heading(Record):
    """``--- title ---``, ``-- title --`` or an inner ``=== title ===``; compared verbatim."""

    kind: ClassVar[str] = "heading"
    title: str = field(default="", kw_only=True)
    marker: str = field(default="---", kw_only=True)

    def payload(self) -> Json:
        return {"marker": self.marker, "title": self.title}


@dataclass(frozen=True)
class JsonRecord(Record):
    """A JSON value on one line or pretty-printed over several (``indent`` says which)."""

    kind: ClassVar[str] = "json"
    value: Json = field(default=None, kw_only=True)
    indent: int | None = field(default=None, kw_only=True)

    @classmethod
    def make(cls, value: Json, indent: int | None = None, **kw: Any) -> JsonRecord:
        return cls(tuple(fmt.log_json(value, indent).split("\n")), value=value, indent=indent,
                   **kw)

    def payload(self) -> Json:
        return self.value


@dataclass(frozen=True)
class Command(JsonRecord):
    """``{"execute": …, "arguments": …}`` as ``qmp_log`` prints it (execute first)."""

    kind: ClassVar[str] = "command"

    @classmethod
    def make(cls, value: Json, indent: int | None = None, **kw: Any) -> Command:
        """As qmp_log prints it; the payload is what the text says (keys as iotests logs
        them), so parsing the text gives the record back."""
        logged = fmt.logged_command(value["execute"], value.get("arguments", {}))
        return cls(tuple(fmt.log_json(logged, indent, sort=False).split("\n")), value=logged,
                   indent=indent, **kw)

    @property
    def name(self) -> str:
        return str(self.value["execute"])

    @property
    def arguments(self) -> dict[str, Json]:
        return dict(self.value.get("arguments") or {})


@dataclass(frozen=True)
class Reply(JsonRecord):
    """``{"return": …}`` or ``{"error": …}`` answering the command or qemu-io echo above it."""

    kind: ClassVar[str] = "reply"


@dataclass(frozen=True)
class BareResult(JsonRecord):
    """A result with no command echoed before it: a hidden step (idiom or recipe)."""

    kind: ClassVar[str] = "bare-result"


@dataclass(frozen=True)
class Event(JsonRecord):
    """A QMP event with filtered timestamp; replay waits for it."""

    kind: ClassVar[str] = "event"

    @property
    def name(self) -> str:
        return str(self.value["event"])


@dataclass(frozen=True)
class BitmapDump(JsonRecord):
    """``{"bitmaps": {node: [...]}}`` pretty-printed; recomputed from the backend."""

    kind: ClassVar[str] = "bitmap-dump"


@dataclass(frozen=True)
class QemuIo(Record):
    """The echo of a qemu-io command (``write -P0x49 0x0000000 0x10000``) before its reply."""

    kind: ClassVar[str] = "qemu-io"
    command: str = field(default="", kw_only=True)

    @classmethod
    def make(cls, command: str) -> QemuIo:
        return cls((command,), command=command)

    def payload(self) -> Json:
        return self.command


@dataclass(frozen=True)
class BitmapCheck(Record):
    """``= Checking Bitmap NAME =`` and ``expecting N dirty sectors; have M. OK!``."""

    kind: ClassVar[str] = "bitmap-check"
    name: str = field(default="", kw_only=True)
    expected: int = field(default=0, kw_only=True)
    have: int = field(default=0, kw_only=True)

    @classmethod
    def make(cls, name: str, expected: int, have: int) -> BitmapCheck:
        verdict = "OK!" if expected == have else "ERROR!"
        return cls((f"= Checking Bitmap {name} =",
                    f"expecting {expected} dirty sectors; have {have}. {verdict}"),
                   name=name, expected=expected, have=have)

    @property
    def ok(self) -> bool:
        return self.expected == self.have

    def payload(self) -> Json:
        return {"name": self.name, "expected": self.expected, "have": self.have}


COMPARE_OUTCOMES = ("Identical", "Mismatch")


@dataclass(frozen=True)
class ImageCompare(Record):
    """``qemu_img compare "A" "B" ==> Identical, OK!``: the outcome and whether it was wanted."""

    kind: ClassVar[str] = "image-compare"
    image: str = field(default="", kw_only=True)
    reference: str = field(default="", kw_only=True)
    identical: bool = field(default=True, kw_only=True)
    expect_identical: bool = field(default=True, kw_only=True)

    @classmethod
    def make(cls, image: str, reference: str, identical: bool,
             expect_identical: bool) -> ImageCompare:
        outcome = "Identical" if identical else "Mismatch"
        verdict = "OK!" if identical == expect_identical else "ERROR!"
        return cls((f'qemu_img compare "{image}" "{reference}" ==> {outcome}, {verdict}',),
                   image=image, reference=reference, identical=identical,
                   expect_identical=expect_identical)

    def payload(self) -> Json:
        return {"image": self.image, "reference": self.reference,
                "identical": self.identical, "expect_identical": self.expect_identical}


RECORD_KINDS: tuple[type[Record], ...] = (
    Blank, Text, Section, Heading, Command, Reply, BareResult, Event, BitmapDump, JsonRecord,
    QemuIo, BitmapCheck, ImageCompare)
