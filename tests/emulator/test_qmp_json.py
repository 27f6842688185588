"""The JSON layer on its own: QEMU's lexer/streamer/parser, writer, QDict and GHashTable order.

The byte-for-byte comparison with QEMU lives in test_qmp_wire.py; these pin the pieces
(and GLib's hash table against the real libglib) so a regression points at its module.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.qmp.ghash import GStrSet, g_str_hash
from emulator.qmp.json_streamer import JSONMessageParser
from emulator.qmp.json_writer import encode_message, qdict_keys, tdb_hash, to_json
from emulator.qmp.utf8 import c_string, is_valid_codepoint, mod_utf8_codepoint


def messages(data: bytes, flush: bool = False, **limits: int) -> list[Any]:
    out: list[Any] = []
    parser = JSONMessageParser(lambda v, e: out.append(("error", e) if e else v), **limits)
    parser.feed(data)
    if flush:
        parser.flush()
    return out


# -- writer ---------------------------------------------------------------------------------
def test_qdict_order_follows_tdb_hash_buckets() -> None:
    assert qdict_keys({"return": 1, "id": 2}) == ["return", "id"]
    assert qdict_keys({"error": 1, "id": 2}) == ["id", "error"]
    assert qdict_keys({"event": 1, "data": 2, "timestamp": 3}) == ["timestamp", "event", "data"]
    # "minor" and "micro" share bucket 225: the later insertion comes first
    assert tdb_hash("minor") % 512 == tdb_hash("micro") % 512 == 225
    assert qdict_keys({"major": 7, "minor": 2, "micro": 22}) == ["micro", "minor", "major"]
    assert qdict_keys({"micro": 22, "minor": 2, "major": 7}) == ["minor", "micro", "major"]


def test_writer_matches_qemu_formatting() -> None:
    assert to_json({"return": {}, "id": [1, 2.5, None, True, False]}) == \
        '{"return": {}, "id": [1, 2.5, null, true, false]}'
    assert to_json([0.1, 1e400, -1e400, -0.0, 1.0, 1.5e300, 2**64 - 1]) == \
        "[0.10000000000000001, inf, -inf, -0, 1, 1.5000000000000001e+300, 18446744073709551615]"
    assert to_json("\u00e9\U0001F600\x00\n\t/\b\f\r\"'\\\x1f\x7f") == \
        '"\\u00E9\\uD83D\\uDE00\\u0000\\n\\t/\\b\\f\\r\\"\'\\\\\\u001F\\u007F"'
    assert encode_message({"return": {}}) == b'{"return": {}}\r\n'


def test_writer_prints_noncharacters_as_replacement() -> None:
    """quoted_str: mod_utf8_codepoint() rejects noncharacters and surrogates -> U+FFFD."""
    assert to_json("a\ufdd0\ufffe\U0001fffe\ud800") == '"a\\uFFFD\\uFFFD\\uFFFD\\uFFFD"'


def test_writer_rejects_non_json() -> None:
    with pytest.raises(TypeError):
        to_json({"x": object()})


# -- utf-8 -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "expected"), [
    (b"abc", "abc"), (b"\xc3\xa9", "\u00e9"), (b"\xc0\x80", "\x00"), (b"\xc1\xbf", "\ufffd"),
    (b"\xed\xa0\x80", "\ufffd"), (b"\xef\xbf\xbe", "\ufffd"), (b"\xf4\x90\x80\x80", "\ufffd"),
    (b"\xc3", "\ufffd"), (b"\xc3'", "\ufffd'"), (b"\xff\xfe", "\ufffd\ufffd"),
    (b"a\x00b", "a"), (b"\x80", "\ufffd"), (b"\xf0\x9f\x98\x80", "\U0001F600"),
])
def test_c_string(raw: bytes, expected: str) -> None:
    assert c_string(raw) == expected


def test_mod_utf8_codepoint_positions() -> None:
    assert mod_utf8_codepoint(b"\xe0\x80", 0) == (-1, 2)   # stops at the missing byte
    assert mod_utf8_codepoint(b"\xe0\x41", 0) == (-1, 1)
    assert mod_utf8_codepoint(b"", 0) == (-1, 0)


# -- streamer and parser ----------------------------------------------------------------------
@pytest.mark.parametrize(("data", "expected"), [
    (b'{"a": [1, 2.5, "x", true, false, null]}', [{"a": [1, 2.5, "x", True, False, None]}]),
    (b"{'a': 'b\"c'}", [{"a": 'b"c'}]),
    (b"garbage\n", [("error", "JSON parse error, invalid keyword 'garbage'")]),
    (b"}", [("error", "JSON parse error, expecting value")]),
    (b'{"a" 1}', [("error", "JSON parse error, missing : in object pair")]),
    (b"{1: 2}", [("error", "JSON parse error, key is not a string in object")]),
    (b'{"a":1,"a":2}', [("error", "JSON parse error, duplicate key")]),
    (b'{"a":1 "b":2}', [("error", "JSON parse error, expected separator in dict")]),
    (b"[1 2]", [("error", "JSON parse error, expected separator in list")]),
    (b'"\\x"', [("error", "JSON parse error, invalid escape sequence in string")]),
    (b'"\\ud800"', [("error", "JSON parse error, \\ud800 is not a valid Unicode character")]),
    (b'"\\u12"', [("error", 'JSON parse error, \\u12" is not a valid Unicode character')]),
    (b'"\xc3"', [("error", "JSON parse error, invalid UTF-8 sequence in string")]),
    (b"01", [("error", "JSON parse error, stray '01'")]),
    (b"\xff", [("error", "JSON parse error, stray '\ufffd'")]),
    (b"\x00", [("error", "JSON parse error, stray ''")]),
    (b"1}", [1, ("error", "JSON parse error, expecting value")]),
    (b"[}", [("error", "JSON parse error, expecting value")]),
    (b"18446744073709551615 18446744073709551616 -9223372036854775809 ",
     [18446744073709551615, 1.8446744073709552e19, -9.2233720368547758e18]),
])
def test_streamer(data: bytes, expected: list[Any]) -> None:
    assert messages(data) == expected


def test_unbalanced_brace_swallows_until_reset() -> None:
    assert messages(b'{\n{"execute": "x"}\n[1]\n') == []
    assert messages(b'{\n{"execute": "x"}\n01\n{}') == [
        ("error", "JSON parse error, stray '01'"), {}]


def test_recovery_skips_to_structural_or_control_char() -> None:
    assert messages(b'1e xyz 1 2 3\n{}') == [("error", "JSON parse error, stray '1e '"), {}]
    assert messages(b'1e xyz{}') == [("error", "JSON parse error, stray '1e '"), {}]


def test_flush_ends_pending_tokens() -> None:
    assert messages(b"123", flush=True) == [123]
    assert messages(b'"abc', flush=True) == [("error", "JSON parse error, stray '\"abc'")]
    assert messages(b"[1,", flush=True) == [("error", "JSON parse error, premature EOI")]


def test_limits() -> None:
    assert messages(b"[" * 1025) == [("error", "JSON nesting depth limit exceeded")]
    deep = messages(b"[" * 1024 + b"]" * 1024)[0]
    for _ in range(1023):
        deep = deep[0]
    assert deep == []
    text = "[" * 1024 + "]" * 1024
    assert to_json(messages(text.encode())[0]) == text
    expecting = ("error", "JSON parse error, expecting value")
    # after a limit error the stream starts afresh with the next token
    assert messages(b"[1,2,3,4]", max_token_count=5) == [
        ("error", "JSON token count limit exceeded"), expecting, 4, expecting]
    assert messages(b'["aaaa", "bbbb"]', max_token_size=10) == [
        ("error", "JSON token size limit exceeded"), expecting]


def test_feed_can_stop_after_a_message() -> None:
    out: list[Any] = []
    parser = JSONMessageParser(lambda v, e: out.append(v))
    data = b'{"a": 1}{"b": 2}'
    used = parser.feed(data, stop=lambda: bool(out))
    assert used == 8 and out == [{"a": 1}]
    assert parser.feed(data[used:], stop=lambda: len(out) > 1) == 8


# QEMU's parser rejects noncharacters and its writer prints them as U+FFFD: no round trip
qmp_text = st.text().filter(lambda s: all(is_valid_codepoint(ord(c)) for c in s))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | qmp_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(qmp_text, inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_writer_output_parses_back(value: Any) -> None:
    """What the writer prints, the parser reads back (floats within %.17g's round trip)."""
    parsed = messages(to_json([value]).encode())
    assert parsed == [[value]]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60))
