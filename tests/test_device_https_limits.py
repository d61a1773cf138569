"""The device HTTPS client against a hostile server on a real loopback TLS socket: every body
it reads is bounded (E_TOO_LARGE before reading it all), a dripping server hits the download
deadline (E_TRANSPORT), and a fleet *device* certificate cannot pose as the server."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otaguard.device.https_transport import MAX_JSON, MAX_KEYLIST, MAX_MANIFEST, HttpsTransport
from otaguard.errors import DeviceError, ErrorCode
from otaguard.server.pki.ca import FleetCA
from otaguard.server.pki.mtls import server_ssl_context
from tests.pg import fleet_ca, server_tls  # noqa: F401

BIG = 100 * 1024 * 1024  # what the hostile server offers; the client must not take it all
MAX_SENT = 16 * 1024 * 1024  # socket buffers and TLS records in flight, far below BIG

# (status, headers, body chunks)
Response = tuple[int, list[tuple[str, str]], Iterator[bytes]]
Handler = Callable[[str, str], Response]


def _filler(total: int, chunk: int = 64 * 1024, delay: float = 0.0) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        if delay:
            time.sleep(delay)
        yield b"x" * n
        sent += n


@dataclass
class HostileServer:
    """A minimal HTTP/1.1-over-TLS server that answers one request per connection."""

    ctx: ssl.SSLContext
    handler: Handler
    sent: int = 0
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(4096)
                    if not data:
                        return
                    head += data
                lines = head.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                hdrs = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
                rest = head.split(b"\r\n\r\n", 1)[1]
                need = int(hdrs.get("content-length", "0")) - len(rest)
                while need > 0:
                    need -= len(conn.recv(min(need, 65536)))
                status, headers, body = self.handler(method, path)
                out = f"HTTP/1.1 {status} X\r\nConnection: close\r\n"
                out += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
                conn.sendall(out.encode())
                for chunk in body:
                    conn.sendall(chunk)
                    self.sent += len(chunk)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.errors.append(type(exc).__name__)

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass(frozen=True)
class Creds:
    ca: Path
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def device_creds(
    fleet_ca: FleetCA, server_tls: Path, tmp_path_factory: pytest.TempPathFactory
) -> Creds:
    d = tmp_path_factory.mktemp("device-creds")
    key = ec.generate_private_key(ec.SECP256R1())
    _write_key(d / "device.key", key)
    (d / "device.pem").write_bytes(fleet_ca.issue_device("SN-LIMIT-1", key.public_key()).pem)
    return Creds(server_tls / "ca.pem", d / "device.pem", d / "device.key")


@contextlib.contextmanager
def hostile(
    server_tls: Path, handler: Handler, cert: Path | None = None, key: Path | None = None
) -> Iterator[HostileServer]:
    ctx = server_ssl_context(
        cert or server_tls / "server.pem",
        key or server_tls / "server.key",
        server_tls / "ca.pem",
        require_client_cert=False,
    )
    srv = HostileServer(ctx, handler)
    try:
        yield srv
    finally:
        srv.close()


def transport(srv: HostileServer, c: Creds, **kw: object) -> HttpsTransport:
    return HttpsTransport(
        srv.url,
        ca_file=c.ca,
        cert_file=c.cert,
        key_file=c.key,
        sleep=lambda _s: None,
        timeout=10.0,
        **kw,  # type: ignore[arg-type]
    )


def _refused(call: Callable[[], object], code: ErrorCode) -> None:
    with pytest.raises(DeviceError) as exc:
        call()
    assert exc.value.code == code, exc.value


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "close-delimited"])
@pytest.mark.parametrize("what", ["checkin", "report", "error", "keylist"])
def test_oversized_bodies_are_refused_without_reading_them(
    device_creds: Creds, server_tls: Path, what: str, declared: bool
) -> None:
    status = 409 if what == "error" else 200
    headers = [("Content-Type", "application/json")]
    if declared:
        headers.append(("Content-Length", str(BIG)))

    def handler(method: str, path: str) -> Response:
        return status, headers, _filler(BIG)

    with hostile(server_tls, handler) as srv:
        t = transport(srv, device_creds)
        call: Callable[[], object] = {
            "checkin": lambda: t.checkin({"version": "1.0.0"}),
            "report": lambda: t.report({"event": "installed"}),
            "error": lambda: t.checkin({"version": "1.0.0"}),
            "keylist": lambda: t.keylist(),
        }[what]
        # Refused from the declared length or at the cap, not by a read timeout (which would
        # be E_TRANSPORT): the code says why; srv.sent below says how little was read.
        _refused(call, ErrorCode.TOO_LARGE)
        t.close()
        # give the server a moment to notice the closed connection, then check it stalled
        for _ in range(100):
            if srv.errors:
                break
            time.sleep(0.02)
        assert srv.sent < MAX_SENT, srv.sent


@pytest.mark.parametrize(
    ("size", "ok"),
    [(MAX_MANIFEST, True), (MAX_MANIFEST + 1, False), (BIG, False)],
    ids=["at-limit", "one-over", "huge"],
)
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "close-delimited"])
def test_manifest_cap(
    device_creds: Creds, server_tls: Path, size: int, ok: bool, declared: bool
) -> None:
    headers = [("Content-Length", str(size))] if declared else []

    def handler(method: str, path: str) -> Response:
        assert path == "/m"
        return 200, headers, _filler(size, chunk=4096)

    with hostile(server_tls, handler) as srv:
        t = transport(srv, device_creds)
        t.update = {"manifest_url": "/m"}
        if ok:
            assert len(t.fetch_manifest()) == MAX_MANIFEST
        else:
            _refused(t.fetch_manifest, ErrorCode.TOO_LARGE)
        t.close()


def test_limits_are_the_documented_ones() -> None:
    assert MAX_JSON == MAX_MANIFEST == MAX_KEYLIST == 64 * 1024


@pytest.mark.parametrize("what", ["image", "checkin"])
def test_dripping_server_hits_the_download_deadline(
    device_creds: Creds, server_tls: Path, what: str
) -> None:
    """Each chunk arrives well inside the read timeout, but the whole body never would.

    Time is the transport's injected clock, one second per reading of it: the download
    must stop with the deadline's own error after a handful of reads, however fast or slow
    the machine is. The server never completes the body (it drips 10 bytes at a time and
    gives up after 20,000), so a transport without the deadline ends with a different
    error ("ended early"), not this one."""
    ticks = [0.0]

    def clock() -> float:
        ticks[0] += 1.0
        return ticks[0]

    def handler(method: str, path: str) -> Response:
        return 200, [("Content-Length", "60000")], _filler(20_000, chunk=10, delay=0.001)

    with hostile(server_tls, handler) as srv:
        t = transport(srv, device_creds, deadline=5.0, clock=clock)
        t.update = {"image_url": "/img"}
        with pytest.raises(DeviceError) as exc:
            if what == "image":
                b"".join(t.open_image(0))
            else:
                t.checkin({})
        assert exc.value.code == ErrorCode.TRANSPORT
        assert "deadline" in exc.value.detail, exc.value
        t.close()


def test_no_deadline_by_default_and_a_fast_body_is_fine(
    device_creds: Creds, server_tls: Path
) -> None:
    def handler(method: str, path: str) -> Response:
        return 200, [("Content-Length", "200000")], _filler(200_000)

    with hostile(server_tls, handler) as srv:
        t = transport(srv, device_creds, deadline=30.0)
        t.update = {"image_url": "/img"}
        assert len(b"".join(t.open_image(0))) == 200_000
        t.close()


# --- G10: a fleet device certificate (clientAuth only) presented as the server certificate ---


def _client_only_cert_for_loopback(ca: FleetCA, d: Path) -> tuple[Path, Path]:
    """Signed by the fleet CA, SAN 127.0.0.1 (so the hostname matches), EKU clientAuth only:
    exactly what a stolen device key pair plus a permissive CA would give a MITM."""
    from otaguard.server.pki import ca as ca_mod

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SN-MITM-1")])
    b = ca._builder(
        subject, key.public_key(), now, now + dt.timedelta(days=1), ExtendedKeyUsageOID.CLIENT_AUTH
    ).add_extension(
        x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        critical=False,
    )
    cert = ca_mod._sign(b, ca._key, ca._signer)
    (d / "mitm.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(d / "mitm.key", key)
    return d / "mitm.pem", d / "mitm.key"


def test_device_certificate_as_server_certificate_is_refused(
    fleet_ca: FleetCA, server_tls: Path, device_creds: Creds, tmp_path: Path
) -> None:
    def handler(method: str, path: str) -> Response:
        body = b'{"update": null}'
        return 200, [("Content-Length", str(len(body)))], iter([body])

    # control: the same server with the real server certificate is accepted
    with hostile(server_tls, handler) as srv:
        t = transport(srv, device_creds)
        assert t.checkin({}) is None
        t.close()
    for cert, key in (
        _client_only_cert_for_loopback(fleet_ca, tmp_path),
        (device_creds.cert, device_creds.key),  # a plain enrolled device certificate
    ):
        with hostile(server_tls, handler, cert=cert, key=key) as srv:
            mitm = transport(srv, device_creds, max_attempts=2)
            _refused(lambda: mitm.checkin({}), ErrorCode.TRANSPORT)  # noqa: B023
            mitm.close()
            assert srv.sent == 0
