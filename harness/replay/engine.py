"""Run compiled sections on a backend and compare what happened with the golden.

Each section gets a fresh test directory and a fresh backend. Events are matched, not
ordered: the golden's events are expectations the replayer waits for (by event name and job),
in the place the golden prints them; an expected event that never comes is missing there, and
a visible event nobody expected is shown where it arrived. Before each step the replayer
settles: it waits until every job is at rest, as iotests' ``run_job`` waits on events.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.backends.base import Backend, VmConfig
from harness.errors import BackendError, RecipeError
from harness.replay import templates
from harness.replay.jobs import JobTracker
from harness.replay.plan import GOLDEN_PREFIX, Plan, compile_part
from harness.replay.recipe import Recipe
from harness.transcript.normalize import DEFAULT_FILTERS, Context, Normalizer
from harness.transcript.records import Event, Record, Reply
from harness.transcript.render import render_records, same_text
from harness.transcript.transcript import Part, Transcript

Json = Any
BackendFactory = Callable[[Path], Backend]

SETTLE_TIMEOUT = 60.0     # a job that does not come to rest in this time is reported stuck
EVENT_TIMEOUT = 10.0      # for events no job explains (a job's events end when it rests)
SECTION_TIMEOUT = 300.0   # a whole section, whatever happens in it
DEGRADED_WAIT = 0.1       # once something expected never came, later waits are cut short
POLL_INTERVAL = 0.005     # between repetitions of a polled query


@dataclass
class Received:
    message: dict[str, Json]
    position: int          # how many actual records existed when it arrived
    consumed: bool = False


@dataclass
class PartResult:
    """The outcome of one section: pass/fail, both texts, and what went wrong."""

    golden_path: str
    title: str
    line: int
    golden: list[Record]
    actual: list[Record]
    seconds: float
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    backend: str = ""
    skipped: str | None = None   # why the section cannot run on this backend (recipe's skip)
    test_dir: str | None = None  # kept for the caller (keep_dir): it removes it

    @property
    def passed(self) -> bool:
        return (self.skipped is None and self.error is None
                and same_text(self.golden, self.actual))

    @property
    def failed(self) -> bool:
        return self.skipped is None and not self.passed

    @property
    def golden_text(self) -> str:
        return render_records(self.golden)

    @property
    def actual_text(self) -> str:
        return render_records(self.actual)


class StepFailure(Exception):
    """A step could not do its job (a stuck job); the section fails, the run goes on."""


class SectionTimeout(StepFailure):
    """The section ran out of time: its remaining steps are not run."""


class PartRun:
    """The state of one section being replayed: backend, events, jobs, actual records."""

    def __init__(self, plan: Plan, backend: Backend, norm: Normalizer,
                 settle_timeout: float, settle: bool,
                 visible_events: frozenset[str] = frozenset()) -> None:
        self.plan = plan
        self.backend = backend
        self.norm = norm
        self.actual: list[Record] = []
        self.received: list[Received] = []
        self.unconsumed: dict[str | None, list[Received]] = {}   # by event name, in arrival order
        self.jobs = JobTracker()
        self.notes: list[str] = []
        self.settle_timeout = settle_timeout
        self.section_limit = max(SECTION_TIMEOUT, 4 * settle_timeout)
        self.section_deadline = time.monotonic() + self.section_limit
        self.degraded = False   # an expected event or state never came: fail fast from now
        self.settling = settle
        self.vm_down = False
        self.visible = visible_events

    def note(self, message: str) -> None:
        self.notes.append(message)

    # -- events --------------------------------------------------------------------------------
    def _arrived(self, message: Json) -> None:
        received = Received(dict(message), len(self.actual))
        self.received.append(received)
        self.unconsumed.setdefault(received.message.get("event"), []).append(received)
        self.jobs.on_event(received.message)

    async def drain(self) -> None:
        """Take in every event that has already arrived."""
        while not self.backend.events.empty():
            self._arrived(await self.backend.events.get())

    async def next_event(self, timeout: float) -> bool:
        """Take the next event, waiting at most ``timeout`` seconds; False if none came."""
        events = self.backend.events
        if events.empty():   # only a real wait pays for a timeout (no task, unlike wait_for)
            try:
                async with asyncio.timeout(max(timeout, 0)):
                    self._arrived(await events.get())
            except TimeoutError:
                return False
            return True
        self._arrived(await events.get())
        return True

    def deadline(self, seconds: float) -> float:
        """When a wait of ``seconds`` must give up: sooner once the run is already failing,
        never after the section's own deadline (then the section stops)."""
        now = time.monotonic()
        if now >= self.section_deadline:
            raise SectionTimeout(f"section timed out after {self.section_limit:.0f} s; "
                                 f"the steps after this one were not run")
        return min(now + (min(seconds, DEGRADED_WAIT) if self.degraded else seconds),
                   self.section_deadline)

    async def settle(self) -> None:
        """Wait until every job is at rest (or fail the step after the settle timeout)."""
        await self.drain()
        if not self.settling or self.vm_down:
            return
        deadline = self.deadline(self.settle_timeout)
        while busy := self.jobs.busy():
            if not await self.next_event(deadline - time.monotonic()):
                self.degraded = True
                raise StepFailure("jobs not at rest after "
                                  f"{self.settle_timeout:.0f} s: "
                                  + ", ".join(f"{j.id} ({j.status})" for j in busy))

    def _take(self, golden: Json) -> Json | None:
        """Consume the first unconsumed event with the golden's name and job, if any."""
        candidates = self.unconsumed.get(golden.get("event"), [])
        ident = _identity(golden)
        for i, rec in enumerate(candidates):
            if ident is None or _identity(rec.message) == ident:
                rec.consumed = True
                del candidates[i]
                return rec.message
        return None

    async def wait_event(self, golden: Json) -> Json | None:
        """The first unconsumed event like ``golden`` (name and job), waiting if need be.

        Gives up as soon as it cannot come any more: every job is at rest and the event
        belongs to a job (jobs only emit events while they move), or after a timeout.
        """
        await self.drain()
        is_job_event = _identity(golden) is not None
        deadline = self.deadline(self.settle_timeout if is_job_event and self.settling
                                 else EVENT_TIMEOUT)
        while True:
            if (found := self._take(golden)) is not None:
                return found
            # Jobs only emit events while they move; with settling off (jobs move under our
            # feet, as in 219), a resting job may be about to move again: wait instead.
            if self.vm_down or (self.settling and is_job_event and not self.jobs.busy()):
                return None
            if not await self.next_event(deadline - time.monotonic()):
                self.degraded = True
                return None

    def unexpected_events(self) -> list[Received]:
        return [r for r in self.received if not r.consumed
                and r.message.get("event") in self.visible]

    # -- commands and queries ------------------------------------------------------------------
    async def execute(self, name: str, arguments: dict[str, Json]) -> Json:
        if self.vm_down:
            raise StepFailure(f"{name}: the VM was already shut down for image comparisons")
        reply = await self.backend.execute(name, arguments)
        self.jobs.on_command(name, arguments, reply)
        await self.drain()
        return reply

    async def execute_shown(self, name: str, arguments: dict[str, Json], golden: Json,
                            shown: Callable[[Json], Json]) -> Json:
        """Execute; with a golden to poll for, repeat until what is shown matches it.

        For state that moves on its own (a speed-limited job's progress): the recipe lists
        such commands under ``poll``; the last result is shown if the golden never comes.
        """
        deadline = self.deadline(self.settle_timeout)
        while True:
            value = shown(await self.execute(name, arguments))
            if golden is None or self.norm.json(value, golden) == golden:
                return value
            if time.monotonic() > deadline:
                self.degraded = True
                return value
            await asyncio.sleep(POLL_INTERVAL)

    async def poll_until(self, name: str, arguments: dict[str, Json], condition: str) -> None:
        deadline = self.deadline(self.settle_timeout)
        while True:
            reply = await self.execute(name, arguments)
            if self.evaluate(condition, reply.get("return", reply)):
                return
            if time.monotonic() > deadline:
                self.degraded = True
                raise StepFailure(f"{name}: {condition!r} still false after "
                                  f"{self.settle_timeout:.0f} s (last: {reply})")
            await asyncio.sleep(POLL_INTERVAL)

    async def query_bitmaps(self, source: str) -> dict[str, Json]:
        """iotests' ``query_bitmaps()`` (by node) or 236's variant (by drive, query-block)."""
        if source == "devices":
            reply = await self.execute("query-block", {})
            return {d["device"]: d.get("inserted", {}).get("dirty-bitmaps", [])
                    for d in reply.get("return", [])}
        reply = await self.execute("query-named-block-nodes", {})
        return {n["node-name"]: n["dirty-bitmaps"] for n in reply.get("return", [])
                if "dirty-bitmaps" in n}

    async def shutdown_vm(self) -> None:
        if not self.vm_down:
            await self.settle()
            await self.drain()
            self.vm_down = True
            await self.backend.shutdown()

    def render_template(self, template: str, value: Json) -> str:
        try:
            return templates.render(template, r=value, **self.plan.variables)
        except templates.TemplateError as exc:
            raise StepFailure(f"probe template {template!r}: {exc}") from None

    def evaluate(self, expression: str, value: Json) -> Json:
        try:
            return templates.evaluate(expression, r=value, **self.plan.variables)
        except templates.TemplateError as exc:
            raise StepFailure(f"probe expression {expression!r}: {exc}") from None


