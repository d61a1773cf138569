"""The fleet CA: one P-256 key that issues device client certificates and the server certificate.

Devices prove who they are with a certificate from this CA (mTLS); the update endpoint proves
itself with a certificate from the same CA, which devices pin instead of trusting the system
store. The two kinds are kept apart by Extended Key Usage: device certificates carry only
``clientAuth`` and server certificates only ``serverAuth``, and OpenSSL enforces the purpose on
both sides, so a device certificate can never be used to impersonate the server.

The CA key lives in an encrypted PKCS#8 file (development) or in an HSM via PKCS#11. With an
HSM the private key never reaches Python, so ``cryptography``'s certificate builder cannot sign;
we let it build the to-be-signed structure with a throwaway key of the same algorithm (the TBS
contains no key material of the issuer), have the HSM sign those bytes, and assemble the final
DER ourselves.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ...crypto.algorithms import CoseAlg
from ...crypto.keys import PublicKey
from ...errors import CryptoError, ErrorCode, KeyStoreError, OtaError, UsageError
from ...fsutil import atomic_write, read_limited

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_META = "ca.json"
MAX_PEM = 64 * 1024
MIN_PASSPHRASE = 8
DEFAULT_CA_DAYS = 3650
DEFAULT_DEVICE_DAYS = 90
DEFAULT_SERVER_DAYS = 365
# ecdsa-with-SHA256 AlgorithmIdentifier (RFC 5758 §3.2): parameters absent.
_ECDSA_SHA256_ALGID = bytes.fromhex("300a06082a8648ce3d040302")


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(content)) + content


class _RawSigner(Protocol):
    """The slice of :class:`otaguard.crypto.cose.Signer` the CA needs."""

    @property
    def public_key(self) -> PublicKey: ...

    @property
    def alg(self) -> CoseAlg: ...

    def sign(self, data: bytes) -> bytes: ...


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def fingerprint(cert_der: bytes) -> str:
    """SHA-256 over the DER certificate, hex: how the DB names a device's current cert."""
    return hashlib.sha256(cert_der).hexdigest()


