"""Who a device request comes from, and whether it may proceed.

Device identity comes only from a verified client certificate: the TLS stack's (our own
listener, see :mod:`..pki.mtls`) or, behind a TLS-terminating proxy, the ``X-Client-Cert``
header — honoured only from configured proxy addresses and re-verified against the fleet CA.
The certificate must also be the one the database holds for that serial and not revoked.
Refusals count towards the per-identity probe detection and are recorded.
"""

from __future__ import annotations

import ipaddress
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import TypeVar

from cryptography import x509
from sqlalchemy import Connection
from starlette.requests import Request

from ...errors import ErrorCode, ServerError
from ..context import Identity, RateLimited, ServerContext
from ..pki.ca import fingerprint, serial_of, verify_forwarded_cert
from ..pki.mtls import PEER_CERT_KEY
from ..storage import store
from ..storage.prepared import Fetched, Prefetch, Record

log = logging.getLogger("otaguard.server")
T = TypeVar("T")

# Refusals of a known device's certificate: counted towards its refusal threshold.
_CERT_REFUSALS = frozenset(
    {ErrorCode.CERT_REVOKED, ErrorCode.CERT_SUPERSEDED, ErrorCode.CERT_EXPIRED}
)


class DeviceGate(ServerContext):
    """Identity, per-device limits and refusal recording of the device API."""

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
        ident = await self._who(request)
        await self._limited(request, ident, self.device_buckets.take(ident.serial))
        return ident

    async def identify_with(
        self, request: Request, prefetch: Callable[[str], Prefetch[T]]
    ) -> tuple[Identity, Fetched[T] | None]:
        """:meth:`identify`, with ``prefetch(serial)`` read in the per-device limit's round
        trip where the limit is in the database (None: read it as usual)."""
        ident = await self._who(request)
        wait, fetched = self.device_buckets.take_with(ident.serial, lambda: prefetch(ident.serial))
        await self._limited(request, ident, wait)
        return ident, fetched

    async def _limited(self, request: Request, ident: Identity, wait: float) -> None:
        if wait > 0:
            ip = request.client.host if request.client else None
            await self._rate_limited(ident, ip, request.url.path)
            raise RateLimited(f"device over its request rate; retry after {wait:.1f} s", wait)

    async def _who(self, request: Request) -> Identity:
        """The verified certificate's identity (failures counted and recorded)."""
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

    def _device_read(
        self,
        ident: Identity,
        fn: Callable[[Connection, store.CheckinSnapshot], T | None],
        fetched: Fetched[store.CheckinSnapshot | None] | None = None,
    ) -> T | None:
        """Read-only fast path: ``fn``'s result for a valid device, or None when the request
        must take the full path (``_device_work``: refusals are recorded there). The device
        row comes with what a check-in reads, in one statement (``store.checkin_snapshot``),
        or ``fetched`` with the per-device limit (``identify_with``); ``fn``'s own reads then
        check a connection out only if it makes any."""
        if fetched is not None:
            if not _valid(fetched.value, ident):
                return None
            with self.db.read_on_demand() as conn:
                assert fetched.value is not None
                return fn(conn, fetched.value)
        with self.db.read(snapshot=False) as conn:
            snap = store.checkin_snapshot(conn, ident.serial)
            if snap is None or not _valid(snap, ident):
                return None
            return fn(conn, snap)

    async def _read_only(
        self,
        ident: Identity,
        fn: Callable[[Connection, store.CheckinSnapshot], T | None],
        fetched: Fetched[store.CheckinSnapshot | None] | None = None,
    ) -> T | None:
        # Inline on the event loop, no thread hop: one indexed read (SQLite file, or a
        # PostgreSQL on this host) costs less than handing the request to a worker thread and
        # back (measured: bench/server.py). A distant database would argue for the threadpool.
        return self._device_read(ident, fn, fetched)

    async def _run(
        self,
        request: Request,
        fn: Callable[[Connection, Record], T],
        *,
        write: bool,
    ) -> T:
        ident = await self.identify(request)
        return await self._db(self._device_work, ident, request, fn, write=write)


def _valid(snap: store.CheckinSnapshot | None, ident: Identity) -> bool:
    """Enrolled, not revoked, this certificate and not expired: the fast path may answer
    (anything else goes the full path, which refuses and records it)."""
    if snap is None:
        return False
    dev = snap.device
    return bool(
        not dev.revoked
        and dev.cert_fingerprint == ident.fingerprint
        and dev.cert_not_after > store.now_s()
    )
