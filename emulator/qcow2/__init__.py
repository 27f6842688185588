"""The on-disk qcow2 format (version 3), with no knowledge of QMP or the block graph.

`Qcow2Image` reads and writes guest data through a `BlockIO` (QEMU's ``bs->file``); see
docs/emulator-design.md for how the block layer drives it.
"""

from emulator.qcow2.bitmaps import StoredBitmap
from emulator.qcow2.blockio import BlockIO, FileIO
from emulator.qcow2.check import CheckResult
from emulator.qcow2.errors import Qcow2Error
from emulator.qcow2.image import Backing, Qcow2Image, Status

__all__ = ["Backing", "BlockIO", "CheckResult", "FileIO", "Qcow2Error", "Qcow2Image",
           "Status", "StoredBitmap"]
