"""JSON text exactly as iotests writes it, so live output renders like a golden.

``log()`` in iotests.py prints ``json.dumps(msg, sort_keys=True, indent=indent)``;
``qmp_log()`` prints the command as ``{"execute": …, "arguments": …}`` in that order with the
arguments sorted recursively (``ordered_qmp``). Default separators, ASCII escapes.
"""

from __future__ import annotations

import functools
import json
from typing import Any


def ordered_qmp(value: Any, conv_keys: bool = True) -> Any:
    """iotests' ``ordered_qmp``: keys sorted all the way down; ``_`` → ``-`` in the keys of
    the top level and of dicts that are list elements (a list resets ``conv_keys``)."""
    if isinstance(value, list):
        return [ordered_qmp(v) for v in value]
    if isinstance(value, dict):
        return {(k.replace("_", "-") if conv_keys else k): ordered_qmp(value[k], False)
                for k in sorted(value)}
    return value


def log_json(value: Any, indent: int | None = None, *, sort: bool = True) -> str:
    """``json.dumps(value, sort_keys=sort, indent=indent)``, with the encoder made once."""
    return _encoder(sort, indent).encode(value)


@functools.cache
def _encoder(sort: bool, indent: int | None) -> json.JSONEncoder:
    """json.dumps builds an encoder per call: half the time of a short record's line."""
    return json.JSONEncoder(sort_keys=sort, indent=indent)


def logged_command(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """``qmp_log``'s ``{"execute": …, "arguments": ordered_qmp(…)}``, in that key order."""
    return {"execute": name, "arguments": ordered_qmp(arguments)}


def log_command(name: str, arguments: dict[str, Any], indent: int | None = None) -> str:
    """The text of ``qmp_log``'s command line."""
    return log_json(logged_command(name, arguments), indent, sort=False)
