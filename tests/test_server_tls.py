"""mTLS on the server's own listener, with real TLS sockets on loopback.

Refusals that must happen in the handshake are checked at the socket level: the server's
alert names the reason (certificate required / unknown CA / expired), and no HTTP request is
ever processed.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import datetime as dt
import socket
import ssl
import urllib.parse
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from otaguard.server.context import ServerSettings
from otaguard.server.pki.ca import FleetCA, write_private_key
from otaguard.server.ratelimit import RateLimit
from tests.pg import (  # noqa: F401
    CA_PASSPHRASE,
    Harness,
    db_url,
    device_context,
    fleet_ca,
    harness,
    hx,
    pg_cluster,
    server_tls,
)


def _raw_request(h: Harness, ctx: ssl.SSLContext) -> bytes:
    """One HTTP request over a raw TLS socket; returns the response or raises SSLError."""
    with (
        socket.create_connection(("127.0.0.1", h.server.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(
            b"POST /v1/checkin HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 17\r\n\r\n{"version":"1.0"}'
        )
        return tls.recv(65536)


def _ctx_with(
    h: Harness, cert_pem: bytes, key: ec.EllipticCurvePrivateKey, d: Path
) -> ssl.SSLContext:
    d.mkdir(parents=True, exist_ok=True)
    (d / "c.pem").write_bytes(cert_pem)
    write_private_key(d / "k.pem", key)
    ctx = ssl.create_default_context(cafile=str(h.tmp / "tls" / "ca.pem"))
    ctx.load_cert_chain(str(d / "c.pem"), str(d / "k.pem"))
    return ctx


def _assert_refused(h: Harness, ctx: ssl.SSLContext) -> None:
    """The server ends the handshake: no HTTP response ever comes back.

    asyncio aborts the transport on a failed handshake without flushing the alert, so the
    client sees EOF: with TLS 1.2 inside the handshake itself, with TLS 1.3 (where the client
    certificate is checked after the client's handshake completed) on the first read.
    """
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    try:
        resp = _raw_request(h, ctx)
    except (ssl.SSLError, ConnectionError):
        resp = b""
    assert resp == b""
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _raw_request(h, ctx)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_handshake_refusals(hx: Harness, tmp_path: Path) -> None:
    # No client certificate.
    _assert_refused(hx, ssl.create_default_context(cafile=str(hx.tmp / "tls" / "ca.pem")))
    # A certificate from another CA (same serial as an enrolled device).
    hx.enroll("SN-1")
    other = FleetCA.create(tmp_path / "other-ca", passphrase=CA_PASSPHRASE)
    key = ec.generate_private_key(ec.SECP256R1())
    foreign = other.issue_device("SN-1", key.public_key())
    _assert_refused(hx, _ctx_with(hx, foreign.pem, key, tmp_path / "foreign"))
    # An expired certificate from the right CA.
    past = dt.datetime(2021, 1, 1, tzinfo=dt.UTC)
    expired = hx.ca.issue_device(
        "SN-1", key.public_key(), not_before=past, not_after=past + dt.timedelta(days=30)
    )
    _assert_refused(hx, _ctx_with(hx, expired.pem, key, tmp_path / "expired"))
    # A server (serverAuth) certificate is not accepted as a client certificate.
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv_cert = hx.ca.issue_server(srv_key.public_key(), dns_names=["evil"], ip_addresses=[])
    _assert_refused(hx, _ctx_with(hx, srv_cert.pem, srv_key, tmp_path / "srvcert"))
    # The control: the same socket code with a valid enrolled certificate gets HTTP 200.
    ok = hx.enroll("SN-OK")
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = device_context(ok)
        ctx.maximum_version = version
        assert _raw_request(hx, ctx).startswith(b"HTTP/1.1 200")
    # Nothing of the refused attempts reached the application.
    from otaguard.server.storage import store

    with hx.db.read() as conn:
        dev = store.device_by_serial(conn, "SN-1")
        assert dev is not None and dev.last_seen is None


def test_valid_cert_reaches_app_and_device_pins_server(hx: Harness, tmp_path: Path) -> None:
    e = hx.enroll("SN-2")
    resp = _raw_request(hx, device_context(e))
    assert resp.startswith(b"HTTP/1.1 200")
    # The device trusts only the fleet CA: a server cert from another CA is refused by it.
    FleetCA.create(tmp_path / "rogue", passphrase=CA_PASSPHRASE)
    ctx = ssl.create_default_context(cafile=str(tmp_path / "rogue" / "ca.pem"))
    ctx.load_cert_chain(str(e.cert_path), str(e.key_path))
    with pytest.raises(ssl.SSLCertVerificationError):
        _raw_request(hx, ctx)


def test_revoked_and_superseded(hx: Harness) -> None:
    e = hx.enroll("SN-3")
    c = hx.client(e)
    assert c.post("/v1/checkin", json={"version": "1.0.0"}).status_code == 200
    from otaguard.server.storage import store

    with hx.db.write() as conn:
        store.revoke_device(conn, "SN-3")
    r = c.post("/v1/checkin", json={"version": "1.0.0"})
    assert r.status_code == 403 and r.json()["error"] == "E_CERT_REVOKED"
    # Re-enrollment issues a new certificate; the old one stays refused.
    e2 = hx.enroll("SN-3", replace=True)
    r = hx.client(e).post("/v1/checkin", json={"version": "1.0.0"})
    assert r.status_code == 403 and r.json()["error"] == "E_CERT_REVOKED"
    assert hx.client(e2).post("/v1/checkin", json={"version": "1.0.0"}).status_code == 200
    with hx.db.read() as conn:
        dev = store.device_by_serial(conn, "SN-3")
        assert dev is not None
        kinds = [p["kind"] for p in store.probe_history(conn, dev.id)]
    assert kinds.count("E_CERT_REVOKED") == 2


def test_unenrolled_cert_refused(hx: Harness, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = hx.ca.issue_device("SN-GHOST", key.public_key())
    ctx = _ctx_with(hx, cert.pem, key, tmp_path / "ghost")
    with httpx.Client(base_url=hx.url, verify=ctx) as c:
        r = c.post("/v1/checkin", json={"version": "1.0.0"})
    assert r.status_code == 403 and r.json()["error"] == "E_CERT"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_forwarded_header_only_from_proxies(
    db_url: str, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path
) -> None:
    import ipaddress

    # Server 1: no proxies configured. A device that also sends X-Client-Cert naming another
    # enrolled device is refused (and recorded), not served as that device.
    with harness(db_url, fleet_ca, server_tls, tmp_path / "a") as h:
        victim = h.enroll("SN-V")
        attacker = h.enroll("SN-A")
        header = urllib.parse.quote(victim.cert.pem.decode())
        r = h.client(attacker).post(
            "/v1/checkin", json={"version": "1.0.0"}, headers={"X-Client-Cert": header}
        )
        assert r.status_code == 403 and r.json()["error"] == "E_CERT"
    # Server 2: 127.0.0.1 is a trusted proxy; the forwarded, CA-verified cert is the identity.
    db2 = tmp_path / "b"
    settings = ServerSettings(
        ca_cert=fleet_ca.cert,
        trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),),
        device_rate=RateLimit(1000, 1000),
    )
    from otaguard.server.storage.db import sqlite_url

    with harness(sqlite_url(tmp_path / "b.db"), fleet_ca, server_tls, db2, settings=settings) as h:
        dev = h.enroll("SN-P")
        proxy = h.enroll("SN-PROXY")  # the proxy's own TLS client identity
        hdr = urllib.parse.quote(dev.cert.pem.decode())
        r = h.client(proxy).post(
            "/v1/checkin",
            json={"version": "2.0.0", "serial": "SN-P"},
            headers={"X-Client-Cert": hdr},
        )
        assert r.status_code == 200, r.text
        from otaguard.server.storage import store

        with h.db.read() as conn:
            row = store.device_by_serial(conn, "SN-P")
            assert row is not None and row.current_version == "2.0.0"
        # A forwarded certificate from another CA is refused even from the proxy.
        other = FleetCA.create(tmp_path / "o", passphrase=CA_PASSPHRASE)
        k = ec.generate_private_key(ec.SECP256R1())
        bad = urllib.parse.quote(other.issue_device("SN-P", k.public_key()).pem.decode())
        r = h.client(proxy).post(
            "/v1/checkin", json={"version": "2.0.0"}, headers={"X-Client-Cert": bad}
        )
        assert r.status_code == 403 and r.json()["error"] == "E_CERT"
        r = h.client(proxy).post(
            "/v1/checkin", json={"version": "2.0.0"}, headers={"X-Client-Cert": "%%garbage"}
        )
        assert r.status_code == 403 and r.json()["error"] == "E_CERT"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_x_forwarded_for_does_not_make_a_client_a_proxy(
    db_url: str, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path
) -> None:
    """Regression: uvicorn's proxy-headers middleware (on by default) rewrote the client
    address from ``X-Forwarded-For`` for any peer on 127.0.0.1 — as every device is behind a
    TCP balancer on the same host. A device could then claim to be a configured proxy and be
    served as any other device through ``X-Client-Cert``. Only the TCP peer counts."""
    import ipaddress

    from otaguard.server.storage import store

    settings = ServerSettings(
        ca_cert=fleet_ca.cert,
        trusted_proxies=(ipaddress.ip_network("192.0.2.10/32"),),  # a proxy elsewhere
        device_rate=RateLimit(1000, 1000),
    )
    with harness(db_url, fleet_ca, server_tls, tmp_path, settings=settings) as h:
        victim = h.enroll("SN-VICTIM")
        attacker = h.enroll("SN-ATTACKER")
        r = h.client(attacker).post(
            "/v1/checkin",
            json={"version": "6.6.6", "serial": "SN-VICTIM"},
            headers={
                "X-Forwarded-For": "192.0.2.10",
                "X-Client-Cert": urllib.parse.quote(victim.cert.pem.decode()),
            },
        )
        assert r.status_code == 403 and r.json()["error"] == "E_CERT", r.text
        with h.db.read() as conn:
            row = store.device_by_serial(conn, "SN-VICTIM")
            assert row is not None and row.current_version != "6.6.6"
