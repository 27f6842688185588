"""qemu-io commands (qemu-io-cmds.c) run against an `IOTarget`, printing what qemu-io prints.

Supported: ``read``/``r``, ``write``/``w``, ``discard``/``d``, ``flush``/``f``, ``length``/``l``,
with qemu-io's
option parsing (GNU getopt, so options may follow the operands), its number syntax (cvtnum:
qemu_strtosz with byte default, k/M/G/T/P/E suffixes, hex, fractions) and its messages.
Options qemu-io accepts but the emulator cannot honour (``-b`` VM state, ``-c`` compressed,
``-s`` source file) are validated like qemu-io does and then fail with "Operation not
supported".

The statistics line after each request ("64 KiB, 1 ops; 00.00 sec (...)") carries measured
times, exactly formatted as qemu-io does but different on every run: callers and filters must
not depend on it. `filter_timing` replaces it the way iotests' filter_qemu_io does.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from emulator.qmp.json_writer import qdict_keys

BDRV_REQUEST_MAX_BYTES = 2147483136  # MIN(SIZE_MAX, INT_MAX) rounded down to the alignment
INT64_MAX = (1 << 63) - 1


class IOTarget(Protocol):
    """What qemu-io talks to: a BlockBackend. Failures are OSError with an errno.

    ``info`` describes the backend's root node (``target.bs``; an offline image is its own):
    its ``format_name``, ``protocol_name``, ``get_info()`` and ``get_specific_info()``."""

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes) -> None: ...

    def pwrite_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None: ...

    def pdiscard(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def length(self) -> int: ...


class _CommandError(Exception):
    """A command stopped early; the message (may be empty) is already what qemu-io prints."""


_TIMING = re.compile(r"[0-9]* ops; [0-9/:. sec]* \([0-9/.inf]* [EPTGMKiBbytes]*/sec "
                     r"and [0-9/.inf]* ops/sec\)")


def filter_timing(text: str) -> str:
    """iotests' filter_qemu_io: the statistics line made stable."""
    return _TIMING.sub("X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)", text)


class _Output(list[str]):
    """What a command prints with printf (the list itself), and ``monitor``: where
    qemu_printf goes — the current monitor under HMP, else stdout as well."""

    def __init__(self, monitor: list[str] | None) -> None:
        super().__init__()
        self.monitor: list[str] = self if monitor is None else monitor


def run(target: IOTarget, command: str,
        clock: Callable[[], float] = time.perf_counter, *,
        monitor: list[str] | None = None) -> str:
    """Run one qemu-io command line and return everything qemu-io prints for it on stdout;
    with ``monitor``, what it prints with qemu_printf goes there instead."""
    return run_command(target, command, clock, monitor=monitor)[1]


def run_command(target: IOTarget, command: str,
                clock: Callable[[], float] = time.perf_counter, *,
                monitor: list[str] | None = None) -> tuple[int, str]:
    """qemuio_command: (the command's return value, < 0 on failure, as qemu-io's exit status
    sees it; what it printed)."""
    out = _Output(monitor)
    argv = [word for word in command.split(" ") if word]
    if not argv:
        return 0, ""
    spec = _COMMANDS.get(argv[0])
    if spec is None:
        return -errno.EINVAL, f'command "{argv[0]}" not found\n'
    argmin, argmax, handler = spec
    nargs = len(argv) - 1
    if nargs < argmin or (argmax != -1 and nargs > argmax):
        if argmax == -1:
            expected = f"at least {argmin} arguments"
        elif argmin == argmax:
            expected = f"{argmin} arguments"
        else:
            expected = f"between {argmin} and {argmax} arguments"
        return -errno.EINVAL, f"bad argument count {nargs} to {argv[0]}, expected {expected}\n"
    try:
        ret = handler(target, argv, out, clock) or 0
    except _CommandError as exc:
        out.append(str(exc))
        ret = -errno.EINVAL
    return ret, "".join(out)