def _identity(event: Json) -> str | None:
    data = event.get("data") or {}
    if not isinstance(data, dict):
        return None
    value = data.get("id", data.get("device"))
    return str(value) if value is not None else None


BLOCK_JOB_EVENTS = frozenset({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR",
                              "BLOCK_JOB_READY", "BLOCK_JOB_PENDING"})


def visible_events(golden: Transcript) -> frozenset[str]:
    """Events whose absence from the golden means something: the kinds it logs at all.

    A script logs the events it waits for; iotests' run_job logs every BLOCK_JOB_* event of
    its job, so one BLOCK_JOB_* in the file makes them all visible.
    """
    names = golden.event_names
    return names | (BLOCK_JOB_EVENTS if names & BLOCK_JOB_EVENTS else frozenset())


def vm_config(recipe: Recipe, norm: Normalizer, variables: dict[str, Json]) -> VmConfig:
    return VmConfig(drives=tuple(norm.reverse(d) for d in recipe.drives),
                    blockdevs=tuple(norm.reverse(b) for b in recipe.blockdevs))


async def run_part(golden: Transcript, part: Part, recipe: Recipe, factory: BackendFactory,
                   *, settle_timeout: float | None = None,
                   keep_dir: bool = False) -> PartResult:
    """Replay one section on a fresh backend in a fresh test directory. With ``keep_dir``
    the directory outlives the section (``result.test_dir``) and a VM still running is
    shut down first, as iotests' VM.shutdown() does, so that its images are complete."""
    started = time.monotonic()
    result = PartResult(golden.path, part.title, part.line, list(part.records), [], 0.0)
    name = getattr(factory, "name", "")
    if name in recipe.skip:
        result.backend, result.skipped = name, recipe.skip[name]
        return result
    test_dir = Path(tempfile.mkdtemp(prefix="qmpreplay-"))
    backend: Backend | None = None
    try:
        plan = compile_part(part, recipe, golden.path)
        norm = Normalizer(Context(test_dir, f"{os.getpid()}-"),
                          recipe.filters or DEFAULT_FILTERS)
        backend = factory(test_dir)
        result.backend = backend.name
        run = PartRun(plan, backend, norm, settle_timeout or recipe.timeout or SETTLE_TIMEOUT,
                      recipe.settle, visible_events(golden))
        await prepare_images(run, recipe)
        await backend.start(vm_config(recipe, norm, plan.variables))
        try:
            await run_steps(run)
        finally:
            result.actual = insert_unexpected(run)
            result.notes = run.notes
    except (BackendError, RecipeError, StepFailure) as exc:
        result.error = str(exc)
    except Exception as exc:  # a bug in a backend: this section's error, never the run's end
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        result.error = (f"backend raised {type(exc).__name__} at "
                        f"{Path(frame.filename).name}:{frame.lineno}: {exc}")
    except asyncio.CancelledError:   # nobody will get the result: nothing is kept
        keep_dir = False
        raise
    finally:
        if backend is not None:
            if keep_dir and backend.running:
                with contextlib.suppress(BackendError):
                    await backend.shutdown()
            await backend.close()
        if keep_dir:
            result.test_dir = str(test_dir)
        else:
            remove_later(test_dir)
        result.seconds = time.monotonic() - started
    return result


