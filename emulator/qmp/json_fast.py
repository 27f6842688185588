"""A fast path for well-formed QMP input: one JSON object parsed by the stdlib ``json``.

QEMU's lexer, streamer and parser (json_lexer, json_streamer, json_parser) are exact for any
input, but a byte at a time. Most input is a plain JSON object, for which they produce
exactly what ``json`` produces — when the object is ASCII without ``\\u`` escapes (QEMU
rejects surrogates and noncharacters; the short escapes mean the same to both), its numbers
follow QEMU's grammar, it has no NaN/Infinity and no duplicate key, and it is within the
streamer's limits. :func:`parse_object` takes such an object and returns ``None`` for
anything else (or anything incomplete); the caller then feeds the same bytes to the faithful
lexer, so the result is the same either way.
"""

from __future__ import annotations

import json
import re
from typing import Any

INT64_MIN, UINT64_MAX = -(1 << 63), (1 << 64) - 1
WINDOW = 64 << 10   # longer messages take the faithful path
_QEMU_ZERO_EXPONENT = re.compile(r"-?0[eE]")   # "0e5": QEMU's lexer has no such number


class _NotQemuJson(ValueError):
    pass


def _reject(text: str) -> Any:
    raise _NotQemuJson(text)


def _qnum_int(text: str) -> int | float:
    """parse_number: an integer is an int if it fits int64 or uint64, else a double."""
    value = int(text)
    return value if INT64_MIN <= value <= UINT64_MAX else float(text)


def _qnum_float(text: str) -> float:
    if _QEMU_ZERO_EXPONENT.match(text):
        raise _NotQemuJson(text)
    return float(text)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _NotQemuJson("duplicate key")   # QEMU reports it
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_int=_qnum_int,
                            parse_float=_qnum_float, parse_constant=_reject, strict=True)


def parse_object(data: bytes, start: int, *, max_token_size: int, max_token_count: int,
                 max_nesting: int) -> tuple[dict[str, Any], int] | None:
    """The JSON object starting at ``data[start]`` (a "{") and the position after it, or
    None when the faithful parser must decide."""
    window = data[start:start + WINDOW]
    try:
        value, end = _DECODER.raw_decode(window.decode("latin-1"))
    except (ValueError, RecursionError):
        return None
    message = window[:end]
    if (not message.isascii() or b"\\u" in message or end + 1 >= max_token_size
            or end >= max_token_count
            or message.count(b"{") + message.count(b"[") > max_nesting):
        return None
    return value, start + end
