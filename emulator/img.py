"""The qemu-img subset the harness needs, so the emulator backend needs no QEMU binary.

Verbs: ``create`` (qcow2, raw), ``compare``, ``rebase -u``, ``check``, ``info --output=json``,
``map --output=json`` and ``bitmap``, as Python functions taking a `Sandbox` (every path,
backing files included, is resolved through it) and as `main(argv)`, which mirrors qemu-img's
command line, messages and exit codes for those verbs.
"""

from __future__ import annotations

import errno
import getopt
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from emulator import qemu_io
from emulator.block import create as create_image
from emulator.block import locking
from emulator.block import perm as P
from emulator.block.create_opts import UINT64_MAX, CreateOpts, help_text, split_options
from emulator.block.errors import GenericError
from emulator.block.open import backing_definition, json_filename_options
from emulator.block.probe import BLOCK_PROBE_BUF_SIZE, probe
from emulator.qcow2 import (
    Backing,
    CheckResult,
    FileIO,
    Qcow2Error,
    Qcow2Image,
    Status,
    StoredBitmap,
)
from emulator.qcow2.blockio import tool_stderr
from emulator.qcow2.check import FIX_ERRORS, FIX_LEAKS
from emulator.qcow2.image import Report
from emulator.qmp.json_writer import qdict_keys, quote
from emulator.sandbox import Sandbox, SandboxError

IO_BUF_SIZE = 2 * 1024 * 1024  # qemu-img.c: compare reads at most this much at a time
SECTOR = 512


class ImgError(Exception):
    """A failed verb: the message qemu-img prints after "qemu-img: ", its exit code, and
    what it had already printed to stdout (create prints "Formatting ..." first)."""

    def __init__(self, message: str, exit_code: int = 1, *, stdout: str = "",
                 newline: bool = True) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stdout = stdout
        self.newline = newline


# -- opening images and backing chains ----------------------------------------------------------
@dataclass
class Extent:
    """One answer of block status for a whole chain (bdrv_block_status and friends)."""

    length: int
    data: bool
    zero: bool
    present: bool  # BDRV_BLOCK_ALLOCATED: some layer of the chain decides these bytes
    depth: int  # how many backing links down that layer is
    offset: int | None  # host offset in that layer's file (BDRV_BLOCK_OFFSET_VALID)