_removals: set[asyncio.Future[None]] = set()


def remove_later(test_dir: Path) -> None:
    """Delete a test directory in a worker thread, off the critical path (unlinking large
    sparse images is slow). ``asyncio.run`` waits for its default executor before it
    returns, so no directory outlives the run."""
    future = asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, test_dir, True)
    _removals.add(future)
    future.add_done_callback(_removals.discard)


async def prepare_images(run: PartRun, recipe: Recipe) -> None:
    """``qemu-img create`` (and qemu-io writes) for the images the script made by itself."""
    for image in recipe.images:
        path = run.norm.reverse(GOLDEN_PREFIX + image.name)
        size = recipe.expand(image.size, run.plan.variables)
        result = await run.backend.qemu_img("create", "-f", image.format, path, size)
        if result.status != 0:
            raise BackendError(f"qemu-img create {image.name}: {result.output.strip()}")
        if image.io:
            result = await run.backend.qemu_io(image.format, path, *image.io)
            if result.status != 0:
                raise BackendError(f"qemu-io {image.name}: {result.output.strip()}")


async def run_steps(run: PartRun) -> None:
    for step in run.plan.steps:
        try:
            await step.run(run)
        except StepFailure as exc:
            run.note(f"line {step.line}: {exc}")
            if isinstance(exc, SectionTimeout):
                break
    await run.drain()


def insert_unexpected(run: PartRun) -> list[Record]:
    """The actual records with every unexpected visible event put where it arrived; one
    that arrived during a command goes after its reply, as iotests logs it (between the two
    it would turn the reply into a bare result)."""
    extras = run.unexpected_events()
    if not extras:
        return run.actual
    out: list[Record] = []
    pending = sorted(extras, key=lambda r: r.position)
    for index, record in enumerate(run.actual):
        while pending and pending[0].position <= index and not isinstance(record, Reply):
            out.append(Event.make(run.norm.json(pending.pop(0).message)))
        out.append(record)
    out += [Event.make(run.norm.json(r.message)) for r in pending]
    return out


Runner = Callable[[Transcript, Part], Awaitable[PartResult]]
