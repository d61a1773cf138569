"""The canonical route: verify an envelope that is byte for byte what otaguard itself writes.

Every envelope the signing service produces is canonical: one encoding per content. For those,
the general strict pipeline (:mod:`.verify`: a byte-level walk of every nested CBOR document,
then the profile checks) does far more work than the signature check it guards. This route
decodes each layer with cbor2 and accepts it only if re-encoding the decoded values with the
encoder the signer uses gives back exactly the bytes received, so every property the strict
walk checks (minimal heads, definite lengths, no duplicate keys, no unexpected members, types)
holds by construction, at C speed.

It keeps the order that matters (docs/threat-model.md): the outer layers (envelope,
authentication wrapper, SUIT_Digest, COSE_Sign1 and its protected header) are checked and the
digest and signatures verified before the manifest body is decoded at all.

It never rejects anything. Any doubt (a layer that is not canonical, a check that fails)
returns ``None`` and the strict pipeline decides, so the error a caller sees, and its code,
always come from one place; tests/test_manifest_canonical.py checks that both routes agree.
"""

from __future__ import annotations

import hmac
import uuid

import cbor2

from .. import cborenc as enc
from ..crypto.algorithms import HASH_SIZES, CoseAlg, HashAlg, digest_bytes
from ..errors import OtaError
from ..trust.model import KeyResolver, Role, TrustedKey
from . import suit
from .envelope import MAX_AUTH_BLOCKS
from .model import DeltaInfo, ManifestInfo
from .profile import decode_text, encode_digest, encode_manifest
from .version import format_version

# Everything a malformed or merely unexpected input can raise on this route; all mean "ask
# the strict route". Programming errors (AttributeError, NameError...) are deliberately not
# here: tests would see them.
_DOUBT = (OtaError, LookupError, TypeError, ValueError, OverflowError, cbor2.CBORError)

_ENVELOPE_HEAD = (
    enc.head(6, suit.TAG_ENVELOPE) + enc.head(5, 2) + enc.uint(suit.ENV_AUTH)
)  # followed by bstr(auth), then:
_MANIFEST_KEY = enc.uint(suit.ENV_MANIFEST)
_SIGN1_HEAD = enc.head(6, suit.TAG_SIGN1) + enc.head(4, 4)
_KID_MAP = enc.head(5, 1) + enc.uint(4)  # unprotected header: {kid}
_PROTECTED_ALG = enc.head(5, 1) + enc.uint(1)  # protected header: {alg}
_SIG_STRUCTURE = enc.head(4, 4) + enc.tstr("Signature1")
_EMPTY_AAD = enc.bstr(b"")
_COSE_ALGS = {int(a): a for a in CoseAlg}
_HASH_ALGS = {int(a): a for a in HashAlg}


class Canonical:
    """What the canonical route verified: the same fields the strict route returns."""

    __slots__ = ("digest", "info", "signers")

    def __init__(self, info: ManifestInfo, digest: bytes, signers: tuple[TrustedKey, ...]):
        self.info = info
        self.digest = digest
        self.signers = signers


def verify(data: bytes, resolver: KeyResolver, now: int | None) -> Canonical | None:
    """Verify a canonical otaguard envelope; ``None`` if the strict route must decide."""
    try:
        return _verify(data, resolver, now)
    except _DOUBT:
        return None


def decode_pinned(data: bytes) -> Canonical | None:
    """As :func:`verify` minus the signatures, for an envelope pinned by the digest of its
    bytes (the bootloader's confirmed slot, see verify.decode_pinned); ``signers`` is empty."""
    try:
        return _verify(data, None, None)
    except _DOUBT:
        return None


def _verify(data: bytes, resolver: KeyResolver | None, now: int | None) -> Canonical | None:
    envelope = cbor2.loads(data)
    if type(envelope) is not cbor2.CBORTag or envelope.tag != suit.TAG_ENVELOPE:
        return None
    members = envelope.value
    if len(members) != 2:
        return None
    auth_raw, manifest_raw = members[suit.ENV_AUTH], members[suit.ENV_MANIFEST]
    manifest_span = enc.bstr(manifest_raw)
    if data != _ENVELOPE_HEAD + enc.bstr(auth_raw) + _MANIFEST_KEY + manifest_span:
        return None

    # authentication wrapper: [bstr SUIT_Digest, bstr COSE_Sign1 ...]
    auth = cbor2.loads(auth_raw)
    if type(auth) is not list or not 2 <= len(auth) <= 1 + MAX_AUTH_BLOCKS:
        return None
    if auth_raw != enc.array([enc.bstr(item) for item in auth]):
        return None
    payload = auth[0]
    alg_number, digest = cbor2.loads(payload)
    alg = _HASH_ALGS[alg_number]
    if payload != encode_digest(alg, digest):
        return None
    if len(digest) != HASH_SIZES[alg]:
        return None
    if not hmac.compare_digest(digest_bytes(manifest_span, alg), digest):
        return None

    signers: dict[bytes, TrustedKey] = {}
    if resolver is not None:
        for block in auth[1:]:
            trusted = _signature(block, payload, resolver, now)
            if trusted is not None:
                signers.setdefault(trusted.key.raw, trusted)  # one key counts once
        if len(signers) < max(1, resolver.threshold):
            return None

    # Only now, authenticated, is the manifest body read.
    info = manifest_info(manifest_raw)
    if info is None:
        return None
    found = tuple(signers.values())
    for signer in found:
        signer.check_scope(info.vendor_id, info.class_id)
    return Canonical(info, digest, found)


