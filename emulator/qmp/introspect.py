"""Hold the emulator's declared schemas against a QEMU binary's ``query-qmp-schema``.

QEMU's introspection names every type by a number and folds all integer widths into "int",
but keeps member names, optionality, enum values, union tags and branches, alternate member
kinds and array element types — enough to catch a misspelt member, a member declared
required that QEMU treats as optional, or a missing enum value.  ``compare_command`` walks
one command's arguments on both sides and lists the differences, a union branch that QEMU
has and the emulator does not declare among them (drivers and actions the emulator does not
emulate are declared too, in emulator/commands/_unemulated.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from emulator.qmp import schema
from emulator.qmp.registry import COMMANDS

_BUILTIN = {"str": "str", "number": "number", "bool": "bool", "null": "null", "any": "any"}


def _builtin_name(name: str) -> str:
    return _BUILTIN.get(name, "int")


@dataclass
class Differences:
    mismatches: list[str] = field(default_factory=list)


class SchemaComparer:
    """Compares emulator types with the entities of one ``query-qmp-schema`` result."""

    def __init__(self, entities: list[dict[str, Any]]) -> None:
        self.entities = {e["name"]: e for e in entities}
        self._seen: set[tuple[int, str]] = set()

    def commands(self) -> dict[str, dict[str, Any]]:
        return {n: e for n, e in self.entities.items() if e.get("meta-type") == "command"}

    def compare_command(self, name: str) -> Differences:
        diff = Differences()
        ours = COMMANDS[name]
        theirs = self.entities[name]
        self._seen.clear()
        if ours.allow_oob != bool(theirs.get("allow-oob", False)):
            diff.mismatches.append(f"{name}: allow-oob differs")
        arg_type = self.entities.get(theirs["arg-type"], {})
        their_members = arg_type.get("members", [])
        if ours.data is None:
            if their_members or arg_type.get("variants"):
                diff.mismatches.append(f"{name}: QEMU takes arguments, the emulator none")
            return diff
        self._object(schema.resolve(ours.data), arg_type, name, diff)
        return diff

    def _type(self, ours: schema.QAPIType, their_name: str, path: str, diff: Differences) -> None:
        theirs = self.entities.get(their_name)
        if theirs is None:
            diff.mismatches.append(f"{path}: QEMU type {their_name} unknown")
            return
        key = (id(ours), their_name)
        if key in self._seen:
            return
        self._seen.add(key)
        meta = theirs["meta-type"]
        if meta == "builtin":
            if not isinstance(ours, schema.Builtin) or _builtin_name(ours.name) != their_name:
                diff.mismatches.append(f"{path}: {ours.describe()} where QEMU has {their_name}")
        elif meta == "enum":
            if not isinstance(ours, schema.Enum):
                diff.mismatches.append(f"{path}: {ours.describe()} where QEMU has an enum")
            elif ours.values != theirs["values"]:
                missing = [v for v in theirs["values"] if v not in ours.values]
                extra = [v for v in ours.values if v not in theirs["values"]]
                what = (f"missing {missing}" if missing else "") + \
                    (f" extra {extra}" if extra else "") or "order differs"
                diff.mismatches.append(f"{path}: enum {ours.name} values: {what.strip()}")
        elif meta == "array":
            if not isinstance(ours, schema.Array):
                diff.mismatches.append(f"{path}: {ours.describe()} where QEMU has an array")
            else:
                self._type(schema.resolve(ours.element), theirs["element-type"], f"{path}[]",
                           diff)
        elif meta == "alternate":
            self._alternate(ours, theirs, path, diff)
        elif meta == "object":
            self._object(ours, theirs, path, diff)

    def _alternate(self, ours: schema.QAPIType, theirs: dict[str, Any], path: str,
                   diff: Differences) -> None:
        if not isinstance(ours, schema.Alternate):
            diff.mismatches.append(f"{path}: {ours.describe()} where QEMU has an alternate")
            return
        by_kind = {}
        for ref in ours.branches.values():
            branch = schema.resolve(ref)
            by_kind[branch.qtype()] = branch
        their_kinds = {}
        for m in theirs["members"]:
            their_kinds[self._qtype(m["type"])] = m["type"]
        if set(by_kind) != set(their_kinds):
            diff.mismatches.append(f"{path}: alternate {ours.name} accepts "
                                   f"{sorted(by_kind)}, QEMU {sorted(their_kinds)}")
        for kind in set(by_kind) & set(their_kinds):
            self._type(by_kind[kind], their_kinds[kind], path, diff)

    def _qtype(self, their_name: str) -> str:
        e = self.entities[their_name]
        meta = e["meta-type"]
        if meta == "builtin":
            return {"string": "string", "int": "number", "number": "number",
                    "boolean": "boolean", "null": "null"}.get(e["json-type"], "any")
        return {"enum": "string", "object": "object", "array": "array"}.get(meta, meta)

    def _object(self, ours: schema.QAPIType, theirs: dict[str, Any], path: str,
                diff: Differences) -> None:
        if not isinstance(ours, schema.ObjectType):
            diff.mismatches.append(f"{path}: {ours.describe()} where QEMU has an object")
            return
        mine = {m.name: m for m in ours.all_members()}
        for m in theirs.get("members", []):
            sub = f"{path}.{m['name']}"
            optional = "default" in m
            if m["name"] not in mine:
                diff.mismatches.append(f"{sub}: missing in the emulator")
                continue
            if mine[m["name"]].optional != optional:
                diff.mismatches.append(
                    f"{sub}: {'optional' if optional else 'required'} in QEMU")
            self._type(schema.resolve(mine[m["name"]].type), m["type"], sub, diff)
        their_names = {m["name"] for m in theirs.get("members", [])}
        for name in mine:
            if name not in their_names:
                diff.mismatches.append(f"{path}.{name}: not in QEMU")
        tag = theirs.get("tag")
        if tag is None:
            if isinstance(ours, schema.Union):
                diff.mismatches.append(f"{path}: a union here, a struct in QEMU")
            return
        if not isinstance(ours, schema.Union) or ours.discriminator != tag:
            diff.mismatches.append(f"{path}: QEMU has a union on {tag!r}")
            return
        for variant in theirs["variants"]:
            case = variant["case"]
            ref = ours.branches.get(case)
            branch_members = self.entities[variant["type"]].get("members", [])
            if ref is None:
                if branch_members:
                    diff.mismatches.append(f"{path}[{tag}={case}]: no branch in the emulator")
                continue
            self._object(schema.resolve(ref), self.entities[variant["type"]],
                         f"{path}[{tag}={case}]", diff)
