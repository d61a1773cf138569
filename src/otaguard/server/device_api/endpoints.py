"""The device API's endpoints: check-in, reports, manifests, images (ranges), key list,
certificate renewal, health, and the device TUF routes.

Every refusal is JSON ``{"error": code, "detail": ...}`` with a status from the error.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import Any

from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ...errors import ErrorCode, ServerError
from ...wire import decimal
from ..context import Identity, error_response
from ..health import healthz
from ..pki.renewal import MAX_CSR, check_csr, parse_csr
from ..storage import store
from ..storage.blobs import check_name
from ..storage.campaigns import TRANSIENT_ERRORS, Plan
from ..storage.mcuboot import offer as mcuboot_offer
from ..storage.prepared import Record
from .gate import DeviceGate
from .tuf import device_tuf_routes

log = logging.getLogger("otaguard.server")

ENVELOPE_TYPE = "application/suit-envelope+cose"
KEYLIST_TYPE = "application/cose; cose-type=cose-sign1"
CERT_TYPE = "application/pem-certificate-chain"
_REPORT_ID = re.compile(r"\A[A-Za-z0-9_.:-]{1,64}\Z")
_STATE = re.compile(r"\A[a-z_]{1,32}\Z")
_ERROR = re.compile(r"\AE_[A-Z0-9_]{1,30}\Z")
_VERSION = re.compile(r"\A[0-9]{1,9}(\.[0-9]{1,9}){0,3}\Z")
_HEX = re.compile(r"\A[0-9a-f]{1,256}\Z")
DONE_STATES = frozenset({"confirmed", "success", "installed_confirmed"})
FAILED_STATES = frozenset({"failed", "rejected", "reverted", "aborted"})
WORKING_STATES = frozenset({"downloading", "downloaded", "installing", "installed", "rebooting"})


class DeviceApi(DeviceGate):
    """The device listener's routes over the shared server state."""

    def device_routes(self) -> list[BaseRoute]:
        """The device listener's routes (also what the OpenAPI document describes)."""
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

    async def health(self, request: Request) -> Response:
        return await healthz(self, request)

    # --- device endpoints ----------------------------------------------------------------------
    async def checkin(self, request: Request) -> Response:
        dialect = self.db.engine.dialect
        ident, fetched = await self.identify_with(
            request, lambda serial: store.checkin_snapshot_prefetch(dialect, serial)
        )
        body = await self.read_json(request)
        _check_serial_claim(body, ident)
        facts = _checkin_facts(body)
        if self.campaigns.tick_due():  # refresh cached campaigns, timed phase advances
            await self._db(self.campaigns.tick)
            fetched = None  # read before the tick: read again after it

        def work(
            conn: Connection, dev: Record, snap: store.CheckinSnapshot | None
        ) -> dict[str, Any] | None:
            # snap (the read-only fast path): the device's snapshot, read in one statement;
            # returns None as soon as a write is needed (the caller then repeats this in a
            # write transaction, snap None, reading afresh after its writes). Any write added
            # here must be preceded by ``if dry: return None``.
            dry = snap is not None
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
            if plan is Plan.HOLD:
                rel = None
            else:  # nothing was written on the fast path: its snapshot is still current
                rel = snap.pending if snap is not None else store.pending_update(conn, dev.id)
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
            if snap is not None:
                keylist_version = snap.keylist_version
            else:
                kl = store.latest_keylist(conn)
                keylist_version = kl.version if kl is not None else None
            return {
                "update": update,
                "keylist_version": keylist_version,
                "poll_interval": self.settings.poll_interval,
            }

        # Most check-ins of an idle fleet change nothing: answer those from a read-only
        # transaction (no writer lock, no commit); anything else takes the full write path.
        result = await self._read_only(
            ident, lambda conn, snap: work(conn, snap.device, snap), fetched
        )
        if result is None:
            result = await self._db(
                self._device_work, ident, request, partial(work, snap=None), write=True
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
        data = await self._db(self.blobs.read, digest, self.settings.max_envelope)
        return Response(data, media_type=ENVELOPE_TYPE, headers={"ETag": etag})

    async def image(self, request: Request) -> Response:
        digest = check_name(request.path_params["digest"])
        if not await self._may_fetch(request, "image_blob", digest):
            raise ServerError(ErrorCode.NOT_FOUND, "no such image for this device", 404)
        size = await self._db(self.blobs.size, digest)
        if size is None:
            log.error("blob %s not served: an offered image or patch is not in the store", digest)
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
                    await self._chunks(digest, start, end),
                    status_code=206,
                    media_type="application/octet-stream",
                    headers=headers,
                )
        headers["Content-Length"] = str(size)
        return StreamingResponse(
            await self._chunks(digest, 0, size - 1),
            media_type="application/octet-stream",
            headers=headers,
        )

    async def _chunks(
        self, digest: str, start: int, end: int
    ) -> Iterator[bytes] | AsyncIterator[bytes]:
        """The blob's bytes, opened (and verified) before the response starts, so a missing
        blob or an unreachable store is a 404/503 rather than a cut body: a plain iterator is
        read on worker threads by the response, one hop per chunk; with ``inline_io`` it is
        read on the event loop."""
        chunks: Iterator[bytes] = iter(())
        if end >= start:
            chunks = await self._db(self.blobs.open_range, digest, start, end)
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
