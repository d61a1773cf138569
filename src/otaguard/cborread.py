"""Reading deterministic CBOR in place, one expected item at a time.

The counterpart of :mod:`otaguard.cborenc` for the verifier's canonical route
(:mod:`otaguard.manifest.canonical`): a caller that knows the one layout a document must have
reads it item by item from the received bytes. Every reader accepts only the shortest head
(RFC 8949 §4.2.1) and a definite length, so a layout read to its last byte is the one canonical
encoding of the values read, and nothing else can match it. Anything unexpected raises
:class:`Mismatch`, which callers treat as "not canonical, ask the strict route", never as a
verdict on the input.

Functions take ``(buf, pos)`` and return the value and the position after it, rather than
keeping a cursor object: this code runs on every manifest a device checks, and a method call per
item costs more than the read itself.
"""

from __future__ import annotations


class Mismatch(ValueError):
    """The bytes are not the expected item in its one canonical encoding."""


def head(buf: bytes, pos: int, major: int) -> tuple[int, int]:
    """The argument of a shortest-form head of major type ``major`` at ``pos``."""
    initial = buf[pos]
    if initial >> 5 != major:
        raise Mismatch(f"major type {initial >> 5} at {pos}, expected {major}")
    info = initial & 31
    if info < 24:
        return info, pos + 1
    if info == 24:
        n = buf[pos + 1]
        if n < 24:
            raise Mismatch(f"non-minimal head at {pos}")
        return n, pos + 2
    if info > 27:
        raise Mismatch(f"indefinite or reserved head at {pos}")
    width = 1 << (info - 24)  # 25, 26, 27: 2, 4, 8 bytes
    end = pos + 1 + width
    if end > len(buf):
        raise Mismatch(f"truncated head at {pos}")
    n = int.from_bytes(buf[pos + 1 : end], "big")
    if n >> (4 * width) == 0:  # would fit in half the width
        raise Mismatch(f"non-minimal head at {pos}")
    return n, end


def uint(buf: bytes, pos: int) -> tuple[int, int]:
    """An unsigned integer (major type 0), so at most 2**64 - 1."""
    initial = buf[pos]
    if initial < 24:
        return initial, pos + 1
    return head(buf, pos, 0)


def integer(buf: bytes, pos: int) -> tuple[int, int]:
    """An integer of major type 0 or 1."""
    if buf[pos] >> 5 == 1:
        n, pos = head(buf, pos, 1)
        return -1 - n, pos
    return uint(buf, pos)


def bstr(buf: bytes, pos: int) -> tuple[int, int]:
    """The span ``(start, end)`` of a byte string's content; the caller slices if it needs the
    bytes, and a nested document is read in place between the two."""
    initial = buf[pos]
    if 0x40 <= initial < 0x58:  # length in the initial byte
        start = pos + 1
        end = start + initial - 0x40
    elif initial == 0x58:  # one-byte length
        start = pos + 2
        end = start + buf[pos + 1]
        if end - start < 24:
            raise Mismatch(f"non-minimal head at {pos}")
    else:
        n, start = head(buf, pos, 2)
        end = start + n
    if end > len(buf):
        raise Mismatch(f"byte string at {pos} runs past the end")
    return start, end


def tstr(buf: bytes, pos: int) -> tuple[str, int]:
    """A text string; invalid UTF-8 raises UnicodeDecodeError (a ValueError, so a mismatch)."""
    initial = buf[pos]
    if 0x60 <= initial < 0x78:  # length in the initial byte
        start = pos + 1
        end = start + initial - 0x60
    else:
        n, start = head(buf, pos, 3)
        end = start + n
    if end > len(buf):
        raise Mismatch(f"text string at {pos} runs past the end")
    return buf[start:end].decode("utf-8"), end


def expect(buf: bytes, pos: int, fixed: bytes) -> int:
    """Position after ``fixed``, which must be the bytes at ``pos``."""
    if not buf.startswith(fixed, pos):
        raise Mismatch(f"unexpected bytes at {pos}")
    return pos + len(fixed)


def at_end(pos: int, end: int) -> None:
    """A nested document must end exactly where its byte string does."""
    if pos != end:
        raise Mismatch(f"document ends at {pos}, its byte string at {end}")
