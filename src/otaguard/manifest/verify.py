"""Verify a SUIT envelope: authenticate first, interpret second.

Order (each step only runs when the previous one passed):

1. size limit, strict CBOR, envelope shape (tag 107, known members);
2. authentication wrapper: present, with at least one authentication block (else E_NO_AUTH);
3. digest of the manifest bstr *as received* against the SUIT_Digest in the wrapper;
4. each COSE_Sign1: key looked up through the resolver (role firmware), signature checked with
   the SUIT_Digest as detached payload; distinct valid keys counted against the threshold;
5. only then the manifest body is decoded (version, unknown elements, severed members);
6. every counted signer's scope must cover the manifest's (vendor-id, class-id).

:func:`authenticate_envelope` is the profile-independent part (it verifies the draft's own
examples); :func:`verify_envelope` adds the otaguard profile extraction.
"""

from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass
from typing import Any

from .. import cbor
from ..crypto.algorithms import digest_bytes
from ..crypto.cose import decode_sign1
from ..errors import CryptoError, ErrorCode, FormatError, OtaError, TrustError
from ..trust.model import KeyResolver, Role, TrustedKey
from . import canonical, suit
from .envelope import (
    MAX_ENVELOPE_SIZE,
    RawEnvelope,
    loads_nested,
    parse_auth_wrapper,
    parse_digest,
    parse_envelope,
)
from .model import ManifestInfo
from .profile import LAYOUT_CURRENT, LAYOUT_LEGACY
from .show import decode_unverified

__all__ = [
    "MAX_ENVELOPE_SIZE",
    "AuthenticatedEnvelope",
    "VerifiedManifest",
    "authenticate_envelope",
    "decode_unverified",
    "verify_envelope",
]

# When no signature verifies, report the most informative failure: a trusted key that is
# revoked/expired/wrong role beats a bad signature, which beats "unknown key", which beats
# structural problems of a block.
_RANK = {
    ErrorCode.KEY_REVOKED: 0,
    ErrorCode.KEY_EXPIRED: 0,
    ErrorCode.KEY_ROLE: 0,
    ErrorCode.SIGNATURE: 1,
    ErrorCode.DIGEST: 1,
    ErrorCode.ALGORITHM: 2,
    ErrorCode.UNTRUSTED_KEY: 3,
    ErrorCode.UNSUPPORTED: 4,
    ErrorCode.CRITICAL_UNKNOWN: 4,
}


@dataclass(frozen=True)
class AuthenticatedEnvelope:
    """A SUIT envelope whose manifest is authenticated; any SUIT profile."""

    envelope: bytes  # exactly the bytes verified
    tagged: bool
    manifest_bytes: bytes  # content of the manifest bstr, as received
    manifest: dict[Any, Any]  # decoded manifest map (decoded only after authentication)
    manifest_digest: bytes
    signers: tuple[TrustedKey, ...]
    severed: dict[int, bytes]  # severable elements present in the envelope, digest-checked
    integrated: dict[str, bytes]  # integrated payloads/dependencies (not authenticated here)


@dataclass(frozen=True)
class VerifiedManifest:
    info: ManifestInfo
    envelope: bytes  # exactly the bytes verified
    manifest_digest: bytes
    signers: tuple[TrustedKey, ...]
    # profile.LAYOUT_CURRENT, or LAYOUT_LEGACY for an envelope signed before the conformant
    # layout (docs/formats.md, "Migration from layout 1")
    layout: int = LAYOUT_CURRENT


