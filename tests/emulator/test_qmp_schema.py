"""QAPI schema declarations, argument checking and the command registry.

Texts and their order are QEMU's (qobject-input-visitor.c, qapi-visit-core.c); the cases
marked "QEMU:" were checked against qemu-system-x86_64 7.2.22 with real commands, the rest
are what the same code paths give for the other builtin types.  test_qmp_wire.py holds the
commands of every family against the recorded QEMU replies.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from emulator.qmp import schema
from emulator.qmp.errors import GenericError
from emulator.qmp.introspect import SchemaComparer
from emulator.qmp.registry import COMMANDS, command


@pytest.fixture(autouse=True)
def scratch_types() -> Iterator[None]:
    """Declarations made by a test disappear after it (the real commands are registered
    first: restoring a registry snapshotted before them would unregister them for every
    later test in this process)."""
    import emulator.commands  # noqa: F401
    types = dict(schema.TYPES)
    commands = dict(COMMANDS)
    yield
    schema.TYPES.clear()
    schema.TYPES.update(types)
    COMMANDS.clear()
    COMMANDS.update(commands)


def error(ref: Any, args: Any) -> str:
    with pytest.raises(GenericError) as info:
        schema.check_arguments(ref, args)
    return info.value.desc


@pytest.fixture
def backup() -> None:
    schema.enum("T-Sync", ["top", "full", "none", "incremental", "bitmap"])
    schema.struct("T-Perf", {"*use-copy-range": "bool", "*max-workers": "int",
                             "*max-chunk": "int64"})
    schema.struct("T-BackupCommon", {"*job-id": "str", "device": "str", "sync": "T-Sync",
                                     "*speed": "int", "*x-perf": "T-Perf"})
    schema.struct("T-BlockdevBackup", {"target": "str"}, base="T-BackupCommon")


@pytest.mark.parametrize(("args", "desc"), [
    ({}, "Parameter 'device' is missing"),                                   # QEMU: base first
    ({"device": "a", "target": "b"}, "Parameter 'sync' is missing"),          # QEMU
    ({"device": "a", "sync": "full"}, "Parameter 'target' is missing"),       # QEMU
    ({"device": 1}, "Invalid parameter type for 'device', expected: string"),
    ({"device": "a", "sync": "bogus"}, "Parameter 'sync' does not accept value 'bogus'"),
    ({"device": "a", "sync": 1}, "Invalid parameter type for 'sync', expected: string"),
    ({"device": "a", "sync": "full", "speed": "x"},
     "Invalid parameter type for 'speed', expected: integer"),
    ({"device": "a", "sync": "full", "x-perf": []},
     "Invalid parameter type for 'x-perf', expected: object"),
    ({"device": "a", "sync": "full", "x-perf": {"max-workers": "x"}},     # QEMU
     "Invalid parameter type for 'x-perf.max-workers', expected: integer"),
    ({"device": "a", "sync": "full", "x-perf": {"foo": 1}, "target": 1},  # QEMU
     "Parameter 'x-perf.foo' is unexpected"),
    ({"device": "a", "sync": "full", "x-perf": {"max-chunk": 2**63}},
     "Invalid parameter type for 'x-perf.max-chunk', expected: integer"),
    ({"device": "a", "sync": "full", "target": "t", "zz": 1, "yy": 2},
     "Parameter 'yy' is unexpected"),
])
def test_struct_with_base(backup: None, args: dict[str, Any], desc: str) -> None:
    assert error("T-BlockdevBackup", args) == desc


def test_checked_value(backup: None) -> None:
    args = {"target": "t", "sync": "full", "device": "d", "x-perf": {"max-workers": 1}}
    assert schema.check_arguments("T-BlockdevBackup", args) == {
        "device": "d", "sync": "full", "x-perf": {"max-workers": 1}, "target": "t"}


INT_CASES = [
    ("int8", 127, None), ("int8", -129, "Parameter 'v' expects int8_t"),
    ("int16", 32768, "Parameter 'v' expects int16_t"),
    ("int32", -2**31, None), ("int32", 2**31, "Parameter 'v' expects int32_t"),   # QEMU
    ("int64", 2**63, "Invalid parameter type for 'v', expected: integer"),
    ("int", 1.0, "Invalid parameter type for 'v', expected: integer"),
    ("int", True, "Invalid parameter type for 'v', expected: integer"),
    ("uint8", 256, "Parameter 'v' expects uint8_t"),
    ("uint16", -1, "Parameter 'v' expects uint16_t"),
    ("uint32", -1, "Parameter 'v' expects uint32_t"),                              # QEMU
    ("uint32", "x", "Parameter 'v' expects uint64"),                               # QEMU
    ("uint64", -1, None), ("uint64", 2**64 - 1, None),
    ("uint64", 2**64 * 1.0, "Parameter 'v' expects uint64"),                       # QEMU
    ("size", "1M", "Parameter 'v' expects uint64"),                                # QEMU
    ("number", "1", "Invalid parameter type for 'v', expected: number"),
    ("number", 1, None),
    ("bool", 0, "Invalid parameter type for 'v', expected: boolean"),
    ("null", 0, "Invalid parameter type for 'v', expected: null"),
    ("str", None, "Invalid parameter type for 'v', expected: string"),
    ("any", {"deep": [None]}, None),
]


@pytest.mark.parametrize(("kind", "value", "desc"), INT_CASES)
def test_builtins(kind: str, value: Any, desc: str | None) -> None:
    if desc is None:
        schema.check_arguments({"v": kind}, {"v": value})
    else:
        assert error({"v": kind}, {"v": value}) == desc


def test_converted_values() -> None:
    checked = schema.check_arguments({"u": "uint64", "n": "number", "s": "size"},
                                     {"u": -1, "n": 3, "s": -2})
    assert checked == {"u": 2**64 - 1, "n": 3.0, "s": 2**64 - 2}
    assert isinstance(checked["n"], float)


def test_ranges_name_the_member_not_the_path() -> None:
    """QEMU: range and enum errors use the member's own name ("null" in a list)."""
    schema.enum("T-Mode", ["a", "b"])
    ref = {"outer": {"inner": "uint8", "mode": "T-Mode", "*list": ["uint8"],
                     "*modes": ["T-Mode"]}}
    assert error(ref, {"outer": {"inner": 300, "mode": "a"}}) == \
        "Parameter 'inner' expects uint8_t"
    assert error(ref, {"outer": {"inner": 1, "mode": "c"}}) == \
        "Parameter 'mode' does not accept value 'c'"
    assert error(ref, {"outer": {"inner": 1, "mode": "a", "list": [1, 300]}}) == \
        "Parameter 'null' expects uint8_t"
    assert error(ref, {"outer": {"inner": 1, "mode": "a", "modes": ["a", "x"]}}) == \
        "Parameter 'null' does not accept value 'x'"
    assert error(ref, {"outer": {"inner": "x", "mode": "a"}}) == \
        "Parameter 'outer.inner' expects uint64"
    assert error(ref, {"outer": {"inner": 1, "mode": "a", "list": [1, "x"]}}) == \
        "Parameter 'outer.list[1]' expects uint64"


