"""``qmpreplay serve``: the emulator as a standalone QMP server on a UNIX socket, for any
QMP client (qemu.qmp, qmp-shell).  It never listens on a network address; the socket is created with
mode 0600 (its directory, if it has to be made, with 0700) and removed on exit.  It runs
until a client sends ``quit`` or the process gets SIGINT/SIGTERM (connected clients then get
SHUTDOWN with reason "host-signal", as from QEMU).
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
