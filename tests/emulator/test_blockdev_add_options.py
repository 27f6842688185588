"""blockdev-add's driver options, one value at a time, on the emulator and on QEMU 7.2.

The schema lets any ``int`` through; the drivers then read their options back as QemuOpts
(sizes refuse negative numbers, numbers wrap them) and check them: qcow2's cache sizes and
clean interval, encryption against the header, an external data file, raw's window, file's
aio and pr-manager, blkdebug's limits and config file, null-co's size and latency. Each
variant is added, the node listing taken and the node deleted; every reply must be QEMU's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import requires_qemu, requires_qemu_img
from tests.emulator.qemu_runner import create_qcow2, run_both, without_host_details

pytestmark = [requires_qemu, requires_qemu_img]

NUMBERS = [0, 1, -1, 3, 511, 512, 4096, 65536, 100000, 1 << 20, 1 << 30, 1 << 31,
           (1 << 63) - 1]
FILE = {"driver": "file", "filename": "@DIR@/img"}
QCOW2 = {"driver": "qcow2", "file": FILE}


def variants() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for key in ("cache-size", "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size",
                "cache-clean-interval"):
        out += [{**QCOW2, key: v} for v in NUMBERS]
    for a, b in (("cache-size", "l2-cache-size"), ("cache-size", "refcount-cache-size"),
                 ("l2-cache-size", "refcount-cache-size")):
        out += [{**QCOW2, a: v, b: 1 << 19} for v in (65536, 262144, 1 << 20)]
    out.append({**QCOW2, "cache-size": 65536, "l2-cache-size": 65536,
                "refcount-cache-size": 65536})
    out += [{**QCOW2, "overlap-check": v} for v in
            ("none", "constant", "cached", "all", {"template": "none", "main-header": True})]
    out += [{**QCOW2, "encrypt": {"format": "aes"}},
            {**QCOW2, "encrypt": {"format": "luks", "key-secret": "x"}},
            {**QCOW2, "data-file": "nosuch"}, {**QCOW2, "backing": "nosuch"},
            {**QCOW2, "backing": None}, {**QCOW2, "read-only": True},
            {**QCOW2, "force-share": True}, {**QCOW2, "force-share": True, "read-only": True},
            {**QCOW2, "detect-zeroes": "unmap"},
            {**QCOW2, "discard": "unmap", "detect-zeroes": "unmap"}]
    for key in ("offset", "size"):
        out += [{"driver": "raw", "file": FILE, key: v} for v in NUMBERS]
    out += [{"driver": "raw", "file": FILE, "offset": 512, "size": 512},
            {"driver": "raw", "file": FILE, "offset": 1, "size": 1}]
    out += [{**FILE, "aio": v} for v in ("threads", "native", "io_uring")]
    out += [{**FILE, "aio": "native", "cache": {"direct": True}}, {**FILE, "pr-manager": "x"},
            {**FILE, "locking": "off"}, {**FILE, "filename": "@DIR@/nosuch"},
            {**FILE, "filename": "@DIR@"}]
    for key in ("align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard",
                "max-discard"):
        out += [{"driver": "blkdebug", "image": FILE, key: v} for v in NUMBERS]
    out += [{"driver": "blkdebug", "image": FILE, "config": "nosuch"},
            {"driver": "blkdebug", "image": FILE, "align": 4096, "max-transfer": 512},
            {"driver": "blkdebug", "image": FILE,
             "inject-error": [{"event": "read_aio", "errno": 5, "once": True}]}]
    # QEMU 7.2.22 aborts on a negative null-co size (options absorbed with &error_abort)
    out += [{"driver": "null-co", "size": v} for v in NUMBERS if v >= 0]
    out += [{"driver": "null-co", "latency-ns": v} for v in (0, -1, 1000)]
    return out


def test_driver_options_like_qemu(tmp_path: Path) -> None:
    steps: list[tuple[Any, ...]] = []
    for i, options in enumerate(variants()):
        steps += [("cmd", "blockdev-add", {**options, "node-name": f"n{i}"}),
                  ("cmd", "query-named-block-nodes", {"flat": True}),
                  ("cmd", "blockdev-del", {"node-name": f"n{i}"})]
    qemu, emu = run_both(tmp_path, steps, lambda d: create_qcow2(d / "img", "4M"))
    qemu, emu = without_host_details(qemu), without_host_details(emu)
    errors = sum("error" in r[2] for r in qemu if tuple(r[:2]) == ("reply", "blockdev-add"))
    assert 40 < errors < len(variants())   # both outcomes are exercised
    differ = [f"{steps[i][1:]}:\n  QEMU     {q[2]}\n  emulator {e[2]}"
              for i, (q, e) in enumerate(zip(qemu, emu, strict=True)) if q != e]
    assert not differ, "\n".join(differ[:5])