@pytest.fixture
def blockdev() -> None:
    schema.enum("T-Driver", ["file", "qcow2", "nbd"])
    schema.struct("T-File", {"filename": "str"})
    schema.alternate("T-Ref", {"definition": "T-Options", "reference": "str"})
    schema.alternate("T-RefOrNull", {"definition": "T-Options", "reference": "str",
                                     "null": "null"})
    schema.struct("T-Qcow2", {"file": "T-Ref", "*backing": "T-RefOrNull"})
    schema.union("T-Options", base={"driver": "T-Driver", "*node-name": "str"},
                 discriminator="driver", branches={"file": "T-File", "qcow2": "T-Qcow2"})


@pytest.mark.parametrize(("args", "desc"), [
    ({}, "Parameter 'driver' is missing"),                                        # QEMU
    ({"driver": "bogus"}, "Parameter 'driver' does not accept value 'bogus'"),    # QEMU
    ({"node-name": 1, "driver": "x"}, "Parameter 'driver' does not accept value 'x'"),
    ({"driver": "qcow2"}, "Parameter 'file' is missing"),                         # QEMU
    ({"driver": "qcow2", "file": 1},
     "Invalid parameter type for 'file', expected: T-Ref"),                       # QEMU
    ({"driver": "qcow2", "file": None},
     "Invalid parameter type for 'file', expected: T-Ref"),                       # QEMU
    ({"driver": "qcow2", "file": {"driver": "file"}},
     "Parameter 'file.filename' is missing"),                                     # QEMU
    ({"driver": "qcow2", "file": {}}, "Parameter 'file.driver' is missing"),      # QEMU
    ({"driver": "qcow2", "file": {"driver": "file", "filename": "f", "x": 1}},
     "Parameter 'file.x' is unexpected"),                                         # QEMU
    ({"driver": "qcow2", "file": "f", "backing": []},
     "Invalid parameter type for 'backing', expected: T-RefOrNull"),              # QEMU
    ({"driver": "nbd", "server": {}}, "Parameter 'server' is unexpected"),
])
def test_union_and_alternates(blockdev: None, args: dict[str, Any], desc: str) -> None:
    assert error("T-Options", args) == desc