def test_any_bytes_yield_values_or_errors(data: bytes) -> None:
    """No input raises: every message is a value or a QEMU error text."""
    for item in messages(data + b"\xff\n", flush=True):
        if isinstance(item, tuple):
            assert item[1].startswith("JSON ")


# -- GLib hash table -----------------------------------------------------------------------------
def _glib() -> Any:
    name = ctypes.util.find_library("glib-2.0")
    if name is None:
        pytest.skip("libglib-2.0 not found")
    lib = ctypes.CDLL(name)
    lib.g_hash_table_new.restype = ctypes.c_void_p
    lib.g_hash_table_new.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.g_hash_table_insert.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    lib.g_hash_table_remove.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.g_hash_table_destroy.argtypes = [ctypes.c_void_p]
    lib.g_hash_table_iter_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.g_hash_table_iter_next.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p),
                                           ctypes.c_void_p]
    lib.g_str_hash.restype = ctypes.c_uint
    lib.g_str_hash.argtypes = [ctypes.c_char_p]
    return lib


def _real_order(lib: Any, ops: list[tuple[str, bytes]]) -> list[bytes]:
    table = lib.g_hash_table_new(ctypes.cast(lib.g_str_hash, ctypes.c_void_p),
                                 ctypes.cast(lib.g_str_equal, ctypes.c_void_p))
    keep = []
    for op, key in ops:
        keep.append(key)
        if op == "add":
            lib.g_hash_table_insert(table, key, None)
        else:
            lib.g_hash_table_remove(table, key)
    it = ctypes.create_string_buffer(128)
    lib.g_hash_table_iter_init(it, table)
    out: list[bytes] = []
    key_out = ctypes.c_char_p()
    while lib.g_hash_table_iter_next(it, ctypes.byref(key_out), None):
        out.append(key_out.value or b"")
    lib.g_hash_table_destroy(table)
    return out


