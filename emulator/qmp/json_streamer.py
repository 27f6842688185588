"""QEMU's JSON streamer (qobject/json-streamer.c): tokens to whole messages.

The streamer counts braces and brackets and hands the collected tokens to the parser as soon
as they balance (or go negative), so "}" alone is a message ("expecting value") and an
unclosed "{" swallows everything after it until the counts balance or a lexical error resets
the stream.  Lexical errors, and the token-size, token-count and nesting limits, are reported
without parsing.  Each message yields exactly one ``emit(value, None)`` or
``emit(None, description)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from emulator.qmp import json_lexer as L
from emulator.qmp.json_fast import parse_object
from emulator.qmp.json_parser import JSONParseError, Token, parse_tokens
from emulator.qmp.utf8 import c_string

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10
_WHITESPACE = re.compile(rb"[ \t\r\n]*")   # what the lexer skips between tokens

Emit = Callable[[Any, "str | None"], None]


class JSONMessageParser:
    """json_message_parser_*: feed bytes, get one callback per complete message."""

    def __init__(self, emit: Emit, *, max_token_size: int = MAX_TOKEN_SIZE,
                 max_token_count: int = MAX_TOKEN_COUNT, max_nesting: int = MAX_NESTING) -> None:
        self.emit = emit
        self.max_token_size = max_token_size
        self.max_token_count = max_token_count
        self.max_nesting = max_nesting
        self.lexer = L.JSONLexer(self._process_token, max_token_size=max_token_size)
        self._emitted = 0   # messages emitted so far
        self._reset()

    def _reset(self) -> None:
        self.brace_count = 0
        self.bracket_count = 0
        self.tokens: list[Token] = []
        self.token_size = 0

    def feed(self, data: bytes, stop: Callable[[], bool] | None = None, start: int = 0) -> int:
        """Feed ``data[start:]``; with ``stop``, stop after the first byte at whose end
        ``stop()`` is true (QEMU's monitor reads one byte at a time and may stop reading
        after any message).  Returns the position after the last byte consumed.

        Between messages, a plain JSON object is taken by the fast path (json_fast); the
        faithful lexer takes everything else, up to the end of the message it completes."""
        i, n = start, len(data)
        while i < n:
            if self._between_messages():
                j = _WHITESPACE.match(data, i).end()  # type: ignore[union-attr]
                if j < n and data[j] == 0x7B:   # "{"
                    parsed = parse_object(data, j, max_token_size=self.max_token_size,
                                          max_token_count=self.max_token_count,
                                          max_nesting=self.max_nesting)
                    if parsed is not None:
                        value, i = parsed
                        self._emit(value, None)
                        if stop is not None and stop():
                            return i
                        continue
            count = self._emitted

            def message_done(count: int = count) -> bool:
                return self._emitted != count or (stop is not None and stop())

            i = self.lexer.feed(data, message_done, i)
            if stop is not None and stop():
                return i
        return n

    def _between_messages(self) -> bool:
        """Nothing of a message lexed yet (QMP's lexer has no interpolation)."""
        lexer = self.lexer
        return (lexer.state == L.IN_START and lexer.start_state == L.IN_START
                and not lexer.token and not self.tokens)

    def flush(self) -> None:
        """End of input (not used by QMP, whose monitor never flushes)."""
        self.lexer.flush()

    def _process_token(self, text: bytes, kind: int) -> None:
        if kind == L.JSON_LCURLY:
            self.brace_count += 1
        elif kind == L.JSON_RCURLY:
            self.brace_count -= 1
        elif kind == L.JSON_LSQUARE:
            self.bracket_count += 1
        elif kind == L.JSON_RSQUARE:
            self.bracket_count -= 1
        elif kind == L.JSON_ERROR:
            self._emit(None, f"JSON parse error, stray '{c_string(text)}'")
            return
        elif kind == L.JSON_END_OF_INPUT:
            if self.tokens:
                self._parse_and_emit()
            return
        if self.token_size + len(text) + 1 > self.max_token_size:
            self._emit(None, "JSON token size limit exceeded")
            return
        if len(self.tokens) + 1 > self.max_token_count:
            self._emit(None, "JSON token count limit exceeded")
            return
        if self.bracket_count + self.brace_count > self.max_nesting:
            self._emit(None, "JSON nesting depth limit exceeded")
            return
        self.tokens.append((kind, text))
        self.token_size += len(text)
        if ((self.brace_count > 0 or self.bracket_count > 0)
                and self.brace_count >= 0 and self.bracket_count >= 0):
            return
        self._parse_and_emit()

    def _parse_and_emit(self) -> None:
        try:
            value = parse_tokens(self.tokens)
        except JSONParseError as exc:
            self._emit(None, str(exc))
        else:
            self._emit(value, None)

    def _emit(self, value: Any, err: str | None) -> None:
        self._reset()
        self._emitted += 1
        self.emit(value, err)
