"""The update server's ASGI app: device API (mTLS identity) and the minimal admin API.

Device identity comes only from a verified client certificate: the TLS stack's (our own
listener, see :mod:`.mtls`) or, behind a TLS-terminating proxy, the ``X-Client-Cert`` header —
honoured only from configured proxy addresses and re-verified against the fleet CA. The
certificate must also be the one the database holds for that serial and not revoked.

Every refusal is JSON ``{"error": code, "detail": ...}`` with a status from the error. The
server holds no signing key: releases are verified on upload against the trust anchors it is
configured with, and devices verify them again.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from cryptography import x509
from sqlalchemy import Connection
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..crypto.cose import Signer
from ..errors import ErrorCode, OtaError, ServerError
from ..trust.model import KeyResolver
from ..wire import decimal, loads_json
from . import store
from .authlog import AuthFailures
from .blobs import LocalBlobStore, check_name
from .ca import fingerprint, serial_of, verify_forwarded_cert
from .campaigns import TRANSIENT_ERRORS, CampaignService, Plan
from .db import Database
from .mcuboot import offer as mcuboot_offer
from .metrics import MetricsMiddleware, ServerMetrics, metrics_endpoint
from .mtls import PEER_CERT_KEY
from .prepared import Record
from .ratelimit import ProbeDetector, RateLimit, TokenBuckets, retry_after_header
from .renewal import MAX_CSR, CertIssuer, check_csr, parse_csr

if TYPE_CHECKING:
    from .tufrepo import TufRepository

log = logging.getLogger("otaguard.server")
T = TypeVar("T")
P = ParamSpec("P")

IpNet = ipaddress.IPv4Network | ipaddress.IPv6Network
ENVELOPE_TYPE = "application/suit-envelope+cose"
KEYLIST_TYPE = "application/cose; cose-type=cose-sign1"
CERT_TYPE = "application/pem-certificate-chain"
# Refusals of a known device's certificate: counted towards its refusal threshold.
_CERT_REFUSALS = frozenset(
    {ErrorCode.CERT_REVOKED, ErrorCode.CERT_SUPERSEDED, ErrorCode.CERT_EXPIRED}
)
MAX_JSON_ITEMS = 64
_REPORT_ID = re.compile(r"\A[A-Za-z0-9_.:-]{1,64}\Z")
_STATE = re.compile(r"\A[a-z_]{1,32}\Z")
_ERROR = re.compile(r"\AE_[A-Z0-9_]{1,30}\Z")
_VERSION = re.compile(r"\A[0-9]{1,9}(\.[0-9]{1,9}){0,3}\Z")
_HEX = re.compile(r"\A[0-9a-f]{1,256}\Z")
DONE_STATES = frozenset({"confirmed", "success", "installed_confirmed"})
FAILED_STATES = frozenset({"failed", "rejected", "reverted", "aborted"})
WORKING_STATES = frozenset({"downloading", "downloaded", "installing", "installed", "rebooting"})


@dataclass
class ServerSettings:
    ca_cert: x509.Certificate
    trusted_proxies: tuple[IpNet, ...] = ()
    device_rate: RateLimit = field(default_factory=lambda: RateLimit(rate=5.0, burst=30))
    ip_rate: RateLimit = field(default_factory=lambda: RateLimit(rate=200.0, burst=1000))
    probe_threshold: int = 20
    probe_window: float = 60.0
    probe_event_interval: float = 10.0
    # Refusals that are not about load (revoked/superseded certificate, a manifest or image
    # the device was not offered) flag an identity after this many within the window.
    refusal_threshold: int = 10
    refusal_window: float = 600.0
    max_device_body: int = 64 * 1024
    max_envelope: int = 64 * 1024
    max_image: int = 1 << 30
    lastseen_interval: int = 60
    poll_interval: int = 300
    # Run the device API's database work and blob reads on the event loop instead of worker
    # threads. For SQLite whose commits do not wait for fsync (synchronous=NORMAL, as the
    # simulator runs it) and blobs in the page cache, the work costs less than the two thread
    # switches of each hop; with fsync per commit, a database across a network or blobs on
    # slow storage, keep the default so one slow call does not stall every connection.
    inline_io: bool = False
    # Seals the rotation audit log (an HSM key authorized for the audit role only); without
    # one the log is hash-chained and anchored in the database but unsealed.
    audit_sealer: Signer | None = None


class TrustState:
    """The anchors releases are checked against on upload (replaceable at run time)."""

    def __init__(self, resolver: KeyResolver | None) -> None:
        self._resolver = resolver
        self._lock = threading.Lock()
        # Re-reads the database's key lists (trustsync.TrustSync.refresh, set where a node
        # shares its database with others); None: this object is the only truth.
        self.refresh: Callable[[], None] | None = None

    @property
    def resolver(self) -> KeyResolver | None:
        return self._resolver

    def fresh(self) -> KeyResolver | None:
        """The anchors, first brought up to the database's newest key list (before a
        security decision; does a database read, so call it off the event loop)."""
        if self.refresh is not None:
            self.refresh()
        return self._resolver

    def replace(self, resolver: KeyResolver) -> None:
        with self._lock:
            old_v = getattr(self._resolver, "version", None)
            new_v = getattr(resolver, "version", None)
            # Never back: a reload from the database may have overtaken a publication.
            if not (isinstance(old_v, int) and isinstance(new_v, int) and new_v < old_v):
                self._resolver = resolver


class RateLimited(ServerError):
    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(ErrorCode.RATE_LIMIT, detail, 429)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Identity:
    serial: str
    fingerprint: str


def error_response(err: OtaError, status: int, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(err.to_dict(), status_code=status, headers=headers)


def _status_of(err: OtaError) -> int:
    if isinstance(err, ServerError):
        return err.status
    return {
        ErrorCode.NOT_FOUND: 404,
        ErrorCode.TOO_LARGE: 413,
        ErrorCode.CONFLICT: 409,
        ErrorCode.EXISTS: 409,
        ErrorCode.REPLAY: 409,
        ErrorCode.AUTH: 401,
        ErrorCode.FORBIDDEN: 403,
        ErrorCode.CERT: 403,
        ErrorCode.CERT_REVOKED: 403,
        ErrorCode.INTERNAL: 500,
        ErrorCode.DATABASE: 503,
    }.get(err.code, 400)


class _IpLimitMiddleware:
    """Per-client-IP token bucket, applied before any authentication work."""

    def __init__(self, app: ASGIApp, buckets: TokenBuckets) -> None:
        self.app = app
        self.buckets = buckets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            client = scope.get("client")
            ip = client[0] if client else "?"
            wait = self.buckets.take(ip)
            if wait > 0:
                resp = error_response(
                    ServerError(ErrorCode.RATE_LIMIT, "too many requests from this address", 429),
                    429,
                    {"Retry-After": retry_after_header(wait)},
                )
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


class UpdateServer:
    """State shared by all requests of one server process."""

    def __init__(
        self,
        db: Database,
        blobs: LocalBlobStore,
        settings: ServerSettings,
        trust: TrustState | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        issuer: CertIssuer | None = None,
    ) -> None:
        """``issuer``: the fleet CA for certificate renewal (``POST /v1/certificate``); None
        answers renewal with E_NO_ISSUER."""
        self.db = db
        self.issuer = issuer
        self.blobs = blobs
        self.settings = settings
        self.trust = trust or TrustState(None)
        self.device_buckets = TokenBuckets(settings.device_rate, clock=clock)
        self.ip_buckets = TokenBuckets(settings.ip_rate, clock=clock)
        self.probes = ProbeDetector(settings.probe_threshold, settings.probe_window, clock=clock)
        self._clock = clock
        self._last_probe_event: dict[str, float] = {}
        self.refusals = ProbeDetector(
            settings.refusal_threshold, settings.refusal_window, clock=clock
        )
        self._refusal_lock = threading.Lock()  # hit() runs on worker threads too
        self._last_refusal_event: dict[str, float] = {}
        self._cert_cache: OrderedDict[bytes, Identity] = OrderedDict()
        self._fwd_cache: OrderedDict[str, tuple[Identity, float]] = OrderedDict()
        self.campaigns = CampaignService(db)
        self.metrics = ServerMetrics(db)
        self.auth_failures = AuthFailures(
            self.metrics.auth_failures, interval=settings.probe_event_interval, clock=clock
        )
        # The TUF repository for fleets whose devices run a TUF client (server/tufrepo.py);
        # None: the /tuf/ routes answer 404.
        self.tuf: TufRepository | None = None

    async def _db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Database work of a device request: on a worker thread, or inline (``inline_io``)."""
        if self.settings.inline_io:
            return fn(*args, **kwargs)
        return await run_in_threadpool(fn, *args, **kwargs)

    # --- app -----------------------------------------------------------------------------------
    def asgi(self, part: str = "device") -> ASGIApp:
        """The device API (for the mTLS listener) or the admin API (for its own listener).

        They are separate apps on separate listeners: the device listener requires a client
        certificate in the handshake, the admin listener authenticates bearer tokens, and
        neither serves the other's routes.
        """
        from .admin import admin_routes
        from .tuf_routes import admin_tuf_routes

        routes: list[BaseRoute]
        if part == "device":
            routes = self.device_routes()
        elif part == "admin":
            routes = [
                *admin_routes(self),
                *admin_tuf_routes(self),
                Route("/healthz", self.health, methods=["GET"]),
                Route("/metrics", metrics_endpoint(self), methods=["GET"]),
            ]
        else:
            raise ValueError(part)
        app = Starlette(
            routes=routes,
            exception_handlers={
                OtaError: self._on_error,
                ClientDisconnect: self._on_disconnect,
                404: self._on_404,
                405: self._on_405,
                Exception: self._on_crash,
            },
        )
        return MetricsMiddleware(_IpLimitMiddleware(app, self.ip_buckets), self.metrics, part)

    def deadline_expired(self, listener: str, phase: str) -> None:
        """A listener closed a connection whose header or body deadline passed."""
        self.metrics.deadlines.labels(listener, phase).inc()

    def device_routes(self) -> list[BaseRoute]:
        """The device listener's routes (also what the OpenAPI document describes)."""
        from .tuf_routes import device_tuf_routes

        return [
            Route("/v1/checkin", self.checkin, methods=["POST"]),
            Route("/v1/reports", self.reports, methods=["POST"]),
            Route("/v1/manifests/{digest}", self.manifest, methods=["GET"]),
            Route("/v1/images/{digest}", self.image, methods=["GET"]),
            Route("/v1/keylist", self.keylist, methods=["GET"]),
            Route("/v1/certificate", self.certificate, methods=["POST"]),
            Route("/healthz", self.health, methods=["GET"]),
            *device_tuf_routes(self),
        ]

    async def _on_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, OtaError)
        status = _status_of(exc)
        headers = {"Retry-After": "5"} if status == 503 else None
        if isinstance(exc, RateLimited):
            headers = {"Retry-After": retry_after_header(exc.retry_after)}
        return error_response(exc, status, headers)

    async def _on_disconnect(self, request: Request, exc: Exception) -> Response:
        # The client went away mid-body (or a read deadline closed the connection): nobody
        # to answer, nothing to log as a server fault.
        return Response(status_code=400)

    async def _on_404(self, request: Request, exc: Exception) -> Response:
        return error_response(OtaError(ErrorCode.NOT_FOUND, "no such endpoint"), 404)

    async def _on_405(self, request: Request, exc: Exception) -> Response:
        return error_response(OtaError(ErrorCode.USAGE, "method not allowed"), 405)

    async def _on_crash(self, request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        return error_response(OtaError(ErrorCode.INTERNAL, "internal server error"), 500)

    async def health(self, request: Request) -> Response:
        from .health import healthz

        return await healthz(self, request)

    # --- identity ------------------------------------------------------------------------------
    def _is_proxy(self, ip: str | None) -> bool:
        if ip is None or not self.settings.trusted_proxies:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.settings.trusted_proxies)

    def _identity_from_der(self, der: bytes) -> Identity:
        ident = self._cert_cache.get(der)
        if ident is None:
            try:
                cert = x509.load_der_x509_certificate(der)
            except ValueError:
                raise ServerError(ErrorCode.CERT, "unparsable client certificate", 403) from None
            ident = Identity(serial_of(cert), fingerprint(der))
            self._cert_cache[der] = ident
            if len(self._cert_cache) > 50_000:
                self._cert_cache.popitem(last=False)
        return ident

    def _identity_from_header(self, value: str) -> Identity:
        cached = self._fwd_cache.get(value)
        now = time.time()
        if cached is not None and now <= cached[1]:
            return cached[0]
        pem = urllib.parse.unquote(value).encode()
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise ServerError(
                ErrorCode.CERT, "forwarded client certificate unparsable", 403
            ) from None
        serial = verify_forwarded_cert(self.settings.ca_cert, cert)
        from cryptography.hazmat.primitives.serialization import Encoding

        ident = Identity(serial, fingerprint(cert.public_bytes(Encoding.DER)))
        self._fwd_cache[value] = (ident, cert.not_valid_after_utc.timestamp())
        if len(self._fwd_cache) > 50_000:
            self._fwd_cache.popitem(last=False)
        return ident

    async def identify(self, request: Request) -> Identity:
        """Who is calling: the verified certificate's serial, then the per-device limit."""
        ip = request.client.host if request.client else None
        header = request.headers.get("x-client-cert")
        der: bytes | None = request.scope.get(PEER_CERT_KEY)
        if header is not None:
            if not self._is_proxy(ip):
                # Counted and logged every time, written at most once per interval per source
                # (this is before the per-device limit: the sender is nobody yet).
                if self.auth_failures.note("device", "forged_header", ip):
                    await self._db(self._probe, None, ip, "forged_header", request.url.path)
                raise ServerError(
                    ErrorCode.CERT,
                    "X-Client-Cert is accepted only from configured proxies",
                    403,
                )
            try:
                ident = self._identity_from_header(header)
            except ServerError:
                self.auth_failures.note("device", "bad_forwarded_cert", ip)
                raise
        elif der:
            ident = self._identity_from_der(der)
        else:
            self.auth_failures.note("device", "no_cert", ip)
            raise ServerError(ErrorCode.CERT, "client certificate required", 401)
        wait = self.device_buckets.take(ident.serial)
        if wait > 0:
            await self._rate_limited(ident, ip, request.url.path)
            raise RateLimited(f"device over its request rate; retry after {wait:.1f} s", wait)
        return ident

    async def _rate_limited(self, ident: Identity, ip: str | None, path: str) -> None:
        flag = self.probes.hit(ident.serial)
        now = self._clock()
        last = self._last_probe_event.get(ident.serial, -1e18)
        if flag or now - last >= self.settings.probe_event_interval:
            self._last_probe_event[ident.serial] = now
            await self._db(self._record_limit, ident.serial, ip, path, flag)

    def _record_limit(self, serial: str, ip: str | None, path: str, flag: bool) -> None:
        with self.db.write() as conn:
            dev = store.device_by_serial(conn, serial)
            dev_id = dev.id if dev is not None else None
            store.record_probe(conn, device_id=dev_id, ip=ip, kind="rate_limit", path=path)
            if flag and dev_id is not None:
                store.flag_suspect(
                    conn,
                    dev_id,
                    f"possible probe: {self.settings.probe_threshold} rate-limit refusals "
                    f"within {self.settings.probe_window:.0f} s",
                )
        self.metrics.probe("rate_limit")

    def _probe(
        self, device_id: int | None, ip: str | None, kind: str, path: str, detail: str = ""
    ) -> None:
        with self.db.write() as conn:
            store.record_probe(
                conn, device_id=device_id, ip=ip, kind=kind, path=path, detail=detail
            )
        self.metrics.probe(kind)

    def _refusal_hit(self, serial: str, *, always_record: bool) -> tuple[bool, bool]:
        """Count a refusal for ``serial``: (flag it now, record a probe event). Events that
        are not always recorded are limited to one per ``probe_event_interval``."""
        with self._refusal_lock:
            flag = self.refusals.hit(serial)
            if always_record:
                return flag, True
            now = self._clock()
            last = self._last_refusal_event.get(serial, -1e18)
            record = flag or now - last >= self.settings.probe_event_interval
            if record:
                self._last_refusal_event[serial] = now
            return flag, record

    def _record_refusal(
        self, device_id: int, ip: str | None, kind: str, path: str, detail: str, flag: bool
    ) -> None:
        with self.db.write() as conn:
            store.record_probe(
                conn, device_id=device_id, ip=ip, kind=kind, path=path, detail=detail
            )
            if flag:
                store.flag_suspect(
                    conn,
                    device_id,
                    f"possible probe: {self.settings.refusal_threshold} refused requests "
                    f"(revoked certificate or not offered) within "
                    f"{self.settings.refusal_window:.0f} s",
                )
        self.metrics.probe(kind)

    def _device_work(
        self,
        ident: Identity,
        request: Request,
        fn: Callable[[Connection, Record], T],
        *,
        write: bool,
    ) -> T:
        """Check the device row (enrolled, this cert, not revoked), then run ``fn`` in the
        same transaction. Refusals are recorded in their own transaction."""
        ip = request.client.host if request.client else None
        refusal: ServerError | None = None
        device_id: int | None = None
        promote: int | None = None
        with self.db.write() if write else self.db.read() as conn:
            dev = store.device_by_serial(conn, ident.serial)
            if dev is None:
                refusal = ServerError(ErrorCode.CERT, "device is not enrolled", 403)
            elif dev.revoked:
                device_id = dev.id
                refusal = ServerError(ErrorCode.CERT_REVOKED, "device certificate revoked", 403)
            elif dev.cert_fingerprint == ident.fingerprint:
                if dev.cert_not_after > store.now_s():
                    return fn(conn, dev)
                # The TLS stack checks validity too; the server clock is the one that counts
                # (and the only one a simulated fleet shares).
                device_id = dev.id
                refusal = ServerError(ErrorCode.CERT_EXPIRED, "device certificate expired", 403)
            elif ident.fingerprint == dev.pending_cert_fingerprint:
                promote = dev.id  # first use of a renewed certificate
            elif ident.fingerprint == dev.prev_cert_fingerprint:
                device_id = dev.id
                refusal = ServerError(
                    ErrorCode.CERT_SUPERSEDED, "certificate superseded by its renewal", 403
                )
            else:
                device_id = dev.id
                refusal = ServerError(
                    ErrorCode.CERT_REVOKED, "certificate superseded by re-enrollment", 403
                )
        if promote is not None:
            with self.db.write() as conn:
                if store.promote_pending_cert(conn, promote, ident.fingerprint):
                    log.info("device %s now uses its renewed certificate", ident.serial)
            # The row now names this certificate as current (or, after a concurrent
            # re-enrollment, something else): judge the request again against it.
            return self._device_work(ident, request, fn, write=write)
        assert refusal is not None
        reason = {
            ErrorCode.CERT: "not_enrolled",
            ErrorCode.CERT_EXPIRED: "expired",
            ErrorCode.CERT_SUPERSEDED: "superseded",
        }.get(refusal.code, "revoked" if dev is not None and dev.revoked else "superseded")
        record = self.auth_failures.note("device", reason, ip, ident.serial)
        if refusal.code in _CERT_REFUSALS and device_id is not None:
            # Every cert refusal is recorded (the device rate limit bounds them) and counts
            # towards the refusal threshold of that identity.
            flag, _ = self._refusal_hit(ident.serial, always_record=True)
            self._record_refusal(
                device_id, ip, refusal.code.value, request.url.path, refusal.detail, flag
            )
        elif record:  # at most once per interval per source: a CA-issued cert, not enrolled
            self._probe(device_id, ip, refusal.code.value, request.url.path, refusal.detail)
        raise refusal

    def _device_read(self, ident: Identity, fn: Callable[[Connection, Record], T]) -> T | None:
        """Read-only fast path: ``fn``'s result for a valid device, or None when the request
        must take the full path (``_device_work``: refusals are recorded there)."""
        with self.db.read(snapshot=False) as conn:
            dev = store.device_by_serial(conn, ident.serial)
            if (
                dev is None
                or dev.revoked
                or dev.cert_fingerprint != ident.fingerprint
                or dev.cert_not_after <= store.now_s()
            ):
                return None
            return fn(conn, dev)

    async def _read_only(
        self, ident: Identity, fn: Callable[[Connection, Record], T | None]
    ) -> T | None:
        # Inline on the event loop, no thread hop: a few indexed reads (SQLite file, or a
        # PostgreSQL on this host) cost less than handing the request to a worker thread and
        # back (measured: bench/server.py). A distant database would argue for the threadpool.
        return self._device_read(ident, fn)

    async def _run(
        self,
        request: Request,
        fn: Callable[[Connection, Record], T],
        *,
        write: bool,
    ) -> T:
        ident = await self.identify(request)
        return await self._db(self._device_work, ident, request, fn, write=write)

    # --- request bodies ------------------------------------------------------------------------
    @staticmethod
    async def read_body(request: Request, limit: int) -> bytes:
        cl = request.headers.get("content-length")
        if cl is not None:
            declared = decimal(cl)
            if declared is None:
                raise ServerError(ErrorCode.MALFORMED, "bad Content-Length", 400)
            if declared > limit:
                raise ServerError(ErrorCode.TOO_LARGE, f"body over {limit} bytes", 413)
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise ServerError(ErrorCode.TOO_LARGE, f"body over {limit} bytes", 413)
        return bytes(buf)

    async def read_json(self, request: Request) -> dict[str, Any]:
        body = await self.read_body(request, self.settings.max_device_body)
        try:
            obj = loads_json(body)
        except OtaError as err:
            raise ServerError(err.code, err.detail, 400) from None
        if not isinstance(obj, dict) or len(obj) > MAX_JSON_ITEMS:
            raise ServerError(ErrorCode.MALFORMED, "body must be a JSON object", 400)
        return obj

    # --- device endpoints ----------------------------------------------------------------------
    async def checkin(self, request: Request) -> Response:
        ident = await self.identify(request)
        body = await self.read_json(request)
        _check_serial_claim(body, ident)
        facts = _checkin_facts(body)
        if self.campaigns.tick_due():  # refresh cached campaigns, timed phase advances
            await self._db(self.campaigns.tick)

        def work(conn: Connection, dev: Record, dry: bool) -> dict[str, Any] | None:
            # dry: inside a read-only transaction, returns None as soon as a write is needed
            # (the caller then repeats this in a write transaction). Any write added here
            # must be preceded by ``if dry: return None``.
            if store.checkin_changes(dev, facts, lastseen_interval=self.settings.lastseen_interval):
                if dry:
                    return None
                store.record_checkin(
                    conn, dev, facts, lastseen_interval=self.settings.lastseen_interval
                )
            # Campaigns decide what this device may be offered now (may (re)assign it).
            plan = self.campaigns.checkin(conn, dev, facts, dry=dry)
            if plan is None:
                return None
            rel = None if plan is Plan.HOLD else store.pending_update(conn, dev.id)
            update: dict[str, Any] | None = None
            if rel is not None:
                if rel.version == facts.get("current_version") and (
                    facts.get("running_digest") in (None, rel.image_digest)
                ):
                    if dry:
                        return None
                    store.set_assignment_state(conn, dev.id, "done")
                else:
                    # SUIT, or the MCUboot image for a class configured for it (None: this
                    # release has no MCUboot image, nothing such a device could install).
                    update = mcuboot_offer(conn, rel, _update_ref(rel))
                    if update is not None and rel.assignment_state == "assigned":
                        if dry:
                            return None
                        store.set_assignment_state(conn, dev.id, "offered")
                    if update is not None and update["format"] == "suit":
                        # Delta for the reported running image (read only); the full image
                        # stays in the offer as the device's fallback.
                        delta = store.delta_ref(conn, rel.id, facts.get("running_digest"))
                        if delta is not None:
                            update["delta"] = delta
            kl = store.latest_keylist(conn)
            return {
                "update": update,
                "keylist_version": kl.version if kl is not None else None,
                "poll_interval": self.settings.poll_interval,
            }

        # Most check-ins of an idle fleet change nothing: answer those from a read-only
        # transaction (no writer lock, no commit); anything else takes the full write path.
        result = await self._read_only(ident, partial(work, dry=True))
        if result is None:
            result = await self._db(
                self._device_work, ident, request, partial(work, dry=False), write=True
            )
        assert result is not None
        self.metrics.checkins.inc()
        return JSONResponse(result)

    async def reports(self, request: Request) -> Response:
        ident = await self.identify(request)
        body = await self.read_json(request)
        _check_serial_claim(body, ident)
        report = _parse_report(body)
        if self.campaigns.tick_due():
            await self._db(self.campaigns.tick)

        def work(conn: Connection, dev: Record) -> bool:
            rel = store.pending_update(conn, dev.id)
            if rel is not None and report.get("manifest_digest") in (None, rel.manifest_digest):
                report["release_id"] = rel.id
            member = self.campaigns.report_member(conn, dev.id)
            if member is not None:
                report["campaign_id"] = member.campaign_db_id
            fresh = store.insert_report(conn, dev.id, report)
            if fresh and member is not None:
                self.campaigns.on_report(conn, dev.id, member, report, rel)
            if fresh:
                if report.get("error_code"):
                    store.record_checkin(
                        conn, dev, {"last_error": report["error_code"]}, lastseen_interval=0
                    )
                if rel is not None and "release_id" in report:
                    state = report["state"]
                    if state in DONE_STATES:
                        store.set_assignment_state(conn, dev.id, "done")
                    elif state in FAILED_STATES:
                        # A dropped download or a power cut is retried by the device itself;
                        # only a final refusal ends a direct assignment.
                        if report.get("error_code") not in TRANSIENT_ERRORS:
                            store.set_assignment_state(conn, dev.id, "failed")
                    elif state in WORKING_STATES:
                        store.set_assignment_state(conn, dev.id, "installing")
            return fresh

        fresh = await self._db(self._device_work, ident, request, work, write=True)
        if fresh:
            self.metrics.on_report(report["state"])
        # The response is sent only after the transaction committed: an acknowledged report
        # is durable. A repeat of the same report_id is acknowledged again, never re-counted.
        return JSONResponse(
            {"report_id": report["report_id"], "duplicate": not fresh},
            status_code=201 if fresh else 200,
        )

    async def _may_fetch(self, request: Request, column: str, digest: str) -> bool:
        """Whether the calling device was offered ``digest``; a refusal is a probe (counted
        towards the refusal threshold, recorded at most once per ``probe_event_interval``)."""
        ident = await self.identify(request)

        def work(conn: Connection, dev: Record) -> tuple[int, bool]:
            return dev.id, store.device_may_fetch(conn, dev.id, column, digest)

        dev_id, ok = await self._db(self._device_work, ident, request, work, write=False)
        if not ok:
            flag, record = self._refusal_hit(ident.serial, always_record=False)
            if record:
                ip = request.client.host if request.client else None
                await self._db(
                    self._record_refusal,
                    dev_id,
                    ip,
                    "not_offered",
                    request.url.path,
                    f"{column} {digest}",
                    flag,
                )
        return ok

    async def manifest(self, request: Request) -> Response:
        digest = check_name(request.path_params["digest"])
        if not await self._may_fetch(request, "envelope_blob", digest):
            raise ServerError(ErrorCode.NOT_FOUND, "no such manifest for this device", 404)
        etag = f'"{digest}"'
        if _etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers={"ETag": etag})
        data = self.blobs.read(digest, self.settings.max_envelope)
        return Response(data, media_type=ENVELOPE_TYPE, headers={"ETag": etag})

    async def image(self, request: Request) -> Response:
        digest = check_name(request.path_params["digest"])
        if not await self._may_fetch(request, "image_blob", digest):
            raise ServerError(ErrorCode.NOT_FOUND, "no such image for this device", 404)
        size = self.blobs.size(digest)
        if size is None:
            raise ServerError(ErrorCode.NOT_FOUND, "image blob missing", 404)
        etag = f'"{digest}"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        rng = request.headers.get("range")
        if_range = request.headers.get("if-range")
        if rng is not None and (if_range is None or if_range.strip() == etag):
            span = parse_range(rng, size)
            if span == "unsatisfiable":
                return error_response(
                    ServerError(ErrorCode.RANGE, f"range outside the {size}-byte image", 416),
                    416,
                    {"Content-Range": f"bytes */{size}", **headers},
                )
            if isinstance(span, tuple):
                start, end = span
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                headers["Content-Length"] = str(end - start + 1)
                return StreamingResponse(
                    self._chunks(digest, start, end),
                    status_code=206,
                    media_type="application/octet-stream",
                    headers=headers,
                )
        headers["Content-Length"] = str(size)
        return StreamingResponse(
            self._chunks(digest, 0, size - 1),
            media_type="application/octet-stream",
            headers=headers,
        )

    def _chunks(self, digest: str, start: int, end: int) -> Iterator[bytes] | AsyncIterator[bytes]:
        """The blob's bytes: a plain iterator is read on worker threads by the response, one
        hop per chunk; with ``inline_io`` it is read on the event loop."""
        chunks = self.blobs.open_range(digest, start, end) if end >= start else iter(())
        if not self.settings.inline_io:
            return chunks

        async def inline() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        return inline()

    async def keylist(self, request: Request) -> Response:
        def work(conn: Connection, dev: Record) -> tuple[int, bytes, str] | None:
            kl = store.latest_keylist(conn)
            return (kl.version, kl.document, kl.sha256) if kl is not None else None

        found = await self._run(request, work, write=False)
        if found is None:
            raise ServerError(ErrorCode.NOT_FOUND, "no key list published", 404)
        version, doc, sha = found
        etag = f'"{sha}"'
        headers = {"ETag": etag, "X-Keylist-Version": str(version)}
        if _etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        return Response(doc, media_type=KEYLIST_TYPE, headers=headers)

    async def certificate(self, request: Request) -> Response:
        """Certificate renewal: a CSR (PEM or DER) over the current identity; the answer is
        the new certificate (PEM), pending until the device first presents it."""
        ident = await self.identify(request)
        # Revoked, expired, superseded or unknown identities stop here (and are recorded).
        dev_id = await self._db(
            self._device_work, ident, request, lambda _c, dev: int(dev.id), write=False
        )
        issuer = self.issuer
        if issuer is None:
            raise ServerError(
                ErrorCode.NO_ISSUER, "this server has no issuing CA: renewal is off", 404
            )
        try:
            body = await self.read_body(request, MAX_CSR)
            key = check_csr(parse_csr(body), ident.serial)
        except ServerError as err:
            # A genuine device never sends a bad CSR: every refusal counts as a probe.
            flag, _ = self._refusal_hit(ident.serial, always_record=True)
            ip = request.client.host if request.client else None
            detail = f"{err.code.value}: {err.detail}"[:200]
            await self._db(
                self._record_refusal, dev_id, ip, "renewal", request.url.path, detail, flag
            )
            raise
        # Off the event loop: with the CA key in an HSM, signing is a PKCS#11 round trip.
        issued = await run_in_threadpool(issuer.issue, ident.serial, key, store.now_s())
        not_after = int(issued.cert.not_valid_after_utc.timestamp())

        def work(conn: Connection, dev: Record) -> None:
            store.set_pending_cert(conn, dev.id, issued.fingerprint, not_after)

        await self._db(self._device_work, ident, request, work, write=True)
        log.info("issued a renewed certificate for %s (until %d)", ident.serial, not_after)
        return Response(issued.pem, status_code=201, media_type=CERT_TYPE)


