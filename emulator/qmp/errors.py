"""The QMP error classes a command handler raises; the dispatcher turns one into
``{"error": {"class": error_class, "desc": desc}}``."""

from __future__ import annotations

from typing import Self


class QMPError(Exception):
    """A failed command, with QEMU's error class and human-readable description."""

    error_class = "GenericError"

    def __init__(self, desc: str, *, hint: str = "") -> None:
        super().__init__(desc)
        self.desc = desc
        # error_append_hint(): a line tools print after the message; QMP replies drop it
        self.hint = hint

    def report_text(self) -> str:
        """error_report_err: the message, and the hint on the next line if there is one."""
        return f"{self.desc}\n{self.hint}" if self.hint else self.desc

    def prepend(self, prefix: str) -> Self:
        """error_prepend(): ``prefix`` goes before the message; the class and the hint stay
        (qemu-img and qemu-io still print "Is another process using the image [x]?" under
        "Could not open backing file: ...")."""
        self.desc = prefix + self.desc
        self.args = (self.desc,)
        return self


class GenericError(QMPError):
    """QEMU's ERROR_CLASS_GENERIC_ERROR: almost every failure."""


class CommandNotFound(QMPError):
    error_class = "CommandNotFound"


class DeviceNotFound(QMPError):
    error_class = "DeviceNotFound"


class DeviceNotActive(QMPError):
    """ERROR_CLASS_DEVICE_NOT_ACTIVE, e.g. "Block job 'j' not found"."""

    error_class = "DeviceNotActive"


class KVMMissingCap(QMPError):
    error_class = "KVMMissingCap"


def error_object(err: QMPError) -> dict[str, str]:
    """qmp_build_error_object(): the value of a reply's "error" member."""
    return {"class": err.error_class, "desc": err.desc}
