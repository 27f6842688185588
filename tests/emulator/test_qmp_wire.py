"""The emulator's QMP wire behaviour against QEMU's, byte for byte.

Each case sends raw bytes on a fresh connection and records every line that comes back
(event timestamps masked).  The replies QEMU 7.2.22 gave are kept in
``test_qmp_wire_corpus.json``:

- ``test_emulator_matches_recording`` holds the emulator to that recording (no QEMU needed);
- ``test_qemu_matches_recording`` (marked ``qemu``) re-asks the real binary, so a recording
  that no longer matches QEMU is noticed.

Re-record after adding cases:  ``python tests/emulator/test_qmp_wire.py --record``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from emulator.qmp.qemu_probe import QemuMonitor, ServerProcess, exchange

RECORDING = Path(__file__).with_name("test_qmp_wire_corpus.json")


@dataclass
class Case:
    id: str
    steps: list[bytes]
    negotiate: bool = True
    fresh: bool = False  # changes machine state: needs its own server
    tags: list[str] = field(default_factory=list)


def _cmd(name: str, args: str) -> bytes:
    return b'{"execute": "' + name.encode() + b'", "arguments": ' + args.encode() + b"}\n"


def _hmp(line: str) -> bytes:
    return _cmd("human-monitor-command", json.dumps({"command-line": line}))


CASES: list[Case] = []


def case(id: str, *steps: bytes, negotiate: bool = True, fresh: bool = False) -> None:
    CASES.append(Case(id, list(steps), negotiate, fresh))


# -- greeting and negotiation ------------------------------------------------------------------
case("neg-query-before-caps", b'{"execute": "query-version"}\n', negotiate=False)
case("neg-unknown-before-caps", b'{"execute": "foo", "id": 1}\n', negotiate=False)
case("neg-caps-id", b'{"execute": "qmp_capabilities", "id": {"a": [1, 2.5]}}\n',
     negotiate=False)
case("neg-caps-twice", b'{"execute": "qmp_capabilities"}\n{"execute": "qmp_capabilities"}\n',
     negotiate=False)
case("neg-caps-oob", b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n',
     negotiate=False)
case("neg-caps-bad-cap",
     b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob", "foo"]}}\n',
     negotiate=False)
case("neg-caps-enable-str",
     b'{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}\n', negotiate=False)
case("neg-caps-enable-int-elem",
     b'{"execute": "qmp_capabilities", "arguments": {"enable": [1]}}\n', negotiate=False)
case("neg-caps-enable-null",
     b'{"execute": "qmp_capabilities", "arguments": {"enable": null}}\n', negotiate=False)
case("neg-caps-empty-and-dup",
     b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob", "oob"]}}\n'
     b'{"execute": "query-status"}\n', negotiate=False)
case("neg-caps-unexpected-arg",
     b'{"execute": "qmp_capabilities", "arguments": {"foo": 1}}\n', negotiate=False)
case("neg-exec-oob", b'{"exec-oob": "qmp_capabilities", "id": 2}\n', negotiate=False)
case("neg-garbage", b"garbage\n1\n{}\n", negotiate=False)
case("neg-args-not-object", b'{"execute": "qmp_capabilities", "id": 1, "arguments": 1}\n',
     negotiate=False)

# -- JSON lexer, streamer and parser -------------------------------------------------------------
for i, raw in enumerate([
    b"garbage\n", b"}\n", b"]\n", b'{"execute": "query-status"}}\n',
    b"{'execute': 'query-status'}\n", b'{"execute": "query-\\x"}\n',
    b'{"execute": "\xff"}\n', b"\xff\n", b'{"execute": "\xc3\xa9"}\n', b"1\n", b'"str"\n',
    b"[]\n", b"null\n", b'{"a" 1}\n', b"{1: 2}\n", b'{"a":1,"a":2}\n', b'{"a":1 "b":2}\n',
    b"[1 2]\n", b"tru\n", b'{"execute": nul}\n', b"01\n", b"-\n", b"1.\n", b"1e\n", b"-01\n",
    b"-0.0e-0\n", b"%d\n", b'{"execute": "query-status",}\n', b"[,]\n", b"{,}\n",
    b'{"a":}\n', b'{"a"}\n', b"[1,]\n", b"@#$\n", b'abc{"execute":"query-status"}\n',
    b"\x00\n", b'{"execute": "query-status"\x00}\n', b'"abc\n"\n', b"'abc\n", b'"\\\n',
    b'{"execute": "query-status", "id": TRUE}\n', b'{"execute": "query-status", "id": +1}\n',
    b'{"execute": "query-status", "id": .5}\n', b'{"execute": "query-status", "id": 00}\n',
    b"[}\n", b"{]\n", b"[[]]]\n", b"{{}}\n", b'{"a": {"b": [1, {"c": }]}}\n', b"{\"a\n",
    b'{"execute": "query-status"} xyz {"execute": "query-status"}\n',
    b'{"execute": "query-status"} xyz\t{"execute": "query-status"}\n',
    b'xyz xyz\n{"execute": "query-status"}\n',
    b'{"execute": "query-status"}\xff{"execute": "query-status"}\n',
    b'{"execute": "query-status"}{"execute": "query-version"}',
    b'  \t\r\n\n{"execute": "query-status"}\r\n',
    b'{"execute": "query-status", "id": "\xed\xa0\x80"}\n',
    b'{"execute": "query-status", "id": "\xc1\xbf"}\n',
    b'{"execute": "query-status", "id": "\xf4\x90\x80\x80"}\n',
    b'{"execute": "query-status", "id": "\xef\xbf\xbe"}\n',
    b'{"execute": "query-status", "id": "\xe0\x80"}\n',
    b'{"execute": "query-status", "id": "\xc3"}\n',
    b'{"execute": "query-status", "id": "\\ud800"}\n',
    b'{"execute": "query-status", "id": "\\ud800\\u0041"}\n',
    b'{"execute": "query-status", "id": "\\udc00"}\n',
    b'{"execute": "query-status", "id": "\\uFFFE"}\n',
    b'{"execute": "query-status", "id": "\\ufdd0"}\n',
    b'{"execute": "query-status", "id": "\\u12"}\n',
    b'{"execute": "query-status", "id": "\\u12zz"}\n',
    b'{"execute": "query-status", "id": "a\x01b"}\n',
    b'{"execute": "query-status", "id": "a\tb"}\n',
    b'{"execute": "query-status", "id": "\x7f\x80"}\n',
    b'{"execute": "query-status", "id": \'a"b\\\'c\'}\n',
    b"[" * 1025 + b"]" * 3 + b"\n",
    b"{" * 1024 + b"}" * 1024 + b"\n",
    b"[" * 1023 + b"{}" + b"]" * 1023 + b"\n",
    b'{"execute": "qu\xc3\xa9ry"}\n',
    b'{"\xc3\xa9": 1}\n',
    b'{"execute": "query-status", "arguments": {"\\u0000": 1}}\n',
]):
    case(f"json-{i:02d}", raw)

case("json-split-message", b'{"execute": "query-', b'status", "id": 7}\n')

# -- dispatch -----------------------------------------------------------------------------------
for i, raw in enumerate([
    b'{"execute": 1}\n', b'{"execute": "x", "arguments": []}\n',
    b'{"execute": "x", "foo": 1}\n', b'{"arguments": {}}\n', b"{}\n",
    b'{"execute": "x", "exec-oob": "y"}\n', b'{"exec-oob": "query-status"}\n',
    b'{"exec-oob": 1, "id": 5}\n', b'{"execute": "query-status", "id": 5, "arguments": 1}\n',
    b'{"execute": "query-status", "id": 5, "control": 1}\n',
    b'{"execute": "query-status", "zz": 1, "yy": 2, "xx": 3}\n',
    b'{"execute": "\\u0000"}\n', b'{"execute": ""}\n', b'{"execute": "foo\\nbar"}\n',
    b'[{"execute": "query-status"}]\n', b'{"execute": "query-status", "arguments": {"x": 1}}\n',
    b'{"execute": "query-status", "arguments": {"x": 1, "y": 2, "z": 3}}\n',
    b'{"execute": "query-status", "arguments": {}}\n',
    b'{"execute": "query-version", "arguments": {"a": 1}}\n',
    b'{"execute": "query-commands", "arguments": {"a": 1}}\n',
    b'{"execute": "stop", "arguments": {"a": 1}}\n',
    b'{"execute": "cont", "arguments": {"a": 1}}\n',
    b'{"execute": "quit", "arguments": {"a": 1}}\n',
    b'{"execute": "query-version"}\n',
]):
    case(f"dispatch-{i:02d}", raw)

# -- id echo -------------------------------------------------------------------------------------
for i, ident in enumerate([
    b"1", b'"x"', b"1e400", b"-1e400", b"1e-400", b"-0", b"-0.0", b"1.0", b"0.1", b"1.5e300",
    b"123.456", b"1E+2", b"18446744073709551615", b"18446744073709551616",
    b"9223372036854775807", b"9223372036854775808", b"-9223372036854775808",
    b"-9223372036854775809", b"123456789012345678901234567890", b"null", b"true", b"false",
    b"[true, false, null]", b"{}", b"[]", b'{"b": 1, "a": 2, "c": 3}',
    b'{"id": {"id": {"id": 1}}}',
    b'"\\u00e9\\ud83d\\ude00\\u0000\\n\\t\\/\\b\\f\\r\\"\\\'\\u001f\\u007f"',
    b'"\xc0\x80"', b'"\xf0\x9f\x98\x80"', b"'single'",
    b'{"major": 1, "minor": 2, "micro": 3}', b'{"micro": 1, "minor": 2, "major": 3}',
    b"[" * 1023 + b"]" * 1023, b'{"a": ' * 1023 + b"1" + b"}" * 1023,
]):
    case(f"id-{i:02d}", b'{"execute": "query-status", "id": ' + ident + b"}\n")
    case(f"id-error-{i:02d}", b'{"execute": "nonexistent", "id": ' + ident + b"}\n")

# -- out-of-band ---------------------------------------------------------------------------------
_OOB = b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n'
for i, raw in enumerate([
    b'{"exec-oob": "query-status"}\n', b'{"exec-oob": "query-status", "id": 3}\n',
    b'{"exec-oob": "foo", "id": 3}\n', b'{"exec-oob": 1, "id": 3}\n',
    b'{"exec-oob": "a", "execute": "b", "id": 3}\n',
    b'{"execute": "a", "exec-oob": "b", "id": 3}\n',
    b'{"exec-oob": "qmp_capabilities", "id": 3}\n', b'{"execute": "qmp_capabilities"}\n',
    b'{"execute": "query-status", "id": "in-band"}\n',
    b'{"exec-oob": "query-status", "arguments": [], "id": 3}\n',
]):
    case(f"oob-{i:02d}", _OOB, raw, negotiate=False)

# reading pauses after each in-band request while OOB is off, so what follows is parsed and
# dispatched only after that request's reply, in the state it left
case("order-inband-then-oob-error",
     b'{"execute": "query-status", "id": 1}{"exec-oob": "query-status", "id": 2}\n')
case("order-caps-then-oob",
     b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}'
     b'{"exec-oob": "query-status", "id": 2}\n', negotiate=False)
case("order-one-byte-two-messages", b'1}{"exec-oob": "x"}\n')
case("order-caps-then-command", b'{"execute": "qmp_capabilities"}{"execute": "query-status"}'
     b'{"execute": "qmp_capabilities"}\n', negotiate=False)

# -- human-monitor-command -----------------------------------------------------------------------
for i, line in enumerate([
    "foo", "foo bar baz", "", "   ", "  foo", "foo/x", "f\u00e9", 'foo"bar', "Qemu-io",
    "qemu-io", "  qemu-io  ", "qemu-io drive0", 'qemu-io drive0 "read 0 512" extra',
    'qemu-io drive0 "read 0 1"x', 'qemu-io drive0 "read 0 1" "y"', 'qemu-io drive0 "unterminated',
    'qemu-io drive0 "\\x41"', 'qemu-io drive0"x"', "qemu-io -x drive0 read", "qemu-io -d",
    "qemu-io -- x y", "info status", "info  status  extra", "info status\n", "info version",
    "info foo", "info  foo", "help info status", "help nonexist", "help info nonexist",
    "help info version", 'help "unterminated', "help qemu-io", "? qemu-io",
    "help qemu-io extra", "info status extra",
]):
    case(f"hmp-{i:02d}", _hmp(line))
case("hmp-cpu-index", _cmd("human-monitor-command", '{"command-line": "foo", "cpu-index": 0}'))
case("hmp-no-args", b'{"execute": "human-monitor-command"}\n')
case("hmp-bad-type", _cmd("human-monitor-command", '{"command-line": 1}'))
case("hmp-unexpected",
     _cmd("human-monitor-command", '{"command-line": "info status", "x": 1}'))

# -- run state and quit (each on a new machine) --------------------------------------------------
case("state-stop-cont",
     b'{"execute": "stop"}\n{"execute": "query-status"}\n{"execute": "cont"}\n',
     b'{"execute": "query-status"}\n{"execute": "cont"}\n{"execute": "stop"}\n',
     b'{"execute": "query-status"}\n{"execute": "stop"}\n{"execute": "cont"}\n',
     _hmp("info status"), fresh=True)
case("state-stop-hmp", b'{"execute": "cont"}\n{"execute": "stop"}\n', _hmp("info status"),
     fresh=True)
case("quit", b'{"execute": "quit", "id": "bye"}\n', fresh=True)
case("quit-then-more", b'{"execute": "quit"}\n{"execute": "query-status"}\n', fresh=True)

# -- argument checking (schemas of every family) --------------------------------------------------
for i, (name, args) in enumerate([
    ("block-dirty-bitmap-add", "{}"),
    ("block-dirty-bitmap-add", '{"node": 1}'),
    ("block-dirty-bitmap-add", '{"node": "a", "name": "b", "granularity": -1}'),
    ("block-dirty-bitmap-add", '{"node": "a", "name": "b", "granularity": 4294967296}'),
    ("block-dirty-bitmap-add", '{"node": "a", "name": "b", "granularity": "x"}'),
    ("block-dirty-bitmap-add", '{"node": "a", "name": "b", "granularity": 1.5}'),
    ("block-dirty-bitmap-add", '{"node": "a", "name": "b", "granularity": null}'),
    ("block-dirty-bitmap-add",
     '{"node": "a", "name": "b", "granularity": 18446744073709551615}'),
    ("block-dirty-bitmap-add",
     '{"node": "a", "name": "b", "granularity": 18446744073709551616}'),
    ("block-dirty-bitmap-add", '{"node": "a", "name": "b", "persistent": "yes"}'),
    ("block-dirty-bitmap-add", '{"node": "a", "name": "b", "persistent": 1}'),
    ("block-dirty-bitmap-add",
     '{"node": "a", "name": "b", "a": 1, "b": 2, "c": 3, "d": 4, "e": 5}'),
    ("block-dirty-bitmap-add", '{"node": "a", "name": "b", "zz": 1, "yy": 2}'),
    ("block-dirty-bitmap-add", '{"name": "b", "node": "a", "disabled": 0, "q": 1}'),
    ("block-dirty-bitmap-remove", '{"node": "a"}'),
    ("block-dirty-bitmap-merge",
     '{"node": "n", "target": "t", "bitmaps": ["a", {"node": "n", "name": "x"}, 1]}'),
    ("block-dirty-bitmap-merge", '{"node": "n", "target": "t", "bitmaps": [{"node": "n"}]}'),
    ("block-dirty-bitmap-merge",
     '{"node": "n", "target": "t", "bitmaps": [{"node": "n", "name": "x", "q": 1}]}'),
    ("block-dirty-bitmap-merge", '{"node": "n", "target": "t", "bitmaps": [null]}'),
    ("block-dirty-bitmap-merge", '{"node": "n", "target": "t", "bitmaps": [true]}'),
    ("block-dirty-bitmap-merge", '{"node": "n", "target": "t", "bitmaps": "a"}'),
    ("transaction",
     '{"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "a"}}]}'),
    ("transaction", '{"actions": [{"type": "block-dirty-bitmap-add", '
                    '"data": {"node": "a", "name": "b", "granularity": -5}}]}'),
    ("transaction", '{"actions": [{"type": "bogus", "data": {}}]}'),
    ("transaction", '{"actions": [{"data": {}}]}'),
    ("transaction", '{"actions": [{"type": "block-dirty-bitmap-add"}]}'),
    ("transaction", '{"actions": [{"type": "block-dirty-bitmap-add", '
                    '"data": {"node": "a", "name": "b"}, "x": 1}]}'),
    ("transaction", '{"actions": [{"type": "block-dirty-bitmap-add", '
                    '"data": {"node": "a", "name": "b", "x": 1}}]}'),
    ("transaction", '{"actions": [{"type": "block-dirty-bitmap-add", '
                    '"data": {"node": "a", "name": "b"}}, '
                    '{"type": "block-dirty-bitmap-add", "data": {"node": 1}}]}'),
    ("transaction", '{"actions": [1]}'),
    ("transaction", '{"actions": {}}'),
    ("transaction", '{"actions": [], "properties": {"completion-mode": "x"}}'),
    ("transaction", '{"actions": [], "properties": {"completion-mode": "grouped", "y": 1}}'),
    ("transaction", '{"actions": [{"type": "abort", "data": {"x": 1}}]}'),
    ("transaction", '{"actions": [{"type": "abort"}]}'),
    ("transaction", '{"actions": [{"type": 1}]}'),
    ("transaction", '{"actions": [{"type": "block-dirty-bitmap-merge", "data": '
                    '{"node": "n", "target": "t", "bitmaps": [{"node": "n", "name": 2}]}}]}'),
    ("blockdev-add", "{}"),
    ("blockdev-add", '{"driver": "bogus"}'),
    ("blockdev-add", '{"driver": "qcow2", "node-name": "n"}'),
    ("blockdev-add", '{"driver": "qcow2", "node-name": "n", "file": 1}'),
    ("blockdev-add", '{"driver": "qcow2", "node-name": "n", "file": {"driver": "file"}}'),
    ("blockdev-add", '{"driver": "qcow2", "node-name": "n", '
                     '"file": {"driver": "file", "filename": "/nonexist", "x": 1}}'),
    ("blockdev-add", '{"driver": "qcow2", "node-name": "n", '
                     '"file": {"driver": "file", "filename": "/nonexist"}, "backing": 1}'),
    ("blockdev-add", '{"driver": "qcow2", "node-name": "n", "file": "x", '
                     '"cache": {"direct": "y"}}'),
    ("blockdev-add", '{"driver": "qcow2", "node-name": "n", "file": "x", "discard": "bad"}'),
    ("blockdev-add", '{"driver": "blkdebug", "node-name": "n", "image": "x", "inject-error": '
                     '[{"event": "read_aio", "errno": 5, "once": true, "x": 1}]}'),
    ("blockdev-add", '{"driver": "blkdebug", "node-name": "n", "image": "x", '
                     '"inject-error": [{"event": "bad"}]}'),
    ("blockdev-add", '{"driver": "blkdebug", "node-name": "n", "image": "x", '
                     '"inject-error": [{"event": "read_aio", "errno": "x"}]}'),
    ("blockdev-add", '{"driver": "blkdebug", "node-name": "n", "image": "x", '
                     '"inject-error": [{}]}'),
    ("blockdev-add", '{"driver": "blkdebug", "node-name": "n", "image": "x", '
                     '"max-transfer": 2147483648}'),
    ("blockdev-add", '{"driver": "blkdebug", "node-name": "n", "image": "x", '
                     '"max-transfer": -2147483649}'),
    ("blockdev-add", '{"driver": "blkdebug", "node-name": "n", "image": "x", '
                     '"max-transfer": "big"}'),
    ("blockdev-add", '{"driver": "null-co", "node-name": "n", "size": "x"}'),
    ("blockdev-add", '{"driver": "null-co", "node-name": "n", "size": 1.0}'),
    ("blockdev-add", '{"driver": "null-co", "node-name": "n", "latency-ns": "x"}'),
    ("blockdev-add", '{"driver": "null-co", "node-name": "n", "read-zeroes": true, "q": 1, '
                     '"detect-zeroes": "x"}'),
    ("blockdev-add", '{"driver": "null-co", "node-name": 1, "detect-zeroes": "x"}'),
    ("blockdev-add", '{"node-name": 1, "driver": "x"}'),
    ("blockdev-add", '{"driver": "raw", "file": {"driver": "null-co", "q": 1}}'),
    ("blockdev-add", '{"driver": "raw", "file": {"driver": "bogus"}}'),
    ("blockdev-add", '{"driver": "raw", "file": {}}'),
    ("blockdev-add", '{"driver": "raw", "file": []}'),
    ("blockdev-add", '{"driver": "raw", "file": null}'),
    ("blockdev-add", '{"driver": "qcow2", "file": "x", "backing": []}'),
    ("blockdev-add", '{"driver": "raw", "file": "x", "size": "1"}'),
    ("blockdev-add", '{"driver": "qcow2", "node-name": "n", "file": "x", "encrypt": {}}'),
    ("blockdev-add", '{"driver": "qcow2", "node-name": "n", "file": "x", '
                     '"encrypt": {"format": "aes", "key-secret": 1}}'),
    ("blockdev-add", '{"driver": "qcow2", "node-name": "n", "file": "x", '
                     '"overlap-check": 1}'),
    ("blockdev-add", '{"driver": "qcow2", "node-name": "n", "file": "x", '
                     '"overlap-check": "bogus"}'),
    ("blockdev-add", '{"driver": "qcow2", "node-name": "n", "file": "x", '
                     '"overlap-check": {"template": "bogus"}}'),
    ("blockdev-add", '{"driver": "qcow2", "node-name": "n", "file": "x", '
                     '"overlap-check": {"main-header": 1}}'),
    ("blockdev-backup", '{"device": "a", "target": "b", "sync": "full", '
                        '"x-perf": {"max-workers": "x"}}'),
    ("blockdev-backup", '{"device": "a", "target": "b", "sync": "full", "x-perf": {"foo": 1}}'),
    ("blockdev-backup", '{"device": "a", "target": "b", "sync": "full", '
                        '"x-perf": {"max-chunk": 1.5}}'),
    ("blockdev-backup", '{"device": "a", "target": "b", "sync": "full", '
                        '"x-perf": {"max-workers": 9223372036854775808}}'),
    ("blockdev-backup", '{"device": "a", "target": "b", "sync": "full", "x-perf": []}'),
    ("blockdev-backup", '{"device": "a", "target": "b", "sync": "bogus"}'),
    ("blockdev-backup", '{"device": "a", "target": "b", "sync": 1}'),
    ("blockdev-backup", '{"device": "a", "target": "b"}'),
    ("blockdev-backup", '{"device": "a", "sync": "full"}'),
    ("blockdev-backup", '{"target": "b", "sync": "full"}'),
    ("blockdev-backup", '{"device": "a", "target": "b", "sync": "full", "speed": "fast"}'),
    ("blockdev-backup", '{"device": "a", "target": "b", "sync": "full", "bitmap-mode": "x"}'),
    ("blockdev-backup", '{"device": "a", "target": "b", "sync": "full", '
                        '"on-source-error": "x"}'),
    ("blockdev-backup", '{"device": "a", "target": "b", "sync": "full", '
                        '"x-perf": {"use-copy-range": 1}}'),
    ("blockdev-backup", '{"device": "a", "target": "b", "sync": "full", "compress": "yes"}'),
    ("blockdev-backup", '{"device": "a", "target": "b", "sync": "full", '
                        '"auto-finalize": 1}'),
    ("blockdev-backup", '{"device": "a", "target": "b", "sync": "full", "job-id": 1}'),
    ("blockdev-backup", '{"device": "a", "target": "b", "sync": "full", '
                        '"filter-node-name": null}'),
    ("blockdev-backup", '{"device": "a", "target": "b", "sync": "full", "q": 1, "r": 2}'),
    ("drive-backup", '{"device": "a", "sync": "full"}'),
    ("drive-backup", '{"device": "a", "sync": "full", "target": "t", "mode": "bogus"}'),
    ("drive-backup", '{"device": "a", "sync": "full", "target": "t", "format": 1}'),
    ("transaction", '{"actions": [{"type": "blockdev-backup", "data": {"device": "a", '
                    '"target": "b", "sync": "full", "x-perf": {"max-workers": "q"}}}]}'),
    ("transaction", '{"actions": [{"type": "blockdev-backup", "data": {"device": "a"}}]}'),
    ("blockdev-create", '{"job-id": "j", "options": {"driver": "qcow2", "file": "x", '
                        '"size": "big"}}'),
    ("blockdev-create", '{"job-id": "j", "options": {"driver": "qcow2", "file": "x", '
                        '"size": 1, "backing-fmt": "nope"}}'),
    ("blockdev-create", '{"job-id": "j", "options": {"driver": "qcow2", "file": "x", '
                        '"size": 1, "version": "v9"}}'),
    ("blockdev-create", '{"job-id": "j", "options": {"driver": "qcow2", "file": "x"}}'),
    ("blockdev-create", '{"job-id": "j", "options": {"driver": "file", "filename": "x", '
                        '"size": 1, "preallocation": "x"}}'),
    ("blockdev-create", '{"job-id": "j", "options": {"driver": "bogus"}}'),
    ("blockdev-create", '{"job-id": "j"}'),
    ("blockdev-create", '{"options": {"driver": "file", "filename": "x", "size": 1}}'),
    ("blockdev-create", '{"job-id": "j", "options": {"driver": "qcow2", "file": "x", '
                        '"size": 1, "cluster-size": "64k"}}'),
    ("blockdev-create", '{"job-id": "j", "options": {"driver": "qcow2", "file": "x", '
                        '"size": 1, "refcount-bits": 1.5}}'),
    ("job-dismiss", '{"id": 1}'),
    ("job-dismiss", "{}"),
    ("job-cancel", '{"id": "j", "x": 1}'),
    ("job-finalize", '{"id": null}'),
    ("query-block-jobs", '{"x": 1}'),
    ("query-jobs", '{"x": 1}'),
    ("block-job-set-speed", '{"device": "j"}'),
    ("block-job-set-speed", '{"device": "j", "speed": "fast"}'),
    ("block-job-cancel", '{"device": "j", "force": "y"}'),
    ("block-job-pause", '{"device": 1}'),
    ("block-job-dismiss", "{}"),
    ("block-job-complete", '{"device": "j", "extra": true}'),
    ("blockdev-del", "{}"),
    ("blockdev-del", '{"node-name": null}'),
    ("query-named-block-nodes", '{"flat": "yes"}'),
    ("query-block", '{"x": 1}'),
]):
    case(f"args-{i:02d}-{name}", _cmd(name, args))


case("args-deep-nesting", b'{"execute": "blockdev-add", "arguments": '
     + b'{"driver": "raw", "file": ' * 1000
     + b'{"driver": "file", "filename": "x", "bogus": 1}' + b"}" * 1000 + b"}\n")


# -- servers ---------------------------------------------------------------------------------------
class EmulatorServer(ServerProcess):
    """``qmpreplay serve`` in a subprocess, on a socket in a private directory."""

    name = "qmpreplay serve"
    start_timeout = 15.0

    def command_line(self) -> list[str]:
        return [sys.executable, "-m", "harness.cli", "serve", "--socket", self.path,
                "--dir", self.dir]


@pytest.fixture(scope="module")
def emulator_server() -> Iterator[EmulatorServer]:
    server = EmulatorServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def qemu_server(qemu_binary: str) -> Iterator[QemuMonitor]:
    with QemuMonitor(qemu_binary) as qemu:
        yield qemu


def run_case(c: Case, path: str) -> list[str]:
    return [line.decode("utf-8", "surrogateescape")
            for line in exchange(path, c.steps, negotiate=c.negotiate)]


def run_on_emulator(c: Case, shared: EmulatorServer) -> list[str]:
    if not c.fresh:
        return run_case(c, shared.path)
    server = EmulatorServer()
    try:
        return run_case(c, server.path)
    finally:
        server.close()


def run_on_qemu(c: Case, shared: QemuMonitor | None, binary: str | None = None) -> list[str]:
    if shared is not None and not c.fresh:
        return run_case(c, shared.path)
    with QemuMonitor(binary or (shared.binary if shared else None)) as qemu:
        return run_case(c, qemu.path)


def load_recording() -> dict[str, list[str]]:
    if not RECORDING.exists():
        return {}
    return json.loads(RECORDING.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


RECORDED = load_recording()
IDS = [c.id for c in CASES]
assert len(set(IDS)) == len(IDS), "duplicate case ids"


@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_emulator_matches_recording(c: Case, emulator_server: EmulatorServer) -> None:
    if c.id not in RECORDED:
        pytest.fail(f"no QEMU recording for {c.id}: run {Path(__file__).name} --record")
    assert run_on_emulator(c, emulator_server) == RECORDED[c.id]


@pytest.mark.qemu
@pytest.mark.parametrize("c", CASES, ids=IDS)
def test_qemu_matches_recording(c: Case, qemu_server: QemuMonitor) -> None:
    assert run_on_qemu(c, qemu_server) == RECORDED.get(c.id)


def record(binary: str | None = None) -> None:
    """Ask QEMU for every case and write the recording."""
    out: dict[str, list[str]] = {}
    with QemuMonitor(binary) as qemu:
        for c in CASES:
            out[c.id] = run_on_qemu(c, qemu)
    RECORDING.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n",
                         encoding="utf-8")
    print(f"recorded {len(out)} cases in {RECORDING}")



# -- how a connection ends --------------------------------------------------------------------
def connection_end(path: str, mode: str, pid: int | None = None) -> list[str]:
    """Client A sends qmp_capabilities + cont and then hangs up ("close"), hangs up after
    negotiating ("close-after-caps"), or only ends its writes ("shutdown-wr"); client B then
    asks for the run state.  A hung-up client loses what was not dispatched yet.  With
    ``pid``, that server is stopped while A sends and hangs up, so the hang-up is certainly
    there when it reads."""
    import signal as signal_module
    import socket as socket_module

    from emulator.qmp.qemu_probe import RawQMP, normalize

    a = RawQMP(path)
    lines = a.read_lines(1)
    if mode == "close-after-caps":
        a.send(b'{"execute": "qmp_capabilities"}\n')
        lines += a.read_lines(1)
    if pid is not None and mode != "shutdown-wr":
        os.kill(pid, signal_module.SIGSTOP)
    try:
        if mode == "close-after-caps":
            a.send(b'{"execute": "cont"}\n')
        else:
            a.send(b'{"execute": "qmp_capabilities"}{"execute": "cont"}\n')
        if mode == "shutdown-wr":
            a.sock.shutdown(socket_module.SHUT_WR)
            lines += a.read_lines(10)  # until EOF
        a.close()
    finally:
        if pid is not None and mode != "shutdown-wr":
            os.kill(pid, signal_module.SIGCONT)
    time.sleep(0.3)
    b = RawQMP(path)
    lines += b.read_lines(1)
    b.send(b'{"execute": "qmp_capabilities"}{"execute": "query-status"}\n')
    lines += b.read_lines(2)
    b.close()
    return [normalize(line).decode() for line in lines]


_RUNNING = ('{"return": {"status": "running", "singlestep": false, "running": true}}\r\n')
_PRELAUNCH = ('{"return": {"status": "prelaunch", "singlestep": false, '
              '"running": false}}\r\n')
_RESUME = ('{"timestamp": {"seconds": SECS, "microseconds": USECS}, '
           '"event": "RESUME"}\r\n')
CONNECTION_ENDS = {
    "close": [_PRELAUNCH],
    "close-after-caps": ['{"return": {}}\r\n', _PRELAUNCH],
    "shutdown-wr": ['{"return": {}}\r\n', _RESUME, '{"return": {}}\r\n', _RUNNING],
}


def _expected_end(mode: str) -> list[str]:
    greeting = RECORDED["neg-caps-oob"][0]
    return [greeting, *CONNECTION_ENDS[mode][:-1], greeting, '{"return": {}}\r\n',
            CONNECTION_ENDS[mode][-1]]


@pytest.mark.parametrize("mode", sorted(CONNECTION_ENDS))
def test_connection_end_emulator(mode: str) -> None:
    server = EmulatorServer()
    try:
        assert connection_end(server.path, mode, server.proc.pid) == _expected_end(mode)
    finally:
        server.close()


@pytest.mark.qemu
@pytest.mark.parametrize("mode", sorted(CONNECTION_ENDS))
def test_connection_end_qemu(mode: str, qemu_binary: str) -> None:
    """A half-closed client is always served to the end.  A hang-up races QEMU's reading: on
    an idle host QEMU nearly always drops what is pending (the emulator's rule), but if the
    hang-up and the data reach it at once (a busy host) it runs them.  So a hang-up only
    has to be seen dropping in one of ten runs."""
    seen = []
    for _ in range(1 if mode == "shutdown-wr" else 10):
        with QemuMonitor(qemu_binary) as qemu:
            seen.append(connection_end(qemu.path, mode))
        if seen[-1] == _expected_end(mode):
            return
    assert seen[-1] == _expected_end(mode)

if __name__ == "__main__":
    if sys.argv[1:2] != ["--record"]:
        sys.exit(f"usage: {sys.argv[0]} --record [QEMU_BINARY]")
    record(sys.argv[2] if len(sys.argv) > 2 else None)
