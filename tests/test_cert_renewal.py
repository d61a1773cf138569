"""Device certificate renewal over the air (issue #16 part 3): the renewal policy, the server's
``POST /v1/certificate`` and its refusals, the device flow over real mTLS (the simulated device
with its flash-backed secure storage, driven by the real updater), power cuts between the
steps, the expiring-certificates listing, and the renewal simulation over > 2 lifetimes."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from otaguard.cli.main import cli
from otaguard.clock import SimClock
from otaguard.device.https_transport import HttpsTransport
from otaguard.device.lab import Lab
from otaguard.device.renewal import CertRenewal, make_csr, renew_due
from otaguard.device.storage import Identity
from otaguard.device.updater import Updater
from otaguard.errors import DeviceError, ErrorCode, OtaError, PowerCut
from otaguard.server.pki.ca import FleetCA, fingerprint
from otaguard.server.pki.enroll import Enrollment
from otaguard.server.pki.renewal import MAX_CSR, CertIssuer
from otaguard.server.storage import store
from otaguard.server.storage.db import sqlite_url
from otaguard.sim.renewal import MemoryIdentityStore, RenewalSimOptions, run_renewal_sim
from tests.pg import Harness, fleet_ca, harness, server_tls  # noqa: F401
from tests.test_server_api import admin

DAY = 86400
LIFETIME = 30 * DAY


@pytest.fixture
def hr(fleet_ca: FleetCA, server_tls: Path, tmp_path: Path) -> Iterator[Harness]:
    with harness(sqlite_url(tmp_path / "renewal.db"), fleet_ca, server_tls, tmp_path) as h:
        h.srv.issuer = CertIssuer(fleet_ca, LIFETIME)
        yield h


# --- policy ------------------------------------------------------------------------------------
@given(
    nb=st.integers(0, 2**34),
    life=st.integers(1, 10**9),
    t1=st.integers(0, 2**35),
    t2=st.integers(0, 2**35),
    frac=st.floats(0.001, 0.999),
)
def test_renew_due_exactly_when_less_than_the_fraction_remains(
    nb: int, life: int, t1: int, t2: int, frac: float
) -> None:
    na = nb + life
    assert renew_due(nb, na, t1, frac) == (na - t1 < frac * life)
    lo, hi = sorted((t1, t2))
    if renew_due(nb, na, lo, frac):  # once due, due for good: the clock only moves on
        assert renew_due(nb, na, hi, frac)
    assert not renew_due(nb, na, nb, frac)  # never at issue time
    assert renew_due(nb, na, na, frac)  # always by the end


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_renew_fraction_outside_the_open_interval_is_a_usage_error(frac: float) -> None:
    with pytest.raises(DeviceError) as ei:
        renew_due(0, 100, 50, frac)
    assert ei.value.code is ErrorCode.USAGE


def test_cert_without_lifetime_is_always_due() -> None:
    assert renew_due(100, 100, 0, 0.5) and renew_due(100, 50, 0, 0.5)


# --- helpers -----------------------------------------------------------------------------------
def _csr(
    serial: str,
    key: Any = None,
    *,
    extra_serial: str | None = None,
    cn: str | None = None,
    algo: Any = "sha256",
) -> bytes:
    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn or serial)]
    attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    if extra_serial:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, extra_serial))
    h = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    if algo == "sha224":
        h = hashes.SHA224()  # 112-bit: below what the server accepts
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs)).sign(key, h)
    return csr.public_bytes(serialization.Encoding.PEM)


def _post(c: httpx.Client, body: bytes) -> httpx.Response:
    return c.post("/v1/certificate", content=body, headers={"content-type": "application/pkcs10"})


def _client(h: Harness, e: Enrollment, cert: bytes, key: ec.EllipticCurvePrivateKey) -> Any:
    d = h.tmp / f"id-{os.urandom(4).hex()}"
    d.mkdir()
    (d / "c.pem").write_bytes(cert)
    (d / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.create_default_context(cafile=str(e.ca_path))
    ctx.load_cert_chain(str(d / "c.pem"), str(d / "k.pem"))
    c = httpx.Client(base_url=h.url, verify=ctx, timeout=10)
    h.clients.append(c)
    return c


def _row(h: Harness, serial: str) -> Any:
    with h.db.read() as conn:
        row = store.device_by_serial(conn, serial)
        assert row is not None
        return row, store.probe_history(conn, row.id)


def _code(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]


# --- server ------------------------------------------------------------------------------------
def test_renewal_is_pending_until_used_then_supersedes_the_old_cert(hr: Harness) -> None:
    e = hr.enroll("SN-R1")
    old = hr.client(e)
    assert old.post("/v1/checkin", json={"version": "1.0.0"}).status_code == 200
    key = ec.generate_private_key(ec.SECP256R1())
    r = _post(old, _csr("SN-R1", key))
    assert r.status_code == 201 and r.headers["content-type"].startswith(
        "application/pem-certificate-chain"
    )
    cert = x509.load_pem_x509_certificate(r.content)
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-R1"
    assert cert.public_key() == key.public_key()
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life.total_seconds() == LIFETIME
    cert.verify_directly_issued_by(hr.ca.cert)
    row, _ = _row(hr, "SN-R1")
    new_fp = fingerprint(cert.public_bytes(serialization.Encoding.DER))
    assert row.pending_cert_fingerprint == new_fp and row.cert_fingerprint == e.cert.fingerprint
    # Not used yet: the old certificate still works (a lost answer costs nothing).
    assert old.post("/v1/checkin", json={"version": "1.0.0"}).status_code == 200
    new = _client(hr, e, r.content, key)
    assert new.post("/v1/checkin", json={"version": "1.0.0"}).status_code == 200
    row, _ = _row(hr, "SN-R1")
    assert row.cert_fingerprint == new_fp and row.pending_cert_fingerprint is None
    assert row.prev_cert_fingerprint == e.cert.fingerprint and row.cert_renewed_at is not None
    assert row.cert_not_after == int(cert.not_valid_after_utc.timestamp())
    # From now on the old one is superseded: refused with its own code, also for renewal.
    old.close()
    old = hr.client(e)
    assert _code(old.post("/v1/checkin", json={"version": "1.0.0"})) == (403, "E_CERT_SUPERSEDED")
    assert _code(_post(old, _csr("SN-R1"))) == (403, "E_CERT_SUPERSEDED")
    _, hist = _row(hr, "SN-R1")
    assert [p["kind"] for p in hist] == ["E_CERT_SUPERSEDED"] * 2
    # The renewed identity renews again (DER this time).
    der = x509.load_pem_x509_csr(_csr("SN-R1")).public_bytes(serialization.Encoding.DER)
    assert _post(new, der).status_code == 201


def test_a_second_request_replaces_an_unused_pending_cert(hr: Harness) -> None:
    e = hr.enroll("SN-R2")
    c = hr.client(e)
    k1, k2 = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    first = _post(c, _csr("SN-R2", k1)).content
    second = _post(c, _csr("SN-R2", k2)).content
    stale = _client(hr, e, first, k1)
    assert _code(stale.post("/v1/checkin", json={"version": "1.0.0"})) == (403, "E_CERT_REVOKED")
    assert _client(hr, e, second, k2).post("/v1/checkin", json={"version": "1"}).status_code == 200


def test_reenrollment_voids_a_renewal_in_flight(hr: Harness) -> None:
    """An unused renewed certificate belongs to the identity it renewed: re-enrolling the
    device (say, after a compromise) must not leave it promotable."""
    e = hr.enroll("SN-R9")
    key = ec.generate_private_key(ec.SECP256R1())
    pending = _post(hr.client(e), _csr("SN-R9", key)).content
    e2 = hr.enroll("SN-R9", replace=True)
    row, _ = _row(hr, "SN-R9")
    assert row.pending_cert_fingerprint is None and row.prev_cert_fingerprint is None
    c = _client(hr, e, pending, key)
    assert _code(c.post("/v1/checkin", json={"version": "1.0.0"})) == (403, "E_CERT_REVOKED")
    assert hr.client(e2).post("/v1/checkin", json={"version": "1.0.0"}).status_code == 200


def _rsa() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize(
    ("make_body", "expected"),
    [
        (lambda: _csr("SN-OTHER"), (403, "E_IDENTITY")),
        (lambda: _csr("SN-R3", extra_serial="SN-OTHER"), (403, "E_IDENTITY")),
        (lambda: _csr("SN-R3", cn="SN-OTHER"), (403, "E_IDENTITY")),
        (lambda: _csr("SN-R3", _rsa()), (400, "E_ALGORITHM")),
        (lambda: _csr("SN-R3", ec.generate_private_key(ec.SECP384R1())), (400, "E_ALGORITHM")),
        (lambda: _csr("SN-R3", ec.generate_private_key(ec.SECP256K1())), (400, "E_ALGORITHM")),
        (lambda: _csr("SN-R3", ed25519.Ed25519PrivateKey.generate()), (400, "E_ALGORITHM")),
        (lambda: _csr("SN-R3", algo="sha224"), (400, "E_ALGORITHM")),
        (lambda: _bad_signature("SN-R3"), (400, "E_SIGNATURE")),
        (lambda: b"not a certificate request", (400, "E_MALFORMED")),
        (lambda: b"", (400, "E_MALFORMED")),
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", (400, "E_MALFORMED")),
        (lambda: os.urandom(MAX_CSR + 1), (413, "E_TOO_LARGE")),
    ],
    ids=[
        "other-serial",
        "two-serials",
        "other-cn",
        "rsa",
        "p384",
        "secp256k1",
        "ed25519",
        "sha224",
        "bad-signature",
        "garbage",
        "empty",
        "pem-garbage",
        "oversize",
    ],
)
def test_bad_csr_refused_with_its_code_and_counted_as_probe(
    hr: Harness, make_body: Any, expected: tuple[int, str]
) -> None:
    e = hr.enroll("SN-R3")
    c = hr.client(e)
    r = _post(c, make_body())
    assert _code(r) == expected
    row, hist = _row(hr, "SN-R3")
    assert row.pending_cert_fingerprint is None  # nothing issued
    assert [(p["kind"], p["detail"].split(":")[0]) for p in hist] == [("renewal", expected[1])]
    # The identity still works: a refused renewal changes nothing.
    assert c.post("/v1/checkin", json={"version": "1.0.0"}).status_code == 200


def _bad_signature(serial: str) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(_csr(serial)).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    return bytes(der)


def test_probes_flag_the_identity_at_the_refusal_threshold(hr: Harness) -> None:
    e = hr.enroll("SN-R4")
    c = hr.client(e)
    n = hr.srv.settings.refusal_threshold
    for _ in range(n):
        assert _code(_post(c, _csr("SN-VICTIM"))) == (403, "E_IDENTITY")
    row, hist = _row(hr, "SN-R4")
    assert row.suspect and "possible probe" in row.suspect_reason and len(hist) == n


def test_revoked_identity_cannot_renew(hr: Harness) -> None:
    e = hr.enroll("SN-R5")
    c = hr.client(e)
    with hr.db.write() as conn:
        store.revoke_device(conn, "SN-R5")
    assert _code(_post(c, _csr("SN-R5"))) == (403, "E_CERT_REVOKED")
    row, hist = _row(hr, "SN-R5")
    assert row.pending_cert_fingerprint is None
    assert [p["kind"] for p in hist] == ["E_CERT_REVOKED"]


def test_expired_identity_cannot_renew_or_check_in(hr: Harness) -> None:
    """Expiry on the server clock: the TLS stack's wall clock says valid, the server does not."""
    e = hr.enroll("SN-R6")
    c = hr.client(e)
    prev = store.set_clock(SimClock(time.time() + 91 * DAY))
    try:
        assert _code(_post(c, _csr("SN-R6"))) == (403, "E_CERT_EXPIRED")
        assert _code(c.post("/v1/checkin", json={"version": "1.0.0"})) == (403, "E_CERT_EXPIRED")
        assert _code(c.get("/v1/keylist")) == (403, "E_CERT_EXPIRED")
    finally:
        store.set_clock(prev)
    row, hist = _row(hr, "SN-R6")
    assert row.pending_cert_fingerprint is None
    assert [p["kind"] for p in hist] == ["E_CERT_EXPIRED"] * 3


