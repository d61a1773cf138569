"""COSE algorithm identifiers otaguard accepts, and the hash algorithms for SUIT digests.

The allow-list is closed on purpose: anything not named here is refused with E_ALGORITHM,
including RSA and the ECDSA curves we do not support. Fully-specified identifiers (Ed25519 -19,
ESP256 -9, RFC 9864) are what we emit by default; the polymorphic ones (EdDSA -8, ES256 -7) are
accepted for interoperability with older SUIT tooling.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum
from typing import Literal

from ..errors import CryptoError, ErrorCode

KeyKind = Literal["ed25519", "p256"]


class CoseAlg(IntEnum):
    ES256 = -7
    EDDSA = -8
    ESP256 = -9
    ED25519 = -19


class HashAlg(IntEnum):
    SHA256 = -16
    SHA384 = -43


ALG_KEY_KIND: dict[CoseAlg, KeyKind] = {
    CoseAlg.ES256: "p256",
    CoseAlg.ESP256: "p256",
    CoseAlg.EDDSA: "ed25519",
    CoseAlg.ED25519: "ed25519",
}

DEFAULT_ALG: dict[KeyKind, CoseAlg] = {"ed25519": CoseAlg.ED25519, "p256": CoseAlg.ESP256}

_HASH_NAMES = {HashAlg.SHA256: "sha256", HashAlg.SHA384: "sha384"}
HASH_SIZES = {HashAlg.SHA256: 32, HashAlg.SHA384: 48}


def cose_alg(value: object) -> CoseAlg:
    """Map a decoded COSE 'alg' value to an allowed algorithm or raise E_ALGORITHM."""
    if type(value) is CoseAlg:  # already mapped (every signature check maps it twice)
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return CoseAlg(value)
        except ValueError:
            pass
    raise CryptoError(ErrorCode.ALGORITHM, f"COSE algorithm {value!r} is not allowed")


def hash_alg(value: object) -> HashAlg:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return HashAlg(value)
        except ValueError:
            pass
    if isinstance(value, str):
        named = {
            "sha256": HashAlg.SHA256,
            "sha-256": HashAlg.SHA256,
            "sha384": HashAlg.SHA384,
            "sha-384": HashAlg.SHA384,
        }
        if value.lower() in named:
            return named[value.lower()]
    raise CryptoError(ErrorCode.ALGORITHM, f"digest algorithm {value!r} is not allowed")


def parse_alg_name(name: str) -> CoseAlg:
    """CLI spelling → COSE alg ('ed25519', 'eddsa', 'esp256', 'es256', or the integer)."""
    table = {
        "ed25519": CoseAlg.ED25519,
        "eddsa": CoseAlg.EDDSA,
        "esp256": CoseAlg.ESP256,
        "es256": CoseAlg.ES256,
    }
    key = name.strip().lower()
    if key in table:
        return table[key]
    try:
        return cose_alg(int(key))
    except ValueError:
        raise CryptoError(ErrorCode.ALGORITHM, f"unknown algorithm {name!r}") from None


class StreamingHasher:
    """Incremental SHA-256/384 so a device can hash an image as it arrives."""

    __slots__ = ("_h", "alg", "length")

    def __init__(self, alg: HashAlg = HashAlg.SHA256) -> None:
        self.alg = hash_alg(alg)
        self._h = hashlib.new(_HASH_NAMES[self.alg])
        self.length = 0

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        self._h.update(chunk)
        self.length += len(chunk)

    def digest(self) -> bytes:
        return self._h.digest()

    def copy(self) -> StreamingHasher:
        other = StreamingHasher.__new__(StreamingHasher)
        other.alg = self.alg
        other._h = self._h.copy()
        other.length = self.length
        return other


def digest_bytes(data: bytes | bytearray | memoryview, alg: HashAlg = HashAlg.SHA256) -> bytes:
    return _HASH_FUNCS[alg](data).digest()


_HASH_FUNCS = {HashAlg.SHA256: hashlib.sha256, HashAlg.SHA384: hashlib.sha384}
