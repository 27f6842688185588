"""QEMU's QObject input visitor (qapi/qobject-input-visitor.c, qapi/qapi-visit-core.c).

Argument checking is only as exact as its error texts and its *order*: QEMU walks the
schema's members in declaration order, takes each member from the JSON object, and reports
the first problem it meets, naming the member by its path ("x-perf.max-workers",
"actions[0].data.name").  Leftover keys are reported when a struct is complete, the first of
them in GLib hash-table order (see :mod:`emulator.qmp.ghash`).  Some messages use the full
path, others (range checks, enum values, alternates) only the member's own name or "null",
exactly as QEMU does; this class reproduces which is which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from emulator.qmp.errors import GenericError
from emulator.qmp.ghash import GStrSet
from emulator.qmp.json_writer import qdict_keys

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
_MISSING = object()


def c_key(key: str) -> bytes:
    """A QDict key as the C string GLib hashes (modified UTF-8)."""
    return key.encode("utf-8", "surrogatepass").replace(b"\0", b"\xc0\x80")


def is_qnum(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def qnum_get_try_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value <= INT64_MAX:
        return value
    return None


def qnum_get_try_uint(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


@dataclass
class _Frame:
    name: str | None
    obj: dict[str, Any] | list[Any]
    unvisited: GStrSet | None = None      # dict: keys not yet taken
    index: int = 0xFFFFFFFF                # list: index of the last element taken (unsigned)
    pos: int = 0                           # list: next element
    keys: dict[bytes, str] = field(default_factory=dict)


class InputVisitor:
    """The visitor's stack of containers and its primitive visits."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.stack: list[_Frame] = []

    # -- names ----------------------------------------------------------------------------
    def full_name(self, name: str | None, n: int = 0) -> str:
        """full_name_nth(): the member's path, e.g. "actions[0].data.name"."""
        errname = ""
        for so in reversed(self.stack):
            if n:
                n -= 1
            elif isinstance(so.obj, dict):
                errname = "." + (name if name is not None else "<anonymous>") + errname
            else:
                errname = f"[{so.index}]" + errname
            name = so.name
        if name:
            return name + errname
        if errname.startswith("."):
            return errname[1:]
        return errname or "<anonymous>"

    # -- taking values ----------------------------------------------------------------------
    def try_get(self, name: str | None, consume: bool) -> Any:
        """qobject_input_try_get_object(); _MISSING when absent."""
        if not self.stack:
            return self.root
        tos = self.stack[-1]
        if isinstance(tos.obj, dict):
            assert name is not None
            ret = tos.obj.get(name, _MISSING)
            if tos.unvisited is not None and consume and ret is not _MISSING:
                removed = tos.unvisited.remove(c_key(name))
                assert removed
            return ret
        if tos.pos < len(tos.obj):
            ret = tos.obj[tos.pos]
            if consume:
                tos.pos += 1
        else:
            ret = _MISSING
        if consume:
            tos.index = (tos.index + 1) & 0xFFFFFFFF
        return ret

    def get(self, name: str | None, consume: bool = True) -> Any:
        value = self.try_get(name, consume)
        if value is _MISSING:
            raise GenericError(f"Parameter '{self.full_name(name)}' is missing")
        return value

    def optional(self, name: str) -> bool:
        """visit_optional(): is the member present (null counts as present)?"""
        return self.try_get(name, False) is not _MISSING

    def type_error(self, name: str | None, expected: str) -> GenericError:
        return GenericError(
            f"Invalid parameter type for '{self.full_name(name)}', expected: {expected}")

    # -- containers --------------------------------------------------------------------------
    def start_struct(self, name: str | None) -> dict[str, Any]:
        obj = self.get(name)
        if not isinstance(obj, dict):
            raise self.type_error(name, "object")
        keys = {c_key(k): k for k in qdict_keys(obj)}
        self.stack.append(_Frame(name, obj, GStrSet(keys), keys=keys))
        return obj

    def check_struct(self) -> None:
        tos = self.stack[-1]
        assert tos.unvisited is not None
        for key in tos.unvisited:
            raise GenericError(f"Parameter '{self.full_name(tos.keys[key])}' is unexpected")

    def end_struct(self) -> None:
        self.stack.pop()

    def start_list(self, name: str | None) -> list[Any]:
        obj = self.get(name)
        if not isinstance(obj, list):
            raise self.type_error(name, "array")
        self.stack.append(_Frame(name, obj))
        return obj

    def next_list(self) -> bool:
        tos = self.stack[-1]
        return tos.pos < len(tos.obj)

    def end_list(self) -> None:
        self.stack.pop()

    def start_alternate(self, name: str | None) -> Any:
        """Peek at an alternate's value (not consumed: its branch's visit takes it)."""
        return self.get(name, consume=False)

    # -- scalars ------------------------------------------------------------------------------
    def type_int64(self, name: str | None) -> int:
        value = qnum_get_try_int(self.get(name))
        if value is None:
            raise self.type_error(name, "integer")
        return value

    def type_uint64(self, name: str | None) -> int:
        obj = self.get(name)
        value = qnum_get_try_uint(obj)
        if value is not None:
            return value
        signed = qnum_get_try_int(obj)
        if signed is not None:  # negative values are accepted "for backward compatibility"
            return signed & UINT64_MAX
        raise GenericError(f"Parameter '{self.full_name(name)}' expects uint64")

    def type_bool(self, name: str | None) -> bool:
        obj = self.get(name)
        if not isinstance(obj, bool):
            raise self.type_error(name, "boolean")
        return obj

    def type_str(self, name: str | None) -> str:
        obj = self.get(name)
        if not isinstance(obj, str):
            raise self.type_error(name, "string")
        return obj

    def type_number(self, name: str | None) -> float:
        obj = self.get(name)
        if not is_qnum(obj):
            raise self.type_error(name, "number")
        return float(obj)

    def type_any(self, name: str | None) -> Any:
        return self.get(name)

    def type_null(self, name: str | None) -> None:
        if self.get(name) is not None:
            raise self.type_error(name, "null")
