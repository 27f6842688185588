"""Control and machine commands: qmp_capabilities, query-version, query-commands,
query-status, stop, cont, quit, human-monitor-command (and the HMP "info status",
"info version" and "help" it can run).

The Machine is ``-machine none -S``: it starts in "prelaunch", stop does nothing until cont
has run it, and it has no CPUs (so any cpu-index is refused).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emulator.qmp import schema
from emulator.qmp.dispatch import current_session
from emulator.qmp.errors import GenericError
from emulator.qmp.hmp import HMP_COMMANDS, help_text, hmp_command, split_words
from emulator.qmp.hmp import handle_hmp_command as run_hmp
from emulator.qmp.protocol import QEMU_PACKAGE, QEMU_VERSION
from emulator.qmp.qemu_commands import QUERY_COMMANDS_ORDER
from emulator.qmp.registry import COMMANDS, command

if TYPE_CHECKING:
    from emulator.machine import Machine

schema.enum("QMPCapability", ["oob"])


@command("qmp_capabilities", data={"*enable": ["QMPCapability"]})
def qmp_capabilities(vm: Machine, enable: list[str] | None = None) -> None:
    """Leave negotiation mode (monitor/qmp-cmds-control.c); the session does the work."""
    session = current_session.get()
    if session is None:
        raise GenericError("qmp_capabilities needs a QMP session")
    session.negotiate(enable or [])


def version_info() -> dict[str, Any]:
    """VersionInfo in QAPI member order (it decides the order of colliding keys)."""
    return {"qemu": dict(QEMU_VERSION), "package": QEMU_PACKAGE}


@command("query-version")
def query_version(vm: Machine) -> dict[str, Any]:
    return version_info()


@command("query-commands")
def query_commands(vm: Machine) -> list[dict[str, str]]:
    """All commands, in QEMU's order (emulator-only commands first)."""
    rank = {name: i for i, name in enumerate(QUERY_COMMANDS_ORDER)}
    names = sorted(COMMANDS, key=lambda n: (n in rank, rank.get(n, 0), n))
    return [{"name": name} for name in names]


@command("query-status")
def query_status(vm: Machine) -> dict[str, Any]:
    return {"running": vm.running, "singlestep": False, "status": vm.runstate}


@command("stop")
def stop(vm: Machine) -> None:
    vm.stop()


@command("cont")
def cont(vm: Machine) -> None:
    vm.cont()


@command("quit")
def quit_(vm: Machine) -> None:
    """SHUTDOWN goes out before the reply; the server closes the connection after it."""
    vm.request_shutdown("host-qmp-quit")


@command("human-monitor-command", data={"command-line": "str", "*cpu-index": "int"})
async def human_monitor_command(vm: Machine, command_line: str,
                                cpu_index: int | None = None) -> str:
    if cpu_index is not None:  # -machine none has no CPUs
        raise GenericError("Parameter 'cpu-index' expects a CPU number")
    return await run_hmp(vm, command_line)


# -- HMP ---------------------------------------------------------------------------------------
@hmp_command("status", args_type="", help="show the current VM status (running|paused)",
             info=True)
def hmp_info_status(vm: Machine) -> str:
    text = f"VM status: {'running' if vm.running else 'paused'}"
    if not vm.running and vm.runstate != "paused":
        text += f" ({vm.runstate})"
    return text + "\n"


@hmp_command("version", args_type="", help="show the version of QEMU", info=True)
def hmp_info_version(vm: Machine) -> str:
    v = QEMU_VERSION
    return f"{v['major']}.{v['minor']}.{v['micro']}{QEMU_PACKAGE}\n"


@hmp_command("help|?", args_type="name:S?", params="[cmd]",
             help="show the help")
def hmp_help(vm: Machine, name: str | None = None) -> str:
    words = split_words(name) if name is not None else []
    if words is None:
        return ""
    return help_text(HMP_COMMANDS, words, [])
