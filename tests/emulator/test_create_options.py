"""blockdev-create's qcow2 options, one value at a time, on the emulator and on QEMU 7.2.

Each set of options passes the schema (the spoiled ones are test_qmp_arguments.py's); the job
then fails or succeeds in qcow2_co_create. For each, the job's outcome (query-jobs: its error
text) and the bytes of the image file it leaves must be QEMU's — but where the emulator says
an option is not emulated (extended L2 entries, external data files, zstd). Each create
has an empty file of its own.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import emulator.commands  # noqa: F401
from emulator.qmp import schema
from emulator.qmp.errors import GenericError
from tests.conftest import requires_qemu
from tests.emulator.qemu_runner import run_both

pytestmark = requires_qemu

NOT_EMULATED = "This qcow2 creation option is not supported by the emulator"
BASE = {"driver": "qcow2", "file": "f", "size": 1 << 20}
VALUES: dict[str, list[Any]] = {
    "size": [0, 511, 513, 512, 1 << 40, 1 << 51, (1 << 51) + 512, (1 << 63) - 512,
             (1 << 64) - 512, 1 << 63],
    "cluster-size": [0, 3, 256, 512, 4096, 3 << 12, 65536, 1 << 21, 1 << 22, 1 << 31],
    # -(1 << 63) also passes qcow2_co_create (is_power_of_2 of the uint64) and fails at
    # the reopen ("Reference count entry width too large"): not modelled
    "refcount-bits": [0, -1, 1, 2, 4, 7, 8, 16, 32, 64, 128, 1 << 31],
    "version": ["v2", "v3"],
    "lazy-refcounts": [True, False],
    "extended-l2": [True, False],
    "compression-type": ["zlib", "zstd"],
    "preallocation": ["off", "metadata", "falloc", "full"],
    "backing-file": ["", "b", "a" * 1023, "a" * 1024, "../outside/b"],
    "backing-fmt": ["qcow2", "raw", "vmdk"],
    "data-file-raw": [True, False],
    "encrypt": [{"format": "luks"}, {"format": "qcow"}, {"format": "luks", "key-secret": "s"},
                {"format": "qcow", "key-secret": "s"}],
}
COMBINATIONS: list[dict[str, Any]] = [
    {"version": "v2", "lazy-refcounts": True}, {"version": "v2", "refcount-bits": 8},
    {"version": "v2", "extended-l2": True}, {"version": "v2", "compression-type": "zstd"},
    {"extended-l2": True, "cluster-size": 4096}, {"extended-l2": True, "cluster-size": 16384},
    {"backing-file": "b", "preallocation": "metadata"}, {"backing-file": "b", "backing-fmt": "raw"},
    {"cluster-size": 512, "size": 1 << 40}, {"cluster-size": 512, "size": 1 << 30},
    {"backing-file": "b", "data-file-raw": True}, {"version": "v2", "data-file": "f"},
    {"backing-file": "a" * 1024, "backing-fmt": "qcow2"},
    {"encrypt": {"format": "luks"}, "backing-file": "b"},
    {"preallocation": "metadata", "size": 1048064},
    {"preallocation": "metadata", "cluster-size": 512, "size": 20 << 20},
    {"preallocation": "falloc", "cluster-size": 512, "size": 20 << 20},
    {"preallocation": "full", "size": 1048064, "refcount-bits": 1},
    {"preallocation": "metadata", "lazy-refcounts": True, "size": 3 << 20},
]


def option_sets() -> list[dict[str, Any]]:
    sets = [{**BASE, key: value} for key, values in VALUES.items() for value in values]
    sets += [{**BASE, **more} for more in COMBINATIONS]
    for options in sets:   # each passes the schema: the job runs and decides
        schema.check_arguments({"job-id": "str", "options": "BlockdevCreateOptions"},
                               {"job-id": "j", "options": options})
    return sets


def test_option_sets_pass_the_schema() -> None:
    assert len(option_sets()) > 70
    try:
        schema.check_arguments({"options": "BlockdevCreateOptions"},
                               {"options": {**BASE, "size": "big"}})
    except GenericError:
        return
    raise AssertionError("a spoiled option passed the schema")


def run_creates(tmp_path: Path, nodes: list[dict[str, Any]],
                options: list[dict[str, Any]]) -> tuple[list[list[dict[str, Any]]],
                                                         list[list[str]]]:
    """blockdev-create of each ``options`` on the node ``nodes[i]`` (blockdev-add arguments
    over an empty file f<i> of its own), on both: (QEMU's and the emulator's job outcomes in
    query-jobs, the digests of their files)."""
    digests: dict[Path, list[str]] = {}

    def digest(name: str, d: Path) -> None:
        digests.setdefault(d, []).append(hashlib.sha256((d / name).read_bytes()).hexdigest())

    def setup(d: Path) -> None:
        for i in range(len(options)):
            (d / f"f{i}").write_bytes(b"")

    steps: list[tuple[Any, ...]] = []
    for i, (node, opts) in enumerate(zip(nodes, options, strict=True)):
        name = node["node-name"]
        steps += [("cmd", "blockdev-add", node),
                  ("cmd", "blockdev-create", {"job-id": f"j{i}",
                                              "options": {**opts, "file": name}}),
                  ("rest", f"j{i}"), ("cmd", "query-jobs", {}),
                  ("img", functools.partial(digest, f"f{i}")),
                  ("cmd", "job-dismiss", {"id": f"j{i}"}),
                  ("cmd", "blockdev-del", {"node-name": name})]
    qemu, emu = run_both(tmp_path, steps, setup)
    outcomes = [[r[2]["return"][0] for r in records if r[:2] == ("reply", "query-jobs")]
                for records in (qemu, emu)]
    return outcomes, [digests[tmp_path / "qemu"], digests[tmp_path / "emu"]]


def test_qcow2_create_options_like_qemu(tmp_path: Path) -> None:
    sets = option_sets()
    nodes = [{"driver": "file", "filename": f"@DIR@/f{i}", "node-name": f"f{i}"}
             for i in range(len(sets))]
    outcomes, files = run_creates(tmp_path, nodes, sets)
    assert len(outcomes[0]) == len(outcomes[1]) == len(files[0]) == len(files[1]) == len(sets)
    differ, not_emulated = [], 0
    for i, options in enumerate(sets):
        theirs, ours = outcomes[0][i], outcomes[1][i]
        if ours.get("error") == NOT_EMULATED:
            not_emulated += 1
        elif ours != theirs or files[0][i] != files[1][i]:
            differ.append(f"{options}: QEMU {theirs.get('error', 'ok')}, emulator "
                          f"{ours.get('error', 'ok')}, same file: {files[0][i] == files[1][i]}")
    assert not_emulated < len(sets) // 4
    assert not differ, "\n".join(differ)


def test_preallocation_through_a_filter_like_qemu(tmp_path: Path) -> None:
    """qcow2_co_create's preallocation resizes its file through whatever node it is given:
    a filter (blkdebug) passes the truncate to the file below (bdrv_co_truncate), with the
    preallocation mode, and blkdebug sees the same requests."""
    modes = ["metadata", "falloc", "full"]
    nodes = [{"driver": "blkdebug", "node-name": f"d{i}",
              "image": {"driver": "file", "filename": f"@DIR@/f{i}"},
              "inject-error": [{"event": "cow_write", "immediately": True}]}
             for i in range(len(modes))]
    options = [{"driver": "qcow2", "size": (3 << 20) - 512, "preallocation": mode}
               for mode in modes]
    outcomes, files = run_creates(tmp_path, nodes, options)
    assert outcomes[1] == outcomes[0]
    assert "error" in outcomes[0][0] and "error" not in outcomes[0][1]   # cow_write failed
    assert files[1] == files[0]
