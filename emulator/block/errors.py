"""The QMP error classes the block layer raises (emulator/qmp/errors.py), in one import."""

from __future__ import annotations

from emulator.qmp.errors import DeviceNotFound, GenericError, QMPError

__all__ = ["DeviceNotFound", "GenericError", "QMPError"]
