"""Block permissions and child roles, as block.c models them.

A child (edge) holds ``perm`` (what its parent needs of the child node) and ``shared_perm``
(what the parent lets other parents of that node do). Drivers derive a child's pair from the
parent node's cumulative pair with ``child_perm`` — by default :func:`default_perms`, the
three rule sets of block.c (filter pass-through, COW backing, storage file). A node's parents
must pairwise allow each other's ``perm``; otherwise :func:`conflict_message` gives QEMU's text.
"""

from __future__ import annotations

CONSISTENT_READ = 0x01
WRITE = 0x02
WRITE_UNCHANGED = 0x04
RESIZE = 0x08
ALL = 0x0F

DEFAULT_PERM_PASSTHROUGH = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE
DEFAULT_PERM_UNCHANGED = ALL & ~DEFAULT_PERM_PASSTHROUGH

# QAPI BlockPermission names (blkdebug take-/unshare-child-perms) -> BLK_PERM_*
QAPI_PERMS = {
    "consistent-read": CONSISTENT_READ,
    "write": WRITE,
    "write-unchanged": WRITE_UNCHANGED,
    "resize": RESIZE,
}

_NAMES = ((CONSISTENT_READ, "consistent read"), (WRITE, "write"),
          (WRITE_UNCHANGED, "write unchanged"), (RESIZE, "resize"))


def perm_names(perm: int) -> str:
    """bdrv_perm_names: "consistent read, write" in bit order."""
    return ", ".join(name for bit, name in _NAMES if perm & bit)


class Role:
    """BdrvChildRole: what a child is to its parent. The bits are plain ints (roles are an
    ``int``), because edges test them on every request and permission update."""

    DATA = 1 << 0
    METADATA = 1 << 1
    FILTERED = 1 << 2
    COW = 1 << 3
    PRIMARY = 1 << 4

    IMAGE = DATA | METADATA  # BDRV_CHILD_IMAGE


def filter_default_perms(perm: int, shared: int) -> tuple[int, int]:
    """bdrv_filter_default_perms: pass everything through to the filtered child."""
    nshared = (shared & DEFAULT_PERM_PASSTHROUGH) | DEFAULT_PERM_UNCHANGED
    return perm & DEFAULT_PERM_PASSTHROUGH, nshared


def default_perms_for_cow(perm: int, shared: int, *, inactive: bool = False) -> tuple[int, int]:
    """bdrv_default_perms_for_cow: backing files are only read (consistently)."""
    perm &= CONSISTENT_READ
    shared = (WRITE | RESIZE) if shared & WRITE else 0
    shared |= CONSISTENT_READ | WRITE_UNCHANGED
    if inactive:
        shared |= WRITE | RESIZE
    return perm, shared


def default_perms_for_storage(role: int, perm: int, shared: int, *, writable: bool,
                              no_io: bool = False, inactive: bool = False) -> tuple[int, int]:
    """bdrv_default_perms_for_storage: a format node's file (metadata and/or data) child."""
    perm, shared = filter_default_perms(perm, shared)
    if role & Role.METADATA:
        if writable:
            perm |= WRITE | RESIZE
        if not no_io:
            perm |= CONSISTENT_READ
        shared &= ~(WRITE | RESIZE)
    if role & Role.DATA:
        shared &= ~RESIZE
        if perm & WRITE_UNCHANGED:
            perm |= WRITE
        if perm & WRITE:
            perm |= RESIZE
    if inactive:
        shared |= WRITE | RESIZE
    return perm, shared


def default_perms(role: int, perm: int, shared: int, *, writable: bool,
                  no_io: bool = False, inactive: bool = False) -> tuple[int, int]:
    """bdrv_default_perms: dispatch on the child's role."""
    if role & Role.FILTERED:
        return filter_default_perms(perm, shared)
    if role & Role.COW:
        return default_perms_for_cow(perm, shared, inactive=inactive)
    if role & (Role.METADATA | Role.DATA):
        return default_perms_for_storage(role, perm, shared, writable=writable, no_io=no_io,
                                         inactive=inactive)
    raise AssertionError(f"child role {role!r} has no default permissions")


def conflict_message(node_name: str, perms: int, b_user: str, b_child: str,
                     a_user: str, a_child: str) -> str:
    """bdrv_a_allow_b's error: b needs ``perms`` that a does not share."""
    return (f"Permission conflict on node '{node_name}': permissions '{perm_names(perms)}' are "
            f"both required by {b_user} (uses node '{node_name}' as '{b_child}' child) and "
            f"unshared by {a_user} (uses node '{node_name}' as '{a_child}' child).")
