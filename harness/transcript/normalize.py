"""Normalization: a registry of named filters, as iotests' ``filter_*`` functions.

Each filter maps live output to the form a golden stores (``forward``) and, where that is
meaningful, golden text back to live values (``reverse``: golden commands name
``TEST_DIR/PID-img``, the backend needs the real path). A ``Normalizer`` applies the filters
a case selects, in registry order, to JSON values and to text lines.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Json = Any


@dataclass(frozen=True)
class Context:
    """What filters need to know about the run: where its files live."""

    test_dir: Path
    prefix: str  # file-name prefix of the run's files, iotests' "<pid>-"

    @functools.cached_property
    def real_prefix(self) -> str:   # cached: every string of every reply is checked for it
        return f"{self.test_dir}/{self.prefix}"


@dataclass(frozen=True)
class Filter:
    name: str
    doc: str
    forward: Callable[[Json, Context, Json], Json]
    reverse: Callable[[Json, Context], Json] | None = None


FILTERS: dict[str, Filter] = {}


def register(name: str, reverse: Callable[[Json, Context], Json] | None = None
             ) -> Callable[[Callable[[Json, Context, Json], Json]],
                           Callable[[Json, Context, Json], Json]]:
    """Register ``forward(value, ctx, golden)`` under ``name`` (golden may be None)."""
    def wrap(fn: Callable[[Json, Context, Json], Json]) -> Callable[[Json, Context, Json], Json]:
        FILTERS[name] = Filter(name, (fn.__doc__ or "").strip(), fn, reverse)
        return fn
    return wrap


# isinstance() with a tuple, not ``dict | list | tuple``: that expression builds a union
# object each time it is evaluated, and these checks run on every value of every message.
CONTAINERS = (dict, list, tuple)
NESTED = (dict, list)
MASKABLE = (str, dict, list)


def replace_strings(value: Json, old: str, new: str) -> Json:
    """A copy of ``value`` with ``old`` replaced by ``new`` in every string, keys included
    (tuples become lists, as in JSON). Written out, with no call per string: it runs on
    every command, reply and event."""
    if isinstance(value, dict):
        return {k.replace(old, new) if isinstance(k, str) else k:
                v.replace(old, new) if isinstance(v, str)
                else replace_strings(v, old, new) if isinstance(v, CONTAINERS) else v
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [v.replace(old, new) if isinstance(v, str)
                else replace_strings(v, old, new) if isinstance(v, CONTAINERS) else v
                for v in value]
    return value.replace(old, new) if isinstance(value, str) else value


GOLDEN_PREFIX = "TEST_DIR/PID-"


def _testfiles_reverse(value: Json, ctx: Context) -> Json:
    return replace_strings(value, GOLDEN_PREFIX, ctx.real_prefix)


@register("testfiles", reverse=_testfiles_reverse)
def _testfiles(value: Json, ctx: Context, golden: Json) -> Json:
    """Test files as TEST_DIR/PID-<name> (iotests' filter_testfiles)."""
    return replace_strings(value, ctx.real_prefix, GOLDEN_PREFIX)


FILTERED_TIMESTAMP = {"microseconds": "USECS", "seconds": "SECS"}


@register("timestamps")
def _timestamps(value: Json, ctx: Context, golden: Json) -> Json:
    """Event timestamps as {"microseconds": "USECS", "seconds": "SECS"} (filter_qmp_event)."""
    if isinstance(value, dict) and "event" in value and "timestamp" in value:
        return {**value, "timestamp": dict(FILTERED_TIMESTAMP)}
    return value


# QAPI members spelt with "_" in object types that appear as list elements of command
# arguments, from QEMU 7.2's query-qmp-schema. iotests' ordered_qmp() logs them with "-"
# (the command it sent kept "_"), so a golden command must be sent with "_" again.
LIST_MEMBERS_WITH_UNDERSCORE = frozenset({"new_state"})


def _iotests_keys_reverse(value: Json, ctx: Context, in_list: bool = False) -> Json:
    if isinstance(value, list):
        return [_iotests_keys_reverse(v, ctx, True) if isinstance(v, NESTED) else v
                for v in value]
    if isinstance(value, dict):
        return {(_list_member_key(k) if in_list else k):
                _iotests_keys_reverse(v, ctx) if isinstance(v, NESTED) else v
                for k, v in value.items()}
    return value


def _list_member_key(key: str) -> str:
    under = key.replace("-", "_")
    return under if under in LIST_MEMBERS_WITH_UNDERSCORE else key


@register("iotests-keys", reverse=_iotests_keys_reverse)
def _iotests_keys(value: Json, ctx: Context, golden: Json) -> Json:
    """Send list-element keys like new_state as QEMU spells them, not as iotests logs them."""
    return value


PLACEHOLDERS = frozenset({"FILTERED", "USECS", "SECS", "OFFSET", "LEN", "SIZE", "IMGFMT",
                          "NODE_NAME", "PID"})


@register("placeholders")
def _placeholders(value: Json, ctx: Context, golden: Json) -> Json:
    """Where the golden holds a placeholder such as "FILTERED", the live value is masked too.

    Only what changes is copied: most replies hold no placeholder, and this runs on all."""
    if isinstance(golden, str):
        return golden if golden in PLACEHOLDERS and not isinstance(value, dict | list) else value
    if isinstance(value, dict) and isinstance(golden, dict):
        changed = {k: masked for k, g in golden.items() if isinstance(g, MASKABLE)
                   and k in value and (masked := _placeholders(value[k], ctx, g)) is not value[k]}
        return {**value, **changed} if changed else value
    if isinstance(value, list) and isinstance(golden, list):
        masked_items = [_placeholders(v, ctx, g) for v, g in zip(value, golden, strict=False)]
        if all(m is v for m, v in zip(masked_items, value, strict=False)):
            return value
        return masked_items + value[len(golden):]
    return value


DEFAULT_FILTERS = ("testfiles", "timestamps", "placeholders", "iotests-keys")


@dataclass
class Normalizer:
    """The filters one case uses, bound to one run's context."""

    ctx: Context
    names: tuple[str, ...] = DEFAULT_FILTERS
    filters: list[Filter] = field(init=False)

    def __post_init__(self) -> None:
        unknown = [n for n in self.names if n not in FILTERS]
        if unknown:
            raise KeyError(f"unknown filter(s): {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(FILTERS))}")
        self.filters = [FILTERS[n] for n in self.names]

    def json(self, value: Json, golden: Json = None) -> Json:
        for f in self.filters:
            value = f.forward(value, self.ctx, golden)
        return value

    def text(self, line: str) -> str:
        return str(self.json(line))

    def reverse(self, value: Json) -> Json:
        for f in reversed(self.filters):
            if f.reverse is not None:
                value = f.reverse(value, self.ctx)
        return value