def spki_sha256(cert: x509.Certificate) -> str:
    """SHA-256 over SubjectPublicKeyInfo (the RFC 7469 pin), hex."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def load_cert_pem(data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CryptoError(ErrorCode.CERT, "not a PEM X.509 certificate") from None


@dataclass(frozen=True)
class IssuedCert:
    cert: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.der)


class FleetCA:
    """A loaded CA: its certificate plus something that can sign with its key."""

    def __init__(
        self,
        cert: x509.Certificate,
        *,
        key: ec.EllipticCurvePrivateKey | None = None,
        signer: _RawSigner | None = None,
    ) -> None:
        if (key is None) == (signer is None):
            raise UsageError(ErrorCode.USAGE, "FleetCA needs exactly one of key or signer")
        pub = PublicKey(key.public_key() if key is not None else signer.public_key.crypto_key)  # type: ignore[union-attr]
        if pub.kind != "p256":
            raise CryptoError(ErrorCode.ALGORITHM, "the fleet CA key must be ECDSA P-256")
        if PublicKey(cert.public_key()) != pub:
            raise CryptoError(ErrorCode.KEY_FORMAT, "CA certificate does not match the CA key")
        self.cert = cert
        self._key = key
        self._signer = signer
        self.public_key = pub

    # --- creation / loading --------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        *,
        passphrase: bytes | None = None,
        signer: _RawSigner | None = None,
        pkcs11_uri: str | None = None,
        name: str = "otaguard fleet CA",
        days: int = DEFAULT_CA_DAYS,
    ) -> FleetCA:
        """Create a CA in ``directory`` (ca.pem, ca.json, and ca.key for a file key)."""
        d = Path(directory)
        if (d / CA_CERT).exists():
            raise OtaError(ErrorCode.EXISTS, f"{d / CA_CERT} already exists")
        key: ec.EllipticCurvePrivateKey | None = None
        if signer is None:
            if passphrase is None or len(passphrase) < MIN_PASSPHRASE:
                raise KeyStoreError(
                    ErrorCode.PIN, f"CA passphrase must be at least {MIN_PASSPHRASE} characters"
                )
            key = ec.generate_private_key(ec.SECP256R1())
            pub = key.public_key()
        else:
            if signer.alg not in (CoseAlg.ES256, CoseAlg.ESP256):
                raise CryptoError(ErrorCode.ALGORITHM, "the fleet CA key must be ECDSA P-256")
            pub = signer.public_key.crypto_key  # type: ignore[assignment]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        )
        cert = _sign(builder, key, signer)
        d.mkdir(parents=True, exist_ok=True)
        meta: dict[str, str] = {"name": name}
        if key is not None:
            assert passphrase is not None
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(passphrase),
            )
            atomic_write(d / CA_KEY, pem, mode=0o600, overwrite=False)
            meta["key"] = "file"
        else:
            meta["key"] = "pkcs11"
            meta["pkcs11_uri"] = pkcs11_uri or ""
        atomic_write(d / CA_META, json.dumps(meta, indent=2).encode(), overwrite=False)
        atomic_write(d / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), overwrite=False)
        return cls(cert, key=key, signer=signer)

    @staticmethod
    def meta(directory: str | os.PathLike[str]) -> dict[str, str]:
        raw = read_limited(Path(directory) / CA_META, MAX_PEM)
        try:
            meta = json.loads(raw)
        except ValueError:
            raise OtaError(ErrorCode.MALFORMED, f"{directory}/{CA_META} is not JSON") from None
        if not isinstance(meta, dict):
            raise OtaError(ErrorCode.MALFORMED, f"{directory}/{CA_META} is not an object")
        return {str(k): str(v) for k, v in meta.items()}

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        passphrase: bytes | None = None,
        signer: _RawSigner | None = None,
    ) -> FleetCA:
        d = Path(directory)
        cert = load_ca_cert(d)
        if signer is not None:
            return cls(cert, signer=signer)
        data = read_limited(d / CA_KEY, MAX_PEM)
        if b"ENCRYPTED PRIVATE KEY" not in data:
            raise CryptoError(ErrorCode.KEY_FORMAT, f"{d / CA_KEY}: must be encrypted PKCS#8")
        if passphrase is None:
            raise KeyStoreError(ErrorCode.PIN, "CA passphrase required")
        try:
            key = serialization.load_pem_private_key(data, password=passphrase)
        except (ValueError, TypeError):
            raise KeyStoreError(ErrorCode.PIN, f"{d / CA_KEY}: wrong passphrase") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CryptoError(ErrorCode.ALGORITHM, "the fleet CA key must be ECDSA P-256")
        return cls(cert, key=key)

    # --- issuing -------------------------------------------------------------------------------
    def _builder(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        not_before: dt.datetime,
        not_after: dt.datetime,
        eku: x509.ObjectIdentifier,
    ) -> x509.CertificateBuilder:
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise CryptoError(ErrorCode.ALGORITHM, "certificate keys must be ECDSA P-256")
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )

    def issue_device(
        self,
        serial: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        days: int = DEFAULT_DEVICE_DAYS,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> IssuedCert:
        """A client certificate whose CN and serialNumber are the device serial."""
        check_serial(serial)
        start = not_before or (_now() - dt.timedelta(minutes=5))
        end = not_after or (start + dt.timedelta(days=days))
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, serial),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, serial),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "otaguard-device"),
            ]
        )
        b = self._builder(subject, public_key, start, end, ExtendedKeyUsageOID.CLIENT_AUTH)
        return IssuedCert(_sign(b, self._key, self._signer))

    def issue_server(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        dns_names: list[str],
        ip_addresses: list[str],
        days: int = DEFAULT_SERVER_DAYS,
    ) -> IssuedCert:
        if not dns_names and not ip_addresses:
            raise UsageError(ErrorCode.USAGE, "a server certificate needs a DNS name or an IP")
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        cn = dns_names[0] if dns_names else ip_addresses[0]
        start = _now() - dt.timedelta(minutes=5)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = self._builder(
            subject,
            public_key,
            start,
            start + dt.timedelta(days=days),
            ExtendedKeyUsageOID.SERVER_AUTH,
        ).add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return IssuedCert(_sign(b, self._key, self._signer))


def _sign(
    builder: x509.CertificateBuilder,
    key: ec.EllipticCurvePrivateKey | None,
    signer: _RawSigner | None,
) -> x509.Certificate:
    if key is not None:
        return builder.sign(key, hashes.SHA256())
    assert signer is not None
    # Build the TBS with a throwaway key of the same algorithm: the TBS names the signature
    # algorithm and the issuer but contains nothing of the issuer's key, so it is exactly what
    # the HSM must sign.
    scratch = builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    tbs = scratch.tbs_certificate_bytes
    raw = signer.sign(tbs)
    if len(raw) != 64:
        raise CryptoError(ErrorCode.SIGNATURE, "HSM returned a malformed ECDSA signature")
    sig = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    der = _der(0x30, tbs + _ECDSA_SHA256_ALGID + _der(0x03, b"\x00" + sig))
    cert = x509.load_der_x509_certificate(der)
    # Never hand out a certificate the HSM signed wrongly.
    signer.public_key.verify(CoseAlg.ES256, raw, tbs)
    return cert


def verify_forwarded_cert(
    ca_cert: x509.Certificate, cert: x509.Certificate, now: dt.datetime | None = None
) -> str:
    """Check a forwarded client certificate the way the TLS stack would; return the serial.

    Used in proxy mode, where the proxy says it verified the certificate: we still refuse
    anything the fleet CA did not sign, anything outside its validity, and non-client certs.
    """
    try:
        cert.verify_directly_issued_by(ca_cert)
    except Exception:
        raise OtaError(ErrorCode.CERT, "client certificate not issued by the fleet CA") from None
    t = now or dt.datetime.now(dt.UTC)
    if not (cert.not_valid_before_utc <= t <= cert.not_valid_after_utc):
        raise OtaError(ErrorCode.CERT, "client certificate outside its validity period")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise OtaError(ErrorCode.CERT, "client certificate has no extended key usage") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise OtaError(ErrorCode.CERT, "certificate is not a client certificate")
    return serial_of(cert)


def load_ca_cert(directory: str | os.PathLike[str]) -> x509.Certificate:
    return load_cert_pem(read_limited(Path(directory) / CA_CERT, MAX_PEM))


_SERIAL_OK = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:")
MAX_SERIAL = 64


def check_serial(serial: str) -> str:
    if not (1 <= len(serial) <= MAX_SERIAL) or not set(serial) <= _SERIAL_OK:
        raise UsageError(
            ErrorCode.USAGE, f"device serial must be 1-{MAX_SERIAL} chars of [A-Za-z0-9-_.:]"
        )
    return serial


def serial_of(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if len(attrs) != 1:
        raise OtaError(ErrorCode.CERT, "client certificate has no single serialNumber")
    value = attrs[0].value
    if not isinstance(value, str):
        raise OtaError(ErrorCode.CERT, "client certificate serialNumber is not a string")
    try:
        return check_serial(value)
    except UsageError:
        raise OtaError(ErrorCode.CERT, "client certificate serialNumber is malformed") from None


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Device/server TLS keys: unencrypted PKCS#8, mode 0600 (the TLS stack loads them)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(path, pem, mode=0o600, overwrite=False)
