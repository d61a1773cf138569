"""The device HTTPS client's connection handling on real loopback TLS sockets: one keep-alive
connection reused across requests, a connection the server closed while idle replaced without
spending a retry (and pinned again), a body cut short is a drop (E_TRANSPORT, resumable), never
a short body, and only https URLs are followed."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from otaguard.device.https_transport import HttpsTransport
from otaguard.errors import DeviceError, ErrorCode
from otaguard.server.pki.ca import FleetCA, spki_sha256
from otaguard.server.pki.mtls import ThreadedServer, server_ssl_context
from tests.pg import fleet_ca, server_tls  # noqa: F401
from tests.test_device_https_limits import (
    Creds,
    device_creds,  # noqa: F401
    hostile,
)
from tests.test_device_https_limits import (
    Response as HResponse,
)

BLOB = bytes(range(256)) * 1000  # 256,000 bytes


def _app(peers: list[Any]) -> Starlette:
    async def checkin(request: Request) -> JSONResponse:
        peers.append(request.scope["client"])
        # Read the body before answering, as the real check-in does: an answer that starts
        # before the body has arrived closes the connection (server/pki/listener.py), and whether
        # it arrived first would otherwise depend on how TLS split the request.
        await request.body()
        return JSONResponse({"update": None})

    async def blob(request: Request) -> Response:
        peers.append(request.scope["client"])
        rng = request.headers.get("range")
        if rng:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            return Response(BLOB[start:], status_code=206)
        return Response(BLOB)

    return Starlette(
        routes=[
            Route("/v1/checkin", checkin, methods=["POST"]),
            Route("/blob", blob, methods=["GET"]),
        ]
    )


def _server(server_tls: Path, peers: list[Any], keep_alive: float) -> ThreadedServer:
    ctx = server_ssl_context(
        server_tls / "server.pem", server_tls / "server.key", server_tls / "ca.pem"
    )
    srv = ThreadedServer(_app(peers), ctx)
    srv.server.config.timeout_keep_alive = keep_alive  # type: ignore[assignment]
    return srv.start()


def _client(url: str, c: Creds, **kw: Any) -> HttpsTransport:
    return HttpsTransport(url, ca_file=c.ca, cert_file=c.cert, key_file=c.key, **kw)


def _pin(server_tls: Path) -> str:
    return spki_sha256(x509.load_pem_x509_certificate((server_tls / "server.pem").read_bytes()))


def test_one_connection_serves_many_requests_and_bodies(
    server_tls: Path,
    device_creds: Creds,
) -> None:
    peers: list[Any] = []
    srv = _server(server_tls, peers, keep_alive=60)
    try:
        t = _client(
            srv.url,
            device_creds,
            spki_pins={_pin(server_tls)},
            max_attempts=1,
        )
        assert t.checkin({}) is None
        t.update = {"image_url": "/blob"}
        assert b"".join(t.open_image(0)) == BLOB
        assert b"".join(t.open_image(100_000)) == BLOB[100_000:]
        it = t.open_image(0)  # the agent stops after the first chunk (e.g. a power cut)
        next(it)
        it.close()  # an unread body: that connection is closed, the next one is fresh
        assert t.checkin({}) is None
        t.close()
        assert t.checkin({}) is None  # close() drops the connection; the client reconnects
        t.close()
    finally:
        srv.stop()
    assert len(peers) == 6
    assert len({peers[0], peers[1], peers[2], peers[3]}) == 1  # one TCP connection
    assert peers[4] != peers[3] and peers[5] != peers[4]


def test_connection_closed_by_the_server_while_idle_is_replaced_and_pinned_again(
    server_tls: Path, device_creds: Creds
) -> None:
    peers: list[Any] = []
    srv = _server(server_tls, peers, keep_alive=0.2)
    try:
        good = _client(
            srv.url,
            device_creds,
            spki_pins={_pin(server_tls)},
            keepalive_expiry=None,
            max_attempts=1,  # a stale connection must not cost the only attempt
        )
        assert good.checkin({}) is None
        (conn,) = good._conns.values()
        first = conn.http.sock  # held: a new socket can never be this object
        time.sleep(0.8)  # the server's keep-alive timeout closes the idle connection
        assert good.checkin({}) is None
        (conn,) = good._conns.values()
        # a new connection (compared as socket objects: the kernel may hand the new one the
        # same client port, so peer addresses alone cannot tell them apart)
        assert conn.http.sock is not None and conn.http.sock is not first
        good.close()
        # the pin is checked on every new connection, not only the first one
        now = [0.0]
        bad = _client(
            srv.url,
            device_creds,
            spki_pins={_pin(server_tls)},
            keepalive_expiry=5.0,
            clock=lambda: now[0],
            max_attempts=1,
        )
        assert bad.checkin({}) is None
        bad._pins = {"00" * 32}  # as if the server's key had been swapped behind the CA
        now[0] += 10  # past the keep-alive expiry: a new connection
        with pytest.raises(DeviceError) as ei:
            bad.checkin({})
        assert ei.value.code == ErrorCode.CERT
        bad.close()
    finally:
        srv.stop()
    assert len(peers) == 3


@pytest.mark.parametrize("what", ["image", "checkin", "keylist"])
def test_body_cut_short_is_a_transport_drop(
    server_tls: Path, device_creds: Creds, what: str
) -> None:
    def handler(method: str, path: str) -> HResponse:
        return 200, [("Content-Length", "10000")], iter([b"{" + b" " * 4999])

    with hostile(server_tls, handler) as srv:
        t = _client(
            srv.url,
            device_creds,
            sleep=lambda _s: None,
            max_attempts=1,
        )
        t.update = {"image_url": "/img"}
        with pytest.raises(DeviceError) as ei:
            if what == "image":
                b"".join(t.open_image(0))
            elif what == "checkin":
                t.checkin({})
            else:
                t.keylist()
        assert ei.value.code == ErrorCode.TRANSPORT
        t.close()


def test_only_https_urls_are_followed(
    server_tls: Path, device_creds: Creds, fleet_ca: FleetCA
) -> None:
    t = _client("https://127.0.0.1:1", device_creds, max_attempts=1)
    for url in (
        "http://127.0.0.1:1/img",
        "//127.0.0.1:1/img",
        "file:///etc/passwd",
        "/img\r\nX-Injected: 1",  # header injection through a server-supplied URL
        "/img with space",
        "/" + "a" * 3000,
    ):
        t.update = {"image_url": url}
        with pytest.raises(DeviceError) as ei:
            b"".join(t.open_image(0))
        assert ei.value.code == ErrorCode.MALFORMED
    with pytest.raises(DeviceError) as ei:
        _client("http://127.0.0.1:1", device_creds)
    assert ei.value.code == ErrorCode.USAGE