def _check_block(
    block: bytes, payload: bytes, resolver: KeyResolver, now: int | None
) -> TrustedKey:
    obj = loads_nested(block, "authentication block")
    if isinstance(obj, cbor.Tag) and obj.tag in (suit.TAG_MAC0, suit.TAG_MAC):
        raise CryptoError(
            ErrorCode.UNSUPPORTED,
            "COSE_Mac authentication is not accepted: otaguard requires signatures (COSE_Sign1)",
        )
    if isinstance(obj, cbor.Tag) and obj.tag == suit.TAG_SIGN:
        raise CryptoError(ErrorCode.UNSUPPORTED, "COSE_Sign (multi-signer) blocks not supported")
    sign1 = decode_sign1(obj, tag_required=True)
    # The unprotected bucket is not signed: allow only the kid in it, so that an accepted
    # envelope cannot differ from what the signer produced in any other header.
    extra = set(sign1.unprotected) - {4}
    if extra:
        raise FormatError(
            ErrorCode.MALFORMED, f"unexpected unprotected COSE header(s) {sorted(map(str, extra))}"
        )
    if sign1.payload is not None and sign1.payload != payload:
        raise CryptoError(ErrorCode.DIGEST, "COSE payload differs from the manifest digest")
    trusted = resolver.resolve(sign1.kid, sign1.alg, Role.FIRMWARE, now)
    sign1.verify(trusted.key, external_payload=payload)
    return trusted


def _authenticate(
    raw: RawEnvelope, resolver: KeyResolver, now: int | None
) -> tuple[bytes, tuple[TrustedKey, ...]]:
    auth_raw = raw.members.get(suit.ENV_AUTH)
    if auth_raw is None:
        raise TrustError(ErrorCode.NO_AUTH, "envelope has no authentication wrapper")
    wrapper = parse_auth_wrapper(auth_raw)
    if not wrapper.blocks:
        raise TrustError(ErrorCode.NO_AUTH, "authentication wrapper holds no signature")
    received = digest_bytes(raw.spans[suit.ENV_MANIFEST], wrapper.digest_alg)
    if not hmac.compare_digest(received, wrapper.digest):
        raise CryptoError(ErrorCode.DIGEST, "manifest digest does not match the signed digest")
    signers: dict[bytes, TrustedKey] = {}
    errors: list[OtaError] = []
    for block in wrapper.blocks:
        try:
            trusted = _check_block(block, wrapper.digest_bytes, resolver, now)
        except OtaError as err:
            errors.append(err)
            continue
        signers.setdefault(trusted.key.raw, trusted)  # the same key twice counts once
    if not signers:
        best = min(errors, key=lambda e: _RANK.get(e.code, 5))
        raise best
    threshold = max(1, resolver.threshold)
    if len(signers) < threshold:
        raise TrustError(
            ErrorCode.THRESHOLD,
            f"{len(signers)} distinct trusted signature(s), policy requires {threshold}",
        )
    return wrapper.digest, tuple(signers.values())


def _decode_manifest(raw: RawEnvelope) -> tuple[dict[Any, Any], dict[int, bytes]]:
    manifest = loads_nested(raw.members[suit.ENV_MANIFEST], "manifest")
    if not isinstance(manifest, dict):
        raise FormatError(ErrorCode.MALFORMED, "SUIT manifest must be a map")
    version = manifest.get(suit.MAN_VERSION)
    if version != 1 or isinstance(version, bool):
        raise FormatError(ErrorCode.VERSION, f"manifest version {version!r} (only 1 is supported)")
    for key in manifest:
        if not isinstance(key, int) or isinstance(key, bool):
            raise FormatError(ErrorCode.MALFORMED, f"manifest key {key!r} is not an integer")
        if key not in suit.MANIFEST_KEYS:
            raise FormatError(ErrorCode.CRITICAL_UNKNOWN, f"unknown SUIT manifest element {key}")
    seq = manifest.get(suit.MAN_SEQUENCE)
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise FormatError(ErrorCode.MALFORMED, "manifest sequence number must be a uint")
    if not isinstance(manifest.get(suit.MAN_COMMON), bytes):
        raise FormatError(ErrorCode.MALFORMED, "manifest common must be a byte string")
    severed: dict[int, bytes] = {}
    for key, value in raw.members.items():
        if not isinstance(key, int) or key not in suit.SEVERABLE:
            continue
        held = manifest.get(key)
        if held is None:
            raise FormatError(
                ErrorCode.MALFORMED, f"severed element {key} is not named in the manifest"
            )
        if not isinstance(held, list):
            raise FormatError(
                ErrorCode.MALFORMED, f"element {key} is both in the manifest and severed"
            )
        alg, expected = parse_digest(held, f"digest of severed element {key}")
        if not hmac.compare_digest(digest_bytes(raw.spans[key], alg), expected):
            raise CryptoError(ErrorCode.DIGEST, f"severed element {key} does not match its digest")
        severed[key] = value
    return manifest, severed


