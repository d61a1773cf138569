"""Deterministic CBOR written from pre-encoded parts.

The manifest encoder writes the same few layouts for every release, and the verifier's
canonical route (:mod:`otaguard.manifest.canonical`, reading with :mod:`otaguard.cborread`)
expects exactly those bytes. Composing them from byte fragments keeps the layout visible as
constants both sides share, and avoids building Python trees only to hand them to a general
encoder.

The output is exactly :func:`otaguard.cbor.dumps` (RFC 8949 §4.2.1 core deterministic: minimal
heads, definite lengths, map keys in bytewise order of their encoding); tests hold the two side
by side. Each function accepts only the one Python type it encodes (``True`` is not an integer
here, ``str`` is not ``bytes``), so a look-alike value (``True`` for 1) can never reproduce the
bytes of a real one.
"""

from __future__ import annotations

from collections.abc import Sequence

_BYTE = [bytes((i,)) for i in range(256)]
NULL = b"\xf6"
_BSTR1 = b"\x58"  # bstr with a one-byte length


class EncodeError(TypeError):
    """A value of the wrong type or range: the caller's bug, or a non-canonical input."""


def head(major: int, n: int) -> bytes:
    """The shortest head for major type ``major`` and argument ``n`` (RFC 8949 §4.2.1)."""
    mt = major << 5
    if n < 24:
        if n < 0:
            raise EncodeError("negative CBOR argument")
        return _BYTE[mt | n]
    if n < 0x100:
        return _BYTE[mt | 24] + _BYTE[n]
    if n < 0x10000:
        return _BYTE[mt | 25] + n.to_bytes(2, "big")
    if n < 0x100000000:
        return _BYTE[mt | 26] + n.to_bytes(4, "big")
    if n < 0x10000000000000000:
        return _BYTE[mt | 27] + n.to_bytes(8, "big")
    raise EncodeError("CBOR argument above 2**64-1")


def uint(n: int) -> bytes:
    if type(n) is not int:
        raise EncodeError(f"expected int, got {type(n).__name__}")
    return _BYTE[n] if 0 <= n < 24 else head(0, n)


def integer(n: int) -> bytes:
    if type(n) is not int:
        raise EncodeError(f"expected int, got {type(n).__name__}")
    return head(0, n) if n >= 0 else head(1, -1 - n)


def bstr(b: bytes) -> bytes:
    if type(b) is not bytes:
        raise EncodeError(f"expected bytes, got {type(b).__name__}")
    n = len(b)
    if n < 24:
        return _BYTE[0x40 | n] + b
    if n < 0x100:
        return _BSTR1 + _BYTE[n] + b
    return head(2, n) + b


def tstr(s: str) -> bytes:
    if type(s) is not str:
        raise EncodeError(f"expected str, got {type(s).__name__}")
    raw = s.encode()
    n = len(raw)
    return (_BYTE[0x60 | n] if n < 24 else head(3, n)) + raw


def array(items: Sequence[bytes]) -> bytes:
    """An array of already-encoded items."""
    return head(4, len(items)) + b"".join(items)


def cmap(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A map of already-encoded (key, value) pairs, put in core deterministic key order."""
    n = len(pairs)
    if n > 1:
        pairs = sorted(pairs, key=_key_order)
        if len({k for k, _ in pairs}) != n:
            raise EncodeError("duplicate map key")
    return head(5, n) + b"".join([k + v for k, v in pairs])


def _key_order(pair: tuple[bytes, bytes]) -> bytes:
    return pair[0]  # RFC 8949 §4.2.1 core deterministic: bytewise order of the encoded keys
