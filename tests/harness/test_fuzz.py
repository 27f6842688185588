"""A short run of the fuzzers of benchmarks/fuzz.py (the full runs are ``tox -e fuzz``)."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "fuzz", Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz.py")
assert SPEC is not None and SPEC.loader is not None
fuzz = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(fuzz)


@pytest.mark.parametrize("seed", [1, 2])
def test_qmp_server_survives_fuzz_and_still_answers(seed: int) -> None:
    sent, replies = asyncio.run(fuzz.fuzz_server(2000, seed))
    assert sent == 2000 and replies >= sent


def test_mutated_goldens_give_located_errors_or_diffs_never_tracebacks() -> None:
    counts = fuzz.fuzz_goldens(150, seed=7, replay_every=10)
    assert counts["parsed"] + counts["located-errors"] == 150
    assert counts["located-errors"] > 0 and counts["parsed"] > 0