class Image:
    """An open image (qcow2 or raw) with its backing chain: what qemu-img's img_open gives.

    Opening fails with `OpenError` carrying QEMU's message for the node itself ("Could not
    open 'x': No such file or directory", "Image is not in qcow2 format", "Could not open
    backing file: ..."); `open_image` adds img_open's "Could not open '<filename>': ".
    """

    def __init__(self, sandbox: Sandbox, path: Path, name: str, fmt: str | None, *,
                 writable: bool = False, open_backing: bool = True, depth: int = 0,
                 check_mode: bool = False, report: Report | None = None,
                 force_share: bool = False, backing: dict[str, Any] | None = None) -> None:
        self.path = path
        self.backing: Image | None = None
        self.qcow2: Qcow2Image | None = None
        try:
            self.io = FileIO(path, read_only=not writable)
        except OSError as exc:
            raise OpenError(f"Could not open '{name}': "
                            f"{os.strerror(exc.errno or errno.EIO)}") from None
        try:
            self.format = fmt or _probe(self.io)
            if self.format in ("qcow2", "raw"):
                self._lock(name, writable, force_share)
            if self.format == "qcow2":
                self.qcow2 = Qcow2Image.open(self.io, read_only=not writable,
                                             check_mode=check_mode, report=report)
            elif self.format != "raw":
                raise OpenError(f"Unknown driver '{self.format}'")
            if open_backing and self.qcow2 is not None and \
                    (backing is not None or self.qcow2.backing_file):
                self.backing = self._open_backing(sandbox, depth, force_share, backing)
        except Qcow2Error as exc:
            self.close()
            raise OpenError(str(exc)) from None
        except OpenError:
            self.close()
            raise

    def _open_described(self, sandbox: Sandbox, options: dict[str, Any], depth: int,
                        force_share: bool) -> Image:
        """A backing node given as options (a qcow2 or raw image over a file, its own
        backing again as options, or none with "backing": null); the file name is the
        process's, as QEMU takes it (relative to the working directory)."""
        file = options.get("file")
        filename = file.get("filename") if isinstance(file, dict) and \
            file.get("driver", "file") == "file" else None
        nested = options.get("backing", {})
        driver = options.get("driver") or None
        if not isinstance(filename, str) or driver not in (None, "qcow2", "raw") or \
                not isinstance(nested, dict | None):
            raise OpenError("The emulator's qemu-img opens a described (json:) backing file "
                            "only as a qcow2 or raw image over a file")
        return Image(sandbox, sandbox.resolve(filename), filename, driver, depth=depth + 1,
                     force_share=force_share, open_backing=nested is not None,
                     backing=nested or None)

    def _lock(self, name: str, writable: bool, force_share: bool) -> None:
        """The lock bytes the image's file node would hold under qemu-img: a qcow2 node
        takes consistent read (and write and resize when writable) and shares neither
        write nor resize; a raw one passes its user's permissions through, sharing all;
        -U (force-share) shares all."""
        qcow2 = self.format == "qcow2"
        perm = P.CONSISTENT_READ | (P.WRITE | (P.RESIZE if qcow2 else 0) if writable else 0)
        shared = P.ALL if force_share or not qcow2 else P.ALL & ~(P.WRITE | P.RESIZE)
        try:
            locking.lock(self.io.fileno(), perm, shared, name)
        except GenericError as exc:
            raise OpenError(exc.report_text()) from None

    def _open_backing(self, sandbox: Sandbox, depth: int, force_share: bool,
                      options: dict[str, Any] | None) -> Image:
        """bdrv_open_backing_file: the header's backing file, or what a json:{...} name or
        a described parent gives as the backing node's options."""
        assert self.qcow2 is not None
        name = self.qcow2.backing_file or ""
        try:
            if depth >= 64:
                raise OpenError("Backing chain too deep")
            fmt = self.qcow2.backing_format
            if options is not None:   # given as options: their driver, else the format
                return self._open_described(sandbox, {"driver": fmt, **options}, depth,
                                            force_share)
            if json_filename_options(name) is not None:
                return self._open_described(sandbox, backing_definition(name, fmt), depth,
                                            force_share)
            path = sandbox.resolve_backing(self.path, name)
            return Image(sandbox, path, name, self.qcow2.backing_format, depth=depth + 1,
                         force_share=force_share)
        except SandboxError as exc:
            raise OpenError(f"Could not open backing file: {exc.desc}") from None
        except OpenError as exc:
            raise OpenError(f"Could not open backing file: {exc}") from None

    @property
    def size(self) -> int:
        return self.qcow2.size if self.qcow2 is not None else self.io.length()

    def read(self, offset: int, length: int) -> bytes:
        """Guest data through the whole chain; past the end of this image, zeroes."""
        inside = max(0, min(length, self.size - offset))
        if self.qcow2 is not None:
            data = self.qcow2.read(offset, inside, self._backing_reader())
        else:
            data = self.io.pread(offset, inside)
        return data + bytes(length - inside)

    def _backing_reader(self) -> Backing | None:
        return self.backing.read if self.backing is not None else None

    def layer_status(self, offset: int, length: int) -> Extent:
        """bdrv_block_status of this layer alone (depth 0); unallocated extents report
        zero only where nothing below could supply data."""
        if self.qcow2 is None:
            return self._raw_status(offset, length)
        preallocated = self.qcow2.metadata_preallocated()
        status, nbytes, host = self.qcow2.map_extent(offset, length)
        if status is Status.DATA:
            if preallocated and host is not None:   # BDRV_BLOCK_RECURSE: the file decides
                file = self._raw_status(host, nbytes)
                return Extent(file.length, True, file.zero, True, 0, host)
            return Extent(nbytes, True, False, True, 0, host)
        if status is Status.ZERO:
            return Extent(nbytes, False, True, True, 0, host)
        below = self.backing
        zero = below is None or offset >= below.size
        return Extent(nbytes, False, zero, False, 0, None)

    def _raw_status(self, offset: int, length: int) -> Extent:
        """file-posix's SEEK_DATA/SEEK_HOLE: holes, and what lies past the end of the file,
        read as zeroes; everything is present."""
        fd, end = self.io.fileno(), self.io.length()
        if offset >= end:
            return Extent(length, False, True, True, 0, offset)
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:   # ENXIO: a hole up to the end
            data = end
        if data > offset:
            return Extent(min(length, data - offset), False, True, True, 0, offset)
        hole = os.lseek(fd, offset, os.SEEK_HOLE)
        return Extent(min(length, hole - offset), True, False, True, 0, offset)

    def chain_status(self, offset: int, length: int) -> Extent:
        """get_block_status in qemu-img map: go down the chain until a layer decides."""
        image: Image | None = self
        depth = 0
        while True:
            assert image is not None
            extent = image.layer_status(offset, length)
            extent.depth = depth
            if extent.data or extent.zero or image.backing is None:
                return extent
            length = extent.length
            image = image.backing
            depth += 1

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()
        if self.qcow2 is not None:
            self.qcow2.close()
        self.io.close()


def _probe(io: FileIO) -> str:
    """find_image_format: the first bytes decide (an empty file reads as zeroes: raw)."""
    return probe(io.pread(0, BLOCK_PROBE_BUF_SIZE))


class OpenError(Exception):
    """An image node that cannot be opened, with QEMU's message for it."""


