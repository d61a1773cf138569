"""The server's own TLS listener: uvicorn with client certificates passed to the app.

uvicorn terminates TLS but builds the ASGI scope without the peer certificate. Its HTTP
protocol object lives exactly as long as one TLS connection, so we subclass it and, once the
connection is made, wrap the app for that connection with a shim that adds the verified
certificate to every request's scope — as the ASGI TLS extension specifies
(``scope["extensions"]["tls"]["client_cert_chain"]``, PEM strings) plus the DER under
``scope["otaguard.peer_cert_der"]``. The certificate was verified by OpenSSL during the
handshake against the fleet CA as the only trust anchor (``CERT_REQUIRED``): a connection
without a valid client certificate never reaches HTTP at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ...errors import ErrorCode, ServerError
from .listener import DeadlineProtocol, Deadlines, with_deadlines

PEER_CERT_KEY = "otaguard.peer_cert_der"

ASGIApp = Any


class _PeerCertApp:
    __slots__ = ("app", "der", "tls")

    def __init__(self, app: ASGIApp, der: bytes | None, tls: dict[str, Any]) -> None:
        self.app = app
        self.der = der
        self.tls = tls

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            ext = scope.setdefault("extensions", {})
            ext["tls"] = self.tls
            scope[PEER_CERT_KEY] = self.der
        await self.app(scope, receive, send)


class _CorkedTransport:
    """Coalesces the writes of one event-loop step into one TLS record and one send().

    uvicorn writes a response's head and body separately; over TLS that is two records, two
    syscalls and two wake-ups of the client for every small JSON answer. Writes are queued
    and flushed on the next loop iteration (or before close), in order.
    """

    __slots__ = ("_buf", "_loop", "_t")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._t = transport
        self._loop = asyncio.get_running_loop()
        self._buf: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._buf:
            self._loop.call_soon(self._flush)
        self._buf.append(data)

    def _flush(self) -> None:
        buf, self._buf = self._buf, []
        if buf and not self._t.is_closing():
            self._t.write(buf[0] if len(buf) == 1 else b"".join(buf))

    def close(self) -> None:
        self._flush()
        self._t.close()

    def abort(self) -> None:
        self._buf = []
        self._t.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


def _peer_cert_app(app: ASGIApp, transport: asyncio.Transport) -> _PeerCertApp:
    """Wrap ``app`` for one TLS connection with its verified client certificate."""
    sslobj: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
    der: bytes | None = None
    tls: dict[str, Any] = {
        "server_cert": None,
        "client_cert_chain": [],
        "client_cert_error": None,
    }
    if sslobj is not None:
        der = sslobj.getpeercert(binary_form=True)
        if der:
            tls["client_cert_chain"] = [ssl.DER_cert_to_PEM_cert(der)]
        cipher = sslobj.cipher()
        tls["tls_version"] = sslobj.version()
        tls["cipher_suite"] = cipher[0] if cipher else None
    return _PeerCertApp(app, der or None, tls)


class MtlsH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus the verified client certificate in the scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = _peer_cert_app(self.app, transport)


class MtlsHttpToolsProtocol(DeadlineProtocol):
    """uvicorn's httptools protocol (the C parser costs a fraction of h11's pure-Python state
    machine) with read deadlines (:mod:`.listener`), plus the verified client certificate in
    the scope. h11 (:class:`MtlsH11Protocol`) has no read deadlines: not used by default."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = _peer_cert_app(self.app, transport)
        self.transport = _CorkedTransport(transport)  # type: ignore[assignment]


MtlsProtocol: type[asyncio.Protocol] = MtlsHttpToolsProtocol


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop (libuv) when it is installed, else asyncio's. Every request crosses
    the loop several times (TLS records, the worker-thread hop for a database write and back),
    and uvloop's transports and cross-thread wake-up cost a fraction of the pure-Python ones."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency (not on Windows)
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run`` on :func:`new_event_loop`."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main)


def server_ssl_context(
    cert: Path, key: Path, client_ca: Path | None, *, require_client_cert: bool = True
) -> ssl.SSLContext:
    """TLS 1.2+ server context; ``client_ca`` is the ONLY anchor for client certificates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    elif require_client_cert:
        raise ServerError(ErrorCode.USAGE, "mTLS needs the fleet CA certificate", 500)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def uvicorn_config(
    app: ASGIApp,
    ctx: ssl.SSLContext | None,
    *,
    log_level: str = "warning",
    protocol: type[asyncio.Protocol] | None = None,
    deadlines: Deadlines | None = None,
) -> uvicorn.Config:
    """``deadlines``: the listener's read deadlines (:mod:`.listener`; defaults if None)."""
    kwargs: dict[str, Any] = {}
    if ctx is not None:
        kwargs["ssl_context_factory"] = lambda _cfg, _default: ctx
    config = uvicorn.Config(
        app,
        http=protocol or MtlsProtocol,
        lifespan="off",
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=75,
        server_header=False,
        date_header=True,
        # The client address is the TCP peer, always. uvicorn's default rewrites it from
        # X-Forwarded-For for peers on 127.0.0.1 — every device behind a balancer on the
        # same host — which let a device pass as a trusted proxy (X-Client-Cert) and as
        # any other address for the per-IP limit. Proxies are handled by DeviceGate.
        proxy_headers=False,
        **kwargs,
    )
    return with_deadlines(config, deadlines or Deadlines())


class ThreadedServer:
    """Run the server on a background thread (tests, benchmarks, the simulator)."""

    def __init__(
        self,
        app: ASGIApp,
        ctx: ssl.SSLContext | None,
        host: str = "127.0.0.1",
        *,
        sock: socket.socket | None = None,
        deadlines: Deadlines | None = None,
    ) -> None:
        """``sock``: a listening socket to serve (e.g. inherited, shared with other server
        processes); by default a new one on a free port of ``host``."""
        self.sock = sock if sock is not None else bind_socket(host, 0)
        self.port: int = self.sock.getsockname()[1]
        self.host = host
        self.server = uvicorn.Server(uvicorn_config(app, ctx, deadlines=deadlines))
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        run_loop(self.server.serve(sockets=[self.sock]))

    def start(self) -> ThreadedServer:
        self._thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            if not self._thread.is_alive():
                break
            threading.Event().wait(0.01)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        with contextlib.suppress(OSError):
            self.sock.close()

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"


@contextlib.contextmanager
def running(app: ASGIApp, ctx: ssl.SSLContext | None) -> Iterator[ThreadedServer]:
    srv = ThreadedServer(app, ctx).start()
    try:
        yield srv
    finally:
        srv.stop()
