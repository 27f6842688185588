"""QAPI types in QAPI's own notation, and argument checking with QEMU's texts.

Declarations read like ``qapi/*.json``::

    schema.enum("BitmapSyncMode", ["on-success", "never", "always"])
    schema.struct("BlockDirtyBitmapAdd", {"node": "str", "name": "str",
                                          "*granularity": "uint32"})
    schema.union("BlockdevOptions", base={"driver": "BlockdevDriver", "*node-name": "str"},
                 discriminator="driver", branches={"file": "BlockdevOptionsFile"})
    schema.alternate("BlockdevRef", {"definition": "BlockdevOptions", "reference": "str"})

A type reference is a builtin or declared type name, a one-element list (an array), or a
dict (an anonymous struct); ``'*name'`` marks an optional member.  Names resolve when
arguments are checked, so declarations may come in any order and may be re-declared (a
module adding a union branch re-declares the union).  ``features`` are accepted and ignored.

Checking walks the value the way QEMU's generated ``visit_type_*`` functions drive its input
visitor (:mod:`emulator.qmp.visitor`), so the first error and its text are QEMU's.  A checked
value is plain JSON data: structs are dicts with their JSON keys in member order (absent
optional members left out), enums are strings, uint64 values given as negative numbers come
back as QEMU stores them (modulo 2**64), ``number`` is a float.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from emulator.qmp.errors import GenericError
from emulator.qmp.visitor import InputVisitor

TypeRef: TypeAlias = "str | list[Any] | dict[str, Any] | QAPIType"

# int types checked against their range after an int64/uint64 visit (qapi-visit-core.c)
_SIGNED = {"int8": (-(1 << 7), (1 << 7) - 1), "int16": (-(1 << 15), (1 << 15) - 1),
           "int32": (-(1 << 31), (1 << 31) - 1)}
_UNSIGNED = {"uint8": (1 << 8) - 1, "uint16": (1 << 16) - 1, "uint32": (1 << 32) - 1}
BUILTINS = ("str", "int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
            "uint64", "size", "number", "bool", "null", "any")

# JSON type of a value as QEMU's alternates dispatch on it (QType)
QTYPE_QNULL, QTYPE_QNUM, QTYPE_QDICT, QTYPE_QLIST, QTYPE_QSTRING, QTYPE_QBOOL = (
    "null", "number", "object", "array", "string", "boolean")


def qtype_of(value: Any) -> str:
    if value is None:
        return QTYPE_QNULL
    if isinstance(value, bool):
        return QTYPE_QBOOL
    if isinstance(value, int | float):
        return QTYPE_QNUM
    if isinstance(value, str):
        return QTYPE_QSTRING
    if isinstance(value, dict):
        return QTYPE_QDICT
    return QTYPE_QLIST


class QAPIType:
    """A schema type; ``visit`` is QAPI's ``visit_type_<T>(v, name, &obj)``."""

    name: str
    meta = "builtin"

    def visit(self, v: InputVisitor, name: str | None) -> Any:
        raise NotImplementedError

    def qtype(self) -> str:
        """The JSON type an alternate branch of this type matches."""
        raise NotImplementedError

    def describe(self) -> str:
        """How ``qmpreplay commands`` prints a reference to this type."""
        return self.name


@dataclass
class Builtin(QAPIType):
    name: str

    def visit(self, v: InputVisitor, name: str | None) -> Any:
        kind = self.name
        if kind == "str":
            return v.type_str(name)
        if kind in ("int", "int64"):
            return v.type_int64(name)
        if kind in _SIGNED:
            value = v.type_int64(name)
            lo, hi = _SIGNED[kind]
            if not lo <= value <= hi:
                raise GenericError(f"Parameter '{name or 'null'}' expects {kind}_t")
            return value
        if kind in ("uint64", "size"):
            return v.type_uint64(name)
        if kind in _UNSIGNED:
            value = v.type_uint64(name)
            if value > _UNSIGNED[kind]:
                raise GenericError(f"Parameter '{name or 'null'}' expects {kind}_t")
            return value
        if kind == "number":
            return v.type_number(name)
        if kind == "bool":
            return v.type_bool(name)
        if kind == "null":
            return v.type_null(name)
        return v.type_any(name)

    def qtype(self) -> str:
        if self.name == "str":
            return QTYPE_QSTRING
        if self.name == "bool":
            return QTYPE_QBOOL
        if self.name == "null":
            return QTYPE_QNULL
        if self.name == "any":
            raise TypeError("'any' cannot be an alternate branch")
        return QTYPE_QNUM


