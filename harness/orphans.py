"""No QEMU outlives the harness that started it.

The harness stops its QEMUs when it ends, but a harness killed outright (SIGKILL, the OOM
killer) runs no cleanup: its QEMU would go on, and one that is flooding events at a client
that is gone keeps a CPU busy for ever. Linux's PR_SET_PDEATHSIG, set in the child before it
execs, has the kernel send SIGKILL to the child when the harness dies.
"""

from __future__ import annotations

import ctypes
import functools
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


@functools.cache
def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child die with this process (None off Linux). The
    C function is looked up here, once, so the child between fork and exec only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
    kill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, kill)

    return preexec
