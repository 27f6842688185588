"""``qmpreplay record``: render a case template into a draft golden, replay it, keep the result.

A case template (``cases/*.j2``) is jinja2 that renders to a *draft golden* in the transcript
language itself: every command visible and followed by a placeholder reply, the events to
wait for, ``{"bitmaps": {}}`` dumps, bitmap checks with the expected count, image compares
with the expected outcome. Recording is then just replaying the draft with no recipe and
writing the actual transcript — the engine recomputes replies, events, dumps, checks and
compares, and puts unexpected visible events where they arrived — so the result replays with
no recipe at all. A template or draft that is wrong is ``TEMPLATE:LINE: what`` (the template
line that produced the offending draft line), exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import jinja2

from harness.backends import make_factory
from harness.errors import QmpReplayError, RecipeError, TranscriptError
from harness.regen import faults, write_if_changed
from harness.replay.cli import default_jobs
from harness.replay.engine import PartResult
from harness.replay.plan import GOLDEN_PREFIX, compile_part
from harness.replay.recipe import Recipe
from harness.replay.runner import replay_transcript
from harness.transcript import format as fmt
from harness.transcript import parse
from harness.transcript.normalize import FILTERED_TIMESTAMP
from harness.transcript.records import BitmapCheck, ImageCompare, Record
from harness.transcript.transcript import Transcript

Json = Any


# -- what templates may call: each returns draft text in the transcript language ------------
def qmp(execute: str, arguments: dict[str, Json] | None = None,
        reply: Json = None) -> str:
    """A visible command as ``qmp_log`` prints it, and a placeholder reply to recompute."""
    placeholder = reply if reply is not None else {"return": {}}
    return fmt.log_command(execute, arguments or {}) + "\n" + fmt.log_json(placeholder)


def hmp(command_line: str) -> str:
    """An HMP command through ``human-monitor-command`` (its reply is a string)."""
    return qmp("human-monitor-command", {"command-line": command_line}, {"return": ""})


def qemu_io(node: str, command: str) -> str:
    """A qemu-io command on a node, visible as the HMP command that runs it."""
    return hmp(f'qemu-io {node} "{command}"')


def event(name: str, **data: Json) -> str:
    """An event to wait for, matched by name and job (``id`` or ``device``)."""
    return fmt.log_json({"data": data, "event": name, "timestamp": dict(FILTERED_TIMESTAMP)})


def bitmaps() -> str:
    """A dump of every node's dirty bitmaps (iotests' ``query_bitmaps``), recomputed."""
    return fmt.log_json({"bitmaps": {}}, indent=2)


def check_bitmap(name: str, expected: int) -> str:
    """``expecting N dirty sectors``: N is the template's; "have" is recomputed."""
    return "\n".join(BitmapCheck.make(name, int(expected), int(expected)).lines)


def compare(image: str, reference: str, identical: bool = True) -> str:
    """``qemu_img compare`` of two test files after the VM is shut down; the expected
    outcome is the template's, the actual one is recomputed."""
    return ImageCompare.make(path(image), path(reference), identical, identical).text


def path(name: str) -> str:
    """A test file as goldens name it (``TEST_DIR/PID-name``)."""
    return name if name.startswith(GOLDEN_PREFIX) else GOLDEN_PREFIX + name


HELPERS = {f.__name__: f for f in (qmp, hmp, qemu_io, event, bitmaps, check_bitmap, compare,
                                   path)}


# -- rendering, with a map from draft lines back to template lines ------------------------
class Draft:
    """A rendered template: the draft text and, per draft line, the template line."""

    def __init__(self, template: Path, text: str, lines: list[int]) -> None:
        self.template = template
        self.text = text
        self.lines = lines

    def error(self, draft_line: int, message: str) -> RecipeError:
        index = min(max(draft_line, 1), len(self.lines)) - 1
        tline = self.lines[index] if self.lines else 1
        return RecipeError(self.template, tline, f"{message} (draft line {draft_line})")


def _environment(directory: Path) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(directory),
                             undefined=jinja2.StrictUndefined, autoescape=False,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals.update(HELPERS)
    return env


def _yield_line(gen: Any, template: jinja2.Template) -> int:
    """The template line of the statement a suspended render generator just yielded at."""
    frame = gen.gi_frame
    while getattr(gen, "gi_yieldfrom", None) is not None and \
            getattr(gen.gi_yieldfrom, "gi_frame", None) is not None:
        inner = gen.gi_yieldfrom
        if inner.gi_frame.f_code.co_filename != template.filename:
            break                          # an included template: keep the include's line
        gen, frame = inner, inner.gi_frame
    return template.get_corresponding_lineno(frame.f_lineno) if frame is not None else 1


