"""Replay whole goldens: sections in order, each on a fresh backend."""

from __future__ import annotations

import asyncio
import gc
import mmap
import os
import pickle
import shutil
import signal
import sys
import tempfile
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from harness.backends.base import Backend
from harness.replay import templates
from harness.replay.engine import PartResult, run_part
from harness.replay.recipe import Recipe, find_recipe
from harness.transcript import parse_file
from harness.transcript.records import Record
from harness.transcript.render import render_records
from harness.transcript.transcript import Part, Transcript

BackendFactory = Callable[[Path], Backend]


@dataclass
class FileResult:
    """One golden replayed: the transcript, its recipe, and a result per section run."""

    transcript: Transcript
    recipe: Recipe
    results: list[PartResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def actual_records(self) -> list[Record]:
        """The whole file as this run saw it: sections that ran give their actual records,
        the rest (preamble text, sections not selected) their golden records."""
        ran = {(r.line, r.title): r for r in self.results}
        out: list[Record] = []
        for part in self.transcript.parts():
            result = ran.get((part.line, part.title))
            out += result.actual if result is not None else list(part.records)
        return out

    def actual_text(self) -> str:
        text = render_records(self.actual_records())
        return text + "\n" if self.transcript.trailing_newline else text


async def replay_transcript(transcript: Transcript, recipe: Recipe, factory: BackendFactory, *,
                            keyword: str | None = None,
                            on_result: Callable[[PartResult], bool | None] | None = None,
                            jobs: int = 1) -> FileResult:
    """Replay the selected sections, up to ``jobs`` at a time, reporting them in file order.

    Sections are independent (each has its own VM and test directory). QEMU sections are
    separate processes already, so they overlap as tasks of this event loop; an in-process
    emulator competes for this one interpreter, so its sections go to forked workers.
    ``on_result`` returning False stops the run: sections not yet started are skipped.
    """
    result = FileResult(transcript, recipe)
    parts = [p for p in transcript.sections() if not keyword or keyword in p.title]
    gc.freeze()   # what exists now (modules, the golden) lives on: collections skip it
    if _can_fork(jobs, len(parts), factory):
        runner: _Sections = _ForkedSections(transcript, recipe, factory, parts, jobs)
    else:
        runner = _TaskSections(transcript, recipe, factory, parts, jobs)
    try:
        for pending in runner.results:
            part_result = await pending
            if part_result is None:
                continue
            result.results.append(part_result)
            if on_result is not None and on_result(part_result) is False:
                runner.stop()
    finally:
        await runner.close()
        gc.unfreeze()
    return result


class _Sections:
    """Sections being replayed: one awaitable result per section, in file order (None for
    a section skipped after a stop)."""

    results: list[Awaitable[PartResult | None]]

    def stop(self) -> None:
        """Start no more sections (those running finish and are reported)."""

    async def close(self) -> None:
        """Wait until nothing runs any more."""


class _TaskSections(_Sections):
    """Sections as tasks of this event loop, ``jobs`` at a time (QEMU: separate processes)."""

    def __init__(self, transcript: Transcript, recipe: Recipe, factory: BackendFactory,
                 parts: list[Part], jobs: int) -> None:
        gate = asyncio.Semaphore(max(1, jobs))
        self.stopped = False

        async def one(part: Part) -> PartResult | None:
            async with gate:
                if self.stopped:
                    return None
                return await run_part(transcript, part, recipe, factory)

        self.tasks = [asyncio.ensure_future(one(p)) for p in parts]
        self.results = list(self.tasks)

    def stop(self) -> None:
        self.stopped = True

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _can_fork(jobs: int, sections: int, factory: BackendFactory) -> bool:
    return (jobs > 1 and sections > 1 and getattr(factory, "in_process", False)
            and hasattr(os, "fork"))


class _ForkedSections(_Sections):
    """Sections in forked workers (an in-process emulator needs a CPU of its own).

    The workers share a pipe of section indices and take the next one whenever they are
    free; each sends its results back, pickled, on a pipe of its own. The pipe holds one
    index more than the workers run, refilled as results come in: no worker waits for this
    process, yet none runs far ahead of what it has reported (``-x`` stops soon). Forking
    (after the factory's preload) gives each worker the parsed golden and a warm
    interpreter for free; a flag in shared memory tells them to start no more sections.
    Their test directories go in one scratch directory of this process's, removed once they
    have gone: a worker that dies leaves nothing behind either.
    """

    def __init__(self, transcript: Transcript, recipe: Recipe, factory: BackendFactory,
                 parts: list[Part], jobs: int) -> None:
        preload = getattr(factory, "preload", None)
        if preload is not None:
            preload()
        templates.preload()
        loop = asyncio.get_running_loop()
        self.path = transcript.path
        self.parts = parts
        self.futures = [loop.create_future() for _ in parts]
        self.results = list(self.futures)
        self.stopped = mmap.mmap(-1, 1)
        self.scratch = tempfile.mkdtemp(prefix="qmpreplay-")
        self.pids: list[int] = []
        self.readers: list[asyncio.Task[None]] = []
        todo, todo_w = os.pipe()
        self.todo_w: int | None = todo_w
        self.fed = 0
        self._feed(min(jobs, len(parts)) + 1)
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()   # the preloaded emulator too: workers never walk (so never copy) it
        for _ in range(min(jobs, len(parts))):
            out_r, out_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(out_r)
                tempfile.tempdir = self.scratch
                if self.todo_w is not None:
                    os.close(self.todo_w)
                _worker(todo, out_w, self.stopped,
                        lambda index: run_part(transcript, parts[index], recipe, factory))
            os.close(out_w)
            self.pids.append(pid)
            self.readers.append(asyncio.ensure_future(self._read(out_r)))
        os.close(todo)
        self.done = asyncio.ensure_future(self._wait_workers())

    async def _read(self, fd: int) -> None:
        """Take one worker's results as they come, until it exits."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
        try:
            while header := await reader.read(8):
                self._feed()
                header += await reader.readexactly(8 - len(header))
                index = int.from_bytes(header[:4], "little")
                size = int.from_bytes(header[4:], "little")
                part_result, passed = pickle.loads(await reader.readexactly(size))
                part_result.golden = list(self.parts[index].records)
                if passed:   # the actual text is the golden's: its records stand in
                    part_result.actual = list(part_result.golden)
                if not self.futures[index].done():   # else the run was cancelled
                    self.futures[index].set_result(part_result)
        finally:
            transport.close()
            self._feed()   # in place of a result its worker died without sending

    def _feed(self, count: int = 1) -> None:
        """Queue the next ``count`` sections; close the pipe once none is left to queue."""
        if self.todo_w is None:
            return
        gone = False
        try:
            for _ in range(count if not self.stopped[0] else 0):
                if self.fed < len(self.parts):
                    os.write(self.todo_w, self.fed.to_bytes(4, "little"))
                    self.fed += 1
        except BrokenPipeError:   # every worker has gone
            gone = True
        if gone or self.fed == len(self.parts) or self.stopped[0]:
            os.close(self.todo_w)
            self.todo_w = None

    async def _wait_workers(self) -> None:
        """Once every worker has gone: a section nobody reported was skipped after a stop,
        or its worker died (that section's error)."""
        await asyncio.gather(*self.readers, return_exceptions=True)
        statuses = [os.waitpid(pid, 0)[1] for pid in self.pids]
        shutil.rmtree(self.scratch, ignore_errors=True)
        failed = next((s for s in statuses if s != 0), 0)
        for part, future in zip(self.parts, self.futures, strict=True):
            if future.done():
                continue
            if self.stopped[0]:
                future.set_result(None)
            else:
                future.set_result(_died(self.path, part, failed))

    def stop(self) -> None:
        self.stopped[0] = 1
        self._feed(0)

    async def close(self) -> None:
        self.stop()
        await self.done


def _died(path: str, part: Part, status: int) -> PartResult:
    how = (f"signal {-os.waitstatus_to_exitcode(status)}" if os.WIFSIGNALED(status)
           else f"status {os.waitstatus_to_exitcode(status)}")
    result = PartResult(path, part.title, part.line, list(part.records), [], 0.0)
    result.error = f"the worker process replaying this section died ({how})"
    return result


def _worker(todo: int, out: int, stopped: mmap.mmap,
            run: Callable[[int], Awaitable[PartResult]]) -> None:
    """A forked worker: replay the sections it takes from ``todo`` and send the results to
    ``out``. It never returns (nor runs the parent's exit handlers)."""
    status = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        removals = _KeptExecutor(1)
        while not stopped[0] and (data := os.read(todo, 4)):
            index = int.from_bytes(data, "little")
            payload = _pickled(_run_isolated(run(index), removals))
            os.write(out, index.to_bytes(4, "little") + len(payload).to_bytes(4, "little"))
            _write_all(out, payload)
        removals.shutdown(wait=True)
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        os._exit(status)


def _pickled(result: PartResult) -> bytes:
    """The result and whether it passed, without what the parent has already (pickling
    records is most of a result's cost): the golden records, and the actual ones of a
    section that passed, whose text is the golden's."""
    passed = result.passed
    result.golden = []
    if passed:
        result.actual = []
    return pickle.dumps((result, passed), pickle.HIGHEST_PROTOCOL)


class _KeptExecutor(ThreadPoolExecutor):
    """A default executor shared by the event loops of a worker's sections (one thread, not
    one per section): closing a loop shuts its executor down without waiting, which this one
    ignores; only the worker's own ``shutdown(wait=True)`` ends it."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if wait:
            super().shutdown(wait=True, cancel_futures=cancel_futures)


def _run_isolated(coro: Awaitable[PartResult], removals: ThreadPoolExecutor) -> PartResult:
    """``asyncio.run`` on a fresh loop, except that test directories are removed in the
    background (by ``removals``) while the next section runs."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.set_default_executor(removals)
    try:
        return loop.run_until_complete(coro)
    finally:
        if tasks := asyncio.all_tasks(loop):
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def replay_file(path: str | Path, factory: BackendFactory, *,
                      recipe: str | Path | None = None, keyword: str | None = None,
                      on_result: Callable[[PartResult], bool | None] | None = None,
                      jobs: int = 1) -> list[PartResult]:
    """Replay the selected sections of one golden file."""
    result = await replay_transcript(parse_file(path), find_recipe(path, recipe), factory,
                                     keyword=keyword, on_result=on_result, jobs=jobs)
    return result.results
