"""Probe flagging beyond rate limits (gap G15): requests for a manifest or image the device was
not offered, and revoked/superseded certificates, count per identity; the threshold within the
window flags the device suspect, once. Real mTLS server, real SQLite."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from otaguard.server.context import ServerSettings, TrustState
from otaguard.server.pki.ca import FleetCA
from otaguard.server.ratelimit import ProbeDetector, RateLimit
from otaguard.server.storage import store
from otaguard.trust.model import StaticKeys
from tests.pg import Harness, db_url, fleet_ca, harness, pg_cluster, server_tls  # noqa: F401
from tests.test_server_api import SIGNER, admin_client, publish

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

REASON = "refused requests (revoked certificate or not offered)"


def _settings(ca: FleetCA, **kw: Any) -> ServerSettings:
    return ServerSettings(
        ca_cert=ca.cert,
        device_rate=RateLimit(rate=1000.0, burst=1000),
        ip_rate=RateLimit(rate=10000.0, burst=10000),
        **kw,
    )


@pytest.fixture
def make(db_url: str, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path) -> Iterator[Any]:
    """``make(**settings)`` starts one server; closed at teardown."""
    stack: list[Any] = []

    def start(**kw: Any) -> Harness:
        cm = harness(
            db_url,
            fleet_ca,
            server_tls,
            tmp_path,
            settings=_settings(fleet_ca, **kw),
            trust=TrustState(StaticKeys([SIGNER.public_key])),
        )
        stack.append(cm)
        return cm.__enter__()

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


def _offered(h: Harness, serial: str) -> tuple[httpx.Client, dict[str, Any]]:
    """Enroll ``serial``, publish a release, assign it: the device client and its offer."""
    rid = publish(h, "1.1.0", os.urandom(4096))
    dev = h.client(h.enroll(serial))
    admin_client(h, "operator").assign(serial, rid)
    upd = dev.post("/v1/checkin", json={"version": "1.0.0"}).json()["update"]
    assert upd is not None
    return dev, upd


def _device(h: Harness, serial: str) -> Any:
    with h.db.read() as conn:
        row = store.device_by_serial(conn, serial)
        assert row is not None
        return row, store.probe_history(conn, row.id)


def test_not_offered_fetches_flag_at_threshold(make: Any) -> None:
    h = make(refusal_threshold=4, probe_event_interval=0.0)
    honest, upd = _offered(h, "SN-60")
    prober = h.client(h.enroll("SN-61"))
    # The honest device fetches what it was offered, many times over: never a probe.
    for _ in range(6):
        assert honest.get(upd["manifest_url"]).status_code == 200
        assert honest.get(upd["image_url"], headers={"Range": "bytes=0-9"}).status_code == 206
    # The prober asks for the other device's manifest and image, and a made-up image.
    urls = [upd["manifest_url"], upd["image_url"], f"/v1/images/{os.urandom(32).hex()}"]
    for url in urls:
        r = prober.get(url)
        assert r.status_code == 404 and r.json()["error"] == "E_NOT_FOUND"
    row, hist = _device(h, "SN-61")
    assert not row.suspect
    assert [p["kind"] for p in hist] == ["not_offered"] * 3
    assert {p["path"] for p in hist} == set(urls)
    blob = upd["manifest_url"].rsplit("/", 1)[1]
    assert any(p["detail"] == f"envelope_blob {blob}" for p in hist)
    # The Nth refusal flags it, with its reason; the admin API shows flag and history.
    assert prober.get(upd["manifest_url"]).status_code == 404
    row, hist = _device(h, "SN-61")
    assert row.suspect and "possible probe" in row.suspect_reason and REASON in row.suspect_reason
    assert len(hist) == 4
    view = admin_client(h, "viewer").device("SN-61")
    assert view["suspect"] is True and len(view["probe_history"]) == 4
    listed = admin_client(h, "viewer").list_devices(suspect=True)
    assert [d["serial"] for d in listed["devices"]] == ["SN-61"]
    honest_row, honest_hist = _device(h, "SN-60")
    assert not honest_row.suspect and honest_hist == []


def test_not_offered_events_at_most_one_per_interval(make: Any) -> None:
    h = make(refusal_threshold=5, probe_event_interval=3600.0)
    prober = h.client(h.enroll("SN-62"))
    url = f"/v1/manifests/{os.urandom(32).hex()}"
    for _ in range(4):
        assert prober.get(url).status_code == 404
    row, hist = _device(h, "SN-62")
    assert not row.suspect and len(hist) == 1  # counted 4 times, recorded once
    assert prober.get(url).status_code == 404  # 5th: flagged, and the flag is recorded
    row, hist = _device(h, "SN-62")
    assert row.suspect and REASON in row.suspect_reason and len(hist) == 2
    for _ in range(5):  # flagged once; further refusals within the interval write nothing
        assert prober.get(url).status_code == 404
    _, hist = _device(h, "SN-62")
    assert len(hist) == 2 and {p["kind"] for p in hist} == {"not_offered"}


def test_refusals_outside_the_window_do_not_flag(make: Any) -> None:
    h = make(probe_event_interval=0.0)
    now = [1000.0]
    h.srv.refusals = ProbeDetector(3, 60.0, clock=lambda: now[0])
    prober = h.client(h.enroll("SN-63"))
    url = f"/v1/images/{os.urandom(32).hex()}"
    for _ in range(6):  # two per window: never three within 60 s
        assert prober.get(url).status_code == 404
        assert prober.get(url).status_code == 404
        now[0] += 61.0
    row, hist = _device(h, "SN-63")
    assert not row.suspect and len(hist) == 12
    assert prober.get(url).status_code == 404
    assert prober.get(url).status_code == 404
    assert prober.get(url).status_code == 404
    row, _ = _device(h, "SN-63")
    assert row.suspect


def test_revoked_cert_refusals_flag_the_identity(make: Any) -> None:
    h = make(refusal_threshold=3)
    e = h.enroll("SN-70")
    c = h.client(e)
    assert c.post("/v1/checkin", json={"version": "1.0.0"}).status_code == 200
    with h.db.write() as conn:
        store.revoke_device(conn, "SN-70")
    for _ in range(2):
        r = c.post("/v1/checkin", json={"version": "1.0.0"})
        assert r.status_code == 403 and r.json()["error"] == "E_CERT_REVOKED"
    row, hist = _device(h, "SN-70")
    assert not row.suspect and [p["kind"] for p in hist] == ["E_CERT_REVOKED"] * 2
    r = c.get(f"/v1/manifests/{os.urandom(32).hex()}")
    assert r.status_code == 403 and r.json()["error"] == "E_CERT_REVOKED"
    row, hist = _device(h, "SN-70")
    assert row.suspect and REASON in row.suspect_reason
    assert [p["kind"] for p in hist] == ["E_CERT_REVOKED"] * 3  # every cert refusal recorded
    view = admin_client(h, "viewer").device("SN-70")
    assert view["suspect"] is True and len(view["probe_history"]) == 3


def test_superseded_cert_and_not_offered_count_together(make: Any) -> None:
    h = make(refusal_threshold=3, probe_event_interval=0.0)
    old = h.client(h.enroll("SN-71"))
    new = h.client(h.enroll("SN-71", replace=True))
    assert new.post("/v1/checkin", json={"version": "1.0.0"}).status_code == 200
    for _ in range(2):  # the old certificate, superseded by re-enrollment
        r = old.post("/v1/checkin", json={"version": "1.0.0"})
        assert r.status_code == 403 and r.json()["error"] == "E_CERT_REVOKED"
    assert not _device(h, "SN-71")[0].suspect
    assert new.get(f"/v1/images/{os.urandom(32).hex()}").status_code == 404
    row, hist = _device(h, "SN-71")
    assert row.suspect and REASON in row.suspect_reason
    assert sorted(p["kind"] for p in hist) == ["E_CERT_REVOKED", "E_CERT_REVOKED", "not_offered"]
    # Another identity is unaffected.
    other = h.client(h.enroll("SN-72"))
    assert other.get(f"/v1/images/{os.urandom(32).hex()}").status_code == 404
    assert not _device(h, "SN-72")[0].suspect
