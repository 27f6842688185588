"""pytest plugin: goldens as test files, each ``=== section ===`` as a test item.

``pytest goldens/`` collects every ``*.out`` under a ``goldens`` directory (or any ``.out``
named on the command line) and runs each section on the backend ``--qmp-backend`` names.
A failing item shows the section's diff, hunks headed by golden line numbers. Works with
``-k``, ``-x`` and pytest-xdist's ``-n``: sections are independent, each on its own backend.

``--regen`` rewrites each golden whose sections ran differently (observations recomputed,
expectations kept; never from a run with a backend fault); ``--strict-goldens`` warns about
golden sections this run did not select and about recipes or case templates with no golden.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.errors import QmpReplayError


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qmpreplay", "replaying golden QMP transcripts")
    group.addoption("--qmp-backend", choices=("emulator", "qemu"), default="emulator",
                    help="where golden sections run (default: emulator)")
    group.addoption("--qemu-binary", metavar="PATH", default=None,
                    help="qemu-system-x86_64 for --qmp-backend qemu (default: from PATH)")
    group.addoption("--qemu-img", metavar="PATH", default=None,
                    help="qemu-img for --qmp-backend qemu (default: from PATH)")
    group.addoption("--regen", action="store_true",
                    help="rewrite each golden whose run differs (expectations kept)")
    group.addoption("--strict-goldens", action="store_true",
                    help="warn about golden sections no run selected and recipes with no golden")


REGEN_PROPERTY = "qmpreplay-regen"
_COLLECTED = pytest.StashKey[dict[str, Any]]()


class GoldenCoverageWarning(pytest.PytestWarning):
    """A golden section no test selected, or a recipe/template with no golden."""


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_COLLECTED] = {}
    if config.getoption("regen") and not hasattr(config, "workerinput"):
        from harness.pytest_regen import RegenPlugin
        config.pluginmanager.register(RegenPlugin(config), "qmpreplay-regen")


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    worker = getattr(config, "workerinput", None)
    if not config.getoption("strict_goldens") or (worker and worker["workerid"] != "gw0"):
        return
    import warnings

    from harness.pytest_regen import coverage_warnings
    selected = {(str(i.path), i.part.line) for i in session.items if isinstance(i, SectionItem)}
    for message, path, line in coverage_warnings(config.rootpath, config.stash[_COLLECTED],
                                                 selected):
        warnings.warn_explicit(GoldenCoverageWarning(message), GoldenCoverageWarning,
                               path, line)


def _wanted(file_path: Path, config: pytest.Config) -> bool:
    if file_path.suffix != ".out":
        return False
    if "goldens" in file_path.parts:
        return True
    return any(Path(a.split("::")[0]).resolve() == file_path.resolve() for a in config.args)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if _wanted(file_path, parent.config):
        return GoldenFile.from_parent(parent, path=file_path)
    return None


class GoldenFile(pytest.File):
    def collect(self) -> Iterator[pytest.Item]:
        from harness.replay.recipe import find_recipe
        from harness.transcript import parse_file
        try:
            transcript = parse_file(self.path)
            recipe = find_recipe(self.path)
        except QmpReplayError as exc:
            raise self.CollectError(str(exc)) from None
        self.config.stash[_COLLECTED][str(self.path)] = transcript
        for part in transcript.sections():
            yield SectionItem.from_parent(self, name=part.title, transcript=transcript,
                                          part=part, recipe=recipe)

    class CollectError(pytest.Collector.CollectError):
        pass


class SectionFailed(Exception):
    def __init__(self, result: Any) -> None:
        super().__init__(result.title)
        self.result = result


_factories: dict[tuple[str, str | None, str | None], Any] = {}


def _factory(config: pytest.Config) -> Any:
    from harness.backends import make_factory
    key = (config.getoption("qmp_backend"), config.getoption("qemu_binary"),
           config.getoption("qemu_img"))
    if key not in _factories:
        try:
            _factories[key] = make_factory(*key)
        except QmpReplayError as exc:
            raise pytest.UsageError(str(exc)) from None
    return _factories[key]


class SectionItem(pytest.Item):
    def __init__(self, *, transcript: Any, part: Any, recipe: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self.transcript = transcript
        self.part = part
        self.recipe = recipe
        self.result: Any = None

    def runtest(self) -> None:
        from harness.replay.engine import run_part
        try:
            self.result = asyncio.run(run_part(self.transcript, self.part, self.recipe,
                                               _factory(self.config)))
        finally:
            if self.config.getoption("regen") and (payload := self.regen_payload()):
                self.user_properties.append((REGEN_PROPERTY, payload))
        if self.result.skipped is not None:
            pytest.skip(f"{self.result.backend}: {self.result.skipped}")
        if not self.result.passed:
            raise SectionFailed(self.result)

    def regen_payload(self) -> dict[str, Any] | None:
        """What ``--regen`` needs of this run, plain enough to cross from an xdist worker;
        nothing for a section the backend skips (its golden text stays as it is)."""
        from harness.regen import faults
        result = self.result
        if result is not None and result.skipped is not None:
            return None
        return {"path": str(self.path), "line": self.part.line, "title": self.part.title,
                "text": result.actual_text if result is not None else "",
                "faults": faults(result) if result is not None else ["the run raised"]}

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str:
        if isinstance(excinfo.value, SectionFailed):
            from harness.replay.cli import format_result
            color = self.config.get_terminal_writer().hasmarkup
            return format_result(excinfo.value.result, color)
        if isinstance(excinfo.value, QmpReplayError):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, self.part.line - 1, f"{self.path.name}:{self.part.line} {self.name}"