def open_image(sandbox: Sandbox, filename: str, fmt: str | None = None, *,
               writable: bool = False, open_backing: bool = True,
               exit_code: int = 1, check_mode: bool = False,
               report: Report | None = None, force_share: bool = False) -> Image:
    """img_open: the image and its backing chain, or ImgError("Could not open ...").
    ``check_mode`` is BDRV_O_CHECK; ``report`` gets what qcow2 prints (a dirty image's
    repair)."""
    try:
        path = sandbox.resolve(filename)
        return Image(sandbox, path, filename, fmt, writable=writable,
                     open_backing=open_backing, check_mode=check_mode, report=report,
                     force_share=force_share)
    except SandboxError as exc:
        raise ImgError(f"Could not open '{filename}': {exc.desc}", exit_code) from None
    except OpenError as exc:
        raise ImgError(f"Could not open '{filename}': {exc}", exit_code) from None


@contextmanager
def opened(sandbox: Sandbox, filename: str, fmt: str | None = None, *,
           writable: bool = False, open_backing: bool = True, check_mode: bool = False,
           report: Report | None = None, force_share: bool = False) -> Iterator[Image]:
    image = open_image(sandbox, filename, fmt, writable=writable, open_backing=open_backing,
                       check_mode=check_mode, report=report, force_share=force_share)
    try:
        yield image
    finally:
        image.close()


# -- create -------------------------------------------------------------------------------------
def create(sandbox: Sandbox, filename: str, fmt: str, size: int | None, *,
           backing_file: str | None = None, backing_format: str | None = None,
           options: str | None = None, no_backing: bool = False) -> str:
    """bdrv_img_create for qemu-img create: make the image and return the "Formatting ..."
    line qemu-img prints. ``options`` is the ``-o`` text; ``no_backing`` is ``-u`` (the
    backing file is not opened). Without a size, the image takes its backing file's."""
    try:
        return _create(sandbox, filename, fmt, size, backing_file, backing_format, options,
                       no_backing)
    except GenericError as exc:
        raise ImgError(f"{filename}: {exc.desc}") from None


