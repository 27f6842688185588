"""Replay whole goldens: sections in order, each on a fresh backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness.backends.base import Backend
from harness.replay.engine import PartResult, run_part
from harness.replay.recipe import find_recipe
from harness.transcript import parse_file

BackendFactory = Callable[[Path], Backend]


async def replay_file(path: str | Path, factory: BackendFactory, *,
                      recipe: str | Path | None = None, keyword: str | None = None,
                      on_result: Callable[[PartResult], bool] | None = None,
                      ) -> list[PartResult]:
    """Replay the selected sections of one golden; ``on_result`` returning False stops."""
    transcript = parse_file(path)
    found = find_recipe(path, recipe)
    results = []
    for part in transcript.sections():
        if keyword and keyword not in part.title:
            continue
        result = await run_part(transcript, part, found, factory)
        results.append(result)
        if on_result is not None and on_result(result) is False:
            break
    return results