def _identities(manifest: dict[Any, Any]) -> list[tuple[uuid.UUID, uuid.UUID | None]]:
    """(vendor-id, class-id) pairs the common sequence sets, for the signer scope check."""
    common = loads_nested(manifest[suit.MAN_COMMON], "common")
    if not isinstance(common, dict):
        raise FormatError(ErrorCode.MALFORMED, "SUIT common must be a map")
    seq_raw = common.get(suit.COMMON_SHARED_SEQUENCE)
    if seq_raw is None:
        return []
    if not isinstance(seq_raw, bytes):
        raise FormatError(ErrorCode.MALFORMED, "shared sequence must be a byte string")
    seq = loads_nested(seq_raw, "shared sequence")
    if not isinstance(seq, list) or len(seq) % 2:
        raise FormatError(ErrorCode.MALFORMED, "shared sequence must be command/argument pairs")
    found: list[tuple[uuid.UUID, uuid.UUID | None]] = []
    for i in range(0, len(seq), 2):
        cmd, arg = seq[i], seq[i + 1]
        if cmd not in (suit.DIR_SET_PARAMETERS, suit.DIR_OVERRIDE_PARAMETERS):
            continue
        if not isinstance(arg, dict):
            raise FormatError(ErrorCode.MALFORMED, "parameters argument must be a map")
        vendor = arg.get(suit.P_VENDOR_ID)
        cls = arg.get(suit.P_CLASS_ID)
        if isinstance(vendor, bytes) and len(vendor) == 16:
            cid = uuid.UUID(bytes=cls) if isinstance(cls, bytes) and len(cls) == 16 else None
            found.append((uuid.UUID(bytes=vendor), cid))
    return found


def _check_scopes(
    signers: tuple[TrustedKey, ...], identities: list[tuple[uuid.UUID, uuid.UUID | None]]
) -> None:
    # A manifest that names no vendor can only be accepted by keys with unrestricted scope.
    targets = identities or [(uuid.UUID(int=0), None)]
    for signer in signers:
        for vendor, cls in targets:
            signer.check_scope(vendor, cls)


def authenticate_envelope(
    data: bytes,
    resolver: KeyResolver,
    *,
    now: int | None = None,
    max_size: int = MAX_ENVELOPE_SIZE,
    require_tag: bool = False,
) -> AuthenticatedEnvelope:
    """Authenticate any SUIT envelope (steps 1-6) without applying the otaguard profile."""
    raw = parse_envelope(data, max_size=max_size, require_tag=require_tag)
    digest, signers = _authenticate(raw, resolver, now)
    manifest, severed = _decode_manifest(raw)
    _check_scopes(signers, _identities(manifest))
    integrated = {k: v for k, v in raw.members.items() if isinstance(k, str)}
    return AuthenticatedEnvelope(
        envelope=raw.data,
        tagged=raw.tagged,
        manifest_bytes=raw.members[suit.ENV_MANIFEST],
        manifest=manifest,
        manifest_digest=digest,
        signers=signers,
        severed=severed,
        integrated=integrated,
    )