def _signature(
    block: bytes, payload: bytes, resolver: KeyResolver, now: int | None
) -> TrustedKey | None:
    """One COSE_Sign1 in the form our signer writes: 18([h'{1: alg}', {4: kid}, nil, sig])."""
    sign1 = cbor2.loads(block)
    if type(sign1) is not cbor2.CBORTag or sign1.tag != suit.TAG_SIGN1:
        return None
    protected, unprotected, detached, signature = sign1.value
    kid = unprotected[4]
    if detached is not None or len(unprotected) != 1:
        return None
    if block != (
        _SIGN1_HEAD
        + enc.bstr(protected)
        + _KID_MAP
        + enc.bstr(kid)
        + enc.NULL
        + enc.bstr(signature)
    ):
        return None
    header = cbor2.loads(protected)
    if len(header) != 1:
        return None
    alg_number = header[1]
    if protected != _PROTECTED_ALG + enc.integer(alg_number):
        return None
    alg = _COSE_ALGS[alg_number]
    try:
        trusted = resolver.resolve(kid, alg, Role.FIRMWARE, now)
        tbs = _SIG_STRUCTURE + enc.bstr(protected) + _EMPTY_AAD + enc.bstr(payload)
        trusted.key.verify(alg, signature, tbs)
    except OtaError:
        return None  # as in the strict route, a block that fails does not count
    return trusted


def manifest_info(raw: bytes) -> ManifestInfo | None:
    """The profile fields of a canonical manifest, or ``None`` if ``raw`` is anything else.

    Reads the fields where the profile puts them and lets the final comparison with
    :func:`encode_manifest` prove that nothing else is there and that every value has the one
    encoding and type the profile allows."""
    loads = cbor2.loads
    manifest = loads(raw)
    params = loads(loads(manifest[_M_COMMON])[_C_SHARED])[1]
    if type(manifest) is not dict or type(params) is not dict:
        return None
    digest_alg, image_digest = loads(params[_P_DIGEST])
    version = params.get(_P_VERSION)
    if version is not None:
        version = format_version(loads(version)[1])
    delta = params.get(_P_DELTA)
    if delta is not None:
        delta = DeltaInfo(*loads(delta))
    uri = manifest.get(_M_INSTALL)
    if uri is not None:
        uri = loads(uri)[1][_P_URI]
    text = manifest.get(_M_TEXT)
    text = {} if text is None else decode_text(loads(text))
    info = ManifestInfo(
        manifest[_M_SEQUENCE],
        uuid.UUID(bytes=params[_P_VENDOR]),
        uuid.UUID(bytes=params[_P_CLASS]),
        _HASH_ALGS[digest_alg],
        image_digest,
        params[_P_SIZE],
        format_version(loads(manifest[_M_SET_VERSION])),
        version,
        params[_P_COUNTER],
        params.get(_P_USE_BEFORE),
        uri,
        text,
        delta,
    )
    if encode_manifest(info) != raw:
        return None
    return info


# Plain ints for the lookups above (module attribute lookups add up on this path).
_M_COMMON, _M_SEQUENCE, _M_SET_VERSION = suit.MAN_COMMON, suit.MAN_SEQUENCE, suit.MAN_SET_VERSION
_M_INSTALL, _M_TEXT, _C_SHARED = suit.MAN_INSTALL, suit.MAN_TEXT, suit.COMMON_SHARED_SEQUENCE
_P_VENDOR, _P_CLASS, _P_DIGEST = suit.P_VENDOR_ID, suit.P_CLASS_ID, suit.P_IMAGE_DIGEST
_P_SIZE, _P_COUNTER, _P_USE_BEFORE = (
    suit.P_IMAGE_SIZE,
    suit.P_OTA_SECURITY_COUNTER,
    suit.P_USE_BEFORE,
)
_P_VERSION, _P_DELTA, _P_URI = suit.P_VERSION, suit.P_OTA_DELTA, suit.P_URI
