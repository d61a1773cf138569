"""Slow clients and refused bodies on every listener (device, admin, signing), raw sockets on
127.0.0.1 with short deadlines; failed authentication logged, counted and not written."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import json
import logging
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func
from sqlalchemy import select as sql_select

from otaguard.crypto.software import SoftwareSigner
from otaguard.server.metrics import parse_samples
from otaguard.server.pki.authlog import AuthFailures
from otaguard.server.pki.ca import FleetCA
from otaguard.server.pki.listener import Deadlines
from otaguard.server.pki.mtls import ThreadedServer, server_ssl_context
from otaguard.server.storage import models
from otaguard.server.storage.db import sqlite_url
from tests.pg import Harness, device_context, fleet_ca, harness, server_tls  # noqa: F401
from tests.test_server_api import admin

# Long enough for a loaded CI machine to send a request in one go, short enough for the test.
SHORT = Deadlines(header_timeout=0.5, body_timeout=1.0, body_min_rate=10)
HEADERS_NEVER_ENDING = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 400


@pytest.fixture
def h(fleet_ca: FleetCA, server_tls: Path, tmp_path: Path) -> Iterator[Harness]:
    with harness(sqlite_url(tmp_path / "otaguard.db"), fleet_ca, server_tls, tmp_path) as hh:
        yield hh


@pytest.fixture
def short(h: Harness, server_tls: Path) -> Iterator[dict[str, ThreadedServer]]:
    """The harness's server behind a second pair of listeners with short deadlines."""
    tls = server_tls
    dev_ctx = server_ssl_context(tls / "server.pem", tls / "server.key", tls / "ca.pem")
    adm_ctx = server_ssl_context(
        tls / "server.pem", tls / "server.key", None, require_client_cert=False
    )
    servers = {
        part: ThreadedServer(
            h.srv.asgi(part),
            ctx,
            deadlines=Deadlines(
                SHORT.header_timeout,
                SHORT.body_timeout,
                SHORT.body_min_rate,
                listener=part,
                on_expire=h.srv.deadline_expired,
            ),
        ).start()
        for part, ctx in (("device", dev_ctx), ("admin", adm_ctx))
    }
    try:
        yield servers
    finally:
        for s in servers.values():
            s.stop()


def _connect(port: int, ctx: ssl.SSLContext | None) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost") if ctx is not None else raw


def _drip(sock: socket.socket, data: bytes, interval: float = 0.05) -> bool:
    """Send ``data`` one byte at a time; True as soon as the server answered or closed."""
    for i in range(len(data)):
        try:
            sock.sendall(data[i : i + 1])
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            return True
        if select.select([sock], [], [], interval)[0]:
            return True
    return False


def _until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (10 s at most)."""
    sock.settimeout(10)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return data
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open; got {data!r}") from None
        if not chunk:
            return data
        data += chunk


def _admin_ctx(h: Harness) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(h.tmp / "tls" / "ca.pem"))


def _metric(h: Harness, name: str) -> float:
    return parse_samples(h.srv.metrics.render().decode()).get(name, 0.0)


@pytest.mark.parametrize("part", ["device", "admin"])
def test_slow_headers_are_cut_off(h: Harness, short: dict[str, ThreadedServer], part: str) -> None:
    ctx = device_context(h.enroll("SN-SLOW")) if part == "device" else _admin_ctx(h)
    with _connect(short[part].port, ctx) as s:
        assert _drip(s, HEADERS_NEVER_ENDING), "server still reading headers after 20 s"
        reply = _until_closed(s)
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert _metric(h, f'otaguard_listener_deadlines_total{{listener="{part}",phase="header"}}') == 1


def test_silent_connection_and_slow_second_request_are_cut_off(
    h: Harness, short: dict[str, ThreadedServer]
) -> None:
    ctx = _admin_ctx(h)
    with _connect(short["admin"].port, ctx) as s:  # connects, says nothing
        assert _until_closed(s).startswith(b"HTTP/1.1 408 ")
    with _connect(short["admin"].port, ctx) as s:  # one good request, then a slow one
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        assert _drip(s, HEADERS_NEVER_ENDING)
        assert _until_closed(s).startswith(b"HTTP/1.1 408 ")


def test_trickled_body_is_cut_off(h: Harness, short: dict[str, ThreadedServer]) -> None:
    """5 bytes/s against a minimum of 10 bytes/s: closed once the average falls behind, though
    no single gap reaches the idle deadline."""
    ctx = device_context(h.enroll("SN-TRICKLE"))
    body = json.dumps({"version": "1.0.0", "pad": "x" * 900}).encode()
    head = (
        b"POST /v1/checkin HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    with _connect(short["device"].port, ctx) as s:
        s.sendall(head)
        assert _drip(s, body, interval=0.2), "server still reading the body"
        assert _until_closed(s) == b""  # no answer: the request never completed
    assert _metric(h, 'otaguard_listener_deadlines_total{listener="device",phase="body"}') == 1


def test_full_speed_requests_are_unaffected(h: Harness, short: dict[str, ThreadedServer]) -> None:
    e = h.enroll("SN-FAST")
    body = json.dumps({"version": "1.0.0"}).encode()
    with _connect(short["device"].port, device_context(e)) as s:
        for _ in range(3):  # keep-alive: three requests on one connection
            s.sendall(
                b"POST /v1/checkin HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                b"application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            reply = s.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in reply


@pytest.mark.parametrize("part", ["device", "admin"])
def test_refused_request_body_is_never_read(
    h: Harness, short: dict[str, ThreadedServer], part: str
) -> None:
    """A 1 GB body declared on a request refused before its body (401 no token, 403 forged
    forwarded certificate): the answer says Connection: close and the server closes."""
    if part == "admin":
        ctx, head = _admin_ctx(h), b"POST /admin/v1/images HTTP/1.1\r\n"
    else:
        victim = urllib.parse.quote(h.enroll("SN-VICTIM").cert.pem.decode())
        ctx = device_context(h.enroll("SN-ATTACKER"))
        head = b"POST /v1/checkin HTTP/1.1\r\nX-Client-Cert: " + victim.encode() + b"\r\n"
    with _connect(short[part].port, ctx) as s:
        s.sendall(head + b"Host: localhost\r\nContent-Length: 1000000000\r\n\r\n" + b"x" * 4096)
        reply = _until_closed(s)
    status = b"401" if part == "admin" else b"403"
    assert reply.startswith(b"HTTP/1.1 " + status + b" ")
    assert b"connection: close" in reply.lower()
    code = b"E_AUTH" if part == "admin" else b"E_CERT"
    assert b'"error":"' + code + b'"' in reply


def test_forged_header_flood_writes_one_row_and_counts_every_attempt(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (#17): each forged X-Client-Cert wrote a probe row before any limit."""
    victim = urllib.parse.quote(h.enroll("SN-V").cert.pem.decode())
    c = h.client(h.enroll("SN-A"))
    with caplog.at_level(logging.WARNING, logger="otaguard.auth"):
        for _ in range(40):
            r = c.post("/v1/checkin", json={"version": "1"}, headers={"X-Client-Cert": victim})
            assert r.status_code == 403 and r.json()["error"] == "E_CERT"
    with h.db.read() as conn:
        pe = models.probe_events
        rows = conn.execute(
            sql_select(func.count()).where(pe.c.kind == "forged_header")
        ).scalar_one()
    assert rows == 1
    name = 'otaguard_auth_failures_total{listener="device",reason="forged_header"}'
    assert _metric(h, name) == 40
    lines = [r.getMessage() for r in caplog.records if r.name == "otaguard.auth"]
    assert len(lines) == 1 and "127.0.0.1" in lines[0] and "forged_header" in lines[0]


