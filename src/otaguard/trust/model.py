"""The vocabulary of trust: roles, scopes, trusted keys, and the resolver verifiers ask.

Verifiers (manifest, key-list updates, the bootloader) never look inside a trust store; they
ask a :class:`KeyResolver` "which trusted key is this kid, for this role, at this time?" and
get either a :class:`TrustedKey` or a TrustError with the precise reason. That keeps every
verifier small and makes the trust decision one piece of code.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from ..crypto.algorithms import CoseAlg
from ..crypto.keys import PublicKey
from ..errors import ErrorCode, TrustError


class Role(StrEnum):
    FIRMWARE = "firmware"  # may sign update manifests
    KEYLIST = "keylist"  # may sign key-list updates (transition mode)
    # May seal audit logs. An audit key is authorized by the root in a document of its own
    # (``keys authorize-audit``), never in a device key list: devices have no use for it, and a
    # key that seals the record of firmware signatures must not be one that signs firmware.
    AUDIT = "audit"


@dataclass(frozen=True)
class Scope:
    """What an operational key may sign for. Empty ``class_ids`` = every class of the vendor."""

    vendor_id: uuid.UUID
    class_ids: frozenset[uuid.UUID] = field(default_factory=frozenset)

    def covers(self, vendor_id: uuid.UUID, class_id: uuid.UUID | None) -> bool:
        if vendor_id != self.vendor_id:
            return False
        return not self.class_ids or (class_id is not None and class_id in self.class_ids)


@dataclass(frozen=True)
class TrustedKey:
    """An operational key as the device trusts it (from a root-signed authorization)."""

    key: PublicKey
    roles: frozenset[Role]
    scopes: tuple[Scope, ...]
    not_before: int  # POSIX seconds
    not_after: int
    name: str = ""

    @property
    def key_id(self) -> bytes:
        return self.key.key_id

    def check_role(self, role: Role) -> None:
        if role not in self.roles:
            raise TrustError(
                ErrorCode.KEY_ROLE, f"key {self.key_id.hex()} lacks the {role.value!r} role"
            )

    def check_time(self, now: int | None) -> None:
        if now is None:
            return
        if now < self.not_before:
            raise TrustError(
                ErrorCode.KEY_EXPIRED,
                f"key {self.key_id.hex()} is not valid before {self.not_before}",
            )
        if now > self.not_after:
            raise TrustError(
                ErrorCode.KEY_EXPIRED, f"key {self.key_id.hex()} expired at {self.not_after}"
            )

    def check_scope(self, vendor_id: uuid.UUID, class_id: uuid.UUID | None) -> None:
        if not any(s.covers(vendor_id, class_id) for s in self.scopes):
            raise TrustError(
                ErrorCode.KEY_SCOPE,
                f"key {self.key_id.hex()} is not authorized for vendor {vendor_id} "
                f"class {class_id}",
            )


class KeyResolver(Protocol):
    """What a verifier needs from a trust store."""

    @property
    def threshold(self) -> int:
        """Distinct trusted signatures a firmware manifest needs (k of k-of-n); at least 1."""
        ...

    def resolve(self, kid: bytes | None, alg: CoseAlg, role: Role, now: int | None) -> TrustedKey:
        """Return the trusted key ``kid`` names, checked for role, validity and revocation.

        Raises TrustError: E_UNTRUSTED_KEY (unknown kid), E_KEY_REVOKED, E_KEY_EXPIRED,
        E_KEY_ROLE; CryptoError E_ALGORITHM if ``alg`` does not fit the key.
        """
        ...


class StaticKeys:
    """A resolver over explicit public keys (``manifest verify --key``, conformance tests).

    Every given key is trusted for every role and scope with no expiry: it is the caller's
    statement "I trust exactly these keys", with no hierarchy behind it.
    """

    def __init__(self, keys: list[PublicKey], threshold: int = 1) -> None:
        if not keys:
            raise TrustError(ErrorCode.EMPTY_KEYLIST, "no keys given")
        self._keys = {k.key_id: k for k in keys}
        # Built once: a verifier resolves a key for every signature it checks.
        self._trusted = {
            kid: TrustedKey(k, frozenset(Role), (_ANY_SCOPE,), 0, 2**63 - 1, "static")
            for kid, k in self._keys.items()
        }
        self._threshold = max(1, threshold)

    @property
    def threshold(self) -> int:
        return self._threshold

    def resolve(self, kid: bytes | None, alg: CoseAlg, role: Role, now: int | None) -> TrustedKey:
        if kid is not None:
            trusted = self._trusted.get(kid)
        elif len(self._keys) == 1:
            # The SUIT examples carry no kid; with exactly one candidate the choice is forced.
            trusted = next(iter(self._trusted.values()))
        else:
            trusted = None
        if trusted is None:
            raise TrustError(ErrorCode.UNTRUSTED_KEY, f"no trusted key with kid {kid!r}")
        trusted.key.check_alg(alg)
        return trusted


class _AnyScope(Scope):
    def covers(self, vendor_id: uuid.UUID, class_id: uuid.UUID | None) -> bool:
        return True


_ANY_SCOPE = _AnyScope(uuid.UUID(int=0))
