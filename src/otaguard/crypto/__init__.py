"""Algorithms, keys, COSE_Sign1 and signers. Everything here is pure except key-file I/O."""

from .algorithms import CoseAlg, HashAlg, KeyKind, StreamingHasher, digest_bytes
from .cose import Sign1, Signer, decode_sign1, sign1
from .keys import PublicKey

__all__ = [
    "CoseAlg",
    "HashAlg",
    "KeyKind",
    "PublicKey",
    "Sign1",
    "Signer",
    "StreamingHasher",
    "decode_sign1",
    "digest_bytes",
    "sign1",
]
