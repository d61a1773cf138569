"""Device certificate renewal: when to renew, and the key → CSR → certificate → first use flow.

One module for every device kind: the simulated device and the Linux agent both keep their
identity in :class:`~.storage.SecureStorage` and talk through
:class:`~.https_transport.HttpsTransport`; :class:`~.updater.Updater` drives this flow from its
polling cycle and the renewal simulation drives the same class.

The flow, each step leaving a working identity behind (a power cut anywhere included):

1. :func:`renew_due` — less than ``fraction`` of the current certificate's lifetime remains;
2. a new P-256 key is generated here, a CSR naming the device's serial is sent over the
   *current* mTLS identity, and the answer (a certificate for that key and serial) is stored
   as the *pending* identity next to the current one, in one record write. Nothing before
   that write changes the device: a cut or a lost answer just means asking again later (the
   server replaces an unused pending certificate);
3. the next check-in presents the pending identity. The server makes it current and
   supersedes the old one on that first use; the device commits it (one record write) when
   that check-in succeeds. A cut between the server's promotion and the device's commit is
   healed by the next check-in, which tries the pending identity first again;
4. a pending identity the server refuses (E_CERT*: replaced by a re-enrollment, revoked) is
   dropped; one that fails for other reasons while the current identity still works is
   dropped after ``MAX_PENDING_FAILURES`` such check-ins, and renewal starts again.

The private key never leaves the device: only the CSR (public key + proof of possession) is
sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import DeviceError, ErrorCode, OtaError
from .storage import Identity

T = TypeVar("T")
DEFAULT_RENEW_FRACTION = 1 / 3
MAX_PENDING_FAILURES = 3
# Refusals that say the server will never accept this certificate.
CERT_REFUSALS = frozenset(
    {
        ErrorCode.CERT,
        ErrorCode.CERT_REVOKED,
        ErrorCode.CERT_SUPERSEDED,
        ErrorCode.CERT_EXPIRED,
    }
)


def check_fraction(fraction: float) -> float:
    if not 0.0 < fraction < 1.0:
        raise DeviceError(ErrorCode.USAGE, f"renew fraction must be in (0, 1), got {fraction}")
    return fraction


def renew_due(not_before: float, not_after: float, now: float, fraction: float) -> bool:
    """Whether less than ``fraction`` of the certificate's lifetime remains at ``now``.

    A certificate with no lifetime (not_after <= not_before) is always due: asking early is
    harmless, never asking is a lock-out."""
    check_fraction(fraction)
    lifetime = not_after - not_before
    if lifetime <= 0:
        return True
    return not_after - now < fraction * lifetime


class IdentityStore(Protocol):
    """Where the identity lives (:class:`~.storage.SecureStorage`); each write is atomic."""

    def identity(self) -> Identity | None: ...

    def write_identity(self, ident: Identity) -> None: ...


class RenewalTransport(Protocol):
    """What the flow needs of the device connection (:class:`~.https_transport.HttpsTransport`)."""

    def request_certificate(self, csr_pem: bytes) -> bytes: ...

    def use_identity(self, cert_pem: bytes, key_pem: bytes) -> None: ...


@dataclass
class RenewalCounts:
    requested: int = 0  # certificates received and stored as pending
    committed: int = 0  # pending identities that worked and became current
    dropped: int = 0  # pending identities given up
    refused: int = 0  # renewal requests the server refused
    last_error: str | None = None


def _serial(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if len(attrs) != 1 or not isinstance(attrs[0].value, str):
        raise DeviceError(ErrorCode.CERT, "device certificate has no single serialNumber")
    return attrs[0].value


def _load(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise DeviceError(ErrorCode.CERT, "not a PEM certificate") from None


def _spki(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class NewKey:
    """A fresh key for a renewal: what the identity record keeps for it (a PKCS#8 PEM, or a
    TPM-wrapped blob whose private part never leaves the TPM), its SubjectPublicKeyInfo, and
    a CSR it signed."""

    key_pem: bytes
    spki: bytes
    csr_pem: bytes


KeyMaker = Callable[[str], NewKey]


def software_key(serial: str) -> NewKey:
    key, csr = make_csr(serial)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return NewKey(pem, _spki(key.public_key()), csr)


def make_csr(serial: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh P-256 key and a PEM CSR naming ``serial`` (CN and serialNumber)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, serial),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, serial),
        ]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM)


class CertRenewal:
    def __init__(
        self,
        store: IdentityStore,
        transport: RenewalTransport,
        *,
        fraction: float = DEFAULT_RENEW_FRACTION,
        clock: Clock = SYSTEM_CLOCK,
        new_key: KeyMaker = software_key,
    ) -> None:
        """``new_key``: where a renewal's key is made (in software; a TPM device makes it in
        its TPM: ``linux/tpmtls.py``)."""
        self.new_key = new_key
        self.store = store
        self.transport = transport
        self.fraction = check_fraction(fraction)
        self.clock = clock
        self.counts = RenewalCounts()
        self._pending_failures = 0

    def checkin(self, call: Callable[[], T]) -> T:
        """Run ``call`` (a check-in) with the pending identity if there is one.

        Success commits the pending identity. A certificate refusal of it drops it. Any other
        failure is retried with the current identity: if the server calls that one superseded,
        it did promote the pending one (the answer was lost) and the device commits it; if
        the current one works, the pending one is dropped after ``MAX_PENDING_FAILURES``
        such polls (never while nothing works: it may be the only identity the server
        still accepts)."""
        ident = self.store.identity()
        if ident is None or ident.pending_key is None or ident.pending_certificate is None:
            return call()
        self.transport.use_identity(ident.pending_certificate, ident.pending_key)
        try:
            result = call()
        except OtaError as err:
            if err.code == ErrorCode.POWER_CUT:
                raise
            self.transport.use_identity(ident.certificate, ident.device_key)
            if err.code in CERT_REFUSALS:
                self._drop(ident, err)
                return call()
            try:
                result = call()
            except OtaError as err2:
                if err2.code != ErrorCode.CERT_SUPERSEDED:
                    raise
                self._commit(ident)
                self.transport.use_identity(ident.pending_certificate, ident.pending_key)
                return call()
            self._pending_failures += 1
            if self._pending_failures >= MAX_PENDING_FAILURES:
                self._drop(ident, err)
            return result
        self._commit(ident)
        return result

    def _commit(self, ident: Identity) -> None:
        assert ident.pending_key is not None and ident.pending_certificate is not None
        self.store.write_identity(Identity(ident.pending_key, ident.pending_certificate))
        self._pending_failures = 0
        self.counts.committed += 1

    def _drop(self, ident: Identity, err: OtaError) -> None:
        self.store.write_identity(Identity(ident.device_key, ident.certificate))
        self._pending_failures = 0
        self.counts.dropped += 1
        self.counts.last_error = err.code.value

    def due(self) -> bool:
        """Whether the current certificate should be renewed now (and nothing is pending)."""
        ident = self.store.identity()
        if ident is None or ident.pending_key is not None:
            return False
        cert = _load(ident.certificate)
        return renew_due(
            cert.not_valid_before_utc.timestamp(),
            cert.not_valid_after_utc.timestamp(),
            self.clock.now(),
            self.fraction,
        )

    def renew_if_due(self) -> bool:
        """Ask for a new certificate if one is due; True when a pending identity was stored
        (the caller's next :meth:`checkin` then puts it to use). A refusal is recorded in
        ``counts`` and raised: the current identity is untouched."""
        if not self.due():
            return False
        ident = self.store.identity()
        assert ident is not None
        serial = _serial(_load(ident.certificate))
        new = self.new_key(serial)
        try:
            cert_pem = self.transport.request_certificate(new.csr_pem)
            cert = _load(cert_pem)
            if _spki(cert.public_key()) != new.spki or _serial(cert) != serial:
                raise DeviceError(ErrorCode.CERT, "renewed certificate is not for our key/serial")
        except OtaError as err:
            if err.code != ErrorCode.POWER_CUT:
                self.counts.refused += 1
                self.counts.last_error = err.code.value
            raise
        self.store.write_identity(
            Identity(ident.device_key, ident.certificate, new.key_pem, cert_pem)
        )
        self.counts.requested += 1
        return True
