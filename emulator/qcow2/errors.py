"""The one exception the qcow2 library raises for images it cannot handle."""

from __future__ import annotations


class Qcow2Error(Exception):
    """An image that is not qcow2, is damaged, or uses a feature the emulator lacks.

    The message is QEMU's text where QEMU has one (e.g. "Image is not in qcow2 format"), so
    callers can print it after "Could not open '<file>': ".
    """
