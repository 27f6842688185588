"""QEMU's JSON lexer (qobject/json-lexer.c), state table and all.

QEMU splits QMP input into tokens with a byte-driven state machine.  Its quirks decide how
broken input is answered: single-quoted strings are accepted, keywords are any ``[a-z]+`` (the
parser rejects unknown ones), a byte that fits no token yields a JSON_ERROR token holding the
bad text ("stray '...'"), after which the lexer skips input until a structural character,
a control character or 0xFE/0xFF.  This module is a transcription of that table.
"""

from __future__ import annotations

import re
from collections.abc import Callable

MAX_TOKEN_SIZE = 64 << 20

# token types (json-parser-int.h); JSON_ERROR must be 0
JSON_ERROR = 0
JSON_LCURLY = 100
JSON_RCURLY = 101
JSON_LSQUARE = 102
JSON_RSQUARE = 103
JSON_COLON = 104
JSON_COMMA = 105
JSON_INTEGER = 106
JSON_FLOAT = 107
JSON_KEYWORD = 108
JSON_STRING = 109
JSON_INTERP = 110
JSON_END_OF_INPUT = 111

# lexer states
(IN_RECOVERY, IN_DQ_STRING_ESCAPE, IN_DQ_STRING, IN_SQ_STRING_ESCAPE, IN_SQ_STRING, IN_ZERO,
 IN_EXP_DIGITS, IN_EXP_SIGN, IN_EXP_E, IN_MANTISSA, IN_MANTISSA_DIGITS, IN_DIGITS, IN_SIGN,
 IN_KEYWORD, IN_INTERP, IN_START, IN_START_INTERP) = range(1, 18)

LOOKAHEAD = 0x80

TokenSink = Callable[[bytes, int], None]


def _build_table() -> list[list[int]]:
    """json_lexer[][256]; unlisted entries are 0 (JSON_ERROR)."""
    t = [[JSON_ERROR] * 256 for _ in range(IN_START_INTERP + 1)]

    def span(state: int, lo: int, hi: int, value: int) -> None:
        for c in range(lo, hi + 1):
            t[state][c] = value

    def terminal(state: int, token: int) -> None:
        span(state, 0, 0xFF, token | LOOKAHEAD)

    def chars(state: int, text: str, value: int) -> None:
        for ch in text:
            t[state][ord(ch)] = value

    digits = "0123456789"
    # error recovery: skip to a structural char, a control char other than \t, or 0xFE/0xFF
    span(IN_RECOVERY, 0, 0x1F, IN_START | LOOKAHEAD)
    span(IN_RECOVERY, 0x20, 0xFD, IN_RECOVERY)
    span(IN_RECOVERY, 0xFE, 0xFF, IN_START | LOOKAHEAD)
    chars(IN_RECOVERY, "\t", IN_RECOVERY)
    chars(IN_RECOVERY, "[]{}:,", IN_START | LOOKAHEAD)
    # strings
    span(IN_DQ_STRING_ESCAPE, 0x20, 0xFD, IN_DQ_STRING)
    span(IN_DQ_STRING, 0x20, 0xFD, IN_DQ_STRING)
    chars(IN_DQ_STRING, "\\", IN_DQ_STRING_ESCAPE)
    chars(IN_DQ_STRING, '"', JSON_STRING)
    span(IN_SQ_STRING_ESCAPE, 0x20, 0xFD, IN_SQ_STRING)
    span(IN_SQ_STRING, 0x20, 0xFD, IN_SQ_STRING)
    chars(IN_SQ_STRING, "\\", IN_SQ_STRING_ESCAPE)
    chars(IN_SQ_STRING, "'", JSON_STRING)
    # numbers
    terminal(IN_ZERO, JSON_INTEGER)
    chars(IN_ZERO, digits, JSON_ERROR)
    chars(IN_ZERO, ".", IN_MANTISSA)
    terminal(IN_EXP_DIGITS, JSON_FLOAT)
    chars(IN_EXP_DIGITS, digits, IN_EXP_DIGITS)
    chars(IN_EXP_SIGN, digits, IN_EXP_DIGITS)
    chars(IN_EXP_E, "-+", IN_EXP_SIGN)
    chars(IN_EXP_E, digits, IN_EXP_DIGITS)
    terminal(IN_MANTISSA_DIGITS, JSON_FLOAT)
    chars(IN_MANTISSA_DIGITS, digits, IN_MANTISSA_DIGITS)
    chars(IN_MANTISSA_DIGITS, "eE", IN_EXP_E)
    chars(IN_MANTISSA, digits, IN_MANTISSA_DIGITS)
    terminal(IN_DIGITS, JSON_INTEGER)
    chars(IN_DIGITS, digits, IN_DIGITS)
    chars(IN_DIGITS, "eE", IN_EXP_E)
    chars(IN_DIGITS, ".", IN_MANTISSA)
    chars(IN_SIGN, "0", IN_ZERO)
    chars(IN_SIGN, "123456789", IN_DIGITS)
    # keywords and interpolation
    terminal(IN_KEYWORD, JSON_KEYWORD)
    span(IN_KEYWORD, ord("a"), ord("z"), IN_KEYWORD)
    terminal(IN_INTERP, JSON_INTERP)
    span(IN_INTERP, ord("A"), ord("Z"), IN_INTERP)
    span(IN_INTERP, ord("a"), ord("z"), IN_INTERP)
    chars(IN_INTERP, digits, IN_INTERP)
    # the two start states
    for start in (IN_START, IN_START_INTERP):
        chars(start, '"', IN_DQ_STRING)
        chars(start, "'", IN_SQ_STRING)
        chars(start, "0", IN_ZERO)
        chars(start, "123456789", IN_DIGITS)
        chars(start, "-", IN_SIGN)
        chars(start, "{", JSON_LCURLY)
        chars(start, "}", JSON_RCURLY)
        chars(start, "[", JSON_LSQUARE)
        chars(start, "]", JSON_RSQUARE)
        chars(start, ",", JSON_COMMA)
        chars(start, ":", JSON_COLON)
        span(start, ord("a"), ord("z"), IN_KEYWORD)
        chars(start, " \t\r\n", IN_START)
    chars(IN_START_INTERP, "%", IN_INTERP)
    return t