def _failure_line(exc: BaseException, template: Path) -> int:
    """The template line an exception came from (jinja2 rewrites its traceback so)."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if Path(frame.filename).resolve() == template.resolve() and frame.lineno:
            return frame.lineno
    return getattr(exc, "lineno", None) or 1


def render_template(template: str | Path, **variables: Json) -> Draft:
    """Render a case template; every failure is a RecipeError at its template line."""
    template = Path(template)
    if not template.is_file():
        raise RecipeError(template, 1, "cannot read the template: no such file")
    env = _environment(template.parent)
    try:
        compiled = env.get_template(template.name)
    except jinja2.TemplateSyntaxError as exc:
        raise RecipeError(exc.filename or template, exc.lineno or 1,
                          f"template does not parse: {exc.message}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(template, 1, f"cannot read the template: {exc}") from None
    chunks: list[tuple[str, int]] = []
    gen = compiled.root_render_func(compiled.new_context(variables))
    try:
        for chunk in gen:
            chunks.append((chunk, _yield_line(gen, compiled)))
    except Exception as exc:  # any failure in a template is the template's
        failure: Exception = exc
        try:
            env.handle_exception()          # rewrites the traceback onto template lines
        except Exception as rewritten:
            failure = rewritten
        message = failure.message if isinstance(failure, jinja2.TemplateError) and \
            failure.message else f"{type(failure).__name__}: {failure}"
        raise RecipeError(template, _failure_line(failure, template),
                          f"template does not render: {message}") from None
    source = template.read_text(encoding="utf-8")
    mapped = sorted({line for line, _ in compiled.debug_info})
    return Draft(template, "".join(c for c, _ in chunks), _line_map(chunks, source, mapped))


def _line_map(chunks: list[tuple[str, int]], source: str, mapped: list[int]) -> list[int]:
    """Per draft line, the template line it came from. Output of an expression (a helper's
    several lines) all maps to the expression's line; literal template text maps line by
    line, found in the source between its statement's line and the next mapped one."""
    starts = [0] + [i + 1 for i, ch in enumerate(source) if ch == "\n"]
    lines: list[int] = []
    at_start = True
    for text, tline in chunks:
        if not text:
            continue
        found = source.find(text, starts[tline - 1]) if tline <= len(starts) else -1
        bound = next((starts[m - 1] for m in mapped if m > tline and m <= len(starts)),
                     len(source))
        literal = 0 <= found <= bound
        if at_start:
            lines.append(source.count("\n", 0, found) + 1 if literal else tline)
        for i, ch in enumerate(text[:-1]):
            if ch == "\n":
                lines.append(source.count("\n", 0, found + i + 1) + 1 if literal else tline)
        at_start = text.endswith("\n")
    return lines


def load_draft(draft: Draft, name: str | Path) -> Transcript:
    """Parse the draft and compile every section with no recipe: a draft that needs one
    (a bare result, a qemu-io echo with no drive) is an error at its template line."""
    try:
        transcript = parse(draft.text, name)
    except TranscriptError as exc:
        raise draft.error(exc.line, exc.message) from None
    if not transcript.sections():
        raise draft.error(1, "the draft has no runnable section (no command to run)")
    for part in transcript.sections():
        try:
            compile_part(part, Recipe(), str(name))
        except RecipeError as exc:
            raise draft.error(exc.line, exc.message) from None
    return transcript


# -- the command ----------------------------------------------------------------------------
def unmet_expectations(records: list[Record]) -> list[tuple[int, str]]:
    """(line in the recorded golden, text) of every check or compare that says ERROR!."""
    out, line = [], 1
    for r in records:
        if (isinstance(r, BitmapCheck) and not r.ok) or \
                (isinstance(r, ImageCompare) and r.identical != r.expect_identical):
            out.append((line + len(r.lines) - 1, r.lines[-1]))
        line += len(r.lines)
    return out


def run(args: argparse.Namespace) -> int:
    if args.recipe:
        raise QmpReplayError("record: a draft is fully visible and replays with no recipe; "
                             "drop --recipe")
    output = Path(args.output)
    draft = render_template(args.template)
    transcript = load_draft(draft, output)
    factory = make_factory(args.backend, args.qemu_binary, args.qemu_img)
    started = time.monotonic()

    def progress(result: PartResult) -> None:
        mark = "fault" if faults(result) else "ok"
        print(f"{mark:<6}{result.title}  ({result.seconds:.2f} s)", file=sys.stderr,
              flush=True)
        for f in faults(result):
            print(f"      {f}", file=sys.stderr)

    result = asyncio.run(replay_transcript(transcript, Recipe(), factory, on_result=progress,
                                           jobs=default_jobs(args.backend)))
    bad = [r for r in result.results if faults(r)]
    if bad:
        raise QmpReplayError(f"record: not writing {output}: {len(bad)} section(s) had a "
                             f"backend fault on {args.backend} (first: '{bad[0].title}', "
                             f"{faults(bad[0])[0]})")
    text = result.actual_text()
    for part in parse(text, output).sections():   # what we write replays, or this is a bug
        compile_part(part, Recipe(), str(output))
    wrote = write_if_changed(output, text)
    for line, what in unmet_expectations(result.actual_records()):
        print(f"{output}:{line}: expectation not met: {what}", file=sys.stderr)
    print(f"recorded {len(result.results)} sections of {args.template} on {args.backend} "
          f"in {time.monotonic() - started:.2f} s into {output}"
          f"{'' if wrote else ' (unchanged)'}")
    return 0