# -- numbers ------------------------------------------------------------------------------------
_SUFFIXES = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_STRTOULL = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX])?")
_FRACTION = re.compile(r"\.([0-9]+)([eE][+-]?[0-9]+)?")


def _strtoull(text: str, base: int) -> tuple[int, int] | None:
    """C strtoull's prefix parse: (value, characters used), or None without digits.
    A value that overflows 64 bits is returned as is; the caller reports ERANGE."""
    prefix = _STRTOULL.match(text)
    assert prefix is not None
    pos = prefix.end(1)
    if base == 16 and prefix.group(2) and _is_digit(text[prefix.end():], 16):
        pos = prefix.end()
    digits = re.match(r"[0-9]+" if base == 10 else r"[0-9a-fA-F]+", text[pos:])
    if digits is None:
        return None
    value = int(digits.group(), base)
    return (-value if prefix.group(1) == "-" else value), pos + digits.end()


def _is_digit(text: str, base: int) -> bool:
    return bool(text) and text[0] in ("0123456789abcdefABCDEF" if base == 16 else "0123456789")


def cvtnum(text: str, warn: Callable[[str], None] | None = None) -> int:
    """qemu-io's cvtnum: qemu_strtosz (default unit bytes) limited to INT64_MAX; returns
    -EINVAL / -ERANGE like QEMU. `warn` gets QEMU's warning about suffixed hex numbers."""
    value = strtosz(text, warn)
    return -errno.ERANGE if value > INT64_MAX else value


def strtosz(text: str, warn: Callable[[str], None] | None = None) -> int:
    """qemu_strtosz: a size below 2^64 with an optional k/M/G/T/P/E suffix (a decimal
    fraction allowed with one), or -EINVAL / -ERANGE."""
    parsed = _strtoull(text, 10)
    if parsed is None:
        return -errno.EINVAL
    value, end = parsed
    if value >= 1 << 64 or value < -(1 << 64):
        return -errno.ERANGE
    if "-" in text[:end]:
        return -errno.EINVAL
    hexadecimal = False
    fraction = 0
    if value == 0 and text[end:end + 1] in ("x", "X"):
        parsed = _strtoull(text, 16)
        assert parsed is not None
        value, end = parsed
        if value >= 1 << 64:
            return -errno.ERANGE
        if text[end:end + 1] == ".":
            return -errno.EINVAL
        hexadecimal = True
    elif text[end:end + 1] == ".":
        match = _FRACTION.match(text, end)
        if match is None:
            end += 1
        elif match.group(2):
            return -errno.EINVAL
        else:
            fraction = int(float("0." + match.group(1)) * (1 << 64)) & ((1 << 64) - 1)
            end = match.end()
    power = _SUFFIXES.get(text[end:end + 1].upper()) if end < len(text) else None
    if power is not None:
        if hexadecimal and warn is not None:
            warn("qemu-io: warning: Using a multiplier suffix on hex numbers is "
                 f"deprecated: {text}\n")
        end += 1
    else:
        power = 0
    if end != len(text):
        return -errno.EINVAL
    multiplier = 1024 ** power
    if multiplier == 1:
        if fraction:
            return -errno.EINVAL
    else:
        scaled = fraction * multiplier
        value = value * multiplier + (scaled >> 64) + ((scaled >> 63) & 1)
        if value >= 1 << 64:
            return -errno.ERANGE
    return value


def _number(text: str, out: list[str]) -> int:
    """cvtnum plus print_cvtnum_err."""
    value = cvtnum(text, out.append)
    if value == -errno.EINVAL:
        raise _CommandError("Parsing error: non-numeric argument, or extraneous/unrecognized "
                            f"suffix -- {text}\n")
    if value == -errno.ERANGE:
        raise _CommandError(f"Parsing error: argument too large -- {text}\n")
    return value


