"""The one exception the qcow2 library raises for images it cannot handle."""

from __future__ import annotations

import errno as errnos


class Qcow2Error(Exception):
    """An image that is not qcow2, is damaged, or uses a feature the emulator lacks.

    The message is QEMU's text where QEMU has one (e.g. "Image is not in qcow2 format"), so
    callers can print it after "Could not open '<file>': ". ``errno`` is the -errno QEMU's
    function returns with it, where a caller looks at it (0 otherwise).
    """

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


def img_create_message(exc: Qcow2Error) -> str:
    """bdrv_img_create's text for a failed qcow2 creation: -EFBIG gets its own message,
    "generally a better message than whatever the driver would deliver" (the hint is there
    because qcow2's cluster_size option has a default value)."""
    if exc.errno == errnos.EFBIG:
        return ("The image size is too large for file format 'qcow2' "
                "(try using a larger cluster size)")
    return str(exc)
