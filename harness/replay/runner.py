"""Replay whole goldens: sections in order, each on a fresh backend."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.backends.base import Backend
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
    gate = asyncio.Semaphore(max(1, jobs))
    stop = asyncio.Event()
    pool = _worker_pool(jobs, len(parts), factory, (transcript, recipe, factory, parts))

    async def one(index: int) -> PartResult | None:
        async with gate:
            if stop.is_set():
                return None
            if pool is not None:
                return await asyncio.get_running_loop().run_in_executor(
                    pool, _run_forked, index)
            return await run_part(transcript, parts[index], recipe, factory)

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(parts))]
    try:
        for task in tasks:
            part_result = await task
            if part_result is None:
                continue
            result.results.append(part_result)
            if on_result is not None and on_result(part_result) is False:
                stop.set()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return result


# What forked workers replay: set before the pool forks, inherited by the children.
_FORKED: tuple[Transcript, Recipe, BackendFactory, list[Part]] | None = None


def _worker_pool(jobs: int, sections: int, factory: BackendFactory,
                 state: tuple[Transcript, Recipe, BackendFactory, list[Part]],
                 ) -> concurrent.futures.ProcessPoolExecutor | None:
    global _FORKED
    if jobs <= 1 or sections <= 1 or not getattr(factory, "in_process", False) \
            or "fork" not in multiprocessing.get_all_start_methods():
        return None
    _FORKED = state
    preload = getattr(factory, "preload", None)
    if preload is not None:
        preload()
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=min(jobs, sections), mp_context=multiprocessing.get_context("fork"))


def _run_forked(index: int) -> PartResult:
    assert _FORKED is not None
    transcript, recipe, factory, parts = _FORKED
    return asyncio.run(run_part(transcript, parts[index], recipe, factory))


async def replay_file(path: str | Path, factory: BackendFactory, *,
                      recipe: str | Path | None = None, keyword: str | None = None,
                      on_result: Callable[[PartResult], bool | None] | None = None,
                      jobs: int = 1) -> list[PartResult]:
    """Replay the selected sections of one golden file."""
    result = await replay_transcript(parse_file(path), find_recipe(path, recipe), factory,
                                     keyword=keyword, on_result=on_result, jobs=jobs)
    return result.results
