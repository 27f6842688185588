"""blkdebug: a filter that injects errors on debug events (block/blkdebug.c).

Rules come from ``inject-error`` and ``set-state`` (the ``config`` file is accepted and
remembered but not read). Per event, rules are kept newest first as QEMU's
QLIST_INSERT_HEAD does; an event runs every rule of that event whose state is 0 or the
current state: the first inject rule that fires resets the active list, each fired inject
rule goes to the head of the active list, and the new state of the set-state rules is applied
after all ran. A request checks the active rules (head first) for a matching offset and I/O
type and fails with -errno; ``once`` rules are removed when they fire. ``immediately=false``
(QEMU yields once before failing) is the default; the error carries ``immediate`` so that a
qcow2 write split into concurrent tasks can tell whether its loop saw the failure at once.
"""

from __future__ import annotations

import errno as errno_mod
import os
from dataclasses import dataclass
from typing import Any, ClassVar

from emulator.block import perm as P
from emulator.block import waits
from emulator.block.drivers import register
from emulator.block.errors import GenericError
from emulator.block.node import (
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_RAW,
    BdrvChild,
    BlockDriverState,
    BlockStatus,
)
from emulator.block.perm import Role
from emulator.block.qemu_opts import absorb_sizes

# event and I/O type names: the QAPI enums BlkdebugEvent, BlkdebugIOType (commands/block.py)
# QEMU_OPT_SIZE options of blkdebug's runtime_opts
BLKDEBUG_SIZES = ("align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard",
                  "max-discard")
DEFAULT_IOTYPES = frozenset({"read", "write", "write-zeroes", "discard", "flush"})

ACTION_INJECT_ERROR = "inject-error"
ACTION_SET_STATE = "set-state"


@dataclass(eq=False)
class Rule:
    """struct BlkdebugRule."""

    event: str
    action: str
    state: int = 0
    # inject-error
    error: int = errno_mod.EIO
    once: bool = False
    immediately: bool = False
    offset: int = -1                      # sector * 512, or -1 for any
    iotypes: frozenset[str] = DEFAULT_IOTYPES
    # set-state
    new_state: int = 0


def _max_int(value: int) -> bool:
    return value >= 2**31 - 1


def _constraint(options: dict[str, Any], key: str, align: int) -> int:
    """One of blkdebug_open's size limits: 0 (none), or below INT_MAX and a multiple of
    ``align``, else "Cannot meet constraints with <key> <value>"."""
    value = int(options.get(key, 0))
    if value and (_max_int(value) or value % align):
        raise GenericError(f"Cannot meet constraints with {key} {value}")
    return value


