"""COSE_Sign1 (RFC 9052 §4.2) with detached or embedded payloads.

Decoding is separate from verifying so a caller can look up the key by ``kid`` first, but
nothing in a COSE_Sign1 is trusted until :meth:`Sign1.verify` returns. Only the protected
header is authenticated, so the algorithm must come from there; ``crit`` labels we do not
understand are refused rather than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import cbor
from ..errors import CryptoError, ErrorCode, FormatError
from .algorithms import CoseAlg, cose_alg
from .keys import PublicKey

TAG_SIGN1 = 18
HDR_ALG, HDR_CRIT, HDR_CONTENT_TYPE, HDR_KID = 1, 2, 3, 4
_UNDERSTOOD = {HDR_ALG, HDR_CRIT, HDR_CONTENT_TYPE, HDR_KID}
MAX_SIGN1 = 16 * 1024
COSE_LIMITS = cbor.Limits(max_size=MAX_SIGN1, max_depth=8, max_items=256)


class Signer(Protocol):
    """Anything that can produce a raw COSE signature: a software key or an HSM object."""

    @property
    def public_key(self) -> PublicKey: ...

    @property
    def alg(self) -> CoseAlg: ...

    def sign(self, data: bytes) -> bytes:
        """Return the COSE signature over ``data`` (Ed25519 64 bytes, ECDSA raw r||s)."""
        ...


@dataclass(frozen=True)
class Sign1:
    protected: bytes  # the serialized protected header, exactly as received
    unprotected: dict[Any, Any]
    payload: bytes | None  # None when detached
    signature: bytes
    alg: CoseAlg
    protected_map: dict[Any, Any] = field(default_factory=dict)

    @property
    def kid(self) -> bytes | None:
        kid = self.unprotected.get(HDR_KID, self.protected_map.get(HDR_KID))
        return kid if isinstance(kid, bytes) else None

    def to_be_signed(self, external_payload: bytes | None = None) -> bytes:
        payload = self.payload if self.payload is not None else external_payload
        if payload is None:
            raise FormatError(ErrorCode.MALFORMED, "detached COSE_Sign1 needs its payload")
        return cbor.dumps(["Signature1", self.protected, b"", payload])

    def verify(self, key: PublicKey, external_payload: bytes | None = None) -> None:
        if (
            self.payload is not None
            and external_payload is not None
            and self.payload != external_payload
        ):
            raise CryptoError(ErrorCode.DIGEST, "embedded payload differs from expected")
        key.verify(self.alg, self.signature, self.to_be_signed(external_payload))

    def encode(self, *, tagged: bool = True) -> bytes:
        arr = [self.protected, self.unprotected, self.payload, self.signature]
        return cbor.dumps(cbor.Tag(TAG_SIGN1, arr) if tagged else arr)


def build_protected(alg: CoseAlg, extra: dict[int, Any] | None = None) -> bytes:
    hdr: dict[int, Any] = {HDR_ALG: int(alg)}
    if extra:
        hdr.update(extra)
    return cbor.dumps(hdr)


def sign1(
    signer: Signer,
    payload: bytes,
    *,
    detached: bool = True,
    include_kid: bool = True,
    extra_protected: dict[int, Any] | None = None,
) -> Sign1:
    """Sign ``payload``. Detached by default: SUIT carries the payload (a digest) elsewhere."""
    protected = build_protected(signer.alg, extra_protected)
    unprotected: dict[Any, Any] = {HDR_KID: signer.public_key.key_id} if include_kid else {}
    tbs = cbor.dumps(["Signature1", protected, b"", payload])
    signature = signer.sign(tbs)
    return Sign1(
        protected=protected,
        unprotected=unprotected,
        payload=None if detached else payload,
        signature=signature,
        alg=signer.alg,
        protected_map=cbor.loads(protected, COSE_LIMITS),
    )


def decode_sign1(obj: Any, *, tag_required: bool = False) -> Sign1:
    """Parse a COSE_Sign1 from raw bytes or an already-decoded CBOR value."""
    if isinstance(obj, bytes | bytearray):
        obj = cbor.loads(bytes(obj), COSE_LIMITS)
    obj = cbor.expect_tag(obj, TAG_SIGN1, "COSE_Sign1", required=tag_required)
    if not isinstance(obj, list) or len(obj) != 4:
        raise FormatError(ErrorCode.MALFORMED, "COSE_Sign1 must be an array of 4")
    protected, unprotected, payload, signature = obj
    if not isinstance(protected, bytes):
        raise FormatError(ErrorCode.MALFORMED, "COSE protected header must be a byte string")
    if not isinstance(unprotected, dict):
        raise FormatError(ErrorCode.MALFORMED, "COSE unprotected header must be a map")
    if payload is not None and not isinstance(payload, bytes):
        raise FormatError(ErrorCode.MALFORMED, "COSE payload must be bytes or nil")
    if not isinstance(signature, bytes):
        raise FormatError(ErrorCode.MALFORMED, "COSE signature must be bytes")
    pmap = cbor.loads(protected, COSE_LIMITS) if protected else {}
    if not isinstance(pmap, dict):
        raise FormatError(ErrorCode.MALFORMED, "COSE protected header must encode a map")
    if set(pmap) & set(unprotected):
        raise FormatError(ErrorCode.MALFORMED, "COSE header label in both buckets")
    if HDR_ALG not in pmap:
        raise CryptoError(ErrorCode.ALGORITHM, "COSE alg must be in the protected header")
    alg = cose_alg(pmap[HDR_ALG])
    crit = pmap.get(HDR_CRIT)
    if crit is not None:
        if (
            not isinstance(crit, list)
            or not crit
            or not all(isinstance(c, int | str) and not isinstance(c, bool) for c in crit)
        ):
            raise FormatError(ErrorCode.MALFORMED, "COSE crit must be a non-empty array of labels")
        unknown = [c for c in crit if c not in _UNDERSTOOD]
        if unknown:
            raise FormatError(
                ErrorCode.CRITICAL_UNKNOWN, f"COSE critical header(s) not understood: {unknown}"
            )
    kid = unprotected.get(HDR_KID, pmap.get(HDR_KID))
    if kid is not None and not isinstance(kid, bytes):
        raise FormatError(ErrorCode.MALFORMED, "COSE kid must be bytes")
    return Sign1(protected, unprotected, payload, signature, alg, pmap)
