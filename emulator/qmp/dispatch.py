"""One QMP request to one response: qapi/qmp-dispatch.c and monitor/qmp.c, check by check.

Order matters because only the first failure is reported: the request must be an object;
its members are checked in QDict order ("execute"/"exec-oob" must be strings and may not
clash, "arguments" must be an object, "id" is anything, nothing else is allowed); the
command must exist in the current command set (before negotiation only qmp_capabilities,
and a CommandNotFound then reads "Expecting capabilities negotiation with
'qmp_capabilities'"); an out-of-band request needs a command that allows it; then the
arguments are visited and the handler runs.  ``id`` is echoed whatever it is.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from emulator.qmp.errors import CommandNotFound, GenericError, QMPError, error_object
from emulator.qmp.json_writer import qdict_keys
from emulator.qmp.registry import COMMANDS

log = logging.getLogger("emulator.qmp")

NEGOTIATION_COMMANDS = frozenset({"qmp_capabilities"})

# the session whose request is running (QEMU's monitor_cur())
current_session: contextvars.ContextVar[Any] = contextvars.ContextVar("current_session",
                                                                      default=None)


def is_oob(request: Any) -> bool:
    """qmp_is_oob(): "exec-oob" without "execute" (checked before any validation)."""
    return isinstance(request, dict) and "exec-oob" in request and "execute" not in request


def check_obj(request: dict[str, Any], allow_oob: bool) -> None:
    """qmp_dispatch_check_obj()."""
    exec_key = None
    for key in qdict_keys(request):
        value = request[key]
        if key == "execute" or (key == "exec-oob" and allow_oob):
            if not isinstance(value, str):
                raise GenericError(f"QMP input member '{key}' must be a string")
            if exec_key is not None:
                raise GenericError(f"QMP input member '{key}' clashes with '{exec_key}'")
            exec_key = key
        elif key == "arguments":
            if not isinstance(value, dict):
                raise GenericError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise GenericError(f"QMP input member '{key}' is unexpected")
    if exec_key is None:
        raise GenericError("QMP input lacks member 'execute'")


async def _run(vm: Any, request: dict[str, Any], allow_oob: bool, negotiating: bool) -> Any:
    check_obj(request, allow_oob)
    oob = "execute" not in request
    name = request["exec-oob"] if oob else request["execute"]
    cmd = COMMANDS.get(name)
    if cmd is None or (negotiating and name not in NEGOTIATION_COMMANDS):
        raise CommandNotFound(f"The command {name} has not been found")
    if oob and not cmd.allow_oob:
        raise GenericError(f"The command {name} does not support OOB")
    try:
        checked = cmd.check(request.get("arguments", {}))
        ret = await cmd.call(vm, checked)
    except QMPError:
        raise
    except Exception as exc:  # a bug in the emulator: answer, never crash the session
        log.exception("QMP command %s failed", name)
        raise GenericError(f"internal error in the emulator's {name}: {exc}") from exc
    if not cmd.success_response:
        return None
    return {} if ret is None else ret


async def dispatch(vm: Any, request: Any, *, allow_oob: bool, negotiating: bool,
                   session: Any = None) -> dict[str, Any] | None:
    """qmp_dispatch() + monitor_qmp_dispatch(): the response to send, or None for a command
    that sends none."""
    token = current_session.set(session)
    rsp: dict[str, Any]
    try:
        if not isinstance(request, dict):
            return {"error": error_object(GenericError("QMP input must be a JSON object"))}
        try:
            ret = await _run(vm, request, allow_oob, negotiating)
        except QMPError as err:
            error = error_object(err)
            if negotiating and err.error_class == "CommandNotFound":
                del error["desc"]
                error["desc"] = "Expecting capabilities negotiation with 'qmp_capabilities'"
            rsp = {"error": error}
        else:
            if ret is None:
                return None
            rsp = {"return": ret}
        if "id" in request:
            rsp["id"] = request["id"]
        return rsp
    finally:
        current_session.reset(token)


def parse_error_response(desc: str) -> dict[str, Any]:
    """The reply to a message the JSON parser rejected (never has an id)."""
    return {"error": {"class": "GenericError", "desc": desc}}
