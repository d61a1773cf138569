"""Server side of device certificate renewal: check a device's CSR, issue its next certificate.

A device renews over its current mTLS identity (``POST /v1/certificate``), so the request is
authenticated before a byte of the CSR is read; the CSR only proves possession of the new key
and must name the caller's own serial. The new certificate has the same serial and the
configured lifetime, and stays *pending* until the device presents it: only then is the old one
superseded (:func:`~.store.promote_pending_cert`), so a device that never received the answer
(a drop, a power cut) keeps a working identity and simply asks again.

Only ECDSA P-256 keys are accepted (what the fleet CA issues and every device identity uses),
with a SHA-2 CSR signature; anything else is E_ALGORITHM. A genuine device never sends a bad
CSR, so every refusal here is counted as a probe by the caller.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ...errors import ErrorCode, ServerError
from .ca import FleetCA, IssuedCert

MAX_CSR = 16 * 1024
DEFAULT_LIFETIME = 90 * 86400
MIN_LIFETIME = 600
CSR_TYPE = "application/pkcs10"
_PEM_CSR = b"-----BEGIN CERTIFICATE REQUEST-----"
_SHA2 = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


@dataclass(frozen=True)
class CertIssuer:
    """The fleet CA as the server uses it: issues renewed device certificates only."""

    ca: FleetCA
    lifetime: int = DEFAULT_LIFETIME  # seconds

    def __post_init__(self) -> None:
        if self.lifetime < MIN_LIFETIME:
            raise ServerError(ErrorCode.USAGE, f"certificate lifetime under {MIN_LIFETIME} s", 500)

    def issue(self, serial: str, public_key: ec.EllipticCurvePublicKey, now: int) -> IssuedCert:
        """Valid from 5 minutes before ``now`` (server clock; devices' clocks drift) for the
        configured lifetime."""
        start = dt.datetime.fromtimestamp(now - 300, dt.UTC)
        end = start + dt.timedelta(seconds=self.lifetime)
        return self.ca.issue_device(serial, public_key, not_before=start, not_after=end)


def parse_csr(body: bytes) -> x509.CertificateSigningRequest:
    """A PKCS#10 request in PEM or DER, size-bounded before parsing."""
    if len(body) > MAX_CSR:
        raise ServerError(ErrorCode.TOO_LARGE, f"CSR over {MAX_CSR} bytes", 413)
    try:
        if body.lstrip().startswith(_PEM_CSR):
            return x509.load_pem_x509_csr(body)
        return x509.load_der_x509_csr(body)
    except ValueError:
        raise ServerError(ErrorCode.MALFORMED, "not a PKCS#10 certificate request", 400) from None


def check_csr(csr: x509.CertificateSigningRequest, serial: str) -> ec.EllipticCurvePublicKey:
    """The CSR's key if it is a P-256 key that signed the CSR and the CSR names ``serial``."""
    try:
        key = csr.public_key()
        hash_alg = csr.signature_hash_algorithm
    except (UnsupportedAlgorithm, ValueError):
        raise ServerError(
            ErrorCode.ALGORITHM, "CSR key or signature algorithm refused", 400
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ServerError(ErrorCode.ALGORITHM, "device keys must be ECDSA P-256", 400)
    if not isinstance(hash_alg, _SHA2):
        raise ServerError(ErrorCode.ALGORITHM, "CSR must be signed with SHA-2", 400)
    if not csr.is_signature_valid:
        raise ServerError(ErrorCode.SIGNATURE, "CSR signature does not verify", 400)
    serials = csr.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [a.value for a in serials] != [serial] or any(a.value != serial for a in names):
        raise ServerError(ErrorCode.IDENTITY, "CSR names another device than the caller", 403)
    return key
