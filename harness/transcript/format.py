"""JSON text exactly as iotests writes it, so live output renders like a golden.

``log()`` in iotests.py prints ``json.dumps(msg, sort_keys=True, indent=indent)``;
``qmp_log()`` prints the command as ``{"execute": …, "arguments": …}`` in that order with the
arguments sorted recursively (``ordered_qmp``). Default separators, ASCII escapes.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from typing import Any

NESTED = (dict, list)   # for isinstance: a tuple is faster than the union dict | list


def ordered_qmp(value: Any, conv_keys: bool = True) -> Any:
    """iotests' ``ordered_qmp``: keys sorted all the way down; ``_`` → ``-`` in the keys of
    the top level and of dicts that are list elements (a list resets ``conv_keys``)."""
    if isinstance(value, list):
        return [ordered_qmp(v) if isinstance(v, NESTED) else v for v in value]
    if isinstance(value, dict):
        return {(k.replace("_", "-") if conv_keys else k):
                ordered_qmp(v, False) if isinstance(v, NESTED) else v
                for k, v in sorted(value.items())}
    return value


def log_json(value: Any, indent: int | None = None, *, sort: bool = True) -> str:
    """``json.dumps(value, sort_keys=sort, indent=indent)``, with the encoder made once."""
    if indent is None and (one_line := _one_line_encoder(sort)) is not None:
        return "".join(one_line(value, 0))
    return _encoder(sort, indent).encode(value)


@functools.cache
def _encoder(sort: bool, indent: int | None) -> json.JSONEncoder:
    """json.dumps builds an encoder per call: half the time of a short record's line."""
    return json.JSONEncoder(sort_keys=sort, indent=indent)


@functools.cache
def _one_line_encoder(sort: bool) -> Callable[[Any, int], Iterable[str]] | None:
    """The C encoder ``JSONEncoder.encode`` makes on every call for one-line output (most
    records), made once; no circular-reference check: live JSON values are trees."""
    make = getattr(json.encoder, "c_make_encoder", None)   # None without the C speedups
    if make is None:
        return None
    encoder: Callable[[Any, int], Iterable[str]] = make(
        None, _encoder(sort, None).default, json.encoder.encode_basestring_ascii, None,
        ": ", ", ", sort, False, True)
    return encoder


def logged_command(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """``qmp_log``'s ``{"execute": …, "arguments": ordered_qmp(…)}``, in that key order."""
    return {"execute": name, "arguments": ordered_qmp(arguments)}


def log_command(name: str, arguments: dict[str, Any], indent: int | None = None) -> str:
    """The text of ``qmp_log``'s command line."""
    return log_json(logged_command(name, arguments), indent, sort=False)
