"""The nodes below a node (its children, theirs, ...), each once."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emulator.block.node import BlockDriverState


def subtree(bs: BlockDriverState) -> list[BlockDriverState]:
    """``bs`` and every node below it, each once."""
    out: list[BlockDriverState] = []
    todo = [bs]
    while todo:
        node = todo.pop()
        if node not in out:
            out.append(node)
            todo.extend(c.bs for c in node.children if c.bs is not None)
    return out
