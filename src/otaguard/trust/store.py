"""The device's trust state and the rules for changing it.

A TrustStore is immutable: applying a key-list update returns a new store or raises, so a
caller (the device agent) can persist the new state atomically and never holds a half-applied
one. It is also the :class:`~otaguard.trust.model.KeyResolver` every verifier asks.

Time: devices may have no trustworthy clock, so expiry is judged against the later of the
caller's ``now`` and ``latest_time`` — the newest issue time seen in a verified document. A
device whose clock was reset to 1970 therefore cannot be talked into accepting an expired key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..crypto.algorithms import CoseAlg
from ..crypto.keys import PublicKey
from ..errors import ErrorCode, TrustError
from .documents import KeyList, decode_keylist_unverified, parse_keylist
from .model import _ANY_SCOPE, Role, TrustedKey

# Fast-forward bounds (DESIGN threat 2.4, docs/threat-model.md G4b). Key-list versions only
# grow, so a list with an absurd version would leave no room for any later list, not even the
# root's: the fleet could never rotate again. No signer may go past MAX_KEYLIST_VERSION, and a
# transition-mode signer (a ``keylist``-role key, possibly compromised) may advance the
# version by at most MAX_KEYLIST_STEP per update, far more than a device that missed every
# publication for years would see, and little enough that exhausting the range through
# devices that take one list per poll would take centuries.
MAX_KEYLIST_VERSION = 2**32 - 1
MAX_KEYLIST_STEP = 1000


@dataclass(frozen=True)
class TrustStore:
    root: PublicKey
    keylist: KeyList
    latest_time: int = 0

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, root: PublicKey, keylist_bytes: bytes, *, latest_time: int = 0) -> TrustStore:
        """Load persisted state: the key list must be signed by the root itself.

        A list installed through a transition-mode update (signed by an operational key) is
        re-verified from the same update chain by :meth:`apply_update`; persisted state that
        the root did not sign is loaded with :meth:`restore`.
        """
        kl = parse_keylist(keylist_bytes, root, {root.key_id: root})
        store = cls(root, kl, max(latest_time, kl.issued_at))
        store._check_usable(kl)
        return store

    @classmethod
    def restore(
        cls, root: PublicKey, keylist_bytes: bytes, signer: PublicKey, *, latest_time: int = 0
    ) -> TrustStore:
        """Reload a list signed by ``signer`` (root or an operational key the device held
        when it installed the list). Authorizations inside are always root-verified."""
        kl = parse_keylist(keylist_bytes, signer, {root.key_id: root})
        if signer != root and kl.key(signer.key_id) is None and signer.key_id not in kl.revoked:
            raise TrustError(ErrorCode.UNTRUSTED_KEY, "key list signer is unknown to it")
        return cls(root, kl, max(latest_time, kl.issued_at))

    # --- KeyResolver -------------------------------------------------------------------------
    @property
    def threshold(self) -> int:
        return self.keylist.threshold

    @property
    def version(self) -> int:
        return self.keylist.version

    def effective_time(self, now: int | None) -> int | None:
        t = max(now or 0, self.latest_time)
        return t or None

    def resolve(self, kid: bytes | None, alg: CoseAlg, role: Role, now: int | None) -> TrustedKey:
        return self._resolve(kid, alg, role, self.effective_time(now), timed=True)

    def resolve_untimed(self, kid: bytes | None, alg: CoseAlg, role: Role) -> TrustedKey:
        """Like :meth:`resolve` but ignoring validity windows (revocation still counts).

        For the bootloader re-checking a pending image that was verified, in time, when it was
        installed: a key expiring between install and reboot must not brick the update.
        """
        return self._resolve(kid, alg, role, None, timed=False)

    def anchor_key(self) -> TrustedKey | None:
        """The anchor as an operational key (single-key fleets only), unless it is revoked."""
        kl = self.keylist
        if not kl.anchor_roles or self.root.key_id in kl.revoked:
            return None
        return TrustedKey(self.root, kl.anchor_roles, (_ANY_SCOPE,), 0, 2**63 - 1, "anchor")

    def usable(self, role: Role, now: int | None) -> list[TrustedKey]:
        """Keys that could verify a document for ``role`` at ``now`` (the anchor included)."""
        out = [a.trusted for a in self.keylist.usable(role, now)]
        anchor = self.anchor_key()
        if anchor is not None and role in anchor.roles:
            out.append(anchor)
        return out

    def _resolve(
        self, kid: bytes | None, alg: CoseAlg, role: Role, t: int | None, *, timed: bool
    ) -> TrustedKey:
        kl = self.keylist
        if kid is None:
            usable = self.usable(role, t)
            if len(usable) != 1:
                raise TrustError(ErrorCode.UNTRUSTED_KEY, "signature carries no key id")
            kid = usable[0].key_id
        if kid in kl.revoked:
            raise TrustError(ErrorCode.KEY_REVOKED, f"key {kid.hex()} is revoked")
        auth = kl.key(kid)
        if auth is not None:
            trusted = auth.trusted
        elif kid == self.root.key_id and kl.anchor_roles:
            anchor = self.anchor_key()
            assert anchor is not None  # not revoked: checked above
            trusted = anchor
        else:
            raise TrustError(ErrorCode.UNTRUSTED_KEY, f"key {kid.hex()} is not in the key list")
        trusted.check_role(role)
        if timed:
            trusted.check_time(t)
        trusted.key.check_alg(alg)
        return trusted

    # --- updates ------------------------------------------------------------------------------
    def observe_time(self, t: int) -> TrustStore:
        """Raise the latest known time from a verified document (never lowers it)."""
        return self if t <= self.latest_time else replace(self, latest_time=t)

    def apply_update(self, data: bytes, now: int | None = None) -> TrustStore:
        """Verify and install a key-list update; return the new store.

        Accepted signers: the root, or (transition mode, DESIGN §8) a currently trusted key
        holding the ``keylist`` role. A transition-mode update may not weaken the device:
        it cannot lower the threshold or un-revoke a key; only the root can.
        """
        msg, _ = decode_keylist_unverified(data)
        if msg.kid is not None and msg.kid == self.root.key_id:
            if self.root.key_id in self.keylist.revoked:
                # Only possible for a single-key fleet whose anchor was retired (transition
                # mode finished): from then on the anchor's signature counts for nothing.
                raise TrustError(ErrorCode.KEY_REVOKED, "the trust anchor key is revoked")
            signer = self.root
        else:
            if msg.kid is None:
                raise TrustError(ErrorCode.UNTRUSTED_KEY, "key-list update carries no key id")
            signer = self.resolve(msg.kid, msg.alg, Role.KEYLIST, now).key
        new = parse_keylist(data, signer, {self.root.key_id: self.root})
        if new.version <= self.keylist.version:
            raise TrustError(
                ErrorCode.REPLAY,
                f"key-list version {new.version} is not newer than {self.keylist.version}",
            )
        if new.version > MAX_KEYLIST_VERSION:
            raise TrustError(
                ErrorCode.FAST_FORWARD,
                f"key-list version {new.version} is beyond the limit {MAX_KEYLIST_VERSION}",
            )
        if signer != self.root:
            if new.version - self.keylist.version > MAX_KEYLIST_STEP:
                raise TrustError(
                    ErrorCode.FAST_FORWARD,
                    f"key-list version jumps {new.version - self.keylist.version} ahead; only "
                    f"the root may advance it by more than {MAX_KEYLIST_STEP}",
                )
            if new.threshold < self.keylist.threshold:
                raise TrustError(
                    ErrorCode.THRESHOLD, "only the root may lower the signature threshold"
                )
            if not new.revoked >= self.keylist.revoked:
                raise TrustError(ErrorCode.KEY_REVOKED, "only the root may un-revoke a key")
            if not new.anchor_roles <= self.keylist.anchor_roles:
                raise TrustError(ErrorCode.KEY_ROLE, "only the anchor may give itself roles")
        store = TrustStore(self.root, new, max(self.latest_time, new.issued_at))
        store._check_usable(new)
        return store

    def _check_usable(self, kl: KeyList) -> None:
        usable = self.usable(Role.FIRMWARE, self.effective_time(None))
        if not usable:
            raise TrustError(
                ErrorCode.EMPTY_KEYLIST,
                "key list leaves no valid, unrevoked firmware key; refusing it",
            )
        if len(usable) < kl.threshold:
            raise TrustError(
                ErrorCode.THRESHOLD,
                f"threshold {kl.threshold} exceeds the {len(usable)} usable firmware keys",
            )
