"""Fleet CA and enrollment: certificates, the HSM-style signing path, registration, revocation."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otaguard.cli.main import main
from otaguard.crypto.software import SoftwareSigner
from otaguard.errors import ErrorCode, OtaError
from otaguard.server.pki.ca import FleetCA, serial_of, spki_sha256, verify_forwarded_cert
from otaguard.server.pki.enroll import enroll_device, issue_server_cert
from otaguard.server.storage import store
from otaguard.server.storage.db import Database
from tests.pg import CA_PASSPHRASE, db_url, fleet_ca, pg_cluster  # noqa: F401


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_ca_create_load_and_wrong_passphrase(tmp_path: Path) -> None:
    ca = FleetCA.create(tmp_path / "ca", passphrase=CA_PASSPHRASE, name="t")
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "ca" / "ca.key").read_bytes()
    again = FleetCA.load(tmp_path / "ca", passphrase=CA_PASSPHRASE)
    assert again.public_key == ca.public_key
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    with pytest.raises(OtaError) as ei:
        FleetCA.load(tmp_path / "ca", passphrase=b"wrong-passphrase")
    assert ei.value.code == ErrorCode.PIN
    with pytest.raises(OtaError) as ei:
        FleetCA.create(tmp_path / "ca", passphrase=CA_PASSPHRASE)
    assert ei.value.code == ErrorCode.EXISTS
    with pytest.raises(OtaError) as ei:
        FleetCA.create(tmp_path / "ca2", passphrase=b"short")
    assert ei.value.code == ErrorCode.PIN


def test_device_and_server_certs(fleet_ca: FleetCA, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    dev = fleet_ca.issue_device("SN-001", key.public_key(), days=7).cert
    assert dev.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "SN-001"
    assert serial_of(dev) == "SN-001"
    assert _eku(dev) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (dev.not_valid_after_utc - dev.not_valid_before_utc) == dt.timedelta(days=7)
    dev.verify_directly_issued_by(fleet_ca.cert)
    srv = issue_server_cert(fleet_ca, tmp_path, dns_names=["localhost"], ip_addresses=["::1"])
    assert _eku(srv.cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert verify_forwarded_cert(fleet_ca.cert, dev) == "SN-001"
    # A server certificate is not a client certificate.
    with pytest.raises(OtaError) as ei:
        verify_forwarded_cert(fleet_ca.cert, srv.cert)
    assert ei.value.code in (ErrorCode.CERT,)


def test_forwarded_cert_checks(fleet_ca: FleetCA, tmp_path: Path) -> None:
    other = FleetCA.create(tmp_path / "other", passphrase=CA_PASSPHRASE)
    key = ec.generate_private_key(ec.SECP256R1())
    foreign = other.issue_device("SN-1", key.public_key()).cert
    with pytest.raises(OtaError) as ei:
        verify_forwarded_cert(fleet_ca.cert, foreign)
    assert ei.value.code == ErrorCode.CERT
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    expired = fleet_ca.issue_device(
        "SN-1", key.public_key(), not_before=past, not_after=past + dt.timedelta(days=1)
    ).cert
    with pytest.raises(OtaError) as ei:
        verify_forwarded_cert(fleet_ca.cert, expired)
    assert ei.value.code == ErrorCode.CERT


def test_refuses_bad_serials_and_keys(fleet_ca: FleetCA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    for bad in ["", "a b", "x" * 65, "SN/1", "é"]:
        with pytest.raises(OtaError) as ei:
            fleet_ca.issue_device(bad, key.public_key())
        assert ei.value.code == ErrorCode.USAGE
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(OtaError) as ei:
        fleet_ca.issue_device("SN-1", p384.public_key())  # type: ignore[arg-type]
    assert ei.value.code == ErrorCode.ALGORITHM


def test_external_signer_path(tmp_path: Path) -> None:
    """The PKCS#11 path: TBS built by cryptography, signed by a Signer, DER assembled by us."""
    signer = SoftwareSigner(ec.generate_private_key(ec.SECP256R1()))
    ca = FleetCA.create(tmp_path / "hsm-ca", signer=signer, pkcs11_uri="pkcs11:token=t")
    ca.cert.verify_directly_issued_by(ca.cert)
    assert FleetCA.meta(tmp_path / "hsm-ca")["key"] == "pkcs11"
    assert not (tmp_path / "hsm-ca" / "ca.key").exists()
    key = ec.generate_private_key(ec.SECP256R1())
    dev = ca.issue_device("SN-9", key.public_key()).cert
    dev.verify_directly_issued_by(ca.cert)
    assert verify_forwarded_cert(ca.cert, dev) == "SN-9"
    ed = SoftwareSigner.__new__(SoftwareSigner)  # an Ed25519 CA is refused
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ed = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(OtaError) as ei:
        FleetCA.create(tmp_path / "ed-ca", signer=ed)
    assert ei.value.code == ErrorCode.ALGORITHM


