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

from typing import Any

from emulator.qmp.errors import GenericError
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


class _Frame:
    """One container being visited."""

    __slots__ = ("index", "name", "obj", "pos", "taken", "unvisited")

    def __init__(self, name: str | None, obj: dict[str, Any] | list[Any]) -> None:
        self.name = name
        self.obj = obj
        # dict: the keys not yet taken, and those taken in order (GLib's table is only
        # rebuilt from them when its iteration order decides which leftover is reported)
        self.unvisited: set[str] | None = set(obj) if isinstance(obj, dict) else None
        self.taken: list[str] = []
        self.index = 0xFFFFFFFF                # list: index of the last element taken
        self.pos = 0                           # list: next element

    def first_unvisited(self) -> str:
        """The leftover key QEMU names: the first its GHashTableIter yields, after the
        table got every key in QDict order and lost the taken ones in the order taken."""
        assert self.unvisited and isinstance(self.obj, dict)
        if len(self.unvisited) == 1:
            return next(iter(self.unvisited))
        from emulator.qmp.ghash import GStrSet  # only for two or more leftovers

        names = {c_key(k): k for k in qdict_keys(self.obj)}
        table = GStrSet(names)
        for key in self.taken:
            table.remove(c_key(key))
        return names[next(iter(table))]


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
        obj = tos.obj
        if isinstance(obj, dict):
            assert name is not None and tos.unvisited is not None
            ret = obj.get(name, _MISSING)
            if consume and ret is not _MISSING:
                tos.unvisited.remove(name)
                tos.taken.append(name)
            return ret
        if tos.pos < len(obj):
            ret = obj[tos.pos]
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

    def current_object(self) -> dict[str, Any]:
        """The JSON object being visited (the struct on top of the stack)."""
        obj = self.stack[-1].obj
        assert isinstance(obj, dict)
        return obj

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
        self.stack.append(_Frame(name, obj))
        return obj

    def check_struct(self) -> None:
        tos = self.stack[-1]
        if tos.unvisited:
            raise GenericError(f"Parameter '{self.full_name(tos.first_unvisited())}' is "
                               "unexpected")

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