def _pattern(text: str) -> int:
    """parse_pattern: strtol(arg, &end, 0) that must be a whole byte."""
    match = re.match(r"[ \t\n\v\f\r]*([+-]?)(0[xX](?=[0-9a-fA-F])|0(?=[0-7])|)", text)
    assert match is not None
    base = 16 if match.group(2)[:2].lower() == "0x" else 8 if match.group(2) == "0" else 10
    digits = re.match({16: r"[0-9a-fA-F]*", 8: r"[0-7]*", 10: r"[0-9]*"}[base],
                      text[match.end():])
    assert digits is not None
    rest = text[match.end() + digits.end():]
    value = int(digits.group() or "0", base) * (-1 if match.group(1) == "-" else 1)
    if not digits.group() and not match.group(2):
        rest = text  # nothing converted: endptr stays at the start
    if value < 0 or value > 255 or rest:
        raise _CommandError(f"{text} is not a valid pattern byte\n")
    return value


# -- option parsing -----------------------------------------------------------------------------
def _getopt(argv: list[str], optstring: str, usage: str) -> tuple[list[tuple[str, str]],
                                                                   list[str]]:
    """GNU getopt as qemu-io gets it: options anywhere before "--", operands kept in order."""
    options: list[tuple[str, str]] = []
    operands: list[str] = []
    args = argv[1:]
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            operands += args[i:]
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        j = 1
        while j < len(arg):
            letter = arg[j]
            j += 1
            at = optstring.find(letter)
            if at < 0 or letter == ":":
                raise _CommandError(f"{argv[0]}: invalid option -- '{letter}'\n{usage}")
            if optstring[at + 1:at + 2] != ":":
                options.append((letter, ""))
                continue
            if j < len(arg):
                options.append((letter, arg[j:]))
            elif i < len(args):
                options.append((letter, args[i]))
                i += 1
            else:
                raise _CommandError(f"{argv[0]}: option requires an argument -- '{letter}'\n"
                                    f"{usage}")
            break
    return options, operands


# -- reporting ----------------------------------------------------------------------------------
def _cvtstr(value: float) -> str:
    """cvtstr: a size with a binary unit, ".000" dropped."""
    for power, unit in enumerate((" KiB", " MiB", " GiB", " TiB", " PiB", " EiB"), 1):
        if value >= 1 << (10 * power):
            text, suffix = f"{value / (1 << (10 * power)):.3f}", unit
    if value < 1024:
        text, suffix = f"{value:f}", " bytes"
    trim = text.find(".000")
    return text[:trim] + suffix if trim >= 0 else text + suffix


def _report(op: str, elapsed: float, offset: int, count: int, total: int, verbose: bool) -> str:
    """print_report."""
    elapsed = max(elapsed, 1e-9)
    seconds = int(elapsed)
    if verbose or seconds:
        stamp = f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60 + elapsed % 1:05.2f}"
    else:
        stamp = f"{elapsed:05.2f} sec"
    if verbose:
        return f"{total},1,{stamp},{total / elapsed:.3f},{1 / elapsed:.3f}\n"
    return (f"{op} {total}/{count} bytes at offset {offset}\n"
            f"{_cvtstr(total)}, 1 ops; {stamp} ({_cvtstr(total / elapsed)}/sec and "
            f"{1 / elapsed:.4f} ops/sec)\n")


def _dump(data: bytes, offset: int) -> str:
    """dump_buffer (read -v)."""
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i:i + 16]
        text = "".join(chr(c) if chr(c).isascii() and chr(c).isalnum() else "." for c in chunk)
        lines.append(f"{offset + i:08x}:  " + "".join(f"{c:02x} " for c in chunk)
                     + f" {text}\n")
    return "".join(lines)


def _check_request(target: IOTarget, offset: int, count: int) -> None:
    """blk_check_byte_request: requests past the end of the device fail with EIO."""
    size = target.length()
    if offset > size or size - offset < count:
        raise OSError(errno.EIO, os.strerror(errno.EIO))


def _check_sector_aligned(offset: int, count: int) -> None:
    if offset % 512:
        raise _CommandError(f"{offset} is not a sector-aligned value for 'offset'\n")
    if count % 512:
        raise _CommandError(f"{count} is not a sector-aligned value for 'count'\n")


