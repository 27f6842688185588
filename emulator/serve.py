"""``qmpreplay serve`` and ``qmpreplay commands``.

serve: the emulator as a standalone QMP server on a UNIX socket, for any QMP client
(qemu.qmp, qmp-shell).  It never listens on a network address; the socket is created with
mode 0600 (its directory, if it has to be made, with 0700) and removed on exit.  It runs
until a client sends ``quit`` or the process gets SIGINT/SIGTERM (connected clients then get
SHUTDOWN with reason "host-signal", as from QEMU).

commands: the table of implemented commands (name, family, arguments); ``--markdown PATH``
also writes it as Markdown; ``--against QEMU_BINARY`` compares it with the binary's
``query-qmp-schema`` and reports the coverage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from harness.errors import QmpReplayError

_NETWORK = re.compile(r"^(tcp:|inet:|vsock:|\[[^\]]*\]:\d+$|[\w.\-]*:\d+$)")
UNIX_PATH_MAX = 107


def check_socket_path(path: str) -> str:
    """Refuse anything but a UNIX socket path that fits in sockaddr_un."""
    if _NETWORK.match(path):
        raise QmpReplayError(f"serve: refusing to listen on network address {path!r}; "
                             "give the path of a UNIX socket")
    if len(os.fsencode(os.path.abspath(path))) > UNIX_PATH_MAX:
        raise QmpReplayError(f"serve: socket path too long for a UNIX socket: {path}")
    return os.path.abspath(path)


def run_serve(args: argparse.Namespace) -> int:
    from emulator.machine import Machine

    path = check_socket_path(args.socket)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, mode=0o700)
        except OSError as exc:
            raise QmpReplayError(f"serve: cannot create {parent}: {exc.strerror}") from None
    made_dir = args.dir is None
    root = tempfile.mkdtemp(prefix="qmpreplay-serve-") if made_dir else args.dir
    if not os.path.isdir(root):
        raise QmpReplayError(f"serve: test directory {root} does not exist")
    try:
        return asyncio.run(_serve(Machine(root), path, root))
    finally:
        if made_dir:
            shutil.rmtree(root, ignore_errors=True)


async def _serve(machine: object, path: str, root: str) -> int:
    from emulator.qmp.server import QMPServer

    server = QMPServer(machine)
    try:
        await server.start_unix(path)
    except OSError as exc:
        raise QmpReplayError(f"serve: cannot listen on {path}: {exc}") from None
    loop = asyncio.get_running_loop()
    signalled: list[int] = []

    def on_signal(signum: int) -> None:
        signalled.append(signum)
        machine.request_shutdown("host-signal")  # type: ignore[attr-defined]
        loop.call_soon(server.stop)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    print(f"qmpreplay: serving QMP on {path} (test directory {root})", file=sys.stderr,
          flush=True)
    try:
        await server.wait_closed()
        await asyncio.sleep(0)  # let the last reply or event reach the client
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await server.close()
    if signalled:
        print(f"qmpreplay: terminating on signal {signalled[0]}", file=sys.stderr)
    return 0


# -- qmpreplay commands --------------------------------------------------------------------------
def command_table() -> list[tuple[str, str, str]]:
    """(name, family, arguments) of every implemented command, sorted by family then name."""
    import emulator.commands  # noqa: F401
    from emulator.qmp.registry import COMMANDS

    rows = [(c.name, c.family, c.describe_arguments()) for c in COMMANDS.values()]
    return sorted(rows, key=lambda r: (r[1], r[0]))


def format_table(rows: list[tuple[str, str, str]]) -> str:
    width = max((len(r[0]) for r in rows), default=7)
    fam = max((len(r[1]) for r in rows), default=6)
    lines = [f"{'COMMAND':<{width}}  {'FAMILY':<{fam}}  ARGUMENTS"]
    lines += [f"{n:<{width}}  {f:<{fam}}  {a or '-'}" for n, f, a in rows]
    return "\n".join(lines) + "\n"


def format_markdown(rows: list[tuple[str, str, str]], coverage: str | None = None) -> str:
    out = ["# QMP commands implemented by the emulator", ""]
    if coverage:
        out += [coverage, ""]
    out += ["| Command | Family | Arguments |", "|---|---|---|"]
    for name, family, args in rows:
        cell = args.replace("|", "\\|") if args else "—"
        out.append(f"| `{name}` | {family} | {cell} |")
    return "\n".join(out) + "\n"


def compare_with(binary: str, rows: list[tuple[str, str, str]]) -> tuple[str, list[str]]:
    """(coverage line, schema differences) of the implemented commands against ``binary``."""
    from emulator.qmp.introspect import SchemaComparer
    from emulator.qmp.qemu_probe import query_qmp_schema

    try:
        comparer = SchemaComparer(query_qmp_schema(binary))
    except (OSError, RuntimeError, ValueError) as exc:
        raise QmpReplayError(f"commands: cannot query {binary}: {exc}") from None
    theirs = set(comparer.commands())
    ours = {r[0] for r in rows}
    both = sorted(ours & theirs)
    pct = 100.0 * len(both) / len(theirs) if theirs else 0.0
    coverage = f"Coverage: {len(both)} of {len(theirs)} commands of {binary} ({pct:.1f}%)"
    extra = sorted(ours - theirs)
    if extra:
        coverage += f"; not in that binary: {', '.join(extra)}"
    differences = []
    for name in both:
        differences += comparer.compare_command(name).mismatches
    return coverage, differences


def run_commands(args: argparse.Namespace) -> int:
    """Print the table; with --against also the coverage and any schema differences
    (exit status 1 if there are some)."""
    rows = command_table()
    coverage, differences = (compare_with(args.against, rows) if args.against
                             else (None, []))
    sys.stdout.write(format_table(rows))
    if coverage:
        print(coverage)
        print("Schema differences: " + ("none" if not differences else str(len(differences))))
        for line in differences:
            print(f"  {line}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(format_markdown(rows, coverage), encoding="utf-8")
    return 1 if differences else 0
