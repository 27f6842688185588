"""Fuzz the emulator's QMP server and the transcript parser/replayer.

``python benchmarks/fuzz.py [--messages N] [--goldens N] [--seed S]`` (``tox -e fuzz``):

* QMP server: N messages over a real socket to the in-process server — random bytes, broken
  JSON, valid JSON of the wrong shape, real commands with random arguments — interleaved
  with valid traffic. After each fuzz message a 0xff byte (a lexer error that makes QEMU's
  JSON streamer start afresh) and a numbered ``query-version`` sentinel keep the two sides in
  step. Every reply must be valid QMP (``return``, or ``error`` with QEMU's class and a
  description); the server must answer ``query-version`` at the end; nothing may hang.
* Parser and replayer: N mutated goldens (lines dropped, duplicated, swapped, cut, digits
  changed): parsing gives a transcript or one ``FILE:LINE:`` error; replaying a mutant on the
  emulator gives results with diffs or a one-line error — never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ERROR_CLASSES = {"GenericError", "CommandNotFound", "DeviceNotFound", "DeviceNotActive",
                 "KVMMissingCap"}


# -- QMP server -------------------------------------------------------------------------------
def random_json(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(8 if depth < 3 else 5)
    if choice == 0:
        return rng.randint(-2**70, 2**70)
    if choice == 1:
        return rng.random() * 10 ** rng.randint(-5, 300)
    if choice == 2:
        return rng.choice([True, False, None])
    if choice in (3, 4):
        alphabet = "abcdefghij-_.#/ \u00e9\u2603"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
    if choice == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["node", "name", "driver", "node-name", "granularity", "id", "device", "job-id",
            "sync", "target", "bitmaps", "file", "size", "persistent", "filename", "arguments"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def fuzz_message(rng: random.Random, commands: list[str]) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:    # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 60)))
    if kind == 1:    # broken JSON: a valid command cut or corrupted
        text = json.dumps({"execute": rng.choice(commands), "arguments": random_json(rng)})
        i = rng.randrange(len(text))
        return (text[:i] + rng.choice(["", "'", "\\", "}", "]", ",", ":", "\x00", "{"]) +
                text[i + rng.randint(0, 3):]).encode()
    if kind == 2:    # valid JSON, wrong shape
        return json.dumps(random_json(rng)).encode()
    if kind == 3:    # a QMP-ish object with wrong members
        msg = {rng.choice(["execute", "exec-oob", "arguments", "id", "control"]):
               random_json(rng) for _ in range(rng.randint(1, 3))}
        return json.dumps(msg).encode()
    # real commands with random arguments
    args = random_json(rng)
    msg: dict[str, Any] = {"execute": rng.choice(commands)}
    if isinstance(args, dict) or rng.random() < 0.2:
        msg["arguments"] = args
    if rng.random() < 0.3:
        msg["id"] = random_json(rng)
    return json.dumps(msg).encode()


def valid_reply(msg: Any) -> bool:
    if not isinstance(msg, dict):
        return False
    if "event" in msg:
        return isinstance(msg.get("timestamp"), dict)
    if "return" in msg:
        return True
    err = msg.get("error")
    return (isinstance(err, dict) and err.get("class") in ERROR_CLASSES
            and isinstance(err.get("desc"), str))


async def fuzz_server(messages: int, seed: int) -> tuple[int, int]:
    import emulator.commands  # noqa: F401  (registers every command)
    from emulator.machine import Machine
    from emulator.qmp.registry import COMMANDS
    from emulator.qmp.server import QMPServer

    rng = random.Random(seed)
    commands = sorted(c for c in COMMANDS if c not in ("quit",))
    with tempfile.TemporaryDirectory() as tmp:
        server = QMPServer(Machine(tmp))
        reader, writer = await asyncio.open_unix_connection(sock=server.socketpair(),
                                                            limit=1 << 24)

        async def read_until(ident: str) -> int:
            count = 0
            while True:
                line = await asyncio.wait_for(reader.readline(), 10)
                if not line:
                    raise RuntimeError("server closed the connection")
                msg = json.loads(line)
                if not valid_reply(msg) and "QMP" not in msg:
                    raise RuntimeError(f"invalid reply: {line[:200]!r}")
                count += 1
                if isinstance(msg, dict) and msg.get("id") == ident:
                    return count

        await reader.readline()  # greeting
        writer.write(b'{"execute": "qmp_capabilities", "id": "caps"}\n')
        await read_until("caps")
        replies = 0
        started = time.monotonic()
        for n in range(messages):
            if rng.random() < 0.7:
                writer.write(fuzz_message(rng, commands) + b"\xff\n")
            else:
                writer.write(b'{"execute": "query-version"}\n')
            if n % 50 == 49 or n == messages - 1:
                ident = f"sentinel-{n}"
                writer.write(b'\xff\n{"execute": "query-version", "id": "%s"}\n' % ident.encode())
                await writer.drain()
                replies += await read_until(ident)
            if n % 10000 == 9999:
                rate = (n + 1) / (time.monotonic() - started)
                print(f"  qmp: {n + 1}/{messages} messages ({rate:.0f}/s)", file=sys.stderr)
        writer.write(b'{"execute": "query-version", "id": "final"}\n')
        await writer.drain()
        await read_until("final")
        writer.close()
        await server.close()
    return messages, replies


# -- parser and replayer ---------------------------------------------------------------------
def mutate(text: str, rng: random.Random) -> str:
    lines = text.split("\n")
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(lines))
        op = rng.randrange(6)
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[i])
        elif op == 2:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3:
            lines[i] = lines[i][:rng.randrange(len(lines[i]) + 1)]
        elif op == 4:
            lines[i] = "".join(str(rng.randrange(10)) if c.isdigit() and rng.random() < 0.3
                               else c for c in lines[i])
        elif len(lines[i]) > 0:
            k = rng.randrange(len(lines[i]))
            lines[i] = lines[i][:k] + rng.choice("{}[]\":, =-x9") + lines[i][k + 1:]
    return "\n".join(lines)


def fuzz_goldens(count: int, seed: int, replay_every: int) -> dict[str, int]:
    from harness.backends import make_factory
    from harness.errors import QmpReplayError
    from harness.replay.runner import replay_file
    from harness.transcript import parse_file

    rng = random.Random(seed)
    sources = [ROOT / "goldens" / n for n in ("257.out", "236.out", "254.out", "283.out")]
    counts = {"parsed": 0, "located-errors": 0, "replayed": 0, "replay-errors": 0}
    factory = make_factory("emulator")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cases").mkdir()
        for n in range(count):
            source = rng.choice(sources)
            path = Path(tmp) / source.name
            recipe = ROOT / "cases" / f"{source.stem}.toml"
            if recipe.exists():
                (Path(tmp) / "cases" / recipe.name).write_text(recipe.read_text())
            path.write_text(mutate(source.read_text(), rng))
            try:
                transcript = parse_file(path)
                counts["parsed"] += 1
            except QmpReplayError as exc:
                assert str(exc).startswith(f"{path}:") and "\n" not in str(exc), exc
                counts["located-errors"] += 1
                continue
            if n % replay_every == 0 and transcript.sections():
                keyword = rng.choice(transcript.sections()).title
                try:
                    asyncio.run(replay_file(path, factory, keyword=keyword))
                    counts["replayed"] += 1
                except QmpReplayError as exc:
                    assert "\n" not in str(exc), exc
                    counts["replay-errors"] += 1
            if n % 100 == 99:
                print(f"  goldens: {n + 1}/{count} {counts}", file=sys.stderr)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--goldens", type=int, default=1000)
    parser.add_argument("--replay-every", type=int, default=5,
                        help="replay one section of every Nth parsable mutant")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    print(f"seed {args.seed}")
    started = time.monotonic()
    sent, replies = asyncio.run(fuzz_server(args.messages, args.seed))
    print(f"QMP server: {sent} fuzz messages, {replies} replies, all valid QMP, "
          f"query-version answered afterwards ({time.monotonic() - started:.1f} s)")
    started = time.monotonic()
    counts = fuzz_goldens(args.goldens, args.seed, args.replay_every)
    print(f"goldens: {args.goldens} mutants: {counts} — no traceback "
          f"({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