# -- commands -----------------------------------------------------------------------------------
_READ_USAGE = ("read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes "
               "at a specified offset\n")
_WRITE_USAGE = ("write [-bcCfnquz] [-P pattern | -s source_file] off len -- writes a number of "
                "bytes at a specified offset\n")


def _read(target: IOTarget, argv: list[str], out: list[str],
          clock: Callable[[], float]) -> int:
    """read_f."""
    options, operands = _getopt(argv, "bCl:pP:qs:v", _READ_USAGE)
    flags = {letter for letter, _ in options}
    pattern = pattern_offset = pattern_count = 0
    for letter, value in options:
        if letter == "l":
            pattern_count = _number(value, out)
        elif letter == "P":
            pattern = _pattern(value)
        elif letter == "s":
            pattern_offset = _number(value, out)
    if len(operands) != 2:
        raise _CommandError(_READ_USAGE)
    offset, count = _operands(operands, out, "")
    if "P" not in flags and flags & {"l", "s"}:
        raise _CommandError(_READ_USAGE)
    if "l" not in flags:
        pattern_count = count - pattern_offset
    if pattern_count < 0 or pattern_count + pattern_offset > count:
        raise _CommandError("pattern verification range exceeds end of read data\n")
    if "b" in flags:
        _check_sector_aligned(offset, count)
    start = clock()
    try:
        if "b" in flags:
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        _check_request(target, offset, count)
        data = target.pread(offset, count) if count else b""
    except OSError as exc:
        raise _CommandError(f"read failed: {os.strerror(exc.errno or errno.EIO)}\n") from None
    elapsed = clock() - start
    ret = 0
    if "P" in flags and data[pattern_offset:pattern_offset + pattern_count] != \
            bytes([pattern]) * pattern_count:
        out.append(f"Pattern verification failed at offset {offset + pattern_offset}, "
                   f"{pattern_count} bytes\n")
        ret = -errno.EINVAL
    if "q" in flags:
        return ret
    if "v" in flags:
        out.append(_dump(data, offset))
    out.append(_report("read", elapsed, offset, count, count, "C" in flags))
    return ret


def _write(target: IOTarget, argv: list[str], out: list[str],
           clock: Callable[[], float]) -> None:
    """write_f."""
    options, operands = _getopt(argv, "bcCfnpP:qs:uz", _WRITE_USAGE)
    flags = {letter for letter, _ in options}
    pattern = 0xCD
    for letter, value in options:
        if letter == "P":
            pattern = _pattern(value)
    if len(operands) != 2:
        raise _CommandError(_WRITE_USAGE)
    if "b" in flags and "z" in flags:
        raise _CommandError("-b and -z cannot be specified at the same time\n")
    if "f" in flags and flags & {"b", "c"}:
        raise _CommandError("-f and -b or -c cannot be specified at the same time\n")
    if "n" in flags and "z" not in flags:
        raise _CommandError("-n requires -z to be specified\n")
    if "u" in flags and "z" not in flags:
        raise _CommandError("-u requires -z to be specified\n")
    if len(flags & {"z", "P", "s"}) > 1:
        raise _CommandError("Only one of -z, -P, and -s can be specified at the same time\n")
    offset, count = _operands(operands, out, None if "n" in flags else " without -n")
    if flags & {"b", "c"}:
        _check_sector_aligned(offset, count)
    start = clock()
    try:
        if flags & {"b", "c", "s"}:
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        _check_request(target, offset, count)
        if count and "z" in flags:
            target.pwrite_zeroes(offset, count, may_unmap="u" in flags)
        elif count:
            target.pwrite(offset, bytes([pattern]) * count)
    except OSError as exc:
        raise _CommandError(f"write failed: {os.strerror(exc.errno or errno.EIO)}\n") from None
    elapsed = clock() - start
    if "q" not in flags:
        out.append(_report("wrote", elapsed, offset, count, count, "C" in flags))


