"""The device renewal flow as a state machine under every mix of faults (hypothesis).

The server is a model of ``server/device_api/gate.py`` ``_device_work`` +
``POST /v1/certificate`` (current, pending and superseded fingerprints; the first use of the
pending certificate promotes it) with real certificates from a real fleet CA; the network
drops requests before they arrive or loses answers after the server acted; the device loses
power before or after either storage write.

Safety, after every step: the certificate the server holds current is one the device has in
storage (current or pending) — the device can always get in. Liveness: once the faults stop,
two polls leave the device on the server's current certificate with nothing pending and no
renewal due.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otaguard.clock import SimClock
from otaguard.device.renewal import CertRenewal
from otaguard.device.storage import Identity
from otaguard.errors import DeviceError, ErrorCode, OtaError, PowerCut
from otaguard.server.pki.ca import FleetCA
from otaguard.sim.renewal import MemoryIdentityStore

SERIAL = "SN-M1"
LIFE = 10 * 86400
T0 = 1_900_000_000


def _fp(pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


class ModelServer:
    def __init__(self, ca: FleetCA, clock: SimClock) -> None:
        self.ca = ca
        self.clock = clock
        self.current = ""
        self.pending: str | None = None
        self.prev: str | None = None

    def issue(self, key: ec.EllipticCurvePublicKey) -> bytes:
        start = dt.datetime.fromtimestamp(self.clock.now() - 300, dt.UTC)
        return self.ca.issue_device(
            SERIAL, key, not_before=start, not_after=start + dt.timedelta(seconds=LIFE)
        ).pem

    def admit(self, cert: bytes) -> None:
        f = _fp(cert)
        if f == self.current:
            return
        if f == self.pending:
            self.prev, self.current, self.pending = self.current, f, None
            return
        code = ErrorCode.CERT_SUPERSEDED if f == self.prev else ErrorCode.CERT_REVOKED
        raise DeviceError(code, "server: refused")

    def renew(self, presented: bytes, csr_pem: bytes) -> bytes:
        self.admit(presented)
        key = x509.load_pem_x509_csr(csr_pem).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        cert = self.issue(key)
        self.pending = _fp(cert)
        return cert


class FaultyNet:
    """Each network call takes the next fault: ok, drop (never arrives), lost (answer lost)."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server
        self.faults: list[str] = []
        self.presented = b""

    def _fault(self) -> str:
        return self.faults.pop(0) if self.faults else "ok"

    def use_identity(self, cert_pem: bytes, key_pem: bytes) -> None:
        self.presented = cert_pem

    def checkin(self) -> None:
        f = self._fault()
        if f == "drop":
            raise DeviceError(ErrorCode.TRANSPORT, "dropped")
        self.server.admit(self.presented)
        if f == "lost":
            raise DeviceError(ErrorCode.TRANSPORT, "answer lost")

    def request_certificate(self, csr_pem: bytes) -> bytes:
        f = self._fault()
        if f == "drop":
            raise DeviceError(ErrorCode.TRANSPORT, "dropped")
        cert = self.server.renew(self.presented, csr_pem)
        if f == "lost":
            raise DeviceError(ErrorCode.TRANSPORT, "answer lost")
        return cert


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> FleetCA:
    return FleetCA.create(Path(tmp_path_factory.mktemp("model-ca")) / "ca", passphrase=b"12345678")


def _boot(store: MemoryIdentityStore, net: FaultyNet, clock: SimClock) -> CertRenewal:
    ident = store.identity()
    assert ident is not None
    net.use_identity(ident.certificate, ident.device_key)  # the TLS client from storage
    return CertRenewal(store, net, fraction=1 / 3, clock=clock)


def _poll(r: CertRenewal, net: FaultyNet) -> None:
    r.checkin(net.checkin)
    if r.renew_if_due():
        r.checkin(net.checkin)


STEP = st.tuples(
    st.integers(0, 12).map(lambda k: k * LIFE // 36),  # time since the last poll (<= LIFE/3)
    st.lists(st.sampled_from(["ok", "drop", "lost"]), max_size=4),  # faults of its calls
    st.sampled_from([None, (1, "before"), (1, "after"), (2, "before"), (2, "after")]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=1, max_size=25))
def test_device_always_holds_the_certificate_the_server_accepts(
    ca: FleetCA, steps: list[tuple[int, list[str], tuple[int, str] | None]]
) -> None:
    clock = SimClock(T0 - LIFE // 2)
    server = ModelServer(ca, clock)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = server.issue(key.public_key())  # half its life gone: renewals start early
    clock.set(T0)
    server.current = _fp(cert)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    store = MemoryIdentityStore(Identity(key_pem, cert))
    net = FaultyNet(server)
    r = _boot(store, net, clock)
    for gap, faults, cut in steps:
        clock.advance(gap)
        net.faults = list(faults)
        if cut is not None:
            store.arm(*cut)
        try:
            _poll(r, net)
        except PowerCut:
            r = _boot(store, net, clock)
        except OtaError:
            pass
        store.disarm()
        ident = store.identity()
        assert ident is not None
        held = {_fp(ident.certificate)}
        if ident.pending_certificate is not None:
            held.add(_fp(ident.pending_certificate))
        assert server.current in held  # safety: the device can always get in
    net.faults = []
    r = _boot(store, net, clock)  # a reboot, then two fault-free polls
    _poll(r, net)
    _poll(r, net)
    ident = store.identity()
    assert ident is not None and ident.pending_key is None
    assert _fp(ident.certificate) == server.current and not r.due()
