"""The ``qmpreplay`` command line.

Each subcommand's options are declared here, and its implementation is imported only when
it runs, so ``qmpreplay parse`` never pays for importing the emulator or QEMU backends.
Every expected failure (bad transcript, missing QEMU, bad recipe) is a :class:`QmpReplayError`
printed as one line on stderr with exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
from collections.abc import Callable, Sequence

from harness.errors import QmpReplayError

# subcommand -> "module:function"; the function takes the parsed arguments, returns the status
HANDLERS: dict[str, str] = {
    "parse": "harness.transcript.cli:run",
    "replay": "harness.replay.cli:run",
    "conform": "harness.conform:run",
    "regen": "harness.regen:run",
    "record": "harness.record:run",
    "proxy": "harness.proxy:run",
    "serve": "emulator.serve:run_serve",
    "commands": "emulator.coverage:run",
}


def _backend_options(p: argparse.ArgumentParser, default: str = "emulator") -> None:
    p.add_argument("--backend", choices=("emulator", "qemu"), default=default,
                   help=f"where the case runs (default: {default})")
    p.add_argument("--qemu-binary", metavar="PATH", default=None,
                   help="qemu-system-x86_64 to drive (default: from PATH)")
    p.add_argument("--qemu-img", metavar="PATH", default=None,
                   help="qemu-img for image work on the QEMU backend (default: from PATH)")
    p.add_argument("--recipe", metavar="PATH", default=None,
                   help="recipe for hidden steps (default: cases/<stem>.toml if present)")
    p.add_argument("--transport", choices=("direct", "socket"), default="direct",
                   help="how the emulator backend is reached: its monitor's dispatch directly "
                        "(default), or qemu.qmp over a socket pair (the wire path)")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of ``only`` that one (what ``main`` runs: each
    subcommand's parser costs a few hundred microseconds to declare)."""
    parser = argparse.ArgumentParser(
        prog="qmpreplay",
        description="Replay golden QMP transcripts (QEMU iotests .out files) on the "
                    "built-in block-layer emulator or on real QEMU.")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    def add(name: str, summary: str) -> argparse.ArgumentParser | None:
        return sub.add_parser(name, help=summary) if only in (None, name) else None

    if p := add("parse", "parse transcripts and summarize their records"):
        p.add_argument("files", nargs="+", metavar="FILE")
        p.add_argument("--json", action="store_true", help="print one JSON object per record")
        p.add_argument("--check-roundtrip", action="store_true",
                       help="exit 0 only if rendering gives every file back byte for byte")

    if p := add("replay", "replay goldens on a backend and diff the result"):
        p.add_argument("files", nargs="+", metavar="FILE")
        _backend_options(p)
        p.add_argument("-k", dest="keyword", metavar="SECTION-SUBSTRING", default=None,
                       help="run only sections whose title contains this text")
        p.add_argument("-x", "--exitfirst", action="store_true", help="stop at the first failure")
        p.add_argument("--junit-xml", metavar="PATH", default=None, help="write a JUnit XML report")
        p.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                       help="sections run at once (default: the CPUs; at most 4 on QEMU)")
        p.add_argument("-q", "--quiet", action="store_true", help="print only failures and totals")

    if p := add("conform", "hold the emulator (and QEMU builds) against real QEMU"):
        p.add_argument("files", nargs="+", metavar="FILE")
        p.add_argument("--qemu-binary", metavar="PATH", action="append", default=None,
                       help="a QEMU binary to include (repeat for a version matrix)")
        p.add_argument("--qemu-img", metavar="PATH", default=None)
        p.add_argument("--html", metavar="PATH", default=None, help="write an HTML report")
        p.add_argument("--images", action="store_true",
                       help="also compare the images each section leaves, byte for byte "
                            "(VMs are shut down as iotests do)")

    if p := add("regen", "rerun a case and rewrite its golden"):
        p.add_argument("file", metavar="FILE")
        _backend_options(p, default="qemu")
        p.add_argument("--accept", action="store_true", help="replace the golden")

    if p := add("record", "render a case template, run it, write a golden"):
        p.add_argument("template", metavar="TEMPLATE.j2")
        _backend_options(p, default="qemu")
        p.add_argument("-o", "--output", metavar="FILE", required=True)

    if p := add("proxy", "record a live QMP session between a client and QEMU"):
        p.add_argument("--listen", metavar="PATH", required=True)
        p.add_argument("--connect", metavar="PATH", required=True)
        p.add_argument("-o", "--output", metavar="FILE", required=True)
        p.add_argument("--test-dir", metavar="DIR", default=None,
                       help="log paths under DIR as TEST_DIR/PID-<name>, as iotests does")

    if p := add("serve", "run the emulator as a standalone QMP server"):
        p.add_argument("--socket", metavar="PATH", required=True)
        p.add_argument("--dir", metavar="DIR", default=None,
                       help="the test directory the emulator may touch (default: a temporary one)")

    if p := add("commands", "list the emulator's QMP commands"):
        p.add_argument("--against", metavar="QEMU_BINARY", default=None,
                       help="compare with this binary's query-qmp-schema")
        p.add_argument("--markdown", metavar="PATH", default=None,
                       help="also write the table as Markdown")
    return parser


def _handler(name: str) -> Callable[[argparse.Namespace], int]:
    module, _, func = HANDLERS[name].partition(":")
    return getattr(importlib.import_module(module), func)  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Without ``argv`` this is the whole program (``qmpreplay``): the
    process ends next, so its last garbage collection (~15 ms, freeing nothing) is skipped."""
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    try:
        return _handler(args.subcommand)(args)
    except QmpReplayError as exc:
        print(f"qmpreplay: {exc}" if not exc.located else str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qmpreplay: interrupted", file=sys.stderr)
        return 130
    finally:
        if argv is None:
            gc.freeze()


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser(argv[0] if argv and argv[0] in HANDLERS else None).parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
