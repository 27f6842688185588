"""QEMU's JSON writer (qobject/json-writer.c) with QDict's iteration order (qobject/qdict.c).

What goes on the wire must match QEMU byte for byte:
- object members come out in QDict order: by ``tdb_hash(key) % 512`` bucket, and within a
  bucket the most recently inserted first (so a Python dict's insertion order matters only
  for keys that share a bucket; build dicts in QAPI member order, as QEMU's output visitor
  inserts them);
- separators are ", " and ": ";
- strings escape ``"`` ``\\`` and ``\\b \\f \\n \\r \\t``, every other code point below 0x20 or from
  0x7F upward as ``\\uXXXX`` (upper-case hex, surrogate pairs beyond the BMP; surrogates and
  noncharacters as ``\\uFFFD``);
- floating-point numbers print with ``%.17g``.
"""

from __future__ import annotations

import functools
from typing import Any

from emulator.qmp.utf8 import is_valid_codepoint

QDICT_BUCKET_MAX = 512
_MASK32 = 0xFFFFFFFF
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
            "\t": "\\t"}


@functools.lru_cache(maxsize=4096)
def tdb_hash(key: str) -> int:
    """qdict.c tdb_hash over the key's (modified) UTF-8 bytes (memoized: keys repeat)."""
    raw = key.encode("utf-8", "surrogatepass").replace(b"\0", b"\xc0\x80")
    value = (0x238F13AF * len(raw)) & _MASK32
    for i, byte in enumerate(raw):
        value = (value + (byte << (i * 5 % 24))) & _MASK32
    return (1103515243 * value + 12345) & _MASK32


def qdict_keys(d: dict[str, Any]) -> list[str]:
    """The keys of ``d`` in the order QEMU's qdict_first()/qdict_next() visit them, taking
    ``d``'s insertion order as the order of qdict_put() calls."""
    if len(d) < 2:
        return list(d)
    return [key for key, _ in _dict_layout(tuple(d))]


def qdict_clone_shallow(d: dict[str, Any]) -> dict[str, Any]:
    """qdict_clone_shallow: the copy takes the keys in QDict order, each at its bucket's
    head, so within a bucket their order is reversed (across buckets it never counts)."""
    return {key: d[key] for key in reversed(d)}


@functools.lru_cache(maxsize=4096)
def _dict_layout(keys: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """The keys of a dict inserted in this order, in QDict order, each with the text written
    before its value (memoized: dicts of one schema type share their keys)."""
    order = {key: i for i, key in enumerate(keys)}
    ordered = sorted(keys, key=lambda k: (tdb_hash(k) % QDICT_BUCKET_MAX, -order[k]))
    return tuple((key, ("" if i == 0 else ", ") + quote(key) + ": ")
                 for i, key in enumerate(ordered))


# printable ASCII but '"' and '\\' stands for itself; the rest of ASCII has a short escape
# or \\u00XX (0x7F included)
_ASCII_ESCAPES = {i: f"\\u{i:04X}" for i in (*range(0x20), 0x7F)}
_ASCII_ESCAPES.update({ord(ch): esc for ch, esc in _ESCAPES.items()})


def quote(s: str) -> str:
    """json-writer.c quoted_str(): code points that are not valid Unicode scalar values or
    are noncharacters print as U+FFFD, as mod_utf8_codepoint() rejects them."""
    if s.isascii():
        if s.isprintable() and '"' not in s and "\\" not in s:
            return f'"{s}"'   # printable ASCII needs no escapes (0x7F is not printable)
        return '"' + s.translate(_ASCII_ESCAPES) + '"'
    out = ['"']
    for ch in s:
        esc = _ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
            continue
        cp = ord(ch)
        if not is_valid_codepoint(cp):
            cp = 0xFFFD
        if cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def format_double(value: float) -> str:
    """``%.17g`` as json_writer_double prints it (C's inf/nan spellings included)."""
    return format(value, ".17g")


def to_json(obj: Any) -> str:
    """Serialize like qobject_to_json(): dict, list/tuple, str, bool, int, float, None."""
    parts: list[str] = []
    try:
        _write(obj, parts)
    except RecursionError:   # an echoed "id" may nest 1024 levels deep
        return _to_json_iterative(obj)
    return "".join(parts)


def _write(obj: Any, parts: list[str]) -> None:
    """The recursive writer (the common case: shallow values)."""
    kind = type(obj)
    if kind is str:
        parts.append(quote(obj))
    elif kind is dict:
        if len(obj) < 2:
            for key in obj:
                parts.append("{" + quote(key) + ": ")
                _write(obj[key], parts)
                parts.append("}")
                return
            parts.append("{}")
            return
        parts.append("{")
        for key, prefix in _dict_layout(tuple(obj)):
            parts.append(prefix)
            _write(obj[key], parts)
        parts.append("}")
    elif kind is int:
        parts.append(str(obj))
    elif kind is list or kind is tuple:
        parts.append("[")
        first = True
        for item in obj:
            if not first:
                parts.append(", ")
            first = False
            _write(item, parts)
        parts.append("]")
    elif isinstance(obj, dict | list | tuple) and not isinstance(obj, str):
        parts.append(_to_json_iterative(obj))
    else:
        parts.append(_scalar(obj))


def _to_json_iterative(obj: Any) -> str:
    """to_json without recursion, for values nested deeper than Python's stack allows."""
    parts: list[str] = []
    todo: list[Any] = [obj]  # values to write, or literal text (_Text) to emit
    while todo:
        item = todo.pop()
        if isinstance(item, _Text):
            parts.append(item)
        elif isinstance(item, dict):
            parts.append("{")
            todo.append(_Text("}"))
            keys = qdict_keys(item)
            for i in range(len(keys) - 1, -1, -1):
                todo.append(item[keys[i]])
                todo.append(_Text(("" if i == 0 else ", ") + quote(keys[i]) + ": "))
        elif isinstance(item, list | tuple):
            parts.append("[")
            todo.append(_Text("]"))
            for i in range(len(item) - 1, -1, -1):
                todo.append(item[i])
                if i:
                    todo.append(_Text(", "))
        else:
            parts.append(_scalar(item))
    return "".join(parts)


class _Text(str):
    """Punctuation queued by to_json (as opposed to a string value)."""


def _scalar(obj: Any) -> str:
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, str):
        return quote(obj)
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        return format_double(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__} as QMP JSON")


def encode_message(obj: dict[str, Any]) -> bytes:
    """One QMP line as QEMU sends it: the JSON text, then "\\r\\n" (monitor_puts turns the
    writer's "\\n" into "\\r\\n")."""
    return to_json(obj).encode("utf-8") + b"\r\n"
