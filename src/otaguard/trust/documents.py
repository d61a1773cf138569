"""Signed trust documents: operational-key authorizations and key lists.

Both are COSE_Sign1 messages with an embedded CBOR-map payload. Every payload starts with a
document-type field so a signature made for one kind of document can never be replayed as
another (a key list is not an authorization, even if the same root signed both).

Key lists are whole replacement lists, not add/remove patches (the way TUF's root metadata
works): a device holding version 7 that receives version 9 ends up in exactly the state the
security officer signed, however many versions it missed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from .. import cbor
from ..crypto.algorithms import CoseAlg, cose_alg
from ..crypto.cose import Sign1, Signer, decode_sign1, sign1
from ..crypto.keys import PublicKey
from ..errors import ErrorCode, FormatError, TrustError
from .model import Role, Scope, TrustedKey

MAX_AUTHORIZATION = 2 * 1024
MAX_KEYLIST = 64 * 1024
MAX_KEYS = 64
MAX_VALIDITY_SECONDS = 25 * 31 * 86400  # DESIGN §4: operational keys live 6–24 months

DOC_AUTHORIZATION = "otaguard/key-authorization/v1"
DOC_KEYLIST = "otaguard/key-list/v1"

# authorization payload labels
A_TYPE, A_KID, A_KEY, A_ALG, A_NBF, A_NAF, A_SCOPES, A_ROLES, A_NAME, A_ISSUED = range(1, 11)
# key-list payload labels
L_TYPE, L_VERSION, L_ISSUED, L_AUTHS, L_REVOKED, L_THRESHOLD, L_ANCHOR_ROLES = range(1, 8)

_AUTH_LIMITS = cbor.Limits(max_size=MAX_AUTHORIZATION, max_depth=8, max_items=512)
_LIST_LIMITS = cbor.Limits(max_size=MAX_KEYLIST, max_depth=8, max_items=4096)


def _field(m: dict[Any, Any], label: int, typ: type | tuple[type, ...], what: str) -> Any:
    if label not in m:
        raise FormatError(ErrorCode.MALFORMED, f"{what}: missing field {label}")
    value = m[label]
    if not isinstance(value, typ) or isinstance(value, bool):
        raise FormatError(ErrorCode.MALFORMED, f"{what}: field {label} has the wrong type")
    return value


def _uint(m: dict[Any, Any], label: int, what: str) -> int:
    value: int = _field(m, label, int, what)
    if value < 0:
        raise FormatError(ErrorCode.MALFORMED, f"{what}: field {label} must be unsigned")
    return value


def _payload_of(msg: Sign1, doc_type: str, limits: cbor.Limits) -> dict[Any, Any]:
    if msg.payload is None:
        raise FormatError(ErrorCode.MALFORMED, f"{doc_type}: payload must be embedded")
    body = cbor.loads(msg.payload, limits)
    if not isinstance(body, dict):
        raise FormatError(ErrorCode.MALFORMED, f"{doc_type}: payload must be a map")
    if body.get(1) != doc_type:
        raise FormatError(ErrorCode.MALFORMED, f"document is not a {doc_type}")
    return body


# --- authorizations ------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyAuthorization:
    """Root's statement: this key may sign these roles for these products in this window."""

    trusted: TrustedKey
    alg: CoseAlg
    issued_at: int
    issuer_kid: bytes
    raw: bytes  # the COSE_Sign1 exactly as signed

    @property
    def key_id(self) -> bytes:
        return self.trusted.key_id


def issue_authorization(
    issuer: Signer,
    key: PublicKey,
    *,
    roles: set[Role] | frozenset[Role],
    scopes: list[Scope],
    not_before: int,
    not_after: int,
    name: str = "",
    alg: CoseAlg | None = None,
    issued_at: int | None = None,
) -> bytes:
    """Root signs an operational key's authorization. Returns the COSE_Sign1 bytes."""
    if not roles:
        raise TrustError(ErrorCode.KEY_ROLE, "an authorization needs at least one role")
    if not scopes:
        raise TrustError(ErrorCode.KEY_SCOPE, "an authorization needs at least one scope")
    if not_after <= not_before:
        raise TrustError(ErrorCode.KEY_EXPIRED, "not-after must be later than not-before")
    if not_after - not_before > MAX_VALIDITY_SECONDS:
        raise TrustError(
            ErrorCode.KEY_EXPIRED,
            "operational keys may be valid for at most 24 months; authorize a new key instead",
        )
    if key == issuer.public_key:
        raise TrustError(ErrorCode.KEY_ROLE, "the root key cannot authorize itself")
    chosen = key.check_alg(alg) if alg is not None else key.default_alg
    payload = {
        A_TYPE: DOC_AUTHORIZATION,
        A_KID: key.key_id,
        A_KEY: key.to_cose_key(),
        A_ALG: int(chosen),
        A_NBF: int(not_before),
        A_NAF: int(not_after),
        A_SCOPES: [[s.vendor_id.bytes, sorted(c.bytes for c in s.class_ids)] for s in scopes],
        A_ROLES: sorted(r.value for r in roles),
        A_NAME: name,
        A_ISSUED: int(issued_at if issued_at is not None else not_before),
    }
    return sign1(issuer, cbor.dumps(payload), detached=False).encode()