@dataclass
class Enum(QAPIType):
    name: str
    values: list[str]
    meta = "enum"

    def visit(self, v: InputVisitor, name: str | None) -> str:
        value = v.type_str(name)
        if value not in self.values:
            raise GenericError(f"Parameter '{name or 'null'}' does not accept value '{value}'")
        return value

    def qtype(self) -> str:
        return QTYPE_QSTRING


@dataclass
class Member:
    name: str
    type: TypeRef
    optional: bool = False


def _members(spec: Mapping[str, TypeRef]) -> list[Member]:
    out = []
    for key, ref in spec.items():
        optional = key.startswith("*")
        out.append(Member(key[1:] if optional else key, ref, optional))
    return out


class ObjectType(QAPIType):
    """Structs and unions: visited as a JSON object, member by member."""

    meta = "object"

    def visit(self, v: InputVisitor, name: str | None) -> dict[str, Any]:
        v.start_struct(name)
        out: dict[str, Any] = {}
        self.visit_members(v, out)
        v.check_struct()
        v.end_struct()
        return out

    def visit_members(self, v: InputVisitor, out: dict[str, Any]) -> None:
        raise NotImplementedError

    def all_members(self) -> list[Member]:
        raise NotImplementedError

    def qtype(self) -> str:
        return QTYPE_QDICT


def visit_members(members: Iterable[Member], v: InputVisitor, out: dict[str, Any]) -> None:
    """visit_type_<T>_members() for plain members, in declaration order (members are
    visited with their struct's object on top of the visitor's stack)."""
    obj = v.current_object()
    for m in members:
        if m.optional and m.name not in obj:   # visit_optional: null counts as present
            continue
        out[m.name] = resolve(m.type).visit(v, m.name)


@dataclass
class Struct(ObjectType):
    name: str
    members: list[Member]
    base: TypeRef | None = None

    def base_type(self) -> ObjectType | None:
        if self.base is None:
            return None
        base = resolve(self.base)
        assert isinstance(base, ObjectType), f"base of {self.name} is not a struct"
        return base

    def visit_members(self, v: InputVisitor, out: dict[str, Any]) -> None:
        base = self.base_type()
        if base is not None:
            base.visit_members(v, out)
        visit_members(self.members, v, out)

    def all_members(self) -> list[Member]:
        base = self.base_type()
        return (base.all_members() if base else []) + self.members


@dataclass
class Union(ObjectType):
    name: str
    base: TypeRef
    discriminator: str
    branches: dict[str, TypeRef]

    def base_type(self) -> ObjectType:
        base = resolve(self.base)
        assert isinstance(base, ObjectType), f"base of {self.name} is not a struct"
        return base

    def visit_members(self, v: InputVisitor, out: dict[str, Any]) -> None:
        self.base_type().visit_members(v, out)
        branch = self.branches.get(out[self.discriminator])
        if branch is not None:
            branch_type = resolve(branch)
            assert isinstance(branch_type, ObjectType)
            branch_type.visit_members(v, out)

    def all_members(self) -> list[Member]:
        return self.base_type().all_members()

    def describe(self) -> str:
        return f"{self.name} (union on {self.discriminator})"


@dataclass
class Alternate(QAPIType):
    name: str
    branches: dict[str, TypeRef]
    meta = "alternate"

    def visit(self, v: InputVisitor, name: str | None) -> Any:
        kind = qtype_of(v.start_alternate(name))
        for ref in self.branches.values():
            branch = resolve(ref)
            if branch.qtype() == kind:
                return branch.visit(v, name)
        raise GenericError(
            f"Invalid parameter type for '{name or 'null'}', expected: {self.name}")

    def qtype(self) -> str:
        raise TypeError("an alternate cannot be an alternate branch")


@dataclass
class Array(QAPIType):
    element: TypeRef
    meta = "array"

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"[{describe(self.element)}]"

    def visit(self, v: InputVisitor, name: str | None) -> list[Any]:
        v.start_list(name)
        out = []
        element = resolve(self.element)
        while v.next_list():
            out.append(element.visit(v, None))
        v.end_list()
        return out

    def qtype(self) -> str:
        return QTYPE_QLIST


TYPES: dict[str, QAPIType] = {name: Builtin(name) for name in BUILTINS}


def _declare(t: QAPIType) -> QAPIType:
    TYPES[t.name] = t
    return t


