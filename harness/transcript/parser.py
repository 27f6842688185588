"""Read an iotests-style golden into typed records that know their line numbers.

The grammar is line-oriented. JSON is recognised by its first character; a lone ``{`` or
``[`` opens a pretty-printed block that ends at the matching bracket in column 0. JSON values
are then classified by meaning (command, reply, event, bitmap dump, bare result), the rest by
the shapes iotests' helpers print. Any line that starts like one of those shapes but is
malformed is an error naming the file and line — a golden is never half-understood.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from harness.errors import TranscriptError
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
    Record,
    Reply,
    Section,
    Text,
)
from harness.transcript.transcript import Transcript

SECTION = re.compile(r"^=== (.*) ===$")
HEADING = re.compile(r"^(---|--) (.*) \1$")
CHECK_HEAD = re.compile(r"^= Checking Bitmap (.+) =$")
CHECK_BODY = re.compile(r"^expecting (\S+) dirty sectors; have (\S+)\. (\S+)$")
COMPARE = re.compile(r'^qemu_img compare "(.*)" "(.*)" ==> (\S+), (\S+)$')
# qemu-io commands as echoed by iotests before the HMP reply (see qemu-io-cmds.c)
QEMU_IO = re.compile(
    r"^(read|readv|write|writev|aio_read|aio_write|aio_flush|flush|discard|zone_\w+|"
    r"truncate|length|info|map|alloc|sleep|abort|sigraise|break|remove_break|resume|"
    r"wait_break)( .*)?$")
CLOSERS = {"{": "}", "[": "]"}
_decode = json.JSONDecoder().raw_decode   # text here starts with "{" or "[", never with space


def parse(text: str, path: str | Path = "<transcript>") -> Transcript:
    """Parse golden text; raise TranscriptError (``FILE:LINE: what``) on malformed input."""
    if text == "":
        raise TranscriptError(path, 1, "empty transcript")
    trailing_newline = text.endswith("\n")
    lines = text.split("\n")
    if trailing_newline:
        lines.pop()
    return Transcript(str(path), _Parser(str(path), lines).records(), trailing_newline)


def parse_file(path: str | Path) -> Transcript:
    """Read and parse a golden file; every I/O or encoding problem is a TranscriptError."""
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError:
        raise TranscriptError(path, 1, "is a directory, not a transcript") from None
    except OSError as exc:
        raise TranscriptError(path, 1, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TranscriptError(
            path, line, f"not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    return parse(text, path)


class _Parser:
    def __init__(self, path: str, lines: list[str]) -> None:
        self.path = path
        self.lines = lines
        self.out: list[Record] = []

    def error(self, line: int, message: str) -> TranscriptError:
        return TranscriptError(self.path, line, message)

    def records(self) -> list[Record]:
        i = 0
        while i < len(self.lines):
            i = self.one(i)
        return self.out

    def one(self, i: int) -> int:
        """Parse the record starting at index ``i``; return the index after it."""
        line, no = self.lines[i], i + 1
        if line == "":
            self.out.append(Blank((line,), line=no))
            return i + 1
        if line[0] in "{[":   # most lines: no section, heading or check starts like this
            if line in CLOSERS:
                return self.pretty_json(i)
            self.out.append(self.classify((line,), self.load(line, no), None, no))
            return i + 1
        if line[0] == "=" and (m := SECTION.match(line)):
            if i == 0 or self.lines[i - 1] == "":
                self.out.append(Section((line,), line=no, title=m.group(1)))
            else:
                self.out.append(Heading((line,), line=no, title=m.group(1), marker="==="))
            return i + 1
        if line[0] == "-" and (m := HEADING.match(line)):
            self.out.append(Heading((line,), line=no, title=m.group(2), marker=m.group(1)))
            return i + 1
        if line[0] == "=" and (m := CHECK_HEAD.match(line)):
            return self.bitmap_check(i, m.group(1))
        if line.startswith("qemu_img compare "):
            self.out.append(self.image_compare(line, no))
            return i + 1
        if QEMU_IO.match(line) and self.next_is_result(i):
            self.out.append(QemuIo((line,), line=no, command=line))
            return i + 1
        self.out.append(Text((line,), line=no))
        return i + 1

    def load(self, text: str, no: int) -> Any:
        try:
            value, end = _decode(text)   # json.loads, less its per-call overhead
            return value if end == len(text) else json.loads(text)   # (it allows white space)
        except json.JSONDecodeError as exc:
            raise self.error(no + exc.lineno - 1,
                             f"starts like JSON but does not parse: {exc.msg} "
                             f"at column {exc.colno}") from None

    def pretty_json(self, i: int) -> int:
        closer = CLOSERS[self.lines[i]]
        for j in range(i + 1, len(self.lines)):
            if self.lines[j] == closer:
                block = tuple(self.lines[i:j + 1])
                value = self.load("\n".join(block), i + 1)
                self.out.append(self.classify(block, value, _indent_of(block), i + 1))
                return j + 1
            if self.lines[j] == "":
                break
        raise self.error(i + 1, f"pretty-printed JSON opened here is never closed "
                                f"(no '{closer}' in column 0 before the next blank line "
                                f"or the end of the file)")

    def classify(self, lines: tuple[str, ...], value: Any, indent: int | None,
                 no: int) -> Record:
        if isinstance(value, dict):
            if "execute" in value or "exec-oob" in value:
                if not isinstance(value.get("execute", value.get("exec-oob")), str):
                    raise self.error(no, "a QMP command needs a string 'execute'")
                return Command(lines, line=no, value=value, indent=indent)
            if "event" in value:
                return Event(lines, line=no, value=value, indent=indent)
            if set(value) == {"bitmaps"}:
                return BitmapDump(lines, line=no, value=value, indent=indent)
            if value == {} or "return" in value or "error" in value:
                prev = self.out[-1] if self.out else None
                if value != {} and isinstance(prev, Command | QemuIo):
                    return Reply(lines, line=no, value=value, indent=indent)
                return BareResult(lines, line=no, value=value, indent=indent)
        return JsonRecord(lines, line=no, value=value, indent=indent)

    def bitmap_check(self, i: int, name: str) -> int:
        no = i + 1
        if i + 1 >= len(self.lines):
            raise self.error(no, "bitmap check has no 'expecting … dirty sectors' line")
        body = self.lines[i + 1]
        m = CHECK_BODY.match(body)
        if not m:
            raise self.error(no + 1, f"expected 'expecting N dirty sectors; have M. OK!' "
                                     f"after the bitmap check header, got {body!r}")
        want, have, verdict = m.groups()
        for label, number in (("expected", want), ("actual", have)):
            if not number.isdigit():
                raise self.error(no + 1, f"bitmap check: {label} count {number!r} "
                                         f"is not a number")
        if verdict not in ("OK!", "ERROR!"):
            raise self.error(no + 1, f"bitmap check: verdict {verdict!r} is neither "
                                     f"'OK!' nor 'ERROR!'")
        record = BitmapCheck(tuple(self.lines[i:i + 2]), line=no, name=name,
                             expected=int(want), have=int(have))
        if (verdict == "OK!") != record.ok:
            raise self.error(no + 1, f"bitmap check: verdict {verdict} contradicts "
                                     f"expecting {want}, have {have}")
        self.out.append(record)
        return i + 2

    def image_compare(self, line: str, no: int) -> ImageCompare:
        m = COMPARE.match(line)
        if not m:
            raise self.error(no, 'malformed image comparison; expected '
                                 'qemu_img compare "A" "B" ==> Identical|Mismatch, OK!|ERROR!')
        image, reference, outcome, verdict = m.groups()
        if outcome not in ("Identical", "Mismatch"):
            raise self.error(no, f"unknown compare outcome {outcome!r} "
                                 f"(expected 'Identical' or 'Mismatch')")
        if verdict not in ("OK!", "ERROR!"):
            raise self.error(no, f"unknown compare verdict {verdict!r} "
                                 f"(expected 'OK!' or 'ERROR!')")
        identical = outcome == "Identical"
        return ImageCompare((line,), line=no, image=image, reference=reference,
                            identical=identical,
                            expect_identical=identical == (verdict == "OK!"))

    def next_is_result(self, i: int) -> bool:
        """A qemu-io echo is always followed by the HMP reply iotests logs after it."""
        nxt = self.lines[i + 1] if i + 1 < len(self.lines) else ""
        return nxt.startswith(('{"return"', '{"error"'))


def _indent_of(block: tuple[str, ...]) -> int:
    """The indent a pretty block was printed with (that of its first member line)."""
    second = block[1] if len(block) > 2 else ""
    return len(second) - len(second.lstrip(" ")) or 2
