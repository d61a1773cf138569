"""The audit-sealing key: authorized by the root for the ``audit`` role only.

A seal proves that the records before it existed when it was made. If the key that signs
firmware also sealed the log, whoever can make it sign (a compromised CI token, an insider at
the HSM) could also re-seal a rewritten history; so seals come from a key of their own, which
the root authorizes for sealing and nothing else, in a document of its own
(``otaguard keys authorize-audit``). Verifiers take the seal key from that document, checked
against the root public key, instead of from a bare PEM whose role nobody vouched for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..crypto.keys import PublicKey
from ..errors import ErrorCode, OtaError, TrustError
from ..trust.documents import parse_authorization
from ..trust.model import Role, TrustedKey


def audit_key(authorization: bytes, root: PublicKey) -> TrustedKey:
    """The key a root-signed audit authorization names (E_KEY_ROLE unless audit-only)."""
    trusted = parse_authorization(authorization, {root.key_id: root}).trusted
    if trusted.roles != frozenset({Role.AUDIT}):
        raise TrustError(
            ErrorCode.KEY_ROLE,
            f"key {trusted.key_id.hex()} is not authorized for audit sealing only "
            f"(roles: {', '.join(sorted(r.value for r in trusted.roles))})",
        )
    return trusted


def seal_window_check(keys: Sequence[TrustedKey]) -> Callable[[PublicKey, int], None]:
    """A seal-time check for :func:`~.audit.verify_log`: each seal inside its key's window."""
    by_id = {k.key_id: k for k in keys}

    def check(key: PublicKey, sealed_at: int) -> None:
        tk = by_id.get(key.key_id)
        if tk is not None:
            tk.check_time(sealed_at)

    return check


def check_separate(sealer: PublicKey, signing_keys: Sequence[PublicKey]) -> None:
    """Refuse a configuration whose sealing key also signs (E_CONFIG)."""
    if any(sealer.key_id == k.key_id for k in signing_keys):
        raise OtaError(
            ErrorCode.CONFIG,
            "the audit-sealing key must not be a signing key: seals would then prove nothing "
            "against whoever can make that key sign",
        )