def test_g_str_hash_matches_glib() -> None:
    lib = _glib()
    for key in [b"", b"a", b"node", b"\xc3\xa9t\xc3\xa9", b"\xff" * 9, b"x-perf"]:
        assert g_str_hash(key) == lib.g_str_hash(key)


def test_ghash_iteration_order_matches_glib() -> None:
    lib = _glib()
    rnd = random.Random(7)
    words = [b"a", b"b", b"node", b"name", b"x-perf", b"\xc3\xa9", b"zz", b"yy", b"granularity"]
    for _ in range(500):
        keys = list({rnd.choice(words) + str(rnd.randint(0, 40)).encode()
                     for _ in range(rnd.randint(1, 70))})
        ops = [("add", k) for k in keys]
        ops += [("remove", k) for k in rnd.sample(keys, rnd.randint(0, len(keys)))]
        ops += [("add", k) for k in rnd.sample(keys, rnd.randint(0, len(keys)))]
        mine = GStrSet()
        for op, key in ops:
            (mine.add if op == "add" else mine.remove)(key)
        assert list(mine) == _real_order(lib, ops)


# -- the fast path for plain objects (json_fast) ---------------------------------------------------
def _feed_all(data: bytes, chunks: int, **limits: int) -> list[Any]:
    """Messages (and the positions the parser stopped at, one message at a time as the
    monitor reads) for ``data`` fed in ``chunks`` pieces."""
    out: list[Any] = []
    parser = JSONMessageParser(lambda v, e: out.append(("error", e) if e else v), **limits)
    step = max(1, -(-len(data) // chunks))
    for start in range(0, len(data), step):
        piece = data[start:start + step]
        used = 0
        while used < len(piece):
            seen = len(out)
            used = parser.feed(piece, lambda seen=seen: len(out) > seen, used)
            out.append(("stop", used))
    return out


def _both(data: bytes, chunks: int, **limits: int) -> tuple[list[Any], list[Any]]:
    """``_feed_all`` with the fast path, and with the faithful lexer alone."""
    import emulator.qmp.json_streamer as streamer

    fast = _feed_all(data, chunks, **limits)
    original = streamer.parse_object
    streamer.parse_object = lambda *a, **k: None  # type: ignore[assignment]
    try:
        slow = _feed_all(data, chunks, **limits)
    finally:
        streamer.parse_object = original
    return fast, slow


FAST_CORPUS = [
    b'{"execute": "query-status"}\n',
    b'  {"execute": "x", "arguments": {"a": [1, -2, 3.5, 1e5, 0.5E-3, true, false, null]}}',
    b'{"a": 0e5}', b'{"a": -0E1}', b'{"a": 01}', b'{"a": 1.}', b'{"a": NaN}', b'{"a": Infinity}',
    b'{"a": 1, "a": 2}', b'{"a": "\\u0041"}', b"{'a': 1}", b'{"a": "\xc3\xa9"}', b'{"a": "\x01"}',
    b'{"a": 18446744073709551616}', b'{"a": -9223372036854775809}', b'{"a": [}', b'{"a" 1}',
    b'{"a": 1,}', b'{}{}[]1}', b'{"a": truex}', b'{"a":\x0c1}', b'{"a": "\x7f"}',
    b'{"a": {"b": {"c": [[[]]]}}}' * 3, b'{"x": 1}{"y": "}"} {"z": [1, {"w": 2}]}\r\n',
    b'{"a": 1', b'{"a": "' + b"x" * 70000 + b'"}', b'{"a": "\\"\\\\\\/\\b\\f\\n\\r\\t"}',
    b'{"a": "\\\'"}', b'{"a": "\\x"}', b'{"a": "\\ud800"}', b'{"a": "\\\\u0041"}',
]


@pytest.mark.parametrize("data", FAST_CORPUS)
def test_fast_path_matches_the_faithful_lexer(data: bytes) -> None:
    for chunks in (1, 3):
        fast, slow = _both(data, chunks)
        assert fast == slow
    fast, slow = _both(b'{"a": [[1]]}', 1, max_nesting=2)
    assert fast == slow
    fast, slow = _both(b'{"aaaaaaaa": 1}', 1, max_token_size=8)
    assert fast == slow


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b":", b",", b" ", b'"a"', b'"b\\n"',
                                 b"1", b"-0", b"0e1", b"2.5", b"true", b"null", b"'c'", b"\x01",
                                 b'"\\""', b'"\\u00e9"', b'"\\/"',
                                 b"\xff", b"\n"]), max_size=30), st.integers(1, 4))
def test_fast_path_matches_on_any_input(parts: list[bytes], chunks: int) -> None:
    data = b"".join(parts)
    fast, slow = _both(data, chunks)
    assert fast == slow
