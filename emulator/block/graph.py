"""The node graph: names, references, and graph changes with QEMU's permission checks.

Every change is done the way block.c does it: change the edges without permissions
("noperm"), then refresh permissions over the affected subtrees in topological order
(bdrv_topological_dfs), checking at each node that its parents allow each other's needs
(bdrv_parent_perms_conflict) before pushing the node's cumulative needs down to its children
with the driver's ``child_perm``. On failure every edge and permission change is undone
(:class:`Transaction`) and QEMU's error text is raised as a GenericError.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from emulator.block import io as blockio
from emulator.block import perm as P
from emulator.block.errors import GenericError
from emulator.block.node import BdrvChild, BlockDriverState, Parent, node_name_is_valid

if TYPE_CHECKING:
    from emulator.block.backend import BlockBackend

NODE_NAME_MAX = 31  # sizeof(bs->node_name) - 1

# op blocker types used by the emulator (BLOCK_OP_TYPE_*)
OP_DRIVE_DEL = "drive-del"
OP_EXTERNAL_SNAPSHOT = "external-snapshot"
OP_BACKUP_SOURCE = "backup-source"
OP_BACKUP_TARGET = "backup-target"


class Transaction:
    """util/transactions.c: actions run newest first on commit and on abort."""

    def __init__(self) -> None:
        self._actions: list[tuple[Callable[[], None] | None, Callable[[], None] | None]] = []

    def add(self, *, abort: Callable[[], None] | None = None,
            commit: Callable[[], None] | None = None) -> None:
        self._actions.append((abort, commit))

    def abort(self) -> None:
        for abort, _ in reversed(self._actions):
            if abort:
                abort()
        self._actions.clear()

    def commit(self) -> None:
        for _, commit in reversed(self._actions):
            if commit:
                commit()
        self._actions.clear()

    def finalize(self, ok: bool) -> None:
        self.commit() if ok else self.abort()


def topological_dfs(found: set[int], bs: BlockDriverState,
                    out: list[BlockDriverState]) -> list[BlockDriverState]:
    """bdrv_topological_dfs: prepend the subtree of ``bs`` (parents before children): each
    child's subtree is prepended in child-list order, then ``bs`` — the reverse of a
    post-order walk."""
    post: list[BlockDriverState] = []

    def visit(node: BlockDriverState) -> None:
        if id(node) in found:
            return
        found.add(id(node))
        for c in node.children:
            if c.bs is not None:
                visit(c.bs)
        post.append(node)

    visit(bs)
    post.reverse()
    return post + out


class BlockGraph:
    """All nodes, their names and the edges between them."""

    def __init__(self) -> None:
        self.named_nodes: list[BlockDriverState] = []     # graph_bdrv_states, naming order
        self.all_nodes: list[BlockDriverState] = []
        self.monitor_owned: list[BlockDriverState] = []   # monitor_bdrv_states
        self.backends: list[BlockBackend] = []            # monitor-named BlockBackends
        self._id_counter = 0
        # bumped by every change of a node's child edges: what cached bdrv_refresh_filename
        # results depend on (edges from BlockBackends and jobs do not count)
        self.generation = 0
        self._rng = random.Random(7)   # QEMU appends two random digits; ours are seeded

    # -- names --------------------------------------------------------------------------------
    def generate_node_name(self) -> str:
        """id_generate(ID_BLOCK): '#block' + counter + two pseudo-random digits."""
        name = f"#block{self._id_counter}{self._rng.randrange(0, 99):02d}"
        self._id_counter += 1
        return name

    def find_node(self, node_name: str) -> BlockDriverState | None:
        for bs in self.named_nodes:
            if bs.node_name == node_name:
                return bs
        return None

    def blk_by_name(self, name: str) -> BlockBackend | None:
        for blk in self.backends:
            if blk.name == name:
                return blk
        return None

    def assign_node_name(self, bs: BlockDriverState, node_name: str | None) -> None:
        """bdrv_assign_node_name, with its checks in QEMU's order."""
        if node_name is None:
            node_name = self.generate_node_name()
        elif not node_name_is_valid(node_name):
            raise GenericError(f"Invalid node-name: '{node_name}'")
        if self.blk_by_name(node_name) is not None:
            raise GenericError(f"node-name={node_name} is conflicting with a device id")
        if self.find_node(node_name) is not None:
            raise GenericError(f"Duplicate nodes with node-name='{node_name}'")
        if len(node_name.encode()) > NODE_NAME_MAX:
            raise GenericError("Node name too long")
        bs.node_name = node_name
        self.named_nodes.append(bs)

    def lookup_bs(self, device: str | None, node_name: str | None) -> BlockDriverState:
        """bdrv_lookup_bs: a BlockBackend name first, then a node name."""
        if device is not None:
            blk = self.blk_by_name(device)
            if blk is not None:
                if blk.bs is None:
                    raise GenericError(f"Device '{device}' has no medium")
                return blk.bs
        if node_name is not None:
            bs = self.find_node(node_name)
            if bs is not None:
                return bs
        raise GenericError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")

    # -- permissions ----------------------------------------------------------------------------
    @staticmethod
    def parent_perms_conflict(bs: BlockDriverState) -> str | None:
        """bdrv_parent_perms_conflict: QEMU's message for the first pair that conflicts."""
        for a in bs.parents:
            for b in bs.parents:
                if a is b:
                    continue
                if b.perm & a.shared_perm != b.perm:
                    return P.conflict_message(bs.node_name, b.perm & ~a.shared_perm,
                                              b.parent_desc(), b.name, a.parent_desc(), a.name)
        return None

    @staticmethod
    def _set_child_perm(c: BdrvChild, perm: int, shared: int, tran: Transaction) -> None:
        old = (c.perm, c.shared_perm)

        def undo() -> None:
            c.perm, c.shared_perm = old

        c.perm, c.shared_perm = perm, shared
        tran.add(abort=undo)

    def node_refresh_perm(self, bs: BlockDriverState, tran: Transaction) -> None:
        """bdrv_node_refresh_perm: check this node, then recompute its children's edges
        (an edge whose permissions do not change needs no undo)."""
        perm, shared = bs.cumulative_perm()
        if perm & (P.WRITE | P.WRITE_UNCHANGED):
            if not bs.is_writable():
                if bs.read_only:
                    raise GenericError("Block node is read-only")
                raise GenericError(f"Read-only block node '{bs.node_name}' cannot support "
                                   "read-write users")
            if (not perm & P.RESIZE and bs.request_alignment != 1
                    and bs.getlength() % bs.request_alignment):
                raise GenericError("Cannot get 'write' permission without 'resize': "
                                   "Image size is not a multiple of request alignment")
        bs.check_perm(perm, shared, tran)
        for c in bs.children:
            nperm, nshared = bs.child_perm(c, c.role, perm, shared)
            if nperm != c.perm or nshared != c.shared_perm:
                self._set_child_perm(c, nperm, nshared, tran)

    def list_refresh_perms(self, nodes: Iterable[BlockDriverState], tran: Transaction) -> None:
        """bdrv_list_refresh_perms."""
        for bs in nodes:
            msg = self.parent_perms_conflict(bs)
            if msg:
                raise GenericError(msg)
            self.node_refresh_perm(bs, tran)

    def refresh_perms(self, bs: BlockDriverState, tran: Transaction | None = None) -> None:
        """bdrv_refresh_perms: the subtree of ``bs``; raises (after undoing) on conflict."""
        own = tran is None
        t = tran or Transaction()
        try:
            self.list_refresh_perms(topological_dfs(set(), bs, []), t)
        except GenericError:
            if own:
                t.abort()
            raise
        if own:
            t.commit()

    def check_perm_update(self, *roots: BlockDriverState) -> None:
        """Recompute permissions below ``roots`` and raise QEMU's text if they conflict.

        On failure the edges' permissions are left as they were."""
        tran = Transaction()
        found: set[int] = set()
        nodes: list[BlockDriverState] = []
        for bs in roots:
            nodes = topological_dfs(found, bs, nodes)
        try:
            self.list_refresh_perms(nodes, tran)
        except GenericError:
            tran.abort()
            raise
        tran.commit()

    def child_try_set_perm(self, c: BdrvChild, perm: int, shared: int) -> None:
        """bdrv_child_try_set_perm: tighten (may fail) or loosen (never fails) one edge."""
        assert c.bs is not None
        tran = Transaction()
        loosen_only = not (perm & ~c.perm) and not (c.shared_perm & ~shared)
        self._set_child_perm(c, perm, shared, tran)
        try:
            self.refresh_perms(c.bs, tran)
        except GenericError:
            tran.abort()
            if loosen_only:
                return
            raise
        tran.commit()

    def child_refresh_perms(self, parent: BlockDriverState, c: BdrvChild) -> None:
        """bdrv_child_refresh_perms: recompute one edge from the parent's needs."""
        perm, shared = parent.cumulative_perm()
        nperm, nshared = parent.child_perm(c, c.role, perm, shared)
        self.child_try_set_perm(c, nperm, nshared)

    # -- edges ------------------------------------------------------------------------------------
    def _replace_child_noperm(self, c: BdrvChild, new_bs: BlockDriverState | None) -> None:
        """bdrv_replace_child_noperm: move the edge; the new parent entry goes to the head.
        Only a node parent's filename changes with it (a BlockBackend's or a job's edge is
        no node's child), so only then are the cached filenames stale.

        The parent keeps the drained sections of the node it now uses (drain_saldo): if the
        new node is in more of them, the parent's drained_begin runs before the move (a job
        pauses); if in fewer, its drained_end runs after it (a job resumes). A node parent
        detaches the edge from the old node and attaches it to the new one (.detach,
        .attach): the edge goes to the head of its children, and a backing edge's blocker
        moves with it."""
        pbs = c.parent if isinstance(c.parent, BlockDriverState) else None
        if pbs is not None:
            self.generation += 1
        new_count = new_bs.quiesce_counter if new_bs is not None else 0
        drain_saldo = new_count - c.parent_quiesce_counter
        while drain_saldo > 0:
            blockio.parent_drained_begin_single(c)
            drain_saldo -= 1
        if c.bs is not None:
            if pbs is not None:
                pbs.child_cb_detach(c)
            c.bs.parents.remove(c)
        c.bs = new_bs
        if new_bs is not None:
            new_bs.parents.insert(0, c)
            drain_saldo += new_bs.quiesce_counter - new_count
            if pbs is not None:
                pbs.child_cb_attach(c)
        while drain_saldo < 0:
            blockio.parent_drained_end_single(c)
            drain_saldo += 1

    def _attach_common(self, parent: Parent, child_bs: BlockDriverState, name: str, role: int,
                       perm: int, shared: int, tran: Transaction) -> BdrvChild:
        """bdrv_attach_child_common: create the edge (and a reference) without checks."""
        c = BdrvChild(parent, None, name, role, perm, shared)
        child_bs.refcnt += 1
        self._replace_child_noperm(c, child_bs)

        def undo() -> None:
            self._replace_child_noperm(c, None)
            child_bs.refcnt -= 1

        tran.add(abort=undo)
        return c

    def attach_child_noperm(self, parent_bs: BlockDriverState, child_bs: BlockDriverState,
                            name: str, role: int, tran: Transaction) -> BdrvChild:
        """bdrv_attach_child_noperm: the edge with the parent driver's child_perm."""
        if child_bs.subtree_contains(parent_bs):
            raise GenericError(f"Making '{child_bs.node_name}' a {name} child of "
                               f"'{parent_bs.node_name}' would create a cycle")
        perm, shared = parent_bs.cumulative_perm()
        nperm, nshared = parent_bs.child_perm(None, role, perm, shared)
        if child_bs.force_share:
            nshared = P.ALL
        return self._attach_common(parent_bs, child_bs, name, role, nperm, nshared, tran)

    def attach_child(self, parent_bs: BlockDriverState, child_bs: BlockDriverState, name: str,
                     role: int) -> BdrvChild:
        """bdrv_attach_child: attach and refresh the parent's subtree, or undo and raise."""
        tran = Transaction()
        try:
            c = self.attach_child_noperm(parent_bs, child_bs, name, role, tran)
            self.refresh_perms(parent_bs, tran)
        except GenericError:
            tran.abort()
            raise
        tran.commit()
        return c

    def root_attach_child(self, parent: Parent, child_bs: BlockDriverState, name: str,
                          role: int, perm: int, shared: int) -> BdrvChild:
        """bdrv_root_attach_child: an edge from a BlockBackend or job, checked below."""
        tran = Transaction()
        try:
            c = self._attach_common(parent, child_bs, name, role, perm, shared, tran)
            self.refresh_perms(child_bs, tran)
        except GenericError:
            tran.abort()
            raise
        tran.commit()
        return c

    def detach_child(self, c: BdrvChild) -> None:
        """bdrv_root_unref_child / bdrv_unref_child: drop the edge and its reference."""
        old = c.bs
        self._replace_child_noperm(c, None)
        if old is not None:
            # loosening restrictions: failures are ignored, as in bdrv_detach_child
            with contextlib.suppress(GenericError):
                self.refresh_perms(old)
            self.unref(old)

    def replace_node(self, from_bs: BlockDriverState, to_bs: BlockDriverState, *,
                     auto_skip: bool = True) -> None:
        """bdrv_replace_node (bdrv_replace_node_common): every parent of ``from_bs`` (except
        ``to_bs``'s own chain and jobs that must keep it) now points to ``to_bs``; undone on
        a permission conflict. All of it inside a drained section of ``from_bs``: whatever
        is above it pauses, and what moved to an undrained ``to_bs`` resumes as it moves."""
        from_bs.refcnt += 1
        blockio.drained_begin(from_bs)
        tran = Transaction()
        try:
            self._replace_node_noperm(from_bs, to_bs, auto_skip, tran)
            found: set[int] = set()
            nodes = topological_dfs(found, to_bs, [])
            nodes = topological_dfs(found, from_bs, nodes)
            self.list_refresh_perms(nodes, tran)
        except GenericError:
            tran.abort()
            raise
        else:
            tran.commit()
        finally:
            blockio.drained_end(from_bs)
            self.unref(from_bs)

    def _replace_node_noperm(self, from_bs: BlockDriverState, to_bs: BlockDriverState,
                             auto_skip: bool, tran: Transaction) -> None:
        for c in list(from_bs.parents):
            if not self._should_update_child(c, to_bs):
                if auto_skip:
                    continue
                raise GenericError(f"Should not change '{c.name}' link to '{from_bs.node_name}'")
            if c.frozen:
                raise GenericError(f"Cannot change '{c.name}' link to '{from_bs.node_name}'")
            self._replace_child_tran(c, to_bs, tran)

    def _replace_child_tran(self, c: BdrvChild, new_bs: BlockDriverState,
                            tran: Transaction) -> None:
        old = c.bs
        assert old is not None
        new_bs.refcnt += 1
        self._replace_child_noperm(c, new_bs)

        def undo() -> None:
            self._replace_child_noperm(c, old)
            new_bs.refcnt -= 1

        def commit() -> None:
            self.unref(old)

        tran.add(abort=undo, commit=commit)

    @staticmethod
    def _should_update_child(c: BdrvChild, to: BlockDriverState) -> bool:
        """should_update_child: never redirect an edge that lies inside ``to``'s own subtree
        (that would make a loop); parents that must stay (jobs) set ``stay_at_node``."""
        if getattr(c.parent, "stay_at_node", False):
            return False
        seen = {id(to)}
        queue = [to]
        while queue:
            v = queue.pop(0)
            for c2 in v.children:
                if c2 is c:
                    return False
                if c2.bs is not None and id(c2.bs) not in seen:
                    seen.add(id(c2.bs))
                    queue.append(c2.bs)
        return True

    def append(self, bs_new: BlockDriverState, bs_top: BlockDriverState) -> None:
        """bdrv_append: ``bs_new`` takes ``bs_top`` as its "backing" child and its place."""
        from emulator.block.open import backing_role
        assert bs_new.backing is None
        tran = Transaction()
        try:
            self.attach_child_noperm(bs_new, bs_top, "backing", backing_role(bs_new), tran)
            self._replace_node_noperm(bs_top, bs_new, True, tran)
            self.list_refresh_perms(topological_dfs(set(), bs_new, []), tran)
        except GenericError:
            tran.abort()
            raise
        tran.commit()

    def insert_filter_above(self, bs: BlockDriverState, filter_bs: BlockDriverState) -> None:
        """bdrv_insert_node's second half: ``filter_bs`` (already opened with ``bs`` as its
        filtered child) replaces ``bs`` for all of ``bs``'s other parents. Raises QEMU's
        permission-conflict text and leaves the graph unchanged if that cannot be done."""
        self.replace_node(bs, filter_bs)

    def set_backing_hd(self, bs: BlockDriverState, backing_bs: BlockDriverState | None) -> None:
        """bdrv_set_backing_hd: replace (or drop) the backing child."""
        from emulator.block.open import backing_role
        if not bs.supports_backing:   # bdrv_set_file_or_backing_noperm
            raise GenericError(f"Driver '{bs.format_name}' of node '{bs.node_name}' does not "
                               "support backing files")
        old = bs.backing
        if old is not None:
            self.detach_child(old)
        if backing_bs is not None:
            self.attach_child(bs, backing_bs, "backing", backing_role(bs))

    # -- lifetime --------------------------------------------------------------------------------
    def unref(self, bs: BlockDriverState) -> None:
        """bdrv_unref: the last reference closes and deletes the node."""
        bs.refcnt -= 1
        if bs.refcnt > 0:
            return
        if bs in self.named_nodes:
            self.named_nodes.remove(bs)
        if bs in self.all_nodes:
            self.all_nodes.remove(bs)
        self.close(bs)

    def close(self, bs: BlockDriverState) -> None:
        """bdrv_close: flush, let the driver close (qcow2 stores bitmaps), drop children."""
        if bs.closed:
            return
        if bs.opened:
            with contextlib.suppress(OSError):
                bs.flush()
            bs.drv_close()
        bs.closed = True
        for c in list(bs.children):
            self.detach_child(c)
        bs.release_named_dirty_bitmaps()
        bs.dirty_bitmaps.clear()

    # -- op blockers -------------------------------------------------------------------------------
    @staticmethod
    def op_block(bs: BlockDriverState, op: str, reason: str) -> None:
        """bdrv_op_block: the newest blocker is the one reported."""
        bs.op_blockers.setdefault(op, []).insert(0, reason)

    @staticmethod
    def op_unblock(bs: BlockDriverState, op: str, reason: str) -> None:
        """bdrv_op_unblock: drop this very reason (identity, like QEMU's Error pointer)."""
        blockers = bs.op_blockers.get(op, [])
        blockers[:] = [b for b in blockers if b is not reason]

    @classmethod
    def op_block_all(cls, bs: BlockDriverState, reason: str) -> None:
        from emulator.block.node import OP_TYPES
        for op in OP_TYPES:
            cls.op_block(bs, op, reason)

    @classmethod
    def op_unblock_all(cls, bs: BlockDriverState, reason: str) -> None:
        for op in list(bs.op_blockers):
            cls.op_unblock(bs, op, reason)

    @staticmethod
    def op_check_blocked(bs: BlockDriverState, op: str) -> None:
        """bdrv_op_is_blocked: "Node '<device or node>' is busy: <newest reason>"."""
        blockers = bs.op_blockers.get(op, [])
        if blockers:
            raise GenericError(f"Node '{bs.device_or_node_name()}' is busy: {blockers[0]}")