def _operands(operands: list[str], out: list[str], limit_note: str | None) -> tuple[int, int]:
    """The offset and length operands; lengths over BDRV_REQUEST_MAX_BYTES are refused
    unless `limit_note` is None (write -z -n)."""
    offset = _number(operands[0], out)
    count = _number(operands[1], out)
    if count > BDRV_REQUEST_MAX_BYTES and limit_note is not None:
        raise _CommandError(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}{limit_note}, "
                            f"given {operands[1]}\n")
    return offset, count


_DISCARD_USAGE = "discard [-Cq] off len -- discards a number of bytes at a specified offset\n"


def _discard(target: IOTarget, argv: list[str], out: list[str],
             clock: Callable[[], float]) -> None:
    """discard_f."""
    options, operands = _getopt(argv, "Cq", _DISCARD_USAGE)
    flags = {letter for letter, _ in options}
    if len(operands) != 2:
        raise _CommandError(_DISCARD_USAGE)
    offset, count = _operands(operands, out, "")
    start = clock()
    try:
        _check_request(target, offset, count)
        if count:
            target.pdiscard(offset, count)
    except OSError as exc:
        raise _CommandError(f"discard failed: {os.strerror(exc.errno or errno.EIO)}\n") \
            from None
    elapsed = clock() - start
    if "q" not in flags:
        out.append(_report("discard", elapsed, offset, count, count, "C" in flags))


def _flush(target: IOTarget, argv: list[str], out: list[str],
           clock: Callable[[], float]) -> int:
    """flush_f: errors are returned to the caller, not printed."""
    try:
        target.flush()
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    return 0


def _length(target: IOTarget, argv: list[str], out: list[str],
            clock: Callable[[], float]) -> int:
    """length_f."""
    try:
        out.append(_cvtstr(target.length()) + "\n")
    except OSError as exc:
        out.append(f"getlength: {os.strerror(exc.errno or errno.EIO)}\n")
        return -(exc.errno or errno.EIO)
    return 0


def _info(target: IOTarget, argv: list[str], out: _Output,
          clock: Callable[[], float]) -> None:
    """info_f: names and sizes with printf; the format-specific part with qemu_printf
    (bdrv_image_info_specific_dump), so under HMP only that part reaches the monitor."""
    node: Any = getattr(target, "bs", target)
    if node is None:
        return
    for name in (node.format_name, node.protocol_name):
        if name:
            out.append(f"format name: {name}\n")
    bdi = node.get_info()
    if bdi is None:   # bdrv_get_info: -ENOTSUP, returned without a word
        return
    out.append(f"cluster size: {_cvtstr(bdi.get('cluster_size', 0))}\n")
    out.append(f"vm state offset: {_cvtstr(bdi.get('vm_state_offset', 0))}\n")
    specific = node.get_specific_info()
    if specific is not None:
        out.append("Format specific information:\n")
        _dump_qobject(out.monitor, specific["data"], 1)


