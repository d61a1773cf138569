"""Secure storage: OTP, monotonic counters, the trust store, identity, agent bookkeeping.

Everything except OTP lives in :class:`~.records.Record` pairs, so each value survives a power
cut as either its old or its new version. OTP is programmed once at manufacturing and holds
the root key's hash and the device's product identity (vendor/class id); it can never be
erased, and a second write is refused with E_OTP_WRITTEN.

OTP also holds the device's hardware unique key (HUK): 32 random bytes generated at
provisioning. It models a fuse that only the bootloader and the update agent can read (real
silicon: a key fuse or secure-element slot that an external flash programmer cannot read out;
see docs/reliability.md "Limits of the model"). From it, HKDF-SHA256 derives one MAC key per
authenticated record type, with a distinct label each (``otaguard/record-mac/v1/<name>``): the
boot state, which pins the confirmed images, and the monotonic counters. A raw-flash attacker
who recomputes a checksum therefore produces a copy that does not authenticate.

Counters only rise. The trust store is persisted as the signed key-list document plus the
public key that signed it; every load re-verifies it against the root whose hash is in OTP,
so tampered storage cannot smuggle in a key.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .. import cbor
from ..crypto.keys import PublicKey
from ..errors import DeviceError, ErrorCode, OtaError
from ..trust.documents import decode_keylist_unverified
from ..trust.store import TrustStore
from .flash import Flash
from .hal import CounterFloor, OtpMedia, RecordMedia
from .layout import DEFAULT_RECORDS, Layout
from .records import KeySource, Record

OTP_MAGIC = b"OGOT"
_OTP_HDR = struct.Struct(">4sH16s")
MAX_SUSPECTS = 16
HUK_SIZE = 32
MAC_LABEL = b"otaguard/record-mac/v1/"
# records whose copies carry an HMAC under a HUK-derived key (the boot state is the other one)
AUTHENTICATED_RECORDS = frozenset({"counters"})


def new_huk() -> bytes:
    """A fresh hardware unique key, generated once per device at provisioning."""
    return secrets.token_bytes(HUK_SIZE)


def derive_record_key(huk: bytes, name: str) -> bytes:
    """The MAC key of record type ``name``: HKDF-SHA256 with a per-type label."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=MAC_LABEL + name.encode()
    ).derive(huk)


def _loads(data: bytes, max_size: int) -> Any:
    return cbor.loads(data, cbor.Limits(max_size=max_size, max_depth=8, max_items=1024))