def test_union_value(blockdev: None) -> None:
    args = {"driver": "qcow2", "file": {"driver": "file", "filename": "f"}, "backing": None,
            "node-name": "n"}
    assert schema.check_arguments("T-Options", args) == {
        "driver": "qcow2", "node-name": "n",
        "file": {"driver": "file", "filename": "f"}, "backing": None}
    assert schema.check_arguments("T-Options", {"driver": "nbd"}) == {"driver": "nbd"}


def test_alternate_in_a_list_is_named_null() -> None:
    """QEMU (block-dirty-bitmap-merge): an alternate list element that fits no branch."""
    schema.struct("T-Bitmap", {"node": "str", "name": "str"})
    schema.alternate("T-BitmapOrStr", {"local": "str", "external": "T-Bitmap"})
    ref = {"bitmaps": ["T-BitmapOrStr"]}
    assert error(ref, {"bitmaps": ["a", {"node": "n", "name": "x"}, 1]}) == \
        "Invalid parameter type for 'null', expected: T-BitmapOrStr"
    assert error(ref, {"bitmaps": [{"node": "n"}]}) == "Parameter 'bitmaps[0].name' is missing"
    assert schema.check_arguments(ref, {"bitmaps": ["a", {"node": "n", "name": "x"}]}) == \
        {"bitmaps": ["a", {"node": "n", "name": "x"}]}


def test_alternate_number_and_bool_branches() -> None:
    schema.enum("T-Level", ["low", "high"])
    schema.alternate("T-Setting", {"n": "int", "b": "bool", "e": "T-Level"})
    ref = {"s": "T-Setting"}
    assert schema.check_arguments(ref, {"s": 5}) == {"s": 5}
    assert schema.check_arguments(ref, {"s": True}) == {"s": True}
    assert error(ref, {"s": "mid"}) == "Parameter 's' does not accept value 'mid'"
    assert error(ref, {"s": 1.5}) == "Invalid parameter type for 's', expected: integer"
    assert error(ref, {"s": None}) == "Invalid parameter type for 's', expected: T-Setting"


def test_transaction_paths() -> None:
    """QEMU: list elements and union branches in paths."""
    schema.enum("T-Kind", ["add", "abort"])
    schema.struct("T-Add", {"node": "str", "name": "str"})
    schema.struct("T-AddWrapper", {"data": "T-Add"})
    schema.struct("T-AbortWrapper", {"data": {}})
    schema.union("T-Action", base={"type": "T-Kind"}, discriminator="type",
                 branches={"add": "T-AddWrapper", "abort": "T-AbortWrapper"})
    ref = {"actions": ["T-Action"]}
    assert error(ref, {"actions": [{"type": "add", "data": {"node": "a"}}]}) == \
        "Parameter 'actions[0].data.name' is missing"
    assert error(ref, {"actions": [{"data": {}}]}) == "Parameter 'actions[0].type' is missing"
    assert error(ref, {"actions": [{"type": "bogus"}]}) == \
        "Parameter 'type' does not accept value 'bogus'"
    assert error(ref, {"actions": [{"type": "abort", "data": {}}, 1]}) == \
        "Invalid parameter type for 'actions[1]', expected: object"
    assert error(ref, {"actions": [{"type": "abort", "data": {"x": 1}}]}) == \
        "Parameter 'actions[0].data.x' is unexpected"
    assert error(ref, {"actions": {}}) == "Invalid parameter type for 'actions', expected: array"