# --- helpers -----------------------------------------------------------------------------------
def _etag_matches(header: str | None, etag: str) -> bool:
    if header is None:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """One ``bytes=`` range → (start, end) inclusive; "unsatisfiable"; or None to ignore.

    RFC 9110 §14.2: a syntactically invalid or multi-range header may be ignored (we serve the
    whole file); a valid range that starts beyond the end is unsatisfiable (416).
    """
    v = value.strip()
    if not v.startswith("bytes=") or "," in v:
        return None
    spec = v[6:].strip()
    first, sep, last = spec.partition("-")
    if not sep or (not first and not last):
        return None
    if (first and decimal(first) is None) or (last and decimal(last) is None):
        return None
    if len(first) > 19 or len(last) > 19:
        return None
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return (max(0, size - n), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return (start, min(end, size - 1))


def _check_serial_claim(body: dict[str, Any], ident: Identity) -> None:
    claimed = body.get("serial")
    if claimed is not None and claimed != ident.serial:
        raise ServerError(
            ErrorCode.IDENTITY,
            "body names another device than the client certificate",
            403,
        )


def _opt(body: dict[str, Any], key: str, typ: type, check: Callable[[Any], bool]) -> Any:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, typ) or isinstance(v, bool) or not check(v):
        raise ServerError(ErrorCode.MALFORMED, f"field {key!r} is invalid", 400)
    return v