def _dump_qobject(out: list[str], value: Any, indentation: int) -> None:
    """dump_qobject (block/qapi.c): dict keys in QDict order, dashes as spaces."""
    if isinstance(value, dict):
        for key in qdict_keys(value):
            item = value[key]
            composite = isinstance(item, dict | list)
            out.append(f"{'':{indentation * 4}}{key.replace('-', ' ')}:"
                       f"{chr(10) if composite else ' '}")
            _dump_qobject(out, item, indentation + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            composite = isinstance(item, dict | list)
            out.append(f"{'':{indentation * 4}}[{i}]:{chr(10) if composite else ' '}")
            _dump_qobject(out, item, indentation + 1)
    elif isinstance(value, bool):
        out.append("true\n" if value else "false\n")
    else:
        out.append(f"{value}\n")


def _error_report(out: _Output, message: str) -> None:
    """error_report: to the monitor under HMP, else "qemu-io: " on stderr."""
    out.monitor.append(f"qemu-io: {message}\n" if out.monitor is out else f"{message}\n")


def _alloc(target: IOTarget, argv: list[str], out: list[str],
           clock: Callable[[], float]) -> None:
    """alloc_f: how many of the bytes from offset on this layer allocates (not its backing);
    past the end of the image the count shrinks."""
    node: Any = getattr(target, "bs", target)
    start = offset = _number(argv[1], out)
    count = _number(argv[2], out) if len(argv) == 3 else 512
    remaining, allocated = count, 0
    while remaining:
        try:
            is_allocated, num = node.is_allocated(offset, remaining)
        except OSError as exc:
            raise _CommandError(f"is_allocated failed: {os.strerror(exc.errno or errno.EIO)}"
                                "\n") from None
        offset += num
        remaining -= num
        if is_allocated:
            allocated += num
        if num == 0:
            count -= remaining
            remaining = 0
    out.append(f"{allocated}/{count} bytes allocated at offset {_cvtstr(start)}\n")


def _map(target: IOTarget, argv: list[str], out: _Output,
         clock: Callable[[], float]) -> int:
    """map_f: the image as runs of allocated and unallocated bytes (map_is_allocated
    merges runs of the same answer)."""
    node: Any = getattr(target, "bs", target)
    offset, remaining = 0, target.length()
    while remaining:
        try:
            first, num = node.is_allocated(offset, remaining)
            while num < remaining:
                same, more = node.is_allocated(offset + num, remaining - num)
                if same != first or not more:
                    break
                num += more
        except OSError as exc:
            _error_report(out, "Failed to get allocation status: "
                               f"{os.strerror(exc.errno or errno.EIO)}")
            return -(exc.errno or errno.EIO)
        if not num:
            _error_report(out, "Unexpected end of image")
            return -errno.EIO
        out.append(f"{_cvtstr(num)} (0x{num:x}) bytes "
                   f"{'    allocated' if first else 'not allocated'} at offset "
                   f"{_cvtstr(offset)} (0x{offset:x})\n")
        offset += num
        remaining -= num
    return 0


# a handler returns the command's value (None for 0), < 0 on a failure it printed or not
_Handler = Callable[[IOTarget, list[str], _Output, Callable[[], float]], "int | None"]
_COMMANDS: dict[str, tuple[int, int, _Handler]] = {}
for _names, _argmin, _argmax, _handler in ((("read", "r"), 2, -1, _read),
                                           (("write", "w"), 2, -1, _write),
                                           (("discard", "d"), 2, -1, _discard),
                                           (("flush", "f"), 0, 0, _flush),
                                           (("length", "l"), 0, 0, _length),
                                           (("info", "i"), 0, 0, _info),
                                           (("alloc", "a"), 1, 2, _alloc),
                                           (("map",), 0, 0, _map)):
    for _alias in _names:
        _COMMANDS[_alias] = (_argmin, _argmax, _handler)


def offline(sandbox: Any, filename: str, fmt: str | None, commands: Sequence[str], *,
            cache: str = "writethrough") -> tuple[int, str]:
    """``qemu-io [-f fmt] [-t cache] -c CMD... FILENAME`` without a VM: the image opened as
    qemu-io opens it (blk_new_open read-write with BDRV_O_UNMAP, writethrough unless told)
    on a block layer of its own, so the commands meet the same nodes a VM's drive has;
    closed at the end. Returns the exit status and everything printed."""
    from emulator.block.errors import GenericError
    from emulator.block.layer import BlockLayer
    from emulator.qcow2.blockio import tool_stderr

    printed: list[str] = []   # stderr (warnings) and stdout, as they come
    status = 0
    with tool_stderr("qemu-io", printed.append):
        layer = BlockLayer(sandbox)
        try:
            blk = layer.blk_new_open(filename, fmt, discard="unmap", cache=cache)
        except GenericError as e:
            return 1, "".join(printed) + f"qemu-io: can't open device {filename}: " \
                f"{e.report_text()}\n"
        try:
            for command in commands:   # command_loop: a failed command makes the status 1
                ret, text = run_command(blk, command)
                printed.append(text)
                status = 1 if ret < 0 else status
        finally:
            layer.close_all()   # what closing prints (a failed cache flush) is output too
    return status, "".join(printed)
