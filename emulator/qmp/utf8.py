"""QEMU's "modified UTF-8" (util/unicode.c), which its JSON parser and writer speak.

Strings inside QEMU are C strings: U+0000 travels as the overlong pair C0 80, and a NUL byte
ends the string.  The parser rejects invalid sequences; the writer prints each invalid
sequence as U+FFFD.  Both need the exact byte-level rules, reproduced here.
"""

from __future__ import annotations

_MIN_CP = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def is_valid_codepoint(cp: int) -> bool:
    """Unicode scalar value that is not a noncharacter (util/unicode.c)."""
    if cp > 0x10FFFF:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return False
    return not 0xD800 <= cp <= 0xDFFF


def mod_utf8_codepoint(s: bytes, pos: int, n: int = 6) -> tuple[int, int]:
    """Decode the sequence at ``s[pos:]``: (codepoint or -1, end position).

    ``s`` is treated as NUL-terminated: bytes past its end read as 0.
    """
    def at(i: int) -> int:
        return s[i] if i < len(s) else 0

    byte = at(pos)
    if n == 0 or byte == 0:
        return -1, pos
    p = pos + 1
    if byte < 0x80:
        return byte, p
    if byte >= 0xFE or not byte & 0x40:
        return -1, p  # impossible byte, or unexpected continuation byte
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for i in range(1, length):
        byte = at(p) if i < n else 0
        if (byte & 0xC0) != 0x80:
            return -1, p  # continuation byte missing
        p += 1
        cp = (cp << 6) | (byte & 0x3F)
    if not is_valid_codepoint(cp):
        return -1, p
    if cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2):
        return -1, p  # overlong, other than C0 80
    return cp, p


def c_string(raw: bytes) -> str:
    """How QEMU's JSON writer sees ``raw`` as a C string: cut at the first NUL byte, each
    invalid sequence becomes U+FFFD."""
    raw = raw.split(b"\0", 1)[0]
    out = []
    pos = 0
    while pos < len(raw):
        cp, pos = mod_utf8_codepoint(raw, pos)
        out.append(chr(cp) if cp >= 0 else "\uFFFD")
    return "".join(out)