def verify_envelope(
    data: bytes,
    resolver: KeyResolver,
    *,
    now: int | None = None,
    max_size: int = MAX_ENVELOPE_SIZE,
    accept_legacy: bool = True,
) -> VerifiedManifest:
    """Verify an otaguard-profile envelope and return what it authorizes.

    Raises OtaError with E_TOO_LARGE/E_MALFORMED (shape), E_NO_AUTH, E_DIGEST, E_SIGNATURE,
    E_UNTRUSTED_KEY/E_KEY_*/E_ALGORITHM (per signer), E_THRESHOLD, E_VERSION,
    E_CRITICAL_UNKNOWN/E_UNSUPPORTED (profile) or E_KEY_SCOPE.

    An envelope in exactly the encoding otaguard writes is accepted by the canonical route
    (:mod:`.canonical`, a fraction of the cost); anything else, and every rejection with its
    code, comes from :func:`verify_strict`.

    ``accept_legacy=False`` retires layout 1 (custom parameters in the shared sequence): such
    an envelope is then E_UNSUPPORTED, after its signatures were checked as any other.
    """
    if type(data) is bytes and len(data) <= max_size:
        fast = canonical.verify(data, resolver, now)
        if fast is not None:
            return VerifiedManifest(fast.info, data, fast.digest, fast.signers)
    return verify_strict(data, resolver, now=now, max_size=max_size, accept_legacy=accept_legacy)


def verify_strict(
    data: bytes,
    resolver: KeyResolver,
    *,
    now: int | None = None,
    max_size: int = MAX_ENVELOPE_SIZE,
    accept_legacy: bool = True,
) -> VerifiedManifest:
    """:func:`verify_envelope` by the general route only: any SUIT encoding the profile allows,
    and the source of every rejection and its code."""
    from .profile import extract_layout

    raw = parse_envelope(data, max_size=max_size, require_tag=True)
    digest, signers = _authenticate(raw, resolver, now)
    manifest, _severed = _decode_manifest(raw)
    extra = [k for k in raw.members if k not in (suit.ENV_AUTH, suit.ENV_MANIFEST)]
    if extra:
        raise FormatError(
            ErrorCode.UNSUPPORTED,
            f"envelope members {sorted(map(str, extra))} are not used by the otaguard profile",
        )
    info, layout = extract_layout(manifest)
    if layout == LAYOUT_LEGACY and not accept_legacy:
        raise FormatError(
            ErrorCode.UNSUPPORTED,
            "manifest layout 1 (custom parameters in the shared sequence) is retired",
        )
    for signer in signers:
        signer.check_scope(info.vendor_id, info.class_id)
    return VerifiedManifest(info, raw.data, digest, signers, layout)


def decode_pinned(data: bytes, *, max_size: int = MAX_ENVELOPE_SIZE) -> VerifiedManifest:
    """Decode an envelope that was verified earlier and is pinned by the digest of its bytes.

    Signatures are NOT checked here: the caller must already have compared SHA-256 of ``data``
    with a record it made when the envelope was verified (the bootloader's record of the
    confirmed slot, docs/reliability.md). That is what lets firmware signed with a key that
    was later rotated out or revoked keep booting, while anything new is verified in full.
    ``signers`` is empty.
    """
    if type(data) is bytes and len(data) <= max_size:
        fast = canonical.decode_pinned(data)
        if fast is not None:
            return VerifiedManifest(fast.info, data, fast.digest, ())
    return decode_pinned_strict(data, max_size=max_size)


def decode_pinned_strict(data: bytes, *, max_size: int = MAX_ENVELOPE_SIZE) -> VerifiedManifest:
    """:func:`decode_pinned` by the general route only. Both layouts, always: a pinned
    envelope was verified when it was installed, and must keep booting after layout 1 is
    retired for new installs."""
    from .profile import extract_layout

    raw = parse_envelope(data, max_size=max_size, require_tag=True)
    auth_raw = raw.members.get(suit.ENV_AUTH)
    if auth_raw is None:
        raise TrustError(ErrorCode.NO_AUTH, "envelope has no authentication wrapper")
    wrapper = parse_auth_wrapper(auth_raw)
    received = digest_bytes(raw.spans[suit.ENV_MANIFEST], wrapper.digest_alg)
    if not hmac.compare_digest(received, wrapper.digest):
        raise CryptoError(ErrorCode.DIGEST, "manifest digest does not match the signed digest")
    manifest, _severed = _decode_manifest(raw)
    info, layout = extract_layout(manifest)
    return VerifiedManifest(info, raw.data, wrapper.digest, (), layout)
