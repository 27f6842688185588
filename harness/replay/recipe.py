"""Recipes: the hidden steps of a golden, declared in ``cases/<stem>.toml``.

A golden prints results of steps it does not echo (images made by ``qemu-img create``, a
qemu-io ``flush`` logged as a bare ``{"return": ""}``, a ``qemu-img rebase -u`` before a
comparison). The recipe names them, briefly; any string value may be a jinja2 template over
the variables its ``title`` pattern captures from the section title. Example::

    title = 'Mode (?P<mode>\\w+); Bitmap Sync (?P<bsync>[\\w-]+)'
    images = [{ name = "img", format = "qcow2", size = "64M" }]
    [targets]                 # backup target node (regex) -> its file
    'ref_target_(\\d+)' = 'fbackup\\1'
    [hidden]                  # bare result text -> the HMP command (or QMP JSON) behind it
    '{"return": ""}' = 'qemu-io drive0 "flush"'
    [rebase]                  # image -> base, for qemu-img rebase -u before comparing it
    bsync2 = "{{ 'bsync1' if bsync == 'always' else 'fbackup0' }}"
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import RecipeError
from harness.replay import templates

Json = Any
KNOWN_KEYS = {"title", "images", "vm", "qemu-io", "bitmaps", "targets", "hidden", "sequence",
              "poll", "rebase", "steps", "probe", "settle", "timeout", "filters", "skip"}


@dataclass(frozen=True)
class Image:
    name: str
    format: str
    size: str
    io: tuple[str, ...] = ()       # qemu-io commands run on it before the VM starts


@dataclass(frozen=True)
class Probe:
    """A golden line (text) and/or the JSON right after it, recomputed from a query."""

    match: re.Pattern[str]
    query: str
    arguments: dict[str, Json]
    text: str | None          # jinja2 template of the line, with ``r`` = the query's return
    next_json: str | None     # jinja2 expression of the JSON record after the line


@dataclass(frozen=True)
class ExtraStep:
    """A step the golden shows no trace of, anchored before or after a golden record."""

    anchor: re.Pattern[str]
    before: bool
    action: str               # an HMP command line, or a QMP command as JSON
    until: str | None = None  # jinja2 condition on ``r`` (the return): repeat until true


@dataclass
class Recipe:
    path: str | None = None
    title: re.Pattern[str] | None = None
    images: list[Image] = field(default_factory=list)
    drives: list[dict[str, Json]] = field(default_factory=list)
    blockdevs: list[dict[str, Json]] = field(default_factory=list)
    qemu_io_device: str | None = None
    bitmap_source: str = "nodes"          # "nodes": query-named-block-nodes; "devices"
    bitmap_node: str | None = None
    targets: list[tuple[re.Pattern[str], str]] = field(default_factory=list)
    hidden: dict[str, str] = field(default_factory=dict)
    sequence: str | None = None           # template: one action per line, for bare results
    poll: frozenset[str] = frozenset()    # commands repeated until the golden's result shows
    rebase: dict[str, str] = field(default_factory=dict)
    steps: list[ExtraStep] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    settle: bool = True
    timeout: float | None = None
    filters: tuple[str, ...] | None = None
    skip: dict[str, str] = field(default_factory=dict)   # backend name -> why it cannot run

    def variables(self, section_title: str) -> dict[str, Json]:
        """Template variables for one section: the title pattern's named groups."""
        found: dict[str, Json] = {"section": section_title}
        if self.title is not None and (m := self.title.search(section_title)):
            found.update({k: v or "" for k, v in m.groupdict().items()})
        return found

    def expand(self, value: str, variables: dict[str, Json]) -> str:
        if "{{" not in value and "{%" not in value:
            return value
        try:
            return templates.render(value, **variables)
        except templates.TemplateError as exc:
            raise RecipeError(self.path or "<recipe>", 1,
                              f"template {value!r}: {exc} (variables: "
                              f"{', '.join(sorted(variables))})") from None

    def target_file(self, node: str) -> str | None:
        for pattern, file in self.targets:
            if pattern.fullmatch(node):
                return pattern.sub(file, node)
        return None


