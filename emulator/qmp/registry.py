"""The QMP command table: ``@command`` registers a handler with its QAPI argument schema.

::

    @command("block-dirty-bitmap-add", data="BlockDirtyBitmapAdd")
    def block_dirty_bitmap_add(vm, node, name, granularity=None, persistent=None,
                               disabled=None): ...

    @command("blockdev-add", data="BlockdevOptions", boxed=True)
    def blockdev_add(vm, options): ...

A handler gets the Machine and the checked arguments as keyword arguments named after the
members (``-`` becomes ``_``; absent optional members are not passed), or with ``boxed=True``
the whole checked dict as one argument.  It returns the command's ``return`` value (None
means ``{}``), may be a coroutine function, and fails by raising a
:class:`emulator.qmp.errors.QMPError`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from emulator.qmp import schema
from emulator.qmp.schema import TypeRef

Handler = Callable[..., Any]


@dataclass
class Command:
    name: str
    handler: Handler
    data: TypeRef | None = None
    boxed: bool = False
    returns: TypeRef | None = None
    allow_oob: bool = False
    success_response: bool = True
    family: str = ""

    def check(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The marshaller's visit of the arguments (QEMU's texts on failure)."""
        return schema.check_arguments(self.data, arguments)

    async def call(self, vm: Any, checked: dict[str, Any]) -> Any:
        if self.boxed:
            result = self.handler(vm, checked)
        else:
            result = self.handler(vm, **{k.replace("-", "_"): v for k, v in checked.items()})
        if inspect.isawaitable(result):
            result = await result
        return result

    def describe_arguments(self) -> str:
        """The arguments as ``qmpreplay commands`` prints them."""
        if self.data is None:
            return ""
        if isinstance(self.data, dict):
            return schema.describe(self.data)
        t = schema.TYPES.get(self.data) if isinstance(self.data, str) else None
        if isinstance(t, schema.Struct):
            return ", ".join(schema.describe_member(m) for m in t.all_members())
        return schema.describe(self.data)


COMMANDS: dict[str, Command] = {}


def _family(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def command(name: str, data: TypeRef | None = None, *, boxed: bool = False,
            returns: TypeRef | None = None, allow_oob: bool = False,
            success_response: bool = True, features: Any = None,
            family: str | None = None) -> Callable[[Handler], Handler]:
    """Register the decorated function as QMP command ``name`` (re-registering replaces)."""

    def register(fn: Handler) -> Handler:
        COMMANDS[name] = Command(name, fn, data, boxed, returns, allow_oob, success_response,
                                 family or _family(fn.__module__))
        return fn

    return register


def lookup(name: str) -> Command | None:
    return COMMANDS.get(name)