def _checkin_facts(body: dict[str, Any]) -> dict[str, Any]:
    u63 = 2**63 - 1
    facts = {
        "current_version": _opt(body, "version", str, lambda s: bool(_VERSION.match(s))),
        "security_counter": _opt(body, "security_counter", int, lambda n: 0 <= n <= u63),
        "keylist_version": _opt(body, "keylist_version", int, lambda n: 0 <= n <= u63),
        "running_digest": _opt(body, "running_digest", str, lambda s: bool(_HEX.match(s))),
        "last_error": _opt(body, "last_error", str, lambda s: bool(_ERROR.match(s))),
    }
    if facts["current_version"] is None:
        raise ServerError(ErrorCode.MALFORMED, "check-in needs 'version'", 400)
    slot = body.get("slot_state")
    if slot is not None:
        if not isinstance(slot, dict | str):
            raise ServerError(ErrorCode.MALFORMED, "field 'slot_state' is invalid", 400)
        encoded = json.dumps(slot, sort_keys=True, separators=(",", ":"))
        if len(encoded) > 1024:
            raise ServerError(ErrorCode.TOO_LARGE, "slot_state over 1024 bytes", 413)
        facts["slot_state"] = encoded
    return {k: v for k, v in facts.items() if v is not None}


def _parse_report(body: dict[str, Any]) -> dict[str, Any]:
    rid = body.get("report_id")
    if not isinstance(rid, str) or not _REPORT_ID.match(rid):
        raise ServerError(ErrorCode.MALFORMED, "report_id must be 1-64 chars [A-Za-z0-9_.:-]", 400)
    state = body.get("state")
    if not isinstance(state, str) or not _STATE.match(state):
        raise ServerError(ErrorCode.MALFORMED, "state must be 1-32 chars [a-z_]", 400)
    return {
        "report_id": rid,
        "state": state,
        "manifest_digest": _opt(body, "manifest_digest", str, lambda s: bool(_HEX.match(s))),
        "error_code": _opt(body, "error", str, lambda s: bool(_ERROR.match(s))),
        "version": _opt(body, "version", str, lambda s: bool(_VERSION.match(s))),
        "detail": _opt(body, "detail", str, lambda s: len(s) <= 500),
    }


def _update_ref(rel: Record) -> dict[str, Any]:
    return {
        "release_id": rel.id,
        "version": rel.version,
        "manifest_digest": rel.manifest_digest,
        "manifest_url": f"/v1/manifests/{rel.envelope_blob}",
        "image_url": f"/v1/images/{rel.image_blob}",
        "image_size": rel.image_size,
        "image_digest": rel.image_digest,
        "digest_alg": rel.digest_alg,
    }