def enum(name: str, values: Iterable[str], *, features: Any = None) -> Enum:
    """Declare (or re-declare) an enum."""
    return _declare(Enum(name, list(values)))  # type: ignore[return-value]


def struct(name: str, members: Mapping[str, TypeRef], *, base: TypeRef | None = None,
           features: Any = None) -> Struct:
    """Declare (or re-declare) a struct; ``base`` is a struct name or an anonymous dict."""
    return _declare(Struct(name, _members(members), base))  # type: ignore[return-value]


def union(name: str, *, base: TypeRef, discriminator: str, branches: Mapping[str, TypeRef],
          features: Any = None) -> Union:
    """Declare (or re-declare) a flat union; discriminator values without a branch add no
    members."""
    return _declare(Union(name, base, discriminator, dict(branches)))  # type: ignore[return-value]


def alternate(name: str, branches: Mapping[str, TypeRef], *, features: Any = None) -> Alternate:
    """Declare (or re-declare) an alternate: the JSON type of the value picks the branch."""
    return _declare(Alternate(name, dict(branches)))  # type: ignore[return-value]


def resolve(ref: TypeRef) -> QAPIType:
    """A type reference to its type: a name, ``[T]`` or an anonymous struct dict."""
    if type(ref) is str:
        found = TYPES.get(ref)
        if found is not None:
            return found
    if isinstance(ref, QAPIType):
        return ref
    if isinstance(ref, str):
        try:
            return TYPES[ref]
        except KeyError:
            raise KeyError(f"QAPI type '{ref}' is not declared") from None
    if isinstance(ref, list | dict):
        # the same declaration always makes the same wrapper (its member and element
        # references resolve by name when visited, so re-declared names still take effect)
        cached = _ANONYMOUS.get(id(ref))
        if cached is not None and cached[0] is ref:
            return cached[1]
        wrapper = _anonymous(ref)
        _ANONYMOUS[id(ref)] = (ref, wrapper)
        return wrapper
    raise TypeError(f"not a QAPI type reference: {ref!r}")


# id(declaration) -> (declaration, its type); the declaration is kept so its id stays unique
_ANONYMOUS: dict[int, tuple[Any, QAPIType]] = {}


def _anonymous(ref: list[Any] | dict[str, Any]) -> QAPIType:
    if isinstance(ref, list):
        if len(ref) != 1:
            raise TypeError(f"an array type is a one-element list, not {ref!r}")
        return Array(ref[0])
    return Struct("<anonymous>", _members(ref))


def describe(ref: TypeRef | None) -> str:
    """Readable form of a type reference, for the commands table."""
    if ref is None:
        return ""
    if isinstance(ref, QAPIType):
        return ref.describe()
    if isinstance(ref, str):
        t = TYPES.get(ref)
        return t.describe() if t is not None else ref
    if isinstance(ref, list):
        return f"[{describe(ref[0])}]"
    return ", ".join(describe_member(m) for m in _members(ref))


def describe_member(m: Member) -> str:
    return f"{m.name}{'?' if m.optional else ''}: {describe(m.type)}"


# JSON nests at most 1024 levels (the streamer's limit); visiting one level of a recursive
# type such as BlockdevOptions takes a handful of Python frames
_RECURSION_LIMIT = 16 * 1024


@contextlib.contextmanager
def _deep_enough() -> Iterator[None]:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, _RECURSION_LIMIT))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def check_arguments(ref: TypeRef | None, arguments: dict[str, Any]) -> dict[str, Any]:
    """What a command's marshaller does before calling it: visit ``arguments`` against the
    command's ``data`` (a struct or union, named or anonymous; None for no arguments) and
    reject leftovers.  Returns the checked arguments or raises GenericError."""
    try:
        return _check_arguments(ref, arguments)
    except RecursionError:   # deeply nested input: visiting has no effects, so start over
        with _deep_enough():
            return _check_arguments(ref, arguments)


def _check_arguments(ref: TypeRef | None, arguments: dict[str, Any]) -> dict[str, Any]:
    v = InputVisitor(arguments)
    v.start_struct(None)
    out: dict[str, Any] = {}
    if ref is not None:
        data = resolve(ref)
        if not isinstance(data, ObjectType):
            raise TypeError(f"command data must be a struct or union, not {describe(ref)}")
        data.visit_members(v, out)
    v.check_struct()
    v.end_struct()
    return out


def check(ref: TypeRef, value: Any) -> Any:
    """Check a whole value against a type, as a top-level visit (tests and tools)."""
    with _deep_enough():
        return resolve(ref).visit(InputVisitor(value), None)
