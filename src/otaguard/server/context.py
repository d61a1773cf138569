"""What every route module of the server works with: settings, trust state, the request
state (database, blob store, limits, metrics) and the small request helpers.

Route modules (:mod:`.device_api`, :mod:`.admin_api`) import this module, never
:mod:`.app`; :mod:`.app` composes them on top of it, so the arrows point down only.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from cryptography import x509
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from ..crypto.cose import Signer
from ..errors import ErrorCode, OtaError, ServerError
from ..trust.model import KeyResolver
from ..wire import decimal, loads_json
from .metrics import ServerMetrics
from .pki.authlog import AuthFailures
from .pki.renewal import CertIssuer
from .ratelimit import ProbeDetector, RateLimit, TokenBuckets
from .storage.blobs import BlobStore, LocalBlobStore
from .storage.campaigns import CampaignService
from .storage.db import Database

if TYPE_CHECKING:
    from .storage.tufrepo import TufRepository

T = TypeVar("T")
P = ParamSpec("P")


IpNet = ipaddress.IPv4Network | ipaddress.IPv6Network


MAX_JSON_ITEMS = 64


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
    # The dashboard's session-signing key (``dashboard.session_key_file``): the same on every
    # node so a session works on all of them; None draws one per process (one node).
    session_key: bytes | None = None


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


class ServerContext:
    """State shared by all requests of one server process."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        settings: ServerSettings,
        trust: TrustState | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        issuer: CertIssuer | None = None,
        data_dir: Path | None = None,
    ) -> None:
        """``issuer``: the fleet CA for certificate renewal (``POST /v1/certificate``); None
        answers renewal with E_NO_ISSUER. ``data_dir``: where local state other than blobs
        lives (the rotation audit log); by default the local blob store's parent."""
        self.db = db
        if data_dir is None and isinstance(blobs, LocalBlobStore):
            data_dir = blobs.root.parent
        self.data_dir = data_dir
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
        # The TUF repository for fleets whose devices run a TUF client (server/storage/tufrepo.py);
        # None: the /tuf/ routes answer 404.
        self.tuf: TufRepository | None = None

    async def _db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Database work of a device request: on a worker thread, or inline (``inline_io``)."""
        if self.settings.inline_io:
            return fn(*args, **kwargs)
        return await run_in_threadpool(fn, *args, **kwargs)

    def deadline_expired(self, listener: str, phase: str) -> None:
        """A listener closed a connection whose header or body deadline passed."""
        self.metrics.deadlines.labels(listener, phase).inc()

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

    def device_routes(self) -> list[BaseRoute]:
        """The device listener's routes; the device API (:mod:`.device_api`) provides them.
        Declared here for the admin API's OpenAPI document, which describes both listeners."""
        raise NotImplementedError


def tuf_repo(srv: ServerContext) -> TufRepository:
    repo = srv.tuf
    if repo is None:
        raise ServerError(ErrorCode.NOT_FOUND, "this server has no TUF repository", 404)
    return repo
