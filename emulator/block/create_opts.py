"""qemu-img create's options: the format's and the protocol's QemuOptsLists, appended.

bdrv_img_create parses ``-o`` into one QemuOpts over both lists (util/qemu-option.c: unknown
names, and values of the wrong type, are refused at once), prints the "Formatting ..." line
from it, and hands it to the format driver. qcow2_co_create_opts then takes its own options
out as a QDict of strings, renames them to blockdev-create's names and reads them with the
QAPI visitor — so an enum value is checked only then, after the line is printed, in
BlockdevCreateOptionsQcow2's member order. :meth:`CreateOpts.qcow2_options` is that step;
the result goes through the same checks as blockdev-create.
"""

from __future__ import annotations

import errno
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from emulator.block.drivers import QEMU_DRIVERS
from emulator.block.errors import GenericError
from emulator.qemu_io import strtosz

UINT64_MAX = (1 << 64) - 1
SIZE_HINT = ("Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
             "and exabytes, respectively.")


@dataclass(frozen=True)
class OptDesc:
    """QemuOptDesc: a name, a QemuOptType, the help text and the default value's text."""

    name: str
    type: str   # "str", "bool", "num" or "size", as qemu_opts_print_help names them
    help: str
    default: str | None = None


_SIZE = OptDesc("size", "size", "Virtual disk size")
QCOW2 = (
    OptDesc("encryption", "bool", "Encrypt the image with format 'aes'. (Deprecated in favor "
                                  "of encrypt.format=aes)"),
    OptDesc("encrypt.format", "str", "Encrypt the image, format choices: 'aes', 'luks'"),
    OptDesc("encrypt.key-secret", "str",
            "ID of secret providing qcow AES key or LUKS passphrase"),
    OptDesc("encrypt.cipher-alg", "str", "Name of encryption cipher algorithm"),
    OptDesc("encrypt.cipher-mode", "str", "Name of encryption cipher mode"),
    OptDesc("encrypt.ivgen-alg", "str", "Name of IV generator algorithm"),
    OptDesc("encrypt.ivgen-hash-alg", "str", "Name of IV generator hash algorithm"),
    OptDesc("encrypt.hash-alg", "str", "Name of encryption hash algorithm"),
    OptDesc("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    OptDesc("cluster_size", "size", "qcow2 cluster size", "65536"),
    OptDesc("extended_l2", "bool", "Extended L2 tables", "off"),
    OptDesc("preallocation", "str",
            "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    OptDesc("compression_type", "str", "Compression method used for image cluster "
                                       "compression", "zlib"),
    _SIZE,
    OptDesc("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptDesc("backing_file", "str", "File name of a base image"),
    OptDesc("backing_fmt", "str", "Image format of the base image"),
    OptDesc("data_file", "str", "File name of an external data file"),
    OptDesc("data_file_raw", "bool", "The external data file must stay valid as a raw image"),
    OptDesc("lazy_refcounts", "bool", "Postpone refcount updates", "off"),
    OptDesc("refcount_bits", "num", "Width of a reference count entry in bits", "16"),
)
RAW = (_SIZE,)
FILE = (   # file-posix's raw_create_opts, the protocol part of every list here
    _SIZE,
    OptDesc("nocow", "bool", "Turn off copy-on-write (valid only on btrfs)"),
    OptDesc("preallocation", "str", "Preallocation mode (allowed values: off, falloc, full)"),
    OptDesc("extent_size_hint", "size", "Extent size hint for the image file, 0 to disable"),
)
FORMATS = {"qcow2": QCOW2, "raw": RAW, "file": FILE}

# qcow2_co_create_opts: QemuOpts names to blockdev-create's, visited in
# BlockdevCreateOptionsQcow2's member order (encrypt.* are one member, "encrypt")
_QCOW2_MEMBERS = (
    ("data_file", "data-file", "str"), ("data_file_raw", "data-file-raw", "bool"),
    ("extended_l2", "extended-l2", "bool"), ("size", "size", "size"),
    ("compat", "version", ("v2", "v3")), ("backing_file", "backing-file", "str"),
    ("backing_fmt", "backing-fmt", QEMU_DRIVERS), ("encrypt", "encrypt", "encrypt"),
    ("cluster_size", "cluster-size", "size"),
    ("preallocation", "preallocation", ("off", "metadata", "falloc", "full")),
    ("lazy_refcounts", "lazy-refcounts", "bool"), ("refcount_bits", "refcount-bits", "int"),
    ("compression_type", "compression-type", ("zlib", "zstd")),
)
_COMPAT = {"0.10": "v2", "1.1": "v3"}
_TRUE, _FALSE = ("on", "yes", "true", "y"), ("off", "no", "false", "n")
_INTEGER = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")


def option_list(fmt: str, protocol: bool = True) -> tuple[OptDesc, ...]:
    """qemu_opts_append of the format's list and the protocol's: the first of a name wins."""
    merged = {d.name: d for d in FORMATS[fmt]}
    for desc in FILE if protocol else ():
        merged.setdefault(desc.name, desc)
    return tuple(merged.values())


def help_text(fmt: str, filename: str | None) -> str:
    """print_block_option_help: the sorted list; without a file name, the format's only."""
    descs = option_list(fmt, protocol=filename is not None)
    lines = []
    for desc in descs:
        kind = {"bool": "bool (on/off)"}.get(desc.type, desc.type)
        lines.append(f"  {desc.name}=<{kind}>".ljust(24) + f" - {desc.help}")
    head = "Supported options:\n" if filename is not None else f"Supported {fmt} options:\n"
    tail = "" if filename is not None else ("\nThe protocol level may support further "
                                            "options.\nSpecify the target filename to include "
                                            "those options.\n")
    return head + "".join(line + "\n" for line in sorted(lines)) + tail


def _integer(text: str) -> int | None:
    """strtoll/strtoull's syntax in base 0 over the whole text, unbounded; None if bad."""
    match = _INTEGER.match(text)
    if match is None:
        return None
    digits = match.group(2)
    value = int(digits, 16 if digits[:2].lower() == "0x" else 8 if digits[:1] == "0" else 10)
    return -value if match.group(1) == "-" else value


def strtou64(text: str) -> int:
    """qemu_strtou64 (base 0, the whole text): negative numbers wrap; -EINVAL, -ERANGE."""
    value = _integer(text)
    if value is None:
        return -errno.EINVAL
    if abs(value) >= 1 << 64:
        return -errno.ERANGE
    return value % (1 << 64)


def parse_bool(name: str, text: str) -> bool:
    """qapi_bool_parse."""
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise GenericError(f"Parameter '{name}' expects 'on' or 'off'")


def parse_size(name: str, text: str) -> int:
    """parse_option_size."""
    value = strtosz(text)
    if value == -errno.ERANGE:
        raise GenericError(f"Value '{text}' is out of range for parameter '{name}'")
    if value < 0:
        raise GenericError(f"Parameter '{name}' expects a non-negative number below 2^64\n"
                           + SIZE_HINT)
    return value


def _parse(desc: OptDesc, text: str) -> int | bool | str:
    """qemu_opt_parse: the value a QemuOpt keeps besides its text."""
    if desc.type == "bool":
        return parse_bool(desc.name, text)
    if desc.type == "size":
        return parse_size(desc.name, text)
    if desc.type == "num":
        value = strtou64(text)
        if value == -errno.ERANGE:
            raise GenericError(f"Value '{text}' is too large for parameter '{desc.name}'")
        if value < 0:
            raise GenericError(f"Parameter '{desc.name}' expects a number")
        return value
    return text


def split_options(text: str) -> list[tuple[str, str]]:
    """get_opt_name_value over a whole ``-o`` text: ``name=value`` (",," is a comma in a
    value), a bare ``name`` is ``name=on`` and ``noname`` is ``name=off``."""
    pairs = []
    pos = 0
    while pos < len(text):
        stop = min((i for i in (text.find("=", pos), text.find(",", pos)) if i >= 0),
                   default=len(text))
        name = text[pos:stop]
        if stop < len(text) and text[stop] == "=":
            value, pos = [], stop + 1
            while pos < len(text):
                if text[pos] == ",":
                    if text[pos + 1:pos + 2] != ",":
                        break
                    pos += 1
                value.append(text[pos])
                pos += 1
            pairs.append((name, "".join(value)))
        elif name.startswith("no"):
            pairs.append((name[2:], "off"))
            pos = stop
        else:
            pairs.append((name, "on"))
            pos = stop
        pos += 1   # the comma
    return pairs


class CreateOpts:
    """A QemuOpts over a format's creation options (and its protocol's)."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.descs = {d.name: d for d in option_list(fmt)}
        self.values: dict[str, tuple[str, int | bool | str]] = {}   # the last setting wins

    def parse(self, text: str) -> None:
        """qemu_opts_do_parse: the first unknown name or bad value stops it."""
        for name, value in split_options(text):
            if name != "id":
                self.set(name, value)

    def set(self, name: str, text: str) -> None:
        """qemu_opt_set (its opt_validate)."""
        desc = self.descs.get(name)
        if desc is None:
            raise GenericError(f"Invalid parameter '{name}'")
        self.values.pop(name, None)
        self.values[name] = (text, _parse(desc, text))

    def set_number(self, name: str, value: int) -> None:
        """qemu_opt_set_number: no parsing; the text is the int64_t's."""
        value %= 1 << 64
        self.values.pop(name, None)
        self.values[name] = (str(value - (1 << 64) if value >= 1 << 63 else value), value)

    def has(self, name: str) -> bool:
        return name in self.descs

    def get(self, name: str) -> str | None:
        entry = self.values.get(name)
        return entry[0] if entry is not None else None

    def get_size(self, name: str) -> int:
        """qemu_opt_get_size, with -1 (as a uint64_t) for an option not set."""
        entry = self.values.get(name)
        return int(entry[1]) if entry is not None else UINT64_MAX

    def line(self) -> str:
        """qemu_opts_print(opts, " "): every option set or with a default, in list order;
        numbers and sizes that were set as their value (an int64_t), commas doubled."""
        words = []
        for desc in self.descs.values():
            entry = self.values.get(desc.name)
            text = entry[0] if entry is not None else desc.default
            if text is None:
                continue
            if desc.type == "str":
                text = text.replace(",", ",,")
            elif desc.type in ("num", "size") and entry is not None:
                number = int(entry[1])
                text = str(number - (1 << 64) if number >= 1 << 63 else number)
            words.append(f"{desc.name}={text}")
        return " ".join(words)

    def qcow2_options(self) -> Callable[[], dict[str, Any]]:
        """qcow2_co_create_opts in its two steps: the options set, renamed, now (the one
        error there: encryption and encrypt.format together); the returned function then
        reads them as blockdev-create's qcow2 branch (enum values checked, members in QAPI
        order, the size rounded up to a sector as it "silently" is), which QEMU does only
        once the file is made."""
        encrypt = self._encrypt()
        return functools.partial(self._visit_qcow2, encrypt)

    def _visit_qcow2(self, encrypt: dict[str, str] | None) -> dict[str, Any]:
        options: dict[str, Any] = {}
        for key, member, kind in _QCOW2_MEMBERS:
            if kind == "encrypt":
                if encrypt is not None:
                    options[member] = _visit_encrypt(encrypt)
                continue
            text = self.get(key)
            if text is None:
                continue
            if key == "compat":
                text = _COMPAT.get(text, text)
            value: object = text
            if kind == "bool":
                value = parse_bool(member, text)
            elif kind == "size":
                value = parse_size(member, text)
            elif kind == "int":   # qemu_strtoi64
                value = _integer(text)
                if value is None or not -(1 << 63) <= value < 1 << 63:
                    raise GenericError(f"Parameter '{member}' expects integer")
            elif isinstance(kind, tuple) and text not in kind:
                raise GenericError(f"Parameter '{member}' does not accept value '{text}'")
            options[member] = value
        size = options.get("size")
        if isinstance(size, int):
            options["size"] = -(-size // 512) * 512
        return options

    def _encrypt(self) -> dict[str, str] | None:
        """The encrypt.* options, the deprecated ``encryption`` among them (on: format
        "qcow"), as qdict_rename_keys leaves them."""
        given = {name[len("encrypt."):]: text for name, (text, _) in self.values.items()
                 if name.startswith("encrypt.")}
        alias = self.get("encryption")
        if alias is not None and alias != "off":
            if "format" in given:
                raise GenericError("'encrypt.format' and its alias 'encryption' can't be used "
                                   "at the same time")
            given["format"] = "qcow" if alias == "on" else alias
        return given or None


def _visit_encrypt(given: dict[str, str]) -> dict[str, object]:
    """QCryptoBlockCreateOptions: the format picks the branch ("aes" is qcow)."""
    given = dict(given)
    fmt = given.pop("format", None)
    if fmt is None:
        raise GenericError("Parameter 'encrypt.format' is missing")
    fmt = "qcow" if fmt == "aes" else fmt
    if fmt not in ("qcow", "luks"):
        raise GenericError(f"Parameter 'format' does not accept value '{fmt}'")
    return {"format": fmt, **given}
