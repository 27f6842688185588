"""Request and block-status flags (include/block/block-common.h, block-io.h).

A module of its own so that the request layer (:mod:`emulator.block.io`) can use them at
module level; :mod:`emulator.block.node` re-exports them under the same names.
"""

BDRV_SECTOR_SIZE = 512

# block-status flags (include/block/block-io.h)
BDRV_BLOCK_DATA = 0x01
BDRV_BLOCK_ZERO = 0x02
BDRV_BLOCK_OFFSET_VALID = 0x04
BDRV_BLOCK_RAW = 0x08
BDRV_BLOCK_ALLOCATED = 0x10
BDRV_BLOCK_EOF = 0x20
BDRV_BLOCK_RECURSE = 0x40

# write flags
BDRV_REQ_ZERO_WRITE = 0x2
BDRV_REQ_MAY_UNMAP = 0x4
BDRV_REQ_FUA = 0x10
BDRV_REQ_WRITE_UNCHANGED = 0x40
BDRV_REQ_NO_FALLBACK = 0x100
