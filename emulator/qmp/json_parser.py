"""QEMU's JSON parser (qobject/json-parser.c): a token list to a Python value.

Values map as QEMU's QObjects do: an object is a ``dict`` (insertion order = input order), an
array a ``list``, a string a ``str``, true/false ``bool``, null ``None``; an integer that fits
int64 or uint64 is an ``int``, anything else numeric a ``float`` (QNum's three kinds).  The
first error wins and ends the parse, with QEMU's message ("JSON parse error, ...").

QEMU's parser is recursive; this one keeps an explicit stack (nesting reaches 1024 levels,
deeper than Python's recursion limit) but takes the same steps in the same order.
"""

from __future__ import annotations

import re
from typing import Any

from emulator.qmp import json_lexer as L
from emulator.qmp.utf8 import c_string, is_valid_codepoint, mod_utf8_codepoint

INT64_MIN, INT64_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1

Token = tuple[int, bytes]  # (type, text)

_SIMPLE_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b",
                   ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}
_HEX = b"0123456789abcdefABCDEF"


class JSONParseError(Exception):
    """A syntax error; ``str(exc)`` is QEMU's full description."""

    def __init__(self, message: str) -> None:
        super().__init__(f"JSON parse error, {message}")


def _cvt4hex(s: bytes, pos: int) -> int:
    cp = 0
    for i in range(4):
        c = s[pos + i] if pos + i < len(s) else 0
        if c == 0 or c not in _HEX:
            return -1
        cp = (cp << 4) | int(chr(c), 16)
    return cp


_PLAIN = {ord('"'): re.compile(rb"[\x01-\x21\x23-\x5b\x5d-\x7f]+"),
          ord("'"): re.compile(rb"[\x01-\x26\x28-\x5b\x5d-\x7f]+")}


def parse_string(tok: bytes) -> str:
    """parse_string(): decode a string token (either quote), QEMU's escapes and checks."""
    quote = tok[0]
    plain = _PLAIN[quote]
    out: list[str] = []
    ptr = 1
    while tok[ptr] != quote:
        run = plain.match(tok, ptr)
        if run is not None:  # ASCII other than the quote and backslash: taken as is
            out.append(run.group().decode("ascii"))
            ptr = run.end()
            continue
        if tok[ptr] == ord("\\"):
            beg = ptr
            ptr += 1
            esc = tok[ptr]
            ptr += 1
            simple = _SIMPLE_ESCAPES.get(esc)
            if simple is not None:
                out.append(simple)
                continue
            if esc != ord("u"):
                raise JSONParseError("invalid escape sequence in string")
            cp = _cvt4hex(tok, ptr)
            ptr += 4
            if 0xD800 <= cp <= 0xDBFF and tok[ptr:ptr + 2] == b"\\u":
                cp = 0x10000 + ((cp & 0x3FF) << 10)
                trailing = _cvt4hex(tok, ptr + 2)
                if 0xDC00 <= trailing <= 0xDFFF:
                    cp |= trailing & 0x3FF
                    ptr += 6
                else:
                    cp = -1
            if cp < 0 or not is_valid_codepoint(cp):
                raise JSONParseError(f"{c_string(tok[beg:ptr])} is not a valid Unicode character")
            out.append(chr(cp))
        else:
            cp, ptr = mod_utf8_codepoint(tok, ptr)
            if cp < 0:
                raise JSONParseError("invalid UTF-8 sequence in string")
            out.append(chr(cp))
    return "".join(out)


def parse_number(tok: bytes, kind: int) -> int | float:
    """JSON_INTEGER as int64, else uint64, else double; JSON_FLOAT as double (strtod)."""
    if kind == L.JSON_INTEGER:
        value = int(tok)
        if INT64_MIN <= value <= UINT64_MAX:
            return value
    return float(tok)


class _Tokens:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def pop(self) -> Token:
        tok = self.peek()
        if tok is None:
            raise JSONParseError("premature EOI")
        self.pos += 1
        return tok


_KEY, _VALUE, _ELEM = range(3)


def parse_tokens(tokens: list[Token]) -> Any:
    """json_parser_parse(): the value the tokens spell, or JSONParseError."""
    ts = _Tokens(tokens)
    stack: list[list[Any]] = []  # frames: [_KEY, dict] | [_VALUE, dict, key] | [_ELEM, list]
    while True:
        # -- parse_value(): start a value
        tok = ts.peek()
        if tok is None:
            raise JSONParseError("premature EOI")
        kind, text = tok
        value: Any
        if kind == L.JSON_LCURLY:
            ts.pop()
            nxt = ts.peek()
            if nxt is None:
                raise JSONParseError("premature EOI")
            if nxt[0] != L.JSON_RCURLY:
                stack.append([_KEY, {}])
                continue
            ts.pop()
            value = {}
        elif kind == L.JSON_LSQUARE:
            ts.pop()
            nxt = ts.peek()
            if nxt is None:
                raise JSONParseError("premature EOI")
            if nxt[0] != L.JSON_RSQUARE:
                stack.append([_ELEM, []])
                continue
            ts.pop()
            value = []
        elif kind == L.JSON_STRING:
            ts.pop()
            value = parse_string(text)
        elif kind in (L.JSON_INTEGER, L.JSON_FLOAT):
            ts.pop()
            value = parse_number(text, kind)
        elif kind == L.JSON_KEYWORD:
            ts.pop()
            if text == b"true":
                value = True
            elif text == b"false":
                value = False
            elif text == b"null":
                value = None
            else:
                raise JSONParseError(f"invalid keyword '{c_string(text)}'")
        elif kind == L.JSON_INTERP:
            raise JSONParseError(f"invalid interpolation '{c_string(text)}'")
        else:
            raise JSONParseError("expecting value")
        # -- a value is complete: hand it to the enclosing container, closing those that end
        while True:
            if not stack:
                return value
            frame = stack[-1]
            if frame[0] == _KEY:
                if not isinstance(value, str):
                    raise JSONParseError("key is not a string in object")
                if ts.pop()[0] != L.JSON_COLON:
                    raise JSONParseError("missing : in object pair")
                stack[-1] = [_VALUE, frame[1], value]
                break
            if frame[0] == _VALUE:
                obj, key = frame[1], frame[2]
                if key in obj:
                    raise JSONParseError("duplicate key")
                obj[key] = value
                sep = ts.pop()[0]
                if sep == L.JSON_RCURLY:
                    stack.pop()
                    value = obj
                    continue
                if sep != L.JSON_COMMA:
                    raise JSONParseError("expected separator in dict")
                if ts.peek() is None:
                    raise JSONParseError("premature EOI")
                stack[-1] = [_KEY, obj]
                break
            items = frame[1]
            items.append(value)
            sep = ts.pop()[0]
            if sep == L.JSON_RSQUARE:
                stack.pop()
                value = items
                continue
            if sep != L.JSON_COMMA:
                raise JSONParseError("expected separator in list")
            break