def test_server_without_issuer_answers_with_a_typed_error(hr: Harness) -> None:
    hr.srv.issuer = None
    c = hr.client(hr.enroll("SN-R7"))
    assert _code(_post(c, _csr("SN-R7"))) == (404, "E_NO_ISSUER")
    assert _code(c.get("/v1/certificate")) == (405, "E_USAGE")


def test_unauthenticated_renewal_never_reaches_the_csr(hr: Harness) -> None:
    """Without a client certificate the handshake fails: no renewal without an identity."""
    ctx = ssl.create_default_context(cafile=str(hr.tmp / "tls" / "ca.pem"))
    with httpx.Client(base_url=hr.url, verify=ctx, timeout=10) as c, pytest.raises(httpx.HTTPError):
        _post(c, _csr("SN-R8"))


def test_expiring_listing_and_cli(hr: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    hr.enroll("SN-E1", days=10)
    hr.enroll("SN-E2", days=60)
    revoked = "SN-E3"
    hr.enroll(revoked, days=5)
    with hr.db.write() as conn:
        store.revoke_device(conn, revoked)
    viewer = admin(hr, "viewer")
    r = viewer.get("/admin/v1/certificates/expiring", params={"within": "30d"})
    assert r.status_code == 200
    assert [d["serial"] for d in r.json()["devices"]] == ["SN-E1"]
    r = viewer.get("/admin/v1/certificates/expiring", params={"within": "61d"})
    assert [d["serial"] for d in r.json()["devices"]] == ["SN-E1", "SN-E2"]
    for bad in ("30x", "-1d", "99999999d", ""):
        r = viewer.get("/admin/v1/certificates/expiring", params={"within": bad})
        assert _code(r) == (400, "E_USAGE")
    assert _code(viewer.get("/admin/v1/certificates/expiring", params={"limit": "0"})) == (
        400,
        "E_USAGE",
    )
    assert hr.client(None).get("/admin/v1/certificates/expiring").status_code == 401
    # The CLI: same listing through the admin client.
    with hr.db.write() as conn:
        token = store.create_token(conn, "cli-viewer", "viewer")
    monkeypatch.setenv("OTAGUARD_ADMIN_TOKEN", token)
    assert hr.admin_server is not None
    args = ["fleet", "expiring", "--server", hr.admin_server.url]
    args += ["--ca-file", str(hr.tmp / "tls" / "ca.pem"), "--within", "30d"]
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    assert '"SN-E1"' in res.output and "SN-E2" not in res.output
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "SN-E1" in res.output
    res = CliRunner().invoke(cli, [*args[:6], "--within", "soon"])
    assert isinstance(res.exception, OtaError) and res.exception.code is ErrorCode.USAGE


# --- device flow over real mTLS ----------------------------------------------------------------
def _identity(e: Enrollment) -> Identity:
    assert e.key_path is not None
    return Identity(e.key_path.read_bytes(), e.cert_path.read_bytes())


def _transport(h: Harness, e: Enrollment, ident: Identity) -> HttpsTransport:
    d = h.tmp / f"dev-{os.urandom(4).hex()}"
    d.mkdir()
    (d / "device.pem").write_bytes(ident.certificate)
    (d / "device.key").write_bytes(ident.device_key)
    return HttpsTransport(
        h.url,
        ca_file=e.ca_path,
        cert_file=d / "device.pem",
        key_file=d / "device.key",
        max_attempts=1,
    )


def test_updater_renews_the_simulated_device_over_mtls(hr: Harness, tmp_path: Path) -> None:
    """The real device (flash-backed secure storage) and updater: the poll in the renewal
    window gets a new certificate and uses it at once; the key stays in the device."""
    e = hr.enroll("SN-D1")
    lab = Lab()
    dev = lab.provision(tmp_path / "dev", os.urandom(8192), identity=_identity(e))
    t = _transport(hr, e, _identity(e))
    sent: list[bytes] = []
    request = t.request_certificate

    def spy(csr: bytes) -> bytes:
        sent.append(csr)
        return request(csr)

    t.request_certificate = spy  # type: ignore[method-assign]
    clock = SimClock(time.time())
    up = Updater(dev, t, clock=clock, renewal=CertRenewal(dev.storage, t, clock=clock))
    assert up.poll_once().cert is None  # fresh certificate: nothing to do
    clock.advance(70 * DAY)  # 20 of 90 days left: due
    res = up.poll_once()
    assert (res.outcome, res.cert) == ("idle", "renewed")
    ident = dev.storage.identity()
    assert ident is not None and ident.pending_key is None
    assert ident.certificate != e.cert.pem and ident.device_key != _identity(e).device_key
    row, _ = _row(hr, "SN-D1")
    assert row.cert_fingerprint == fingerprint(
        x509.load_pem_x509_certificate(ident.certificate).public_bytes(serialization.Encoding.DER)
    )
    assert row.prev_cert_fingerprint == e.cert.fingerprint
    # Only a CSR went out: the new public key, never the private one.
    assert len(sent) == 1 and b"PRIVATE" not in sent[0]
    new_key = serialization.load_pem_private_key(ident.device_key, None)
    assert x509.load_pem_x509_csr(sent[0]).public_key() == new_key.public_key()
    # A reboot (new updater and transport from storage) keeps the renewed identity.
    t.close()
    t2 = _transport(hr, e, ident)
    up2 = Updater(dev, t2, clock=clock, renewal=CertRenewal(dev.storage, t2, clock=clock))
    assert up2.poll_once().outcome == "idle"
    t2.close()


def test_server_without_issuer_leaves_the_device_working(hr: Harness, tmp_path: Path) -> None:
    hr.srv.issuer = None
    e = hr.enroll("SN-D2")
    store_ = MemoryIdentityStore(_identity(e))
    t = _transport(hr, e, _identity(e))
    r = CertRenewal(store_, t, clock=SimClock(time.time() + 70 * DAY))
    with pytest.raises(OtaError) as ei:
        r.renew_if_due()
    assert ei.value.code is ErrorCode.NO_ISSUER and r.counts.refused == 1
    assert store_.identity() == _identity(e)
    assert t.checkin({"version": "1.0.0"}) is None
    t.close()


def _poll(r: CertRenewal, t: HttpsTransport) -> None:
    r.checkin(lambda: t.checkin({"version": "1.0.0"}))
    if r.renew_if_due():
        r.checkin(lambda: t.checkin({"version": "1.0.0"}))


@pytest.mark.parametrize(
    ("nth", "when"), [(1, "before"), (1, "after"), (2, "before"), (2, "after")]
)
def test_power_cut_between_steps_leaves_a_working_identity(
    hr: Harness, nth: int, when: str
) -> None:
    """Cut before/after storing the new certificate, and before/after committing it once the
    server saw it used: the device reboots into an identity the server accepts, and the
    renewal completes on a later poll."""
    e = hr.enroll(f"SN-C{nth}{when[0]}")
    store_ = MemoryIdentityStore(_identity(e))
    clock = SimClock(time.time() + 70 * DAY)
    t = _transport(hr, e, _identity(e))
    r = CertRenewal(store_, t, clock=clock)
    store_.arm(nth, when)
    with pytest.raises(PowerCut):
        _poll(r, t)
    t.close()
    for _ in range(2):  # reboot: everything in RAM is gone, storage is what it is
        ident = store_.identity()
        assert ident is not None
        t = _transport(hr, e, ident)
        r = CertRenewal(store_, t, clock=clock)
        _poll(r, t)
        t.close()
    final = store_.identity()
    assert final is not None and final.pending_key is None
    row, _ = _row(hr, e.serial)
    cert = x509.load_pem_x509_certificate(final.certificate)
    assert row.cert_fingerprint == fingerprint(cert.public_bytes(serialization.Encoding.DER))
    assert row.cert_fingerprint != e.cert.fingerprint  # renewed, not just surviving


def test_lost_answer_after_the_server_promoted_is_healed(hr: Harness) -> None:
    """The check-in with the new identity reached the server (old one now superseded) but its
    answer was lost: the device falls back, hears E_CERT_SUPERSEDED and commits the new one."""
    e = hr.enroll("SN-L1")
    store_ = MemoryIdentityStore(_identity(e))
    t = _transport(hr, e, _identity(e))
    r = CertRenewal(store_, t, clock=SimClock(time.time() + 70 * DAY))
    r.checkin(lambda: t.checkin({"version": "1.0.0"}))
    assert r.renew_if_due()
    lost = [True]

    def call() -> Any:
        out = t.checkin({"version": "1.0.0"})
        if lost.pop() if lost else False:
            raise DeviceError(ErrorCode.TRANSPORT, "answer lost")
        return out

    r.checkin(call)
    ident = store_.identity()
    assert ident is not None and ident.pending_key is None and r.counts.committed == 1
    row, _ = _row(hr, "SN-L1")
    assert row.prev_cert_fingerprint == e.cert.fingerprint
    t.close()


def test_pending_identity_the_server_refuses_is_dropped(hr: Harness) -> None:
    """A pending certificate replaced by a later request (or a re-enrollment) is refused: the
    device drops it, stays on its current identity and renews again."""
    e = hr.enroll("SN-P1")
    store_ = MemoryIdentityStore(_identity(e))
    t = _transport(hr, e, _identity(e))
    r = CertRenewal(store_, t, clock=SimClock(time.time() + 70 * DAY))
    assert r.renew_if_due()
    _, other = make_csr("SN-P1")
    _post(hr.client(e), other)  # the server's pending certificate is now another one
    r.checkin(lambda: t.checkin({"version": "1.0.0"}))
    ident = store_.identity()
    assert ident == _identity(e) and r.counts.dropped == 1
    assert r.counts.last_error == "E_CERT_REVOKED"
    _poll(r, t)
    ident = store_.identity()
    assert ident is not None and ident.certificate != e.cert.pem and r.counts.committed == 1
    t.close()


def test_renewed_certificate_for_another_key_is_refused(hr: Harness) -> None:
    e = hr.enroll("SN-K1")
    store_ = MemoryIdentityStore(_identity(e))
    t = _transport(hr, e, _identity(e))
    foreign = _post(hr.client(e), _csr("SN-K1")).content
    t.request_certificate = lambda csr: foreign  # type: ignore[method-assign]
    r = CertRenewal(store_, t, clock=SimClock(time.time() + 70 * DAY))
    with pytest.raises(OtaError) as ei:
        r.renew_if_due()
    assert ei.value.code is ErrorCode.CERT and store_.identity() == _identity(e)
    t.close()


# --- simulation --------------------------------------------------------------------------------
def test_renewal_simulation_no_device_locked_out(tmp_path: Path) -> None:
    """> 2 certificate lifetimes with outages and power cuts in every step: nobody locked out.
    The control run (a server that cannot renew) locks every device out: the check can fail."""
    opts = RenewalSimOptions(devices=8, lifetimes=2.2, seed=7, crash_rate=0.5)
    rep = run_renewal_sim(opts, tmp_path / "ok")
    assert rep.ok and rep.locked_out == [] and rep.final_checkin_failures == []
    assert rep.lifetimes > 2 and rep.simulated_s > 2 * rep.lifetime_s
    assert rep.renewals >= 2 * opts.devices  # every device renewed at least twice
    assert sum(rep.crashes.values()) > 0 and rep.max_expiring_listed > 0
    control = run_renewal_sim(
        RenewalSimOptions(devices=3, lifetimes=1.2, seed=7, issuer=False), tmp_path / "ctl"
    )
    assert not control.ok and len(control.locked_out) == 3
    assert all("E_CERT_EXPIRED" in x for x in control.locked_out)


def test_server_run_refuses_a_bad_cert_lifetime(tmp_path: Path) -> None:
    args = ["server", "run", "--data-dir", str(tmp_path), "--ca-cert", str(tmp_path / "ca.pem")]
    res = CliRunner().invoke(cli, [*args, "--cert-lifetime", "soon"])
    assert isinstance(res.exception, OtaError) and res.exception.code is ErrorCode.USAGE
    assert "--cert-lifetime" in res.exception.detail


def test_agent_config_renew_fraction(tmp_path: Path) -> None:
    from otaguard.device.linux.config import AgentConfig

    base = {"server": {"url": "https://updates.example", "spki_pins": ["ab" * 32]}}
    assert AgentConfig.from_dict(base, tmp_path).renew_fraction == pytest.approx(1 / 3)
    doc = {"server": {**base["server"], "renew_fraction": 0.5}}
    assert AgentConfig.from_dict(doc, tmp_path).renew_fraction == 0.5
    for bad in (0.95, -0.1, "half"):
        doc = {"server": {**base["server"], "renew_fraction": bad}}
        with pytest.raises(DeviceError) as ei:
            AgentConfig.from_dict(doc, tmp_path)
        assert ei.value.code is ErrorCode.CONFIG and "renew_fraction" in ei.value.detail