def load_recipe(path: str | Path) -> Recipe:
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise RecipeError(path, 1, f"cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise RecipeError(path, int(m.group(1)) if m else 1, f"not valid TOML: {exc}") from None
    return recipe_from_dict(data, str(path))


def recipe_from_dict(data: dict[str, Json], path: str = "<recipe>") -> Recipe:
    def fail(message: str) -> RecipeError:
        return RecipeError(path, _line_of(path, message.split("'")[1] if "'" in message else ""),
                           message)

    unknown = set(data) - KNOWN_KEYS
    if unknown:
        raise fail(f"unknown key '{sorted(unknown)[0]}' (known: {', '.join(sorted(KNOWN_KEYS))})")
    r = Recipe(path=path)
    try:
        if "title" in data:
            r.title = re.compile(data["title"])
        r.images = [Image(i["name"], i.get("format", "qcow2"), str(i["size"]),
                          tuple(i.get("io", ()))) for i in data.get("images", [])]
        vm = data.get("vm", {})
        r.drives = list(vm.get("drives", []))
        r.blockdevs = list(vm.get("blockdevs", []))
        r.qemu_io_device = data.get("qemu-io", {}).get("device")
        bitmaps = data.get("bitmaps", {})
        r.bitmap_source = bitmaps.get("source", "nodes")
        if r.bitmap_source not in ("nodes", "devices"):
            raise fail(f"'bitmaps.source' must be \"nodes\" or \"devices\", "
                       f"not {r.bitmap_source!r}")
        r.bitmap_node = bitmaps.get("node")
        r.targets = [(re.compile(k), v) for k, v in data.get("targets", {}).items()]
        r.hidden = dict(data.get("hidden", {}))
        r.rebase = dict(data.get("rebase", {}))
        r.sequence = data.get("sequence")
        r.poll = frozenset(data.get("poll", ()))
        for s in data.get("steps", []):
            if ("before" in s) == ("after" in s):
                raise fail("each '[[steps]]' needs exactly one of 'before' or 'after'")
            r.steps.append(ExtraStep(re.compile(s.get("before") or s["after"]),
                                     "before" in s, s["run"], s.get("until")))
        for p in data.get("probe", []):
            r.probes.append(Probe(re.compile(p["match"]), p.get("query", "query-block"),
                                  dict(p.get("arguments", {})), p.get("text"),
                                  p.get("next_json")))
        r.settle = bool(data.get("settle", True))
        r.timeout = float(data["timeout"]) if "timeout" in data else None
        r.filters = tuple(data["filters"]) if "filters" in data else None
        r.skip = {str(k): str(v) for k, v in data.get("skip", {}).items()}
    except KeyError as exc:
        raise fail(f"missing key '{exc.args[0]}'") from None
    except re.error as exc:
        raise fail(f"bad regular expression {exc.pattern!r}: {exc}") from None
    except (TypeError, AttributeError) as exc:
        raise fail(f"malformed recipe: {exc}") from None
    return r


def _line_of(path: str, key: str) -> int:
    """Best effort: the first line of the recipe that mentions ``key``."""
    try:
        for no, line in enumerate(Path(path).read_text().splitlines(), 1):
            if key and key.split(".")[-1] in line:
                return no
    except OSError:
        pass
    return 1


def find_recipe(golden: str | Path, explicit: str | Path | None = None) -> Recipe:
    """The recipe for a golden: explicit, else ``cases/<stem>.toml`` beside or above it."""
    if explicit is not None:
        return load_recipe(explicit)
    golden = Path(golden).resolve()
    for base in (golden.parent, *golden.parents):
        candidate = base / "cases" / f"{golden.stem}.toml"
        if candidate.is_file():
            return load_recipe(candidate)
        if (base / "pyproject.toml").exists() or (base / ".git").exists():
            break
    return Recipe()
