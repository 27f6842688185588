"""What the jobs' filters share (copy-before-write for backup, mirror_top for mirror): one
filtered child, the job's source, that takes the reads and flushes and gives the filename —
and, once the filter was dropped from the graph, nothing to read and nothing to flush."""

from __future__ import annotations

import errno
import os
from typing import ClassVar

from emulator.block.node import BdrvChild, BlockDriverState


class SourceFilter(BlockDriverState):
    is_filter: ClassVar[bool] = True
    has_refresh_filename_hook: ClassVar[bool] = True

    def _source(self) -> BdrvChild:
        """The filtered child (bs->file or bs->backing); ENOMEDIUM once it is gone."""
        c = self.filter_child()
        if c is None:
            raise OSError(errno.ENOMEDIUM, os.strerror(errno.ENOMEDIUM))
        return c

    def drv_preadv(self, offset: int, length: int) -> bytes:
        return self._source().pread(offset, length)

    def drv_flush(self) -> bool:
        """cbw_co_flush, bdrv_mirror_top_flush: only the source, and nothing once the
        filter was dropped (or, for mirror_top, its append failed)."""
        c = self.filter_child()
        if c is not None and c.bs is not None:
            c.flush()
        return True

    def drv_refresh_filename(self) -> None:
        """cbw_refresh_filename, bdrv_mirror_top_refresh_filename: the source's filename."""
        c = self.filter_child()
        if c is not None and c.bs is not None:
            self.exact_filename = c.bs.filename