def test_redeclaration_and_late_resolution() -> None:
    schema.struct("T-Late", {"x": "T-NotYet"})
    with pytest.raises(KeyError):
        schema.check_arguments("T-Late", {"x": 1})
    schema.enum("T-NotYet", ["a"])
    assert schema.check_arguments("T-Late", {"x": "a"}) == {"x": "a"}
    schema.enum("T-NotYet", ["a", "b"])
    assert schema.check_arguments("T-Late", {"x": "b"}) == {"x": "b"}


def test_describe() -> None:
    schema.struct("T-D", {"a": "str", "*b": ["int"], "*c": {"d": "bool"}})
    assert schema.describe("T-D") == "T-D"
    assert schema.describe({"a": "str", "*b": ["int"]}) == "a: str, b?: [int]"


# -- registry ----------------------------------------------------------------------------------
def test_handler_arguments_and_return() -> None:
    seen: dict[str, Any] = {}

    @command("x-test-kwargs", data={"node-name": "str", "*max-workers": "int"})
    def handler(vm: object, node_name: str, **rest: Any) -> None:
        seen.update(node_name=node_name, rest=rest)

    @command("x-test-boxed", data={"a": "int"}, boxed=True)
    async def boxed(vm: object, options: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"got": options}

    cmd = COMMANDS["x-test-kwargs"]
    assert asyncio.run(cmd.call(None, cmd.check({"node-name": "n"}))) is None
    assert seen == {"node_name": "n", "rest": {}}
    asyncio.run(cmd.call(None, cmd.check({"node-name": "n", "max-workers": 2})))
    assert seen["rest"] == {"max_workers": 2}
    assert cmd.family == "test_qmp_schema"
    assert cmd.describe_arguments() == "node-name: str, max-workers?: int"
    boxed_cmd = COMMANDS["x-test-boxed"]
    assert asyncio.run(boxed_cmd.call(None, boxed_cmd.check({"a": 1}))) == {"got": {"a": 1}}


# -- introspection comparer --------------------------------------------------------------------
def test_comparer_finds_differences() -> None:
    schema.enum("T-Color", ["red", "green"])
    schema.struct("T-Paint", {"color": "T-Color", "coats": "int", "*brand": "str",
                              "*extra": "bool"})

    @command("x-test-paint", data="T-Paint")
    def paint(vm: object, **kw: Any) -> None:
        return None

    theirs = [
        {"name": "x-test-paint", "meta-type": "command", "arg-type": "1", "ret-type": "0"},
        {"name": "1", "meta-type": "object", "members": [
            {"name": "color", "type": "2"}, {"name": "coats", "type": "int", "default": None},
            {"name": "brand", "type": "str", "default": None},
            {"name": "gloss", "type": "bool", "default": None}]},
        {"name": "2", "meta-type": "enum", "values": ["red", "green", "blue"]},
        {"name": "int", "meta-type": "builtin", "json-type": "int"},
        {"name": "str", "meta-type": "builtin", "json-type": "string"},
        {"name": "bool", "meta-type": "builtin", "json-type": "boolean"},
    ]
    diff = SchemaComparer(json.loads(json.dumps(theirs))).compare_command("x-test-paint")
    assert sorted(diff.mismatches) == sorted([
        "x-test-paint.color: enum T-Color values: missing ['blue']",
        "x-test-paint.coats: optional in QEMU",
        "x-test-paint.gloss: missing in the emulator",
        "x-test-paint.extra: not in QEMU",
    ])


@pytest.mark.qemu
def test_declared_schemas_match_qemu(qemu_binary: str) -> None:
    """Every command the emulator implements takes QEMU 7.2's arguments: member names,
    optionality, enum values, every union branch (those of drivers and actions it does not
    emulate too), alternate kinds, array elements."""
    from emulator.qmp.qemu_probe import query_qmp_schema

    comparer = SchemaComparer(query_qmp_schema(qemu_binary))
    problems = []
    for name in sorted(COMMANDS):
        if name.startswith("x-test-"):
            continue
        if name not in comparer.entities:
            problems.append(f"{name}: not a QEMU 7.2 command")
            continue
        problems += comparer.compare_command(name).mismatches
    assert problems == []
