"""Every command's arguments, mutated member by member, on the emulator and on QEMU 7.2.

For each command the emulator implements, the arguments are built from its declared schema
(the least each type needs) and then spoiled one place at a time: each member missing, of
every wrong JSON type, out of range, an unknown value of an enum, an unknown member, one level
down into objects and into every union branch. The emulator and real QEMU, each with a qcow2
node "x" to act on, must give the same reply to each, in order, but where the emulator says a
driver, an image format or an action is not emulated (its only deliberate boundary). That
covers QEMU's argument checks (qobject-input-visitor texts) and the first semantic checks of
every command; a divergence this found is a regression test in test_qmp_wire.py or here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import emulator.commands  # noqa: F401
from emulator.block.drivers import QEMU_DRIVERS
from emulator.qmp import schema
from emulator.qmp.registry import COMMANDS
from tests.conftest import requires_qemu, requires_qemu_img
from tests.emulator.qemu_runner import create_qcow2, normalize, on_both, run_commands

# values of every JSON type, and numbers and strings that QEMU's checks treat specially
WRONG: list[Any] = [0, -1, 1 << 64, 1.5, "x", "", True, [], [1], {}, None, 3, 512, 65536,
                    1 << 31, -(1 << 63), "drive0", "a" * 300, "on", "#block1"]
# commands that end the session or stop the (absent) guest, and query-commands (its reply
# is the emulator's own command list; `qmpreplay commands --against` holds it against QEMU's)
SKIPPED = {"quit", "qmp_capabilities", "human-monitor-command", "stop", "cont", "query-commands"}
NODE_X = ("blockdev-add", {"driver": "qcow2", "node-name": "x",
                           "file": {"driver": "file", "filename": "img"}})
# the emulator's deliberate boundary: QEMU would go on (and succeed, or fail on the network)
NOT_EMULATED = re.compile(r"Unknown driver '(?P<driver>[^']*)'|Creating \S+ images is not "
                          r"emulated|Action '\S+' is not supported")


def least(ref: schema.TypeRef, depth: int = 0) -> Any:
    """The smallest value of a type that passes the schema (first branch of a union,
    the simplest branch of an alternate below the top)."""
    t = schema.resolve(ref)
    if isinstance(t, schema.Builtin):
        return {"str": "x", "bool": False, "null": None, "any": {}, "number": 1.0}.get(t.name, 0)
    if isinstance(t, schema.Enum):
        return t.values[0]
    if isinstance(t, schema.Array):
        return []
    if isinstance(t, schema.Alternate):
        refs = list(t.branches.values())
        simple = [r for r in refs if not isinstance(schema.resolve(r), schema.ObjectType)]
        return least(simple[0] if simple and depth > 0 else refs[0], depth + 1)
    if isinstance(t, schema.Union):
        value = {m.name: least(m.type, depth + 1) for m in t.base_type().all_members()
                 if not m.optional}
        value[t.discriminator] = case = next(iter(t.branches))
        return {**value, **required(t.branches[case], depth + 1)}
    assert isinstance(t, schema.Struct)
    return required(t, depth + 1)


def required(ref: schema.TypeRef, depth: int) -> dict[str, Any]:
    t = schema.resolve(ref)
    assert isinstance(t, schema.ObjectType)
    return {m.name: least(m.type, depth) for m in t.all_members() if not m.optional}


def members(ref: schema.TypeRef) -> list[schema.Member]:
    t = schema.resolve(ref)
    return t.all_members() if isinstance(t, schema.ObjectType) else []


def spoiled(base: dict[str, Any], ref: schema.TypeRef) -> Iterator[dict[str, Any]]:
    """``base`` with one member of ``ref`` missing, wrong, or (one level down) spoiled."""
    yield {**base, "no-such-member": 1}
    for m in members(ref):
        if not m.optional:
            yield {k: v for k, v in base.items() if k != m.name}
        for wrong in WRONG:
            yield {**base, m.name: wrong}
        t = schema.resolve(m.type)
        if isinstance(t, schema.Enum):
            for value in [*t.values, "bogus"]:
                yield {**base, m.name: value}
        inner = least(m.type)
        if isinstance(inner, dict):
            yield {**base, m.name: {**inner, "bogus": 1}}
            for mm in members(m.type):
                for wrong in WRONG[:9]:
                    yield {**base, m.name: {**inner, mm.name: wrong}}


def variants(name: str) -> list[dict[str, Any]]:
    """Each distinct spoiled argument set of one command, in a stable order."""
    data = COMMANDS[name].data
    out: list[dict[str, Any]] = [{}]
    if data is None:
        out.append({"x": 1})
    else:
        t = schema.resolve(data)
        base = least(data)
        out += [base, *spoiled(base, data)]
        if isinstance(t, schema.Union):
            for case, branch in t.branches.items():
                full = {**base, t.discriminator: case, **required(branch, 1)}
                out += [{**base, t.discriminator: case}, full, *spoiled(full, branch)]
    unique = {json.dumps(v, sort_keys=True): v for v in out}
    return list(unique.values())


def not_emulated(reply: dict[str, Any]) -> bool:
    m = NOT_EMULATED.fullmatch(reply.get("error", {}).get("desc", ""))
    return m is not None and (m["driver"] is None or m["driver"] in QEMU_DRIVERS)


def test_variants_reach_every_member() -> None:
    """The generator itself: it spoils every member of blockdev-add's qcow2 branch."""
    seen = {key for v in variants("blockdev-add") if v.get("driver") == "qcow2" for key in v}
    assert {"lazy-refcounts", "overlap-check", "data-file", "no-such-member"} <= seen
    assert len(variants("block-dirty-bitmap-add")) > 50


@requires_qemu
@requires_qemu_img
@pytest.mark.qemu
@pytest.mark.parametrize("name", sorted(set(COMMANDS) - SKIPPED))
def test_spoiled_arguments_get_qemus_replies(tmp_path: Path, name: str) -> None:
    commands = [NODE_X, *[(name, v) for v in variants(name)]]
    qemu, emu = on_both(
        tmp_path, lambda d, q: normalize(run_commands(d, commands, qemu=q), d, sizes=True),
        setup=lambda d: create_qcow2(d / "img", "1M"))
    differ = [f"{json.dumps(args)}\n  qemu:     {q}\n  emulator: {e}"
              for (_, args), q, e in zip(commands, qemu, emu, strict=True)
              if q != e and not not_emulated(e)]
    compared = sum(not not_emulated(e) for e in emu)
    assert compared > len(commands) // 2, "the boundary swallowed most of the variants"
    assert not differ, f"{len(differ)} of {len(commands)} differ:\n" + "\n".join(differ[:10])
