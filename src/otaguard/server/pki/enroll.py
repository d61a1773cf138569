"""Enrollment: issue a device its identity and register it, as one step.

The output directory is what a device is provisioned with: ``device.key`` (its TLS client key,
unless it brought its own CSR — the better practice, since the key then never leaves the
device), ``device.pem`` (its certificate), ``server-ca.pem`` (the only anchor it trusts for
the update endpoint) and ``device.json``.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ...errors import CryptoError, ErrorCode, UsageError
from ...fsutil import atomic_write
from ..storage import store
from ..storage.db import Database
from .ca import FleetCA, IssuedCert, check_serial, spki_sha256, write_private_key

MAX_GROUPS = 32
MAX_LABEL = 64


@dataclass(frozen=True)
class Enrollment:
    serial: str
    cert: IssuedCert
    key_path: Path | None
    cert_path: Path
    ca_path: Path


def _check_label(kind: str, value: str, limit: int) -> str:
    if not value or len(value) > limit or not value.isprintable():
        raise UsageError(ErrorCode.USAGE, f"{kind} must be 1-{limit} printable characters")
    return value


def enroll_device(
    ca: FleetCA,
    db: Database,
    *,
    serial: str,
    model: str,
    hw_rev: str,
    groups: list[str],
    out_dir: Path,
    days: int = 90,
    csr_pem: bytes | None = None,
    replace: bool = False,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Enrollment:
    check_serial(serial)
    _check_label("model", model, 64)
    _check_label("hw_rev", hw_rev, 32)
    if len(groups) > MAX_GROUPS:
        raise UsageError(ErrorCode.USAGE, f"at most {MAX_GROUPS} groups")
    for g in groups:
        _check_label("group", g, MAX_LABEL)
    key: ec.EllipticCurvePrivateKey | None = None
    if csr_pem is not None:
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise CryptoError(ErrorCode.MALFORMED, "not a PEM certificate request") from None
        if not csr.is_signature_valid:
            raise CryptoError(ErrorCode.SIGNATURE, "CSR signature does not verify")
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise CryptoError(ErrorCode.ALGORITHM, "device keys must be ECDSA P-256")
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        pub = key.public_key()
    issued = ca.issue_device(serial, pub, days=days, not_before=not_before, not_after=not_after)
    # Register first: a certificate the server does not know is useless, a registered device
    # whose files failed to write can simply be re-enrolled with --replace.
    with db.write() as conn:
        store.register_device(
            conn,
            serial=serial,
            model=model,
            hw_rev=hw_rev,
            groups=groups,
            cert_fingerprint=issued.fingerprint,
            cert_not_after=int(issued.cert.not_valid_after_utc.timestamp()),
            replace=replace,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path = None
    if key is not None:
        key_path = out_dir / "device.key"
        if key_path.exists() and replace:
            key_path.unlink()
        write_private_key(key_path, key)
    cert_path = out_dir / "device.pem"
    ca_path = out_dir / "server-ca.pem"
    atomic_write(cert_path, issued.pem)
    atomic_write(ca_path, ca.cert.public_bytes(serialization.Encoding.PEM))
    info = {
        "serial": serial,
        "model": model,
        "hw_rev": hw_rev,
        "groups": sorted(set(groups)),
        "cert_fingerprint": issued.fingerprint,
        "not_after": issued.cert.not_valid_after_utc.isoformat(),
        "server_ca_spki_sha256": spki_sha256(ca.cert),
    }
    atomic_write(out_dir / "device.json", json.dumps(info, indent=2).encode())
    return Enrollment(serial, issued, key_path, cert_path, ca_path)


def issue_server_cert(
    ca: FleetCA, out_dir: Path, *, dns_names: list[str], ip_addresses: list[str], days: int = 365
) -> IssuedCert:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.issue_server(
        key.public_key(), dns_names=dns_names, ip_addresses=ip_addresses, days=days
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_private_key(out_dir / "server.key", key)
    atomic_write(out_dir / "server.pem", issued.pem)
    return issued
