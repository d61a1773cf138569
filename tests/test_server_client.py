"""The device HTTPS client against a real mTLS server: pinning, resume, backoff, reports."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from otaguard.device.https_transport import HttpsTransport
from otaguard.errors import DeviceError, ErrorCode
from otaguard.server.context import ServerSettings, TrustState
from otaguard.server.pki.ca import FleetCA, spki_sha256
from otaguard.server.pki.enroll import Enrollment
from otaguard.server.ratelimit import RateLimit
from otaguard.server.storage import store
from otaguard.trust.model import StaticKeys
from tests.pg import CA_PASSPHRASE, Harness, db_url, fleet_ca, harness, pg_cluster, server_tls  # noqa: F401
from tests.test_server_api import SIGNER, admin_client, publish


def _transport(h: Harness, e: Enrollment, **kw: object) -> HttpsTransport:
    sleeps: list[float] = []
    t = HttpsTransport(
        h.url,
        ca_file=e.ca_path,
        cert_file=e.cert_path,
        key_file=e.key_path,  # type: ignore[arg-type]
        sleep=sleeps.append,
        rng=random.Random(1),
        **kw,  # type: ignore[arg-type]
    )
    t.sleeps = sleeps  # type: ignore[attr-defined]
    return t


@pytest.fixture
def hxt(db_url: str, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    with harness(
        db_url, fleet_ca, server_tls, tmp_path, trust=TrustState(StaticKeys([SIGNER.public_key]))
    ) as h:
        yield h


def test_client_end_to_end_with_resume(hxt: Harness, server_tls: Path) -> None:
    image = os.urandom(200_000)
    rid = publish(hxt, "3.0.0", image)
    e = hxt.enroll("SN-C1")
    admin_client(hxt, "operator").assign("SN-C1", rid)
    from cryptography import x509

    pin = spki_sha256(x509.load_pem_x509_certificate((server_tls / "server.pem").read_bytes()))
    t = _transport(hxt, e, spki_pins={pin})
    upd = t.checkin({"version": "2.0.0", "security_counter": 1})
    assert upd is not None and upd["version"] == "3.0.0"
    env = t.fetch_manifest()
    assert env[:2] == b"\xd8\x6b"  # tag 107
    first = b"".join(t.open_image(0))[:123_457]  # the agent got this far, then the link dropped
    rest = b"".join(t.open_image(len(first)))
    assert first + rest == image
    t.report({"event": "installed", "version": "3.0.0", "report_id": "rep-1"})
    t.report({"event": "installed", "version": "3.0.0", "report_id": "rep-1"})  # retry: same id
    t.report({"event": "error", "error": "E_SELF_TEST", "detail": "watchdog"})
    with hxt.db.read() as conn:
        row = store.device_by_serial(conn, "SN-C1")
        assert row is not None and store.count_reports(conn, row.id) == 2
        assert row.last_error == "E_SELF_TEST"
    t.close()


def test_client_refuses_wrong_pin_and_wrong_ca(hxt: Harness, tmp_path: Path) -> None:
    e = hxt.enroll("SN-C2")
    t = _transport(hxt, e, spki_pins={"00" * 32})
    with pytest.raises(DeviceError) as ei:
        t.checkin({"version": "1.0.0"})
    assert ei.value.code == ErrorCode.CERT
    t.close()
    # A device provisioned with another CA refuses our server (not in its trust anchors).
    FleetCA.create(tmp_path / "rogue", passphrase=CA_PASSPHRASE)
    t = HttpsTransport(
        hxt.url,
        ca_file=tmp_path / "rogue" / "ca.pem",
        cert_file=e.cert_path,
        key_file=e.key_path,  # type: ignore[arg-type]
        sleep=lambda _s: None,
        max_attempts=2,
    )
    with pytest.raises(DeviceError) as ei:
        t.checkin({"version": "1.0.0"})
    assert ei.value.code == ErrorCode.TRANSPORT
    t.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_client_backs_off_on_429(
    db_url: str, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path
) -> None:
    s = ServerSettings(ca_cert=fleet_ca.cert, device_rate=RateLimit(rate=0.2, burst=1))
    with harness(db_url, fleet_ca, server_tls, tmp_path, settings=s) as h:
        t = _transport(h, h.enroll("SN-C3"), max_attempts=3)
        assert t.checkin({"version": "1.0.0"}) is None
        with pytest.raises(DeviceError) as ei:
            t.checkin({"version": "1.0.0"})  # the sleeps are recorded, not slept
        assert ei.value.code == ErrorCode.TRANSPORT
        sleeps = t.sleeps  # type: ignore[attr-defined]
        assert len(sleeps) == 2 and all(x >= 5 for x in sleeps)  # Retry-After honoured
        t.close()


def test_backoff_delays_are_jittered_and_capped() -> None:
    t = HttpsTransport.__new__(HttpsTransport)
    t.base_delay, t.max_delay, t._rng = 1.0, 30.0, random.Random(7)  # type: ignore[attr-defined]
    delays = [t._delay(a, None) for a in range(12)]
    assert all(0 <= d <= min(30.0, 2**a) for a, d in enumerate(delays))
    assert len(set(delays)) == len(delays)
    assert t._delay(0, "120") == 30.0  # Retry-After capped at max_delay