def _create(sandbox: Sandbox, filename: str, fmt: str, size: int | None,
            backing_file: str | None, backing_format: str | None, options: str | None,
            no_backing: bool) -> str:
    create_image.check_format(fmt)
    create_image.check_emulated(fmt)   # (the emulator knows the options of these alone)
    opts = CreateOpts(fmt)
    if options:
        opts.parse(options)
    if opts.get("size") is None:
        opts.set_number("size", size if size is not None else UINT64_MAX)
    elif size is not None:
        raise GenericError("The image size must be specified only once")
    for name, value, what in (("backing_file", backing_file, "Backing file"),
                              ("backing_fmt", backing_format, "Backing file format")):
        if value is not None:
            if not opts.has(name):
                raise GenericError(f"{what} not supported for file format '{fmt}'")
            opts.set(name, value)
    backing_file, backing_format = opts.get("backing_file"), opts.get("backing_fmt")
    create_image.check_backing(filename, backing_file)
    image_size = opts.get_size("size")
    if backing_file and not no_backing:
        image_size = _backing_size(sandbox, filename, backing_file, backing_format, image_size)
        opts.set_number("size", image_size)
    elif backing_file and not backing_format:
        raise GenericError("Backing file specified without backing format")
    if image_size == UINT64_MAX:
        raise GenericError("Image creation needs a size parameter")
    line = f"Formatting '{filename}', fmt={fmt} {opts.line()}\n"
    try:
        qcow2 = opts.qcow2_options() if fmt == "qcow2" else None   # the renames' checks
        path = sandbox.resolve(filename, for_create=True)
        hint = opts.get_size("extent_size_hint")
        create_image.write(path, filename, fmt, -(-image_size // 512) * 512, qcow2,
                           preallocation=None if fmt == "qcow2" else opts.get("preallocation"),
                           extent_size_hint=None if hint == UINT64_MAX else hint)
    except (SandboxError, GenericError) as exc:
        raise ImgError(f"{filename}: {exc.report_text()}", stdout=line) from None
    return line


def _backing_size(sandbox: Sandbox, filename: str, backing_file: str,
                  backing_format: str | None, size: int) -> int:
    """bdrv_img_create's look at the backing file (opened without I/O): its format must be
    given, and it gives the size when there is none."""
    try:
        path = sandbox.resolve_backing(Path(filename), backing_file)
        backing = Image(sandbox, path, backing_file, backing_format, open_backing=False)
    except (SandboxError, OpenError) as exc:
        detail = exc.desc if isinstance(exc, SandboxError) else str(exc)
        raise ImgError(f"{filename}: {detail}\nCould not open backing image.") from None
    backing.close()
    if not backing_format:
        raise ImgError(f"{filename}: Backing file specified without backing format\n"
                       f"Detected format of {backing.format}.", newline=False)
    return backing.size if size == UINT64_MAX else size


# -- compare ------------------------------------------------------------------------------------
@dataclass
class CompareResult:
    """img_compare's exit code (0 identical, 1 different, 2 open error, 3 block status
    error, 4 read error) and what it printed to stdout."""

    exit_code: int
    output: str


def compare(sandbox: Sandbox, filename1: str, filename2: str, *, fmt1: str | None = None,
            fmt2: str | None = None, strict: bool = False,
            force_share: bool = False) -> CompareResult:
    """img_compare: allocation-aware comparison; unallocated and zero ranges are equal."""
    image1 = open_image(sandbox, filename1, fmt1, exit_code=2, force_share=force_share)
    try:
        image2 = open_image(sandbox, filename2, fmt2, exit_code=2, force_share=force_share)
    except ImgError:
        image1.close()
        raise
    try:
        return _compare(image1, image2, strict)
    except OSError as exc:
        raise ImgError(f"Error while reading: {os.strerror(exc.errno or errno.EIO)}", 4) \
            from None
    finally:
        image1.close()
        image2.close()


def _compare(image1: Image, image2: Image, strict: bool) -> CompareResult:
    size1, size2 = image1.size, image2.size
    if strict and size1 != size2:
        return CompareResult(1, "Strict mode: Image size mismatch!\n")
    offset = 0
    while offset < min(size1, size2):
        status1 = _status_above(image1, offset, size1 - offset)
        status2 = _status_above(image2, offset, size2 - offset)
        chunk = min(status1[2], status2[2])
        if strict and status1[:2] != status2[:2]:
            return CompareResult(1, f"Strict mode: Offset {offset} block status mismatch!\n")
        if status1[1] and status2[1]:
            pass
        elif status1[0] == status2[0]:
            if status1[0]:
                chunk = min(chunk, IO_BUF_SIZE)
                mismatch = _first_difference(image1.read(offset, chunk),
                                             image2.read(offset, chunk))
                if mismatch is not None:
                    return CompareResult(1, f"Content mismatch at offset {offset + mismatch}!\n")
        else:
            chunk = min(chunk, IO_BUF_SIZE)
            only_allocated = image1 if status1[0] else image2
            nonzero = _first_nonzero_sector(only_allocated.read(offset, chunk))
            if nonzero is not None:
                return CompareResult(1, f"Content mismatch at offset {offset + nonzero}!\n")
        offset += chunk
    output = ""
    if size1 != size2:
        output = "Warning: Image size mismatch!\n"
        longer, end = (image1, size1) if size1 > size2 else (image2, size2)
        while offset < end:
            allocated, zero, chunk = _status_above(longer, offset, end - offset)
            if allocated and not zero:
                chunk = min(chunk, IO_BUF_SIZE)
                nonzero = _first_nonzero_sector(longer.read(offset, chunk))
                if nonzero is not None:
                    return CompareResult(1, output +
                                         f"Content mismatch at offset {offset + nonzero}!\n")
            offset += chunk
    return CompareResult(0, output + "Images are identical.\n")


def _status_above(image: Image, offset: int, length: int) -> tuple[bool, bool, int]:
    """bdrv_block_status_above(bs, NULL): (allocated in some layer, reads as zero, length)."""
    extent = image.chain_status(offset, length)
    return extent.present, extent.zero, extent.length


def _first_difference(a: bytes, b: bytes) -> int | None:
    """compare_buffers: the start of the first differing 512-byte sector, or None."""
    if a == b:
        return None
    for start in range(0, len(a), SECTOR):
        if a[start:start + SECTOR] != b[start:start + SECTOR]:
            return start
    return None


def _first_nonzero_sector(data: bytes) -> int | None:
    """find_nonzero: the start of the first 512-byte sector holding a non-zero byte."""
    stripped = data.lstrip(b"\0")
    if not stripped:
        return None
    return (len(data) - len(stripped)) // SECTOR * SECTOR


# -- rebase -u ----------------------------------------------------------------------------------
def rebase_unsafe(sandbox: Sandbox, filename: str, backing_file: str,
                  backing_format: str | None, fmt: str | None = None, *,
                  report: Report | None = None) -> None:
    """``qemu-img rebase -u``: only the header's backing file name and format change (a
    dirty image is repaired as it opens; ``report`` gets what the repair prints)."""
    if backing_file and not backing_format:
        raise ImgError(f"Could not change the backing file to '{backing_file}': backing "
                       "format must be specified")
    with opened(sandbox, filename, fmt, writable=True, open_backing=False,
                report=report) as image:
        if image.qcow2 is None:
            raise ImgError(f"Could not change the backing file to '{backing_file}': "
                           "Operation not supported")
        image.qcow2.set_backing(backing_file or None, backing_format)


# -- check --------------------------------------------------------------------------------------
@dataclass
class CheckReport:
    """img_check: exit code (0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 format
    without checks), the summary on stdout and qcow2's findings on stderr."""

    exit_code: int
    output: str
    messages: str
    result: CheckResult | None = None


def check(sandbox: Sandbox, filename: str, fmt: str | None = None, *,
          output_format: str = "human", fix: int = 0,
          force_share: bool = False) -> CheckReport:
    """img_check: the image opened with BDRV_O_CHECK and its backing chain (read-write to
    repair: ``fix`` is BDRV_FIX_LEAKS / BDRV_FIX_ERRORS), checked, and checked again after a
    repair."""
    with opened(sandbox, filename, fmt, writable=bool(fix), check_mode=True,
                force_share=force_share) as image:
        if image.qcow2 is None:
            return CheckReport(63, "", "qemu-img: This image format does not support checks\n")
        qcow2 = image.qcow2
        try:
            loaded = qcow2.load_bitmaps(mark_in_use=True) if fix else []
            report = _check_qcow2(qcow2, filename, image.format, output_format, fix)
        except Qcow2Error as exc:   # refused: nothing more is written, not even at close
            image.qcow2 = None
            raise ImgError(str(exc)) from None
        _store_bitmaps(qcow2, loaded)
        return report


def _store_bitmaps(qcow2: Qcow2Image, loaded: list[StoredBitmap]) -> None:
    """qcow2_inactivate's qcow2_store_persistent_dirty_bitmaps for an image opened
    read-write by qemu-img: the bitmaps loaded consistent at open (and marked in use then) are
    written anew; those already in use stay as they are."""
    qcow2.store_bitmaps([sb for sb in loaded if not sb.in_use])


def _check_qcow2(qcow2: Qcow2Image, filename: str, fmt: str, output_format: str,
                 fix: int) -> CheckReport:
    """img_check after img_open: collect_image_check, the repair summary and the second
    check, the dump, the exit code."""
    result = qcow2.check(fix)
    lines = list(result.messages)
    output = ""
    if result.ret == 0 and (result.corruptions_fixed or result.leaks_fixed):
        if output_format == "human":
            output += ("The following inconsistencies were found and repaired:\n\n"
                       f"    {result.leaks_fixed} leaked clusters\n"
                       f"    {result.corruptions_fixed} corruptions\n\n"
                       "Double checking the fixed image now...\n")
        fixed = result
        result = qcow2.check()
        lines += result.messages
        result.leaks_fixed = fixed.leaks_fixed
        result.corruptions_fixed = fixed.corruptions_fixed
    messages = "".join(line + "\n" for line in lines)
    if result.ret == 0:
        output += (_check_json(result, filename, fmt) if output_format == "json"
                   else _check_human(result))
    if result.ret or result.check_errors:
        reason = f": {os.strerror(-result.ret)}" if result.ret else ""
        return CheckReport(1, output, messages + f"qemu-img: Check failed{reason}\n", result)
    exit_code = 2 if result.corruptions else 3 if result.leaks else 0
    return CheckReport(exit_code, output, messages, result)


def _check_human(result: CheckResult) -> str:
    """dump_human_image_check."""
    if not (result.corruptions or result.leaks or result.check_errors):
        out = "No errors were found on the image.\n"
    else:
        out = ""
        if result.corruptions:
            out += (f"\n{result.corruptions} errors were found on the image.\nData may be "
                    "corrupted, or further writes to the image may corrupt it.\n")
        if result.leaks:
            out += (f"\n{result.leaks} leaked clusters were found on the image.\nThis means "
                    "waste of disk space, but no harm to data.\n")
        if result.check_errors:
            out += (f"\n{result.check_errors} internal errors have occurred during the "
                    "check.\n")
    if result.total_clusters and result.allocated_clusters:
        allocated = result.allocated_clusters
        out += (f"{allocated}/{result.total_clusters} = "
                f"{allocated * 100 / result.total_clusters:0.2f}% allocated, "
                f"{result.fragmented_clusters * 100 / allocated:0.2f}% fragmented, "
                f"{result.compressed_clusters * 100 / allocated:0.2f}% compressed clusters\n")
    if result.image_end_offset:
        out += f"Image end offset: {result.image_end_offset}\n"
    return out


def _check_json(result: CheckResult, filename: str, fmt: str) -> str:
    """dump_json_image_check: ImageCheck, optional members only when non-zero."""
    fields: dict[str, Any] = {"filename": filename, "format": fmt,
                              "check-errors": result.check_errors}
    for key, value in (("image-end-offset", result.image_end_offset),
                       ("corruptions", result.corruptions), ("leaks", result.leaks),
                       ("corruptions-fixed", result.corruptions_fixed),
                       ("leaks-fixed", result.leaks_fixed),
                       ("total-clusters", result.total_clusters),
                       ("allocated-clusters", result.allocated_clusters),
                       ("fragmented-clusters", result.fragmented_clusters),
                       ("compressed-clusters", result.compressed_clusters)):
        if value:
            fields[key] = value
    return to_json_pretty(fields) + "\n"


# -- info and map -------------------------------------------------------------------------------
def info(sandbox: Sandbox, filename: str, fmt: str | None = None, *,
         force_share: bool = False) -> dict[str, Any]:
    """``qemu-img info --output=json`` as a dict in QAPI member order (ImageInfo)."""
    with opened(sandbox, filename, fmt, open_backing=False, force_share=force_share) as image:
        fields: dict[str, Any] = {
            "filename": filename, "format": image.format,
            "dirty-flag": image.qcow2 is not None and image.qcow2.get_info()["is_dirty"],
            "actual-size": image.io.allocated_size(), "virtual-size": image.size}
        qcow2 = image.qcow2
        if qcow2 is None:
            return fields
        fields["cluster-size"] = qcow2.cluster_size
        if qcow2.backing_file:
            fields["backing-filename"] = qcow2.backing_file
            fields["full-backing-filename"] = _full_backing_filename(filename,
                                                                     qcow2.backing_file)
            if qcow2.backing_format:
                fields["backing-filename-format"] = qcow2.backing_format
        fields["format-specific"] = {"type": "qcow2", "data": qcow2.specific_info()}
        return fields


def info_chain(sandbox: Sandbox, filename: str, fmt: str | None, *, chain: bool,
               force_share: bool = False) -> list[dict[str, Any]]:
    """collect_image_info_list: the image's info and, with ``chain`` (--backing-chain), each
    backing file's in turn, by its full name and recorded format; a name met twice is a
    loop."""
    infos: list[dict[str, Any]] = []
    seen: set[str] = set()
    name: str | None = filename
    while name is not None:
        if name in seen:
            raise ImgError(f"Backing file '{name}' creates an infinite loop.")
        seen.add(name)
        infos.append(info(sandbox, name, fmt, force_share=force_share))
        if not chain:
            break
        name, fmt = (infos[-1].get("full-backing-filename"),
                     infos[-1].get("backing-filename-format"))
    return infos


def _full_backing_filename(filename: str, backing_file: str) -> str:
    """bdrv_get_full_backing_filename: relative to the image's directory (path_combine)."""
    if os.path.isabs(backing_file) or "/" not in filename:
        return backing_file
    return filename[:filename.rindex("/") + 1] + backing_file


def map_image(sandbox: Sandbox, filename: str, fmt: str | None = None, *,
              force_share: bool = False) -> list[dict[str, Any]]:
    """``qemu-img map --output=json``: merged extents of the whole chain (img_map)."""
    entries: list[dict[str, Any]] = []
    with opened(sandbox, filename, fmt, force_share=force_share) as image:
        size = image.size
        offset = 0
        while offset < size:
            extent = image.chain_status(offset, size - offset)
            entry = {"start": offset, "length": extent.length, "depth": extent.depth,
                     "present": extent.present, "zero": extent.zero, "data": extent.data}
            if extent.offset is not None:
                entry["offset"] = extent.offset
            if entries and _mergeable(entries[-1], entry):
                entries[-1]["length"] += extent.length
            else:
                entries.append(entry)
            offset += extent.length
    return entries


def _mergeable(current: dict[str, Any], following: dict[str, Any]) -> bool:
    """entry_mergeable."""
    if any(current[k] != following[k] for k in ("zero", "data", "depth", "present")):
        return False
    if ("offset" in current) != ("offset" in following):
        return False
    return "offset" not in current or \
        current["offset"] + current["length"] == following["offset"]


def map_json(entries: list[dict[str, Any]]) -> str:
    """dump_map_entry's JSON lines, as qemu-img prints them."""
    lines = []
    for entry in entries:
        text = (f'{{ "start": {entry["start"]}, "length": {entry["length"]}, '
                f'"depth": {entry["depth"]}, "present": {_bool(entry["present"])}, '
                f'"zero": {_bool(entry["zero"])}, "data": {_bool(entry["data"])}')
        if "offset" in entry:
            text += f', "offset": {entry["offset"]}'
        lines.append(text + "}")
    return "[" + ",\n".join(lines) + "]\n"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def to_json_pretty(obj: Any, indent: int = 0) -> str:
    """qobject_to_json_pretty: four-space indents, members in QDict order."""
    pad = "\n" + " " * (4 * (indent + 1))
    end = "\n" + " " * (4 * indent)
    if isinstance(obj, dict):
        members = [pad + quote(k) + ": " + to_json_pretty(obj[k], indent + 1)
                   for k in qdict_keys(obj)]
        return "{" + ",".join(members) + end + "}"
    if isinstance(obj, list):
        return "[" + ",".join(pad + to_json_pretty(v, indent + 1) for v in obj) + end + "]"
    if isinstance(obj, bool):
        return _bool(obj)
    if isinstance(obj, str):
        return quote(obj)
    return str(obj)


# -- command line -------------------------------------------------------------------------------
def main(argv: list[str], *, sandbox: Sandbox | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """``qemu-img VERB ...`` for the verbs above; returns qemu-img's exit code. Paths are
    checked against `sandbox` (default: the current directory)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    box = sandbox or Sandbox(os.getcwd())
    if not argv:
        err.write("qemu-img: Not enough arguments\nTry 'qemu-img --help' for more "
                  "information\n")
        return 1
    verb = _VERBS.get(argv[0])
    if verb is None:
        err.write(f"qemu-img: Command not found: {argv[0]}\n")
        return 1
    try:
        with tool_stderr("qemu-img", err.write):
            return verb(box, argv[1:], out, err)
    except ImgError as exc:
        if "-q" not in argv:
            out.write(exc.stdout)
        err.write(f"qemu-img: {exc}" + "\n" * exc.newline)
        return exc.exit_code
    except getopt.GetoptError as exc:
        err.write(f"qemu-img: {exc.msg}\nTry 'qemu-img --help' for more information\n")
        return 1


def _force_share(flags: dict[str, str]) -> bool:
    """-U / --force-share: the image is opened sharing every permission."""
    return "-U" in flags or "--force-share" in flags


def _usage_error(message: str) -> ImgError:
    return ImgError(f"{message}\nTry 'qemu-img --help' for more information")


def _main_create(box: Sandbox, args: list[str], out: TextIO, err: TextIO) -> int:
    options, operands = getopt.gnu_getopt(args, "F:b:f:ho:qu", ["object=", "help"])
    values: dict[str, str | None] = {"fmt": "raw", "backing_file": None,
                                     "backing_format": None}
    create_opts: str | None = None
    quiet = no_backing = False
    for flag, value in options:
        if flag == "-f":
            values["fmt"] = value
        elif flag == "-b":
            values["backing_file"] = value
        elif flag == "-F":
            values["backing_format"] = value
        elif flag == "-o":   # accumulate_options
            trailing = len(value) - len(value.rstrip(","))
            if not value or value[0] == "," or trailing % 2:
                raise ImgError(f"Invalid option list: {value}")
            create_opts = value if create_opts is None else f"{create_opts},{value}"
        elif flag == "-q":
            quiet = True
        elif flag == "-u":
            no_backing = True
    fmt = str(values["fmt"])
    if create_opts and any(name in ("help", "?") for name, _ in split_options(create_opts)):
        try:   # print_block_option_help
            create_image.check_format(fmt)
            create_image.check_emulated(fmt)
        except GenericError as exc:
            raise ImgError(exc.desc) from None
        out.write(help_text(fmt, operands[0] if operands else None))
        return 0
    if not operands:
        raise _usage_error("Expecting image file name")
    if len(operands) > 2:
        raise _usage_error("Unexpected argument: " + operands[2])
    size = None
    if len(operands) == 2:
        size = _cvtnum("image size", operands[1])
    line = create(box, operands[0], fmt, size, backing_file=values["backing_file"],
                  backing_format=values["backing_format"], options=create_opts,
                  no_backing=no_backing)
    if not quiet:
        out.write(line)
    return 0


def _main_compare(box: Sandbox, args: list[str], out: TextIO, err: TextIO) -> int:
    options, operands = getopt.gnu_getopt(args, "hf:F:T:pqsU",
                                          ["object=", "image-opts", "force-share"])
    flags = dict(options)
    if len(operands) != 2:
        raise _usage_error("Expecting two image file names")
    try:
        result = compare(box, operands[0], operands[1], fmt1=flags.get("-f"),
                         fmt2=flags.get("-F"), strict="-s" in flags,
                         force_share=_force_share(flags))
    except ImgError as exc:
        err.write(f"qemu-img: {exc}\n")
        return exc.exit_code
    if "-q" not in flags:
        out.write(result.output)
    return result.exit_code


def _main_rebase(box: Sandbox, args: list[str], out: TextIO, err: TextIO) -> int:
    options, operands = getopt.gnu_getopt(args, "hf:F:b:upt:T:qU",
                                          ["object=", "image-opts", "force-share"])
    flags = dict(options)
    if len(operands) != 1:
        raise _usage_error("Expecting one image file name")
    if "-b" not in flags:
        raise ImgError("Must specify backing file (-b) or use unsafe mode (-u)" if "-u"
                       not in flags else "Expecting backing file name")
    if "-u" not in flags:
        raise ImgError("The emulator's qemu-img does only unsafe rebases (-u)")
    rebase_unsafe(box, operands[0], flags["-b"], flags.get("-F"), flags.get("-f"),
                  report=err.write)
    return 0


def _main_check(box: Sandbox, args: list[str], out: TextIO, err: TextIO) -> int:
    options, operands = getopt.gnu_getopt(args, "hf:r:T:qU",
                                          ["output=", "object=", "image-opts", "force-share",
                                           "repair=", "format="])
    options = [({"--repair": "-r", "--format": "-f"}.get(k, k), v) for k, v in options]
    fix = 0
    for flag, value in options:
        if flag == "-r":
            if value not in _REPAIR_MODES:
                raise _usage_error("Unknown option value for -r (expecting 'leaks' or "
                                   f"'all'): {value}")
            fix = _REPAIR_MODES[value]
    flags = dict(options)
    if len(operands) != 1:
        raise _usage_error("Expecting one image file name")
    output_format = flags.get("--output", "human")
    if output_format not in ("human", "json"):
        raise ImgError("--output must be used with human or json as argument.")
    report = check(box, operands[0], flags.get("-f"), output_format=output_format, fix=fix,
                   force_share=_force_share(flags))
    err.write(report.messages)
    if "-q" not in flags:
        out.write(report.output)
    return report.exit_code


_REPAIR_MODES = {"leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}   # img_check's -r


def _main_info(box: Sandbox, args: list[str], out: TextIO, err: TextIO) -> int:
    options, operands = getopt.gnu_getopt(args, "f:hU", ["output=", "backing-chain",
                                                         "object=", "image-opts",
                                                         "force-share"])
    flags = dict(options)
    if len(operands) != 1:
        raise _usage_error("Expecting one image file name")
    if flags.get("--output") != "json":
        raise ImgError("The emulator's qemu-img info prints --output=json only")
    chain = "--backing-chain" in flags
    infos = info_chain(box, operands[0], flags.get("-f"), chain=chain,
                       force_share=_force_share(flags))
    out.write(to_json_pretty(infos if chain else infos[0]) + "\n")
    return 0


def _main_map(box: Sandbox, args: list[str], out: TextIO, err: TextIO) -> int:
    options, operands = getopt.gnu_getopt(args, "f:hU", ["output=", "object=", "image-opts",
                                                         "force-share", "start-offset=",
                                                         "max-length="])
    flags = dict(options)
    if len(operands) != 1:
        raise _usage_error("Expecting one image file name")
    if flags.get("--output") != "json":
        raise ImgError("The emulator's qemu-img map prints --output=json only")
    out.write(map_json(map_image(box, operands[0], flags.get("-f"),
                                 force_share=_force_share(flags))))
    return 0


def _main_bitmap(box: Sandbox, args: list[str], out: TextIO, err: TextIO) -> int:
    """img_bitmap: the actions, in command-line order, are the QMP bitmap commands on the
    image's node (opened read-write without its backing chain, on a block layer of its
    own); persistent bitmaps are stored as the image closes."""
    from emulator.block.layer import BlockLayer
    from emulator.commands import bitmap as qmp

    options, operands = getopt.gnu_getopt(args, "b:f:F:g:h", [
        "help", "object=", "image-opts", "add", "remove", "clear", "enable", "disable",
        "merge=", "granularity=", "source-file=", "source-format="])
    actions: list[tuple[str, str | None]] = []
    flags: dict[str, str] = {}
    granularity = 0
    for flag, value in options:
        if flag.startswith("--") and flag[2:] in ("add", "remove", "clear", "enable",
                                                  "disable", "merge"):
            actions.append((flag[2:], value if flag == "--merge" else None))
        elif flag in ("-g", "--granularity"):
            granularity = _cvtnum("granularity", value)
        else:
            flags[{"--source-file": "-b", "--source-format": "-F"}.get(flag, flag)] = value
    names = [name for name, _ in actions]
    for failed, message in (
            (not actions, "Need at least one of --add, --remove, --clear, --enable, "
                          "--disable, or --merge"),
            (granularity and "add" not in names, "granularity only supported with --add"),
            ("-F" in flags and "-b" not in flags, "-F only supported with -b"),
            ("-b" in flags and "merge" not in names,
             "Merge bitmap source file only supported with --merge"),
            (len(operands) != 2, "Expecting filename and bitmap name")):
        if failed:
            raise ImgError(message)
    filename, name = operands
    layer = BlockLayer(box)
    try:
        bs = _open_node(layer, filename, flags.get("-f"), read_only=False)
        src_bs = bs if "-b" not in flags else \
            _open_node(layer, flags["-b"], flags.get("-F"), read_only=True)
        for action, source in actions:
            try:
                node = bs.node_name
                if action == "add":
                    qmp.bitmap_add(layer, node, name, granularity or None, True)
                elif action == "remove":
                    qmp.bitmap_remove(layer, node, name, release=True)
                elif action == "merge":
                    qmp.bitmap_merge(layer, node, name, [{"node": src_bs.node_name,
                                                          "name": source}])
                elif action == "clear":
                    qmp.bitmap_clear(layer, node, name)
                else:
                    qmp.bitmap_enable(layer, node, name, action == "enable")
            except GenericError as exc:
                raise ImgError(f"Operation {action} on bitmap {name} failed: {exc.desc}") \
                    from None
    finally:
        layer.close_all()
    return 0


def _open_node(layer: Any, filename: str, fmt: str | None, *, read_only: bool) -> Any:
    """img_open with BDRV_O_NO_BACKING: an anonymous BlockBackend over the image's node."""
    try:
        blk = layer.blk_new_open(filename, fmt, backing=None, **{"read-only": read_only})
    except GenericError as exc:
        raise ImgError(f"Could not open '{filename}': {exc.report_text()}") from None
    return blk.bs


def _cvtnum(name: str, text: str) -> int:
    """qemu-img's cvtnum: a size from 0 to INT64_MAX, or its two-line complaint."""
    value = qemu_io.strtosz(text)
    if value < 0 and value != -errno.ERANGE:
        raise ImgError(f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes "
                       "for\nqemu-img: kilobytes, megabytes, gigabytes, terabytes, "
                       "petabytes and exabytes.")
    if value < 0 or value > qemu_io.INT64_MAX:
        raise ImgError(f"Invalid {name} specified. Must be between 0 and "
                       f"{qemu_io.INT64_MAX}.")
    return value


_VERBS = {"create": _main_create, "compare": _main_compare, "rebase": _main_rebase,
          "check": _main_check, "info": _main_info, "map": _main_map, "bitmap": _main_bitmap}