def _parse_scopes(raw: Any) -> tuple[Scope, ...]:
    if not isinstance(raw, list) or not raw:
        raise FormatError(ErrorCode.MALFORMED, "authorization scopes must be a non-empty array")
    scopes = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)):
            raise FormatError(ErrorCode.MALFORMED, "scope must be [vendor-id, [class-id...]]")
        ids = [item[0], *item[1]]
        if not all(isinstance(b, bytes) and len(b) == 16 for b in ids):
            raise FormatError(ErrorCode.MALFORMED, "scope ids must be 16-byte UUIDs")
        scopes.append(
            Scope(uuid.UUID(bytes=item[0]), frozenset(uuid.UUID(bytes=c) for c in item[1]))
        )
    return tuple(scopes)


def _parse_roles(raw: Any) -> frozenset[Role]:
    if not isinstance(raw, list) or not raw:
        raise FormatError(ErrorCode.MALFORMED, "authorization roles must be a non-empty array")
    try:
        return frozenset(Role(r) for r in raw)
    except ValueError:
        raise FormatError(ErrorCode.MALFORMED, f"unknown role in {raw!r}") from None


def parse_authorization(data: bytes | Any, issuers: dict[bytes, PublicKey]) -> KeyAuthorization:
    """Verify an authorization against the allowed issuer keys (normally just the root)."""
    raw = data if isinstance(data, bytes) else cbor.dumps(data)
    msg = decode_sign1(raw if isinstance(data, bytes) else data, tag_required=True)
    issuer_kid = msg.kid
    issuer = issuers.get(issuer_kid) if issuer_kid is not None else None
    if issuer is None:
        raise TrustError(
            ErrorCode.UNTRUSTED_KEY,
            f"authorization issued by unknown key {issuer_kid.hex() if issuer_kid else None}",
        )
    msg.verify(issuer)
    body = _payload_of(msg, DOC_AUTHORIZATION, _AUTH_LIMITS)
    key = PublicKey.from_cose_key(_field(body, A_KEY, dict, "authorization"))
    kid = _field(body, A_KID, bytes, "authorization")
    if kid != key.key_id:
        raise TrustError(ErrorCode.MALFORMED, "authorization kid does not match its key")
    alg = key.check_alg(cose_alg(_field(body, A_ALG, int, "authorization")))
    nbf, naf = _uint(body, A_NBF, "authorization"), _uint(body, A_NAF, "authorization")
    if naf <= nbf:
        raise FormatError(ErrorCode.MALFORMED, "authorization validity window is empty")
    name = body.get(A_NAME, "")
    if not isinstance(name, str):
        raise FormatError(ErrorCode.MALFORMED, "authorization name must be text")
    trusted = TrustedKey(
        key=key,
        roles=_parse_roles(body.get(A_ROLES)),
        scopes=_parse_scopes(body.get(A_SCOPES)),
        not_before=nbf,
        not_after=naf,
        name=name,
    )
    return KeyAuthorization(
        trusted=trusted,
        alg=alg,
        issued_at=_uint(body, A_ISSUED, "authorization") if A_ISSUED in body else nbf,
        issuer_kid=issuer_kid or b"",
        raw=raw,
    )


# --- key lists -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyList:
    """The set of operational keys a device accepts now, with a monotonic version."""

    version: int
    issued_at: int
    authorizations: tuple[KeyAuthorization, ...]
    revoked: frozenset[bytes]
    threshold: int
    signer_kid: bytes
    raw: bytes  # the signed document, what devices persist and servers publish
    # Roles the trust anchor itself holds. Empty for a rooted fleet (the root only signs key
    # lists and authorizations); {firmware, keylist} for a fleet that shipped with a single
    # operational key and no root (transition mode, docs/operations.md).
    anchor_roles: frozenset[Role] = frozenset()

    def key(self, kid: bytes) -> KeyAuthorization | None:
        for a in self.authorizations:
            if a.key_id == kid:
                return a
        return None

    def usable(self, role: Role, now: int | None) -> list[KeyAuthorization]:
        """Authorizations that could verify a document for ``role`` at ``now``."""
        out = []
        for a in self.authorizations:
            if a.key_id in self.revoked or role not in a.trusted.roles:
                continue
            if now is not None and not (a.trusted.not_before <= now <= a.trusted.not_after):
                continue
            out.append(a)
        return out


