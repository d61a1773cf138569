"""Build a signed otaguard SUIT envelope from a ManifestInfo.

The signers sign the encoded SUIT_Digest of the manifest bstr (detached COSE_Sign1 payload),
one authentication block each, so several keys can co-sign a release (k-of-n threshold).
"""

from __future__ import annotations

from collections.abc import Sequence

from .. import cbor
from ..crypto.algorithms import HashAlg, digest_bytes
from ..crypto.cose import Signer, sign1
from ..errors import ErrorCode, UsageError
from . import suit
from .model import ManifestInfo
from .profile import encode_digest, encode_manifest


def manifest_digest(manifest: bytes, alg: HashAlg = HashAlg.SHA256) -> bytes:
    """The encoded SUIT_Digest over the manifest bstr (head + content): the signed payload."""
    return encode_digest(alg, digest_bytes(cbor.dumps(manifest), alg))


def assemble_envelope(manifest: bytes, payload: bytes, blocks: Sequence[bytes]) -> bytes:
    """Envelope bytes from the parts (``payload`` = encoded SUIT_Digest), canonical order."""
    auth = cbor.dumps([payload, *blocks])
    return cbor.dumps(
        cbor.Tag(suit.TAG_ENVELOPE, {suit.ENV_AUTH: auth, suit.ENV_MANIFEST: manifest})
    )


def sign_manifest(
    manifest: bytes, signers: Sequence[Signer], alg: HashAlg = HashAlg.SHA256
) -> bytes:
    """Wrap already-encoded SUIT_Manifest bytes in a signed envelope (any SUIT profile)."""
    if not signers:
        raise UsageError(ErrorCode.USAGE, "at least one signer is required")
    payload = manifest_digest(manifest, alg)
    blocks = [sign1(s, payload, detached=True).encode(tagged=True) for s in signers]
    return assemble_envelope(manifest, payload, blocks)


def build_envelope(info: ManifestInfo, signers: Sequence[Signer]) -> bytes:
    """Encode ``info`` (otaguard profile) and sign it with every signer, in order."""
    return sign_manifest(encode_manifest(info), signers, HashAlg(info.digest_alg))


def build_unsigned(info: ManifestInfo) -> bytes:
    """Envelope with the digest but no signature (the draft's "unsigned" form, for tests)."""
    manifest = encode_manifest(info)
    return assemble_envelope(manifest, manifest_digest(manifest, HashAlg(info.digest_alg)), [])