def test_admin_auth_failures_logged_once_per_source_and_interval(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    c = h.client(None, headers={"Authorization": "Bearer otg_wrong"})
    with caplog.at_level(logging.WARNING, logger="otaguard.auth"):
        for _ in range(5):
            assert c.get("/admin/v1/campaigns").status_code == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "otaguard.auth"]
    assert lines == ["authentication failed on the admin listener from 127.0.0.1: bad_token"]
    assert _metric(h, 'otaguard_auth_failures_total{listener="admin",reason="bad_token"}') == 5
    ok = admin(h, "viewer")  # a good token is never counted
    assert ok.get("/admin/v1/campaigns").status_code == 200
    assert _metric(h, 'otaguard_auth_failures_total{listener="admin",reason="bad_token"}') == 5


def test_auth_failure_window(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    af = AuthFailures(interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="otaguard.auth"):
        assert af.note("admin", "bad_token", "192.0.2.1") is True
        assert af.note("admin", "bad_token", "192.0.2.1") is False  # same window: no record
        assert af.note("admin", "no_token", "192.0.2.1") is True  # another reason: recorded
        assert af.note("admin", "bad_token", "192.0.2.2") is True  # another source
        now[0] = 10.0
        assert af.note("admin", "bad_token", "192.0.2.1") is True
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # 192.0.2.1 twice (0 s, 10 s), 192.0.2.2 once
    assert lines[-1].endswith("bad_token (2 more from this source not logged)")


# --- the signing service, as the real process ----------------------------------------------------
@pytest.fixture
def signing_service(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    pw = "listener-test-passphrase"
    SoftwareSigner.generate(tmp_path / "svc.key", "ed25519", pw.encode())
    SoftwareSigner.generate(tmp_path / "seal.key", "ed25519", pw.encode())
    (tmp_path / "policy.json").write_text(json.dumps({"version": 1, "requesters": {}}))
    (tmp_path / "signing.json").write_text(
        json.dumps(
            {
                "version": 1,
                "signer": {"key_file": "svc.key"},
                "audit_sealer": {"key_file": "seal.key"},
                "audit_log": "audit.log",
                "state": "state.sqlite",
                "policy": "policy.json",
                "tokens": [],
            }
        )
    )
    env = {**os.environ, "OTAGUARD_KEY_PASSPHRASE": pw}
    proc = subprocess.Popen(
        [sys.executable, "-m", "otaguard.cli.main", "signing", "serve", "--config",
         str(tmp_path / "signing.json"), "--port", "0", "--header-timeout", "0.5",
         "--body-timeout", "1"],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    port = None
    while port is None:
        line = proc.stderr.readline()
        assert line, "signing service did not start"
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        port = int(m.group(1)) if m else None
    for _ in range(200):  # until uvicorn accepts
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(20)


def test_signing_listener_deadlines_and_auth_log(
    signing_service: tuple[int, subprocess.Popen[str]],
) -> None:
    port, proc = signing_service
    with _connect(port, None) as s:
        assert _drip(s, HEADERS_NEVER_ENDING)
        assert _until_closed(s).startswith(b"HTTP/1.1 408 ")
    for _ in range(3):
        with _connect(port, None) as s:
            s.sendall(
                b"POST /v1/sign HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer otg_x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{"
            )
            reply = _until_closed(s)
            assert reply.startswith(b"HTTP/1.1 401 ") and b"connection: close" in reply.lower()
    proc.terminate()
    proc.wait(20)
    assert proc.stderr is not None
    err = proc.stderr.read()
    auth = [ln for ln in err.splitlines() if "authentication failed" in ln]
    assert auth == [
        "WARNING otaguard.auth: authentication failed on the signing listener from 127.0.0.1: "
        "bad_token"
    ], err
    assert "header deadline passed" in err
