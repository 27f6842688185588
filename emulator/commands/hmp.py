"""HMP ``qemu-io [-d] DEVICE "COMMAND"`` (block/monitor/block-hmp-cmds.c hmp_qemu_io).

The device is a BlockBackend name first, else a node name reached through a temporary
BlockBackend (perm 0, shared all), so requests pass through filters above the node (writing
to a copy-before-write filter goes through it). With ``-d`` the name is a qdev id. Before a
command runs, its extra permissions (qemu-io-cmds.c ``.perm``: WRITE for write/writev/
aio_write/discard, WRITE|RESIZE for truncate) are added to the backend, and they stay.
qemu-io prints to QEMU's stdout, not into the HMP reply: the emulator logs that text (logger
``emulator.qemu_io``) and replies "". What qemu-io prints with qemu_printf (``info``'s
format-specific part) or reports with error_report() goes to the current monitor instead —
a permission it cannot take ("Block node is read-only") comes back in the reply, as do
lookup errors ("Error: ...").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from emulator.block import perm as P
from emulator.block.errors import GenericError
from emulator.qmp.hmp import hmp_command

if TYPE_CHECKING:
    from emulator.block.backend import BlockBackend
    from emulator.machine import Machine

log = logging.getLogger("emulator.qemu_io")

COMMAND_PERMS = {
    "write": P.WRITE, "w": P.WRITE, "writev": P.WRITE, "aio_write": P.WRITE,
    "truncate": P.WRITE | P.RESIZE, "t": P.WRITE | P.RESIZE, "discard": P.WRITE,
    "d": P.WRITE,
}


def run_qemu_io(blk: BlockBackend, command: str) -> tuple[str, str]:
    """qemuio_command: widen the backend's permissions as the command needs (command() in
    qemu-io-cmds.c), then run it. Returns (what error_report sends to the monitor, what
    qemu-io prints on stdout)."""
    from emulator import qemu_io

    words = command.split()
    need = COMMAND_PERMS.get(words[0], 0) if words else 0
    if need & ~blk.perm and blk.is_available():
        try:
            blk.set_perm(blk.perm | need, blk.shared_perm)
        except GenericError as e:
            return f"{e.desc}\n", ""
    monitor: list[str] = []   # qemu_printf's output (info's format-specific part)
    stdout = qemu_io.run(blk, command, monitor=monitor)
    return "".join(monitor), stdout


@hmp_command("qemu-io", args_type="qdev:-d,device:B,command:s",
             params='[-d] [device] "[command]"',
             help="run a qemu-io command on a block device\n\t\t\t-d: [device] is a "
                  "device ID rather than a drive ID or node name")
def hmp_qemu_io(vm: Machine, device: str, command: str, qdev: bool = False) -> str:
    block = vm.block
    local = None
    if qdev:
        blk = next((b for b in block.backends if b.dev_id == device), None)
        if blk is None:
            raise GenericError(f"Device '{device}' not found")
    else:
        blk = block.blk_by_name(device)
        if blk is None:
            bs = block.graph.lookup_bs(None, device)
            blk = local = block.temporary_backend(bs)
    try:
        monitor, stdout = run_qemu_io(blk, command)
    finally:
        if local is not None:
            local.unref()
    if stdout:
        log.info("%s", stdout.rstrip("\n"))
    return monitor