def test_enroll_registers_and_revokes(fleet_ca: FleetCA, db_url: str, tmp_path: Path) -> None:
    db = Database(db_url)
    db.upgrade()
    e = enroll_device(
        fleet_ca,
        db,
        serial="SN-100",
        model="gw",
        hw_rev="r2",
        groups=["eu", "beta"],
        out_dir=tmp_path / "dev",
    )
    assert e.key_path is not None and e.key_path.stat().st_mode & 0o777 == 0o600
    info = json.loads((tmp_path / "dev" / "device.json").read_text())
    assert info["server_ca_spki_sha256"] == spki_sha256(fleet_ca.cert)
    with db.read() as conn:
        row = store.device_by_serial(conn, "SN-100")
        assert row is not None
        assert row.cert_fingerprint == e.cert.fingerprint
        assert row.model == "gw" and row.hw_rev == "r2" and not row.revoked
        assert store.device_groups(conn, row.id) == ["beta", "eu"]
    with pytest.raises(OtaError) as ei:
        enroll_device(
            fleet_ca,
            db,
            serial="SN-100",
            model="gw",
            hw_rev="r2",
            groups=[],
            out_dir=tmp_path / "x",
        )
    assert ei.value.code == ErrorCode.EXISTS
    # Re-enrollment with the device's own CSR: new fingerprint, key stays on the device.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SN-100")]))
        .sign(key, hashes.SHA256())
    )
    e2 = enroll_device(
        fleet_ca,
        db,
        serial="SN-100",
        model="gw",
        hw_rev="r2",
        groups=["eu"],
        out_dir=tmp_path / "dev2",
        csr_pem=csr.public_bytes(serialization.Encoding.PEM),
        replace=True,
    )
    assert e2.key_path is None
    with db.write() as conn:
        row = store.device_by_serial(conn, "SN-100")
        assert row is not None and row.cert_fingerprint == e2.cert.fingerprint
        assert store.device_groups(conn, row.id) == ["eu"]
        store.revoke_device(conn, "SN-100")
    with db.read() as conn:
        row = store.device_by_serial(conn, "SN-100")
        assert row is not None and row.revoked
    with pytest.raises(OtaError) as ei, db.write() as conn:
        store.revoke_device(conn, "nope")
    assert ei.value.code == ErrorCode.NOT_FOUND
    db.dispose()


def test_cli_init_enroll_revoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTAGUARD_CA_PASSPHRASE", CA_PASSPHRASE.decode())
    ca_dir, data = tmp_path / "ca", tmp_path / "data"
    assert main(["fleet", "init-ca", "--dir", str(ca_dir)]) == 0
    args = ["--ca-dir", str(ca_dir), "--data-dir", str(data)]
    assert main(["fleet", "server-cert", "--ca-dir", str(ca_dir), "--ip", "127.0.0.1",
                 "--out", str(tmp_path / "tls")]) == 0  # fmt: skip
    dev = ["--model", "gw", "--hw-rev", "r1"]
    assert main(["fleet", "enroll", *args, "--serial", "SN-7", *dev, "--group", "lab",
                 "--out", str(tmp_path / "d")]) == 0  # fmt: skip
    assert (tmp_path / "d" / "device.pem").exists()
    assert main(["fleet", "enroll", *args, "--serial", "SN-7", "--model", "gw",
                 "--hw-rev", "r1", "--out", str(tmp_path / "d2")]) == 1  # fmt: skip
    assert main(["fleet", "revoke", "--data-dir", str(data), "--serial", "SN-7"]) == 0
    assert main(["fleet", "revoke", "--data-dir", str(data), "--serial", "nope"]) == 1
    monkeypatch.setenv("OTAGUARD_CA_PASSPHRASE", "wrong-passphrase")
    assert main(["fleet", "enroll", *args, "--serial", "SN-8", "--model", "gw",
                 "--hw-rev", "r1", "--out", str(tmp_path / "d3")]) == 1  # fmt: skip