@register
class BlkdebugNode(BlockDriverState):
    fua_support: ClassVar[str | None] = "file"
    format_name: ClassVar[str] = "blkdebug"
    protocol_name: ClassVar[str | None] = "blkdebug"
    is_filter: ClassVar[bool] = True
    has_refresh_filename_hook: ClassVar[bool] = True
    strong_runtime_opts: ClassVar[tuple[str, ...]] = (
        "config", "inject-error.", "set-state.", "align", "max-transfer", "opt-write-zero",
        "max-write-zero", "opt-discard", "max-discard")

    @staticmethod
    def _read_config(layer: Any, name: str) -> None:
        """read_config: the file must be readable; its rules are not emulated."""
        try:
            with open(layer.resolve_path(name), "rb"):
                pass
        except OSError as e:
            raise GenericError("Could not read blkdebug config file: "
                               f"{os.strerror(e.errno or errno_mod.EIO)}") from None
        raise GenericError("blkdebug config files are not emulated (give the rules as "
                           "inject-error and set-state)")

    def drv_open(self, options: dict[str, Any], open_child: Any) -> None:
        absorb_sizes(options, BLKDEBUG_SIZES)
        self.config_file: str | None = options.get("config")
        if self.config_file is not None:
            self._read_config(open_child.layer, self.config_file)
        self.rules: dict[str, list[Rule]] = {}
        self.active_rules: list[Rule] = []
        for spec in options.get("inject-error", []):
            self._add_rule(spec, ACTION_INJECT_ERROR)
        for spec in options.get("set-state", []):
            self._add_rule(spec, ACTION_SET_STATE)
        self.state = 1
        self.take_child_perms = 0
        self.unshare_child_perms = 0
        for name in options.get("take-child-perms", []):
            self.take_child_perms |= P.QAPI_PERMS[name]
        for name in options.get("unshare-child-perms", []):
            self.unshare_child_perms |= P.QAPI_PERMS[name]
        open_child(options.get("image"), "image", Role.FILTERED | Role.PRIMARY)
        assert self.file is not None and self.file.bs is not None
        self.align = int(options.get("align", 0))
        if self.align and (_max_int(self.align) or self.align & (self.align - 1)):
            raise GenericError(f"Cannot meet constraints with align {self.align}")
        align = max(self.align, self.file.bs.request_alignment)
        self.max_transfer_opt = _constraint(options, "max-transfer", align)
        self.opt_write_zero_opt = _constraint(options, "opt-write-zero", align)
        self.max_write_zero_opt = _constraint(options, "max-write-zero",
                                              max(self.opt_write_zero_opt, align))
        self.opt_discard_opt = _constraint(options, "opt-discard", align)
        self.max_discard_opt = _constraint(options, "max-discard",
                                           max(self.opt_discard_opt, align))
        self.drv_debug_event("none")

    def _add_rule(self, spec: dict[str, Any], action: str) -> None:
        """add_rule: the QAPI schema already checked event and iotype names."""
        event = spec.get("event")
        if event is None:
            raise GenericError("Missing event name for rule")
        rule = Rule(event=event, action=action, state=int(spec.get("state", 0)))
        if action == ACTION_INJECT_ERROR:
            rule.error = int(spec.get("errno", errno_mod.EIO))
            rule.once = bool(spec.get("once", False))
            rule.immediately = bool(spec.get("immediately", False))
            sector = int(spec.get("sector", -1))
            rule.offset = -1 if sector == -1 else sector * 512
            if "iotype" in spec:
                rule.iotypes = frozenset({spec["iotype"]})
        else:
            rule.new_state = int(spec.get("new_state", 0))
        self.rules.setdefault(event, []).insert(0, rule)

    def drv_refresh_limits(self) -> None:
        if self.align:
            self.request_alignment = self.align
        if self.max_transfer_opt:
            self.max_transfer = self.max_transfer_opt
        if self.opt_write_zero_opt:
            self.opt_write_zero = self.opt_write_zero_opt
        if self.max_write_zero_opt:
            self.max_pwrite_zeroes = self.max_write_zero_opt
        if self.opt_discard_opt:
            self.pdiscard_alignment = self.opt_discard_opt
        if self.max_discard_opt:
            self.max_pdiscard = self.max_discard_opt

    # -- permissions ----------------------------------------------------------------------
    def child_perm(self, child: BdrvChild | None, role: int, perm: int,
                   shared: int) -> tuple[int, int]:
        """blkdebug_child_perm: default filter permissions, then take/unshare modifiers."""
        nperm, nshared = super().child_perm(child, role, perm, shared)
        return nperm | self.take_child_perms, nshared & ~self.unshare_child_perms

    # -- events and rules --------------------------------------------------------------------
    def drv_debug_event(self, event: str) -> None:
        """blkdebug_debug_event."""
        new_state = self.state
        injected = 0
        for rule in list(self.rules.get(event, [])):
            if rule.state and rule.state != self.state:
                continue
            if rule.action == ACTION_INJECT_ERROR:
                injected += 1
                if injected == 1:
                    self.active_rules = []
                self.active_rules.insert(0, rule)
            elif rule.action == ACTION_SET_STATE:
                new_state = rule.new_state
        self.state = new_state

    def rule_check(self, offset: int, length: int, iotype: str) -> None:
        """rule_check: fail the request with the first matching active rule's errno."""
        for rule in self.active_rules:
            if ((rule.offset == -1 or (length and offset <= rule.offset < offset + length))
                    and iotype in rule.iotypes):
                break
        else:
            return
        if not rule.error:
            return
        if rule.once:
            self.active_rules.remove(rule)
            self.rules[rule.event].remove(rule)
        if not rule.immediately:
            waits.note(waits.BH)
        error = OSError(rule.error, os.strerror(rule.error))
        error.immediate = rule.immediately   # type: ignore[attr-defined]
        raise error

    # -- I/O ------------------------------------------------------------------------------------
    def drv_getlength(self) -> int:
        assert self.file is not None and self.file.bs is not None
        return self.file.bs.getlength()

    def drv_preadv(self, offset: int, length: int) -> bytes:
        self.rule_check(offset, length, "read")
        assert self.file is not None
        return self.file.pread(offset, length)

    def drv_pwritev(self, offset: int, data: bytes, flags: int) -> None:
        self.rule_check(offset, len(data), "write")
        assert self.file is not None
        self.file.pwrite(offset, data, flags)

    def drv_pwrite_zeroes(self, offset: int, length: int, flags: int) -> None:
        align = max(self.request_alignment, self.opt_write_zero)
        if length < align:
            raise NotImplementedError   # -ENOTSUP: the block layer falls back to writes
        self.rule_check(offset, length, "write-zeroes")
        assert self.file is not None
        self.file.pwrite_zeroes(offset, length, flags)

    def drv_pdiscard(self, offset: int, length: int) -> None:
        if length < self.request_alignment:
            return
        self.rule_check(offset, length, "discard")
        assert self.file is not None
        self.file.pdiscard(offset, length)

    def drv_flush_to_disk(self) -> None:
        """blkdebug_co_flush is .bdrv_co_flush_to_disk: the generic flush calls it (and so
        checks "flush" rules) only when the node was written since its last flush."""
        self.rule_check(0, 0, "flush")
        assert self.file is not None
        self.file.flush()

    def drv_block_status(self, want_zero: bool, offset: int, length: int) -> BlockStatus:
        self.rule_check(offset, length, "block-status")
        assert self.file is not None
        return BDRV_BLOCK_RAW | BDRV_BLOCK_OFFSET_VALID, length, offset, self.file.bs

    def pure_block_status(self) -> bool:
        """Only rules for the "block-status" I/O type act on block-status requests (events
        come from other requests)."""
        return not any("block-status" in rule.iotypes
                       for rules in self.rules.values() for rule in rules)

    def drv_refresh_filename(self) -> None:
        """blkdebug_refresh_filename: "blkdebug:CONFIG:IMAGE" when nothing else was set."""
        assert self.file is not None and self.file.bs is not None
        if not self.file.bs.exact_filename:
            return
        if any(k not in ("config", "image", "x-image", "driver") for k in self.full_open_options):
            return
        self.exact_filename = f"blkdebug:{self.config_file or ''}:{self.file.bs.exact_filename}"

