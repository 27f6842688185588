"""The node graph model: names, references, permissions and their error texts.

Texts were checked against Debian QEMU 7.2.22 (see test_block_qmp.py for the live
comparisons); the permission rules are block.c's bdrv_default_perms and blkdebug.c's
blkdebug_child_perm.
"""

from __future__ import annotations

import pytest

from emulator.block import perm as P
from emulator.block.backend import BlockBackend
from emulator.block.errors import GenericError
from emulator.block.layer import BlockLayer

CONFLICT_283 = (
    "Permission conflict on node 'base': permissions 'write' are both required by node "
    "'other' (uses node 'base' as 'image' child) and unshared by node 'source' (uses node "
    "'base' as 'image' child).")


def layer_283() -> BlockLayer:
    """The graph of 283's first section."""
    layer = BlockLayer()
    layer.blockdev_add({"driver": "null-co", "node-name": "target", "size": 1048576})
    layer.blockdev_add({"driver": "blkdebug", "node-name": "source",
                        "image": {"driver": "null-co", "node-name": "base", "size": 1048576}})
    layer.blockdev_add({"driver": "blkdebug", "node-name": "other", "image": "base",
                        "take-child-perms": ["write"]})
    return layer


def test_283_conflict_text_and_rollback() -> None:
    """A parent that unshares WRITE on 'source' (as the active copy-before-write filter
    does) conflicts with 'other' taking WRITE on 'base'; nothing changes."""
    layer = layer_283()
    base = layer.find_node("base")
    before = [(c.name, c.perm, c.shared_perm) for c in base.parents]
    blk = BlockBackend(layer.graph, perm=P.CONSISTENT_READ, shared_perm=P.ALL & ~P.WRITE)
    with pytest.raises(GenericError) as e:
        blk.insert_bs(layer.find_node("source"))
    assert e.value.desc == CONFLICT_283
    assert [(c.name, c.perm, c.shared_perm) for c in base.parents] == before
    assert blk.root is None and layer.find_node("source").parents == []


def test_parents_and_children_newest_first() -> None:
    layer = layer_283()
    base = layer.find_node("base")
    assert [c.parent_desc() for c in base.parents] == ["node 'other'", "node 'source'"]
    assert base.refcnt == 2


def test_named_nodes_listed_newest_first() -> None:
    layer = layer_283()
    names = [n["node-name"] for n in layer.query_named_block_nodes()]
    assert names == ["other", "base", "source", "target"]


@pytest.mark.parametrize(("name", "error"), [
    ("1x", "Invalid node-name: '1x'"),
    ("", "Invalid node-name: ''"),
    ("#block1", "Invalid node-name: '#block1'"),
    ("target", "Duplicate nodes with node-name='target'"),
    ("a" * 32, "Node name too long"),
])
def test_node_name_errors(name: str, error: str) -> None:
    layer = layer_283()
    with pytest.raises(GenericError) as e:
        layer.blockdev_add({"driver": "null-co", "node-name": name})
    assert e.value.desc == error


def test_node_name_of_31_chars_is_fine() -> None:
    layer = BlockLayer()
    layer.blockdev_add({"driver": "null-co", "node-name": "a" * 31})


def test_format_file_reference_checked_before_node_name() -> None:
    """bdrv_open_inherit opens a format's file child before naming the format node;
    blkdebug (a protocol driver) names itself first."""
    layer = BlockLayer()
    with pytest.raises(GenericError, match=r"^Cannot find device='nosuch' nor node-name='nosuch'$"):
        layer.blockdev_add({"driver": "raw", "node-name": "1bad", "file": "nosuch"})
    with pytest.raises(GenericError, match=r"^Invalid node-name: '1bad'$"):
        layer.blockdev_add({"driver": "blkdebug", "node-name": "1bad", "image": "nosuch"})
    assert layer.graph.named_nodes == []