@dataclass(frozen=True)
class OtpData:
    root_hash: bytes  # TrustBundle.root_hash: the root public key's thumbprint
    vendor_id: uuid.UUID
    class_id: uuid.UUID
    model: str
    hw_rev: str
    huk: bytes  # hardware unique key: readable only by the bootloader and agent (module doc)

    def __repr__(self) -> str:  # never print the HUK
        return (
            f"OtpData(vendor_id={self.vendor_id}, class_id={self.class_id}, "
            f"model={self.model!r}, hw_rev={self.hw_rev!r})"
        )

    def encode(self) -> bytes:
        return cbor.dumps(
            {
                1: self.root_hash,
                2: self.vendor_id.bytes,
                3: self.class_id.bytes,
                4: self.model,
                5: self.hw_rev,
                6: self.huk,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> OtpData:
        m = _loads(data, 1024)
        try:
            otp = cls(
                bytes(m[1]),
                uuid.UUID(bytes=m[2]),
                uuid.UUID(bytes=m[3]),
                str(m[4]),
                str(m[5]),
                bytes(m[6]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DeviceError(ErrorCode.STORAGE, f"OTP contents unreadable: {exc}") from None
        if len(otp.huk) != HUK_SIZE:
            raise DeviceError(ErrorCode.STORAGE, "OTP holds no valid hardware unique key")
        return otp


@dataclass(frozen=True)
class Counters:
    security: int = 0
    sequence: int = 0
    keylist_version: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "security": self.security,
            "sequence": self.sequence,
            "keylist_version": self.keylist_version,
        }

    def never_below(self, other: Counters) -> bool:
        return (
            self.security >= other.security
            and self.sequence >= other.sequence
            and self.keylist_version >= other.keylist_version
        )


@dataclass(frozen=True)
class Identity:
    """The device's TLS identity; ``pending_*`` is a renewed key + certificate not yet used
    with the server (device/renewal.py): the current pair stays until the new one worked."""

    device_key: bytes
    certificate: bytes
    pending_key: bytes | None = None
    pending_certificate: bytes | None = None


@dataclass(frozen=True)
class Staging:
    """A download in progress: enough to resume it after a reboot."""

    slot: int
    manifest_digest: bytes  # SHA-256 of the envelope bytes being installed
    committed: int  # image bytes known to be on flash (sector-aligned)
    image_size: int


@dataclass(frozen=True)
class AgentState:
    suspects: tuple[dict[str, Any], ...] = ()
    last_error: str | None = None
    last_detail: str = ""
    events: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class FlashOtp:
    """The OTP sector of a simulated flash part (:class:`~.hal.OtpMedia`): a header with a
    truncated SHA-256 over the body, programmed once, never erasable."""

    def __init__(self, flash: Flash, layout: Layout) -> None:
        self.flash = flash
        self.region = layout.otp

    def read_otp(self) -> bytes | None:
        r = self.region
        head = self.flash.read(r.offset, _OTP_HDR.size)
        if head.count(0xFF) == len(head):
            return None
        magic, length, digest = _OTP_HDR.unpack(head)
        if magic != OTP_MAGIC or length > r.size - _OTP_HDR.size:
            raise DeviceError(ErrorCode.STORAGE, "OTP area is corrupt")
        body = self.flash.read(r.offset + _OTP_HDR.size, length)
        if hashlib.sha256(body).digest()[:16] != digest:
            raise DeviceError(ErrorCode.STORAGE, "OTP area is corrupt")
        return body

    def program_otp(self, body: bytes) -> None:
        r = self.region
        if not self.flash.is_erased(r.offset, r.size):
            raise DeviceError(ErrorCode.OTP_WRITTEN, "OTP is already programmed (write-once)")
        blob = _OTP_HDR.pack(OTP_MAGIC, len(body), hashlib.sha256(body).digest()[:16]) + body
        if len(blob) > r.size:
            raise DeviceError(ErrorCode.TOO_LARGE, "OTP contents too large")
        self.flash.program_bytes(r.offset, blob)


RecordOpener = Callable[[str, KeySource | None], RecordMedia]


class SecureStorage:
    """OTP, counters, trust store, identity and agent bookkeeping over any backend.

    ``open_record(name, key)`` returns the backend's record ``name`` (MAC-authenticated under
    ``key`` when one is given); ``otp`` is the backend's write-once area.
    """

    def __init__(
        self,
        otp: OtpMedia,
        open_record: RecordOpener,
        names: Iterable[str] = DEFAULT_RECORDS,
        *,
        floor: CounterFloor | None = None,
    ) -> None:
        """``floor``: hardware counters the security counter and key-list version can never
        drop below (a TPM); None where the record alone is all there is."""
        self.otp_media = otp
        self.floor = floor
        self.open_record = open_record
        self._keys: dict[str, bytes] = {}
        # (trust record, OTP root hash, the store verified from them) since power-on: RAM
        self._verified_trust: tuple[bytes, bytes, TrustStore] | None = None
        self.rec = {
            name: open_record(
                name, self.record_key(name) if name in AUTHENTICATED_RECORDS else None
            )
            for name in names
        }

    @classmethod
    def on_flash(cls, flash: Flash, layout: Layout) -> SecureStorage:
        def open_record(name: str, key: KeySource | None) -> RecordMedia:
            region = layout.bootstate if name == "bootstate" else layout.records[name]
            return Record(flash, region, key=key)

        return cls(FlashOtp(flash, layout), open_record, layout.records)

    def record_key(self, name: str) -> KeySource:
        """The MAC key source for record type ``name`` (derived from the HUK on first use)."""

        def key() -> bytes:
            k = self._keys.get(name)
            if k is None:
                otp = self.otp()
                if otp is None:
                    raise DeviceError(
                        ErrorCode.STATE, "device is not provisioned (no hardware unique key)"
                    )
                k = self._keys[name] = derive_record_key(otp.huk, name)
            return k

        return key

    # --- OTP ---------------------------------------------------------------------------------
    def otp(self) -> OtpData | None:
        body = self.otp_media.read_otp()
        return None if body is None else OtpData.decode(body)

    def require_otp(self) -> OtpData:
        otp = self.otp()
        if otp is None:
            raise DeviceError(ErrorCode.STATE, "device is not provisioned (OTP empty)")
        return otp

    def program_otp(self, data: OtpData) -> None:
        """Fuse the identity facts, then create the counter record at zero: from here on a
        missing counter record is tamper (:meth:`counters`)."""
        self.otp_media.program_otp(data.encode())
        self._write_counters(Counters())

    # --- counters ----------------------------------------------------------------------------
    def counters(self) -> Counters:
        raw = self.rec["counters"].read()
        if raw is None:
            if self.rec["counters"].written():
                raise DeviceError(ErrorCode.STORAGE, "counter record unreadable in both copies")
            if self.otp() is not None:
                # Provisioning writes the record right after OTP, so a provisioned device
                # without one had it erased: tamper, never "all counters zero" (which would
                # let an older signed image boot again).
                raise DeviceError(
                    ErrorCode.STORAGE, "counter record missing on a provisioned device"
                )
            return Counters()
        m = _loads(raw, 256)
        rec = Counters(int(m[1]), int(m[2]), int(m[3]))
        if self.floor is None:
            return rec
        # The record may be an old copy put back (a restored disk); the hardware counters
        # cannot have gone back, so they win.
        security, keylist_version = self.floor.floor()
        return Counters(
            max(rec.security, security), rec.sequence, max(rec.keylist_version, keylist_version)
        )

    def advance(
        self,
        *,
        security: int | None = None,
        sequence: int | None = None,
        keylist_version: int | None = None,
    ) -> Counters:
        """Raise counters; lowering any is refused with E_COUNTER_DECREASE. Equal is a no-op."""
        cur = self.counters()
        new = Counters(
            cur.security if security is None else security,
            cur.sequence if sequence is None else sequence,
            cur.keylist_version if keylist_version is None else keylist_version,
        )
        if not new.never_below(cur):
            raise DeviceError(
                ErrorCode.COUNTER_DECREASE,
                f"monotonic counters cannot go down: {cur.as_dict()} -> {new.as_dict()}",
            )
        if new != cur:
            self._write_counters(new)
        return new

    def _write_counters(self, c: Counters) -> None:
        if self.floor is not None:
            self.floor.raise_to(c.security, c.keylist_version)  # first: the floor leads
        self.rec["counters"].write(cbor.dumps({1: c.security, 2: c.sequence, 3: c.keylist_version}))

    def catch_up(
        self, *, security: int = 0, sequence: int = 0, keylist_version: int = 0
    ) -> Counters:
        """Raise counters to at least the given values (idempotent; used after reboots)."""
        cur = self.counters()
        return self.advance(
            security=max(cur.security, security),
            sequence=max(cur.sequence, sequence),
            keylist_version=max(cur.keylist_version, keylist_version),
        )

    # --- trust store -------------------------------------------------------------------------
    def save_trust(self, store: TrustStore, signer: PublicKey) -> None:
        payload = cbor.dumps(
            {
                1: store.root.to_cose_key(),
                2: store.keylist.raw,
                3: signer.to_cose_key(),
                4: store.latest_time,
            }
        )
        self.rec["trust"].write(payload)

    def trust_bytes(self) -> bytes | None:
        return self.rec["trust"].read()

    def load_trust(self) -> TrustStore:
        """The device's trust store, verified against the OTP root hash.

        The record is read (and its MAC checked) from flash on every load. Its signatures are
        verified once per power-on and record: a load that finds the very bytes verified
        earlier since power-on, under the same OTP root, reuses that result (verification is
        a function of those bytes alone), as firmware keeps its verified trust state in RAM.
        Any other record (a key-list update, a copy rewritten behind our back) is verified
        anew. :meth:`power_on` forgets it all: the bootloader verifies from scratch.
        """
        otp = self.require_otp()
        raw = self.rec["trust"].read()
        if raw is None:
            raise DeviceError(ErrorCode.STORAGE, "trust store unreadable in both copies")
        seen = self._verified_trust
        if seen is not None and seen[0] == raw and seen[1] == otp.root_hash:
            return seen[2]
        store = self._verify_trust(raw, otp.root_hash)
        self._verified_trust = (raw, otp.root_hash, store)
        return store

    def power_on(self) -> None:
        """RAM does not survive a reset: forget the trust store verified before it."""
        self._verified_trust = None

    def _verify_trust(self, raw: bytes, root_hash: bytes) -> TrustStore:
        m = _loads(raw, self.rec["trust"].capacity)
        try:
            root = PublicKey.from_cose_key(m[1])
            signer = PublicKey.from_cose_key(m[3])
            keylist = bytes(m[2])
            latest = int(m[4])
        except (KeyError, TypeError, ValueError) as exc:
            raise DeviceError(ErrorCode.STORAGE, f"trust record malformed: {exc}") from None
        if root.thumbprint != root_hash:
            raise DeviceError(ErrorCode.STORAGE, "trust store root does not match OTP")
        if signer == root:
            return TrustStore.create(root, keylist, latest_time=latest)
        return TrustStore.restore(root, keylist, signer, latest_time=latest)

    # --- identity ----------------------------------------------------------------------------
    def identity(self) -> Identity | None:
        raw = self.rec["identity"].read()
        if raw is None:
            return None
        m = _loads(raw, self.rec["identity"].capacity)
        if (3 in m) != (4 in m):
            raise DeviceError(ErrorCode.STORAGE, "identity record: half a pending identity")
        if 3 in m:
            return Identity(bytes(m[1]), bytes(m[2]), bytes(m[3]), bytes(m[4]))
        return Identity(bytes(m[1]), bytes(m[2]))

    def write_identity(self, ident: Identity) -> None:
        """One power-cut-safe record write: the old record or the new one, never a mix."""
        doc: dict[int, bytes] = {1: ident.device_key, 2: ident.certificate}
        if (ident.pending_key is None) != (ident.pending_certificate is None):
            raise DeviceError(ErrorCode.STATE, "a pending identity needs its key and certificate")
        if ident.pending_key is not None and ident.pending_certificate is not None:
            doc[3], doc[4] = ident.pending_key, ident.pending_certificate
        self.rec["identity"].write(cbor.dumps(doc))

    # --- staging -----------------------------------------------------------------------------
    def staging(self) -> Staging | None:
        raw = self.rec["staging"].read()
        if raw is None:
            return None
        m = _loads(raw, 512)
        if not m:
            return None
        return Staging(int(m[1]), bytes(m[2]), int(m[3]), int(m[4]))

    def write_staging(self, s: Staging | None) -> None:
        if s is None:
            if self.rec["staging"].read() in (None, cbor.dumps({})):
                return
            self.rec["staging"].write(cbor.dumps({}))
            return
        self.rec["staging"].write(
            cbor.dumps({1: s.slot, 2: s.manifest_digest, 3: s.committed, 4: s.image_size})
        )

    # --- agent bookkeeping -------------------------------------------------------------------
    def agent_state(self) -> AgentState:
        raw = self.rec["agent"].read()
        if raw is None:
            return AgentState()
        m = _loads(raw, self.rec["agent"].capacity)
        return AgentState(
            suspects=tuple(dict(s) for s in m.get(1, [])),
            last_error=m.get(2),
            last_detail=str(m.get(3, "")),
            events=int(m.get(4, 0)),
        )

    def write_agent_state(self, st: AgentState) -> None:
        body = {
            1: list(st.suspects[-MAX_SUSPECTS:]),
            2: st.last_error,
            3: st.last_detail[:200],
            4: st.events,
        }
        self.rec["agent"].write(cbor.dumps(body))


def keylist_signer(store: TrustStore, update: bytes) -> PublicKey:
    """The public key that signed ``update`` (root, or a trusted key-list key), for persisting."""
    msg, _ = decode_keylist_unverified(update)
    if msg.kid is None or msg.kid == store.root.key_id:
        return store.root
    auth = store.keylist.key(msg.kid)
    if auth is None:
        raise OtaError(ErrorCode.UNTRUSTED_KEY, "key-list update signer is not trusted")
    return auth.trusted.key