TABLE = _build_table()

# Runs of bytes that leave the state unchanged and emit nothing, lexed in one step:
# state -> (pattern, whether the bytes join the token).  Same result as byte by byte.
_RUNS = {
    IN_DQ_STRING: (re.compile(rb"[\x20-\x21\x23-\x5b\x5d-\xfd]+"), True),
    IN_SQ_STRING: (re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\xfd]+"), True),
    IN_RECOVERY: (re.compile(rb"[\t\x20-\x2b\x2d-\x39\x3b-\x5a\x5c\x5e-\x7a\x7c\x7e-\xfd]+"),
                  False),
    IN_START: (re.compile(rb"[ \t\r\n]+"), False),
    IN_DIGITS: (re.compile(rb"[0-9]+"), True),
    IN_MANTISSA_DIGITS: (re.compile(rb"[0-9]+"), True),
    IN_EXP_DIGITS: (re.compile(rb"[0-9]+"), True),
    IN_KEYWORD: (re.compile(rb"[a-z]+"), True),
}
_EMITTING = frozenset({JSON_LCURLY, JSON_RCURLY, JSON_LSQUARE, JSON_RSQUARE, JSON_COLON,
                       JSON_COMMA, JSON_INTERP, JSON_INTEGER, JSON_FLOAT, JSON_KEYWORD,
                       JSON_STRING})


class JSONLexer:
    """Feeds bytes through the table; each finished token goes to ``sink(text, type)``."""

    def __init__(self, sink: TokenSink, *, interpolation: bool = False,
                 max_token_size: int = MAX_TOKEN_SIZE) -> None:
        self.sink = sink
        self.start_state = IN_START_INTERP if interpolation else IN_START
        self.state = self.start_state
        self.token = bytearray()
        self.max_token_size = max_token_size

    def feed(self, raw: bytes, stop: Callable[[], bool] | None = None, start: int = 0) -> int:
        """Lex ``raw[start:]``; with ``stop``, return early after the first byte at whose
        end ``stop()`` is true.  Returns the position after the last byte consumed."""
        i, n = start, len(raw)
        while i < n:
            run = _RUNS.get(self.state)
            if run is not None:
                pattern, keep = run
                room = self.max_token_size + 1 - len(self.token) if keep else n
                m = pattern.match(raw, i, min(n, i + room)) if room > 0 else None
                if m is not None:
                    if keep:
                        self.token += m.group()
                    i = m.end()
                    self._check_size()
                    continue
            self._feed_char(raw[i], flush=False)
            i += 1
            if stop is not None and stop():
                return i
        return n

    def flush(self) -> None:
        """End of input: finish or reject the pending token, then signal JSON_END_OF_INPUT."""
        self._feed_char(0, flush=True)
        self.sink(bytes(self.token), JSON_END_OF_INPUT)

    def _feed_char(self, ch: int, flush: bool) -> None:
        consumed = False
        while (self.state != self.start_state) if flush else not consumed:
            entry = TABLE[self.state][ch]
            consumed = not flush and not entry & LOOKAHEAD
            new_state = entry & ~LOOKAHEAD
            if consumed:
                self.token.append(ch)
            if new_state in _EMITTING:
                self.sink(bytes(self.token), new_state)
                self.token.clear()
                new_state = self.start_state
            elif new_state == IN_START:
                self.token.clear()
                new_state = self.start_state
            elif new_state == JSON_ERROR:
                self.sink(bytes(self.token), JSON_ERROR)
                self.token.clear()
                new_state = IN_RECOVERY
            elif new_state == IN_RECOVERY:
                self.token.clear()
            self.state = new_state
        self._check_size()

    def _check_size(self) -> None:
        """A single token must not grow without bound."""
        if len(self.token) > self.max_token_size:
            self.sink(bytes(self.token), self.state)
            self.token.clear()
            self.state = self.start_state