def test_blockdev_del_texts() -> None:
    layer = layer_283()
    layer.blockdev_add({"driver": "null-co", "node-name": "n1"})
    layer.blockdev_add({"driver": "raw", "node-name": "r2", "file": "n1"})
    for node, text in [("base", "Node base is not owned by the monitor"),
                       ("nosuch", "Failed to find node with node-name='nosuch'"),
                       ("n1", "Block device n1 is in use")]:
        with pytest.raises(GenericError) as e:
            layer.blockdev_del(node)
        assert e.value.desc == text
    layer.blockdev_del("r2")
    layer.blockdev_del("n1")
    layer.blockdev_del("source")
    assert [n.node_name for n in layer.graph.named_nodes] == ["target", "base", "other"]
    layer.blockdev_del("other")
    assert [n.node_name for n in layer.graph.named_nodes] == ["target"]


def test_blockdev_del_with_backend_in_use() -> None:
    layer = BlockLayer()
    layer.blockdev_add({"driver": "null-co", "node-name": "n"})
    blk = layer.temporary_backend(layer.find_node("n"))
    with pytest.raises(GenericError, match=r"^Node n is in use$"):
        layer.blockdev_del("n")
    blk.unref()
    layer.blockdev_del("n")


def test_read_only_node_refuses_writers() -> None:
    layer = BlockLayer()
    layer.blockdev_add({"driver": "null-co", "node-name": "n", "read-only": True})
    blk = layer.temporary_backend(layer.find_node("n"))
    with pytest.raises(GenericError, match=r"^Block node is read-only$"):
        blk.set_perm(P.WRITE, P.ALL)
    assert blk.root is not None and blk.root.perm == 0


def test_default_perms_rules() -> None:
    """block.c: format file child (metadata+data), COW backing child, filtered child."""
    img = P.Role.DATA | P.Role.METADATA | P.Role.PRIMARY
    assert P.default_perms(img, P.CONSISTENT_READ, P.ALL, writable=True) == (
        P.CONSISTENT_READ | P.WRITE | P.RESIZE, P.CONSISTENT_READ | P.WRITE_UNCHANGED)
    assert P.default_perms(P.Role.COW, P.ALL, P.ALL, writable=True) == (
        P.CONSISTENT_READ, P.ALL)
    assert P.default_perms(P.Role.COW, P.ALL, P.CONSISTENT_READ, writable=True) == (
        P.CONSISTENT_READ, P.CONSISTENT_READ | P.WRITE_UNCHANGED)
    assert P.default_perms(P.Role.FILTERED, P.WRITE, P.CONSISTENT_READ, writable=True) == (
        P.WRITE, P.CONSISTENT_READ)
    assert P.perm_names(P.ALL) == "consistent read, write, write unchanged, resize"


def test_unshare_child_perms() -> None:
    layer = BlockLayer()
    layer.blockdev_add({"driver": "null-co", "node-name": "base"})
    layer.blockdev_add({"driver": "blkdebug", "node-name": "a", "image": "base",
                        "unshare-child-perms": ["write"]})
    with pytest.raises(GenericError) as e:
        layer.blockdev_add({"driver": "blkdebug", "node-name": "b", "image": "base",
                            "take-child-perms": ["write", "resize"]})
    assert e.value.desc == (
        "Permission conflict on node 'base': permissions 'write' are both required by node "
        "'b' (uses node 'base' as 'image' child) and unshared by node 'a' (uses node 'base' "
        "as 'image' child).")
    assert layer.find_node("b") is None
    assert [c.parent_desc() for c in layer.find_node("base").parents] == ["node 'a'"]


def test_insert_filter_above_moves_parents() -> None:
    layer = BlockLayer()
    layer.blockdev_add({"driver": "null-co", "node-name": "n"})
    blk = layer.temporary_backend(layer.find_node("n"))
    layer.blockdev_add({"driver": "blkdebug", "node-name": "f", "image": "n"})
    layer.graph.insert_filter_above(layer.find_node("n"), layer.find_node("f"))
    assert blk.bs is layer.find_node("f")
    assert [c.parent_desc() for c in layer.find_node("n").parents] == ["node 'f'"]


def test_backend_parent_desc() -> None:
    layer = BlockLayer()
    blk = BlockBackend(layer.graph, name="drive0")
    assert blk.parent_desc() == "block device 'drive0'"
    assert BlockBackend(layer.graph).parent_desc() == "an unnamed block device"