def sign_keylist(
    signer: Signer,
    *,
    version: int,
    authorizations: list[bytes],
    revoked: set[bytes] | frozenset[bytes] = frozenset(),
    threshold: int = 1,
    issued_at: int,
    anchor_roles: set[Role] | frozenset[Role] = frozenset(),
) -> bytes:
    """Produce a signed key list (also the key-list update document devices install).

    ``anchor_roles`` is only for single-key fleets (see :func:`single_key_keylist`).
    """
    if version < 1:
        raise TrustError(ErrorCode.REPLAY, "key-list versions start at 1")
    if threshold < 1:
        raise TrustError(ErrorCode.THRESHOLD, "threshold must be at least 1")
    if len(authorizations) > MAX_KEYS:
        raise TrustError(ErrorCode.TOO_LARGE, f"at most {MAX_KEYS} keys per list")
    payload = {
        L_TYPE: DOC_KEYLIST,
        L_VERSION: int(version),
        L_ISSUED: int(issued_at),
        L_AUTHS: [cbor.loads(a, _AUTH_LIMITS) for a in authorizations],
        L_REVOKED: sorted(revoked),
        L_THRESHOLD: int(threshold),
    }
    if anchor_roles:
        payload[L_ANCHOR_ROLES] = sorted(r.value for r in anchor_roles)
    # Re-embedding decoded authorizations re-encodes them canonically; they were produced by
    # cbor.dumps so the bytes (and therefore their signatures) are unchanged.
    return sign1(signer, cbor.dumps(payload), detached=False).encode()


def decode_keylist_unverified(data: bytes) -> tuple[Sign1, dict[Any, Any]]:
    msg = decode_sign1(cbor.loads(data, _LIST_LIMITS), tag_required=True)
    return msg, _payload_of(msg, DOC_KEYLIST, _LIST_LIMITS)


def parse_keylist(
    data: bytes,
    signer: PublicKey,
    authorization_issuers: dict[bytes, PublicKey],
) -> KeyList:
    """Verify a key list's signature with ``signer`` and every authorization inside it."""
    msg, body = decode_keylist_unverified(data)
    if msg.kid is not None and msg.kid != signer.key_id:
        raise TrustError(ErrorCode.UNTRUSTED_KEY, "key list signed by a different key")
    msg.verify(signer)
    auth_items = _field(body, L_AUTHS, list, "key list")
    if len(auth_items) > MAX_KEYS:
        raise FormatError(ErrorCode.TOO_LARGE, f"more than {MAX_KEYS} keys in a key list")
    auths: list[KeyAuthorization] = []
    seen: set[bytes] = set()
    for item in auth_items:
        auth = parse_authorization(cbor.dumps(item), authorization_issuers)
        if auth.key_id in seen:
            raise FormatError(ErrorCode.MALFORMED, "key listed twice in a key list")
        seen.add(auth.key_id)
        auths.append(auth)
    revoked = _field(body, L_REVOKED, list, "key list")
    if not all(isinstance(k, bytes) for k in revoked):
        raise FormatError(ErrorCode.MALFORMED, "revoked entries must be key ids")
    threshold = _uint(body, L_THRESHOLD, "key list")
    if threshold < 1:
        raise FormatError(ErrorCode.MALFORMED, "threshold must be at least 1")
    anchor_roles = _parse_roles(body[L_ANCHOR_ROLES]) if L_ANCHOR_ROLES in body else frozenset()
    return KeyList(
        version=_uint(body, L_VERSION, "key list"),
        issued_at=_uint(body, L_ISSUED, "key list"),
        authorizations=tuple(auths),
        revoked=frozenset(revoked),
        threshold=threshold,
        signer_kid=signer.key_id,
        raw=data,
        anchor_roles=anchor_roles,
    )


def single_key_keylist(key: Signer, *, issued_at: int, version: int = 1) -> bytes:
    """The key list of a fleet that shipped with ONE operational key and no root.

    The key is the trust anchor (its hash is what the device's OTP holds) *and* signs firmware
    and key-list updates. A later key-list update signed by it can add a new key (whose
    authorization it issues), and one signed by the new key can revoke it: the runbook's
    transition mode. Whoever holds this key can do the same, which is the mode's risk.
    """
    return sign_keylist(
        key,
        version=version,
        authorizations=[],
        issued_at=issued_at,
        anchor_roles=frozenset({Role.FIRMWARE, Role.KEYLIST}),
    )
