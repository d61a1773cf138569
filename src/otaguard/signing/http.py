"""HTTP front of the signing service (Starlette). CI holds a bearer token, never a key.

* ``POST /v1/sign``: JSON :class:`~otaguard.signing.policy.SigningRequest` → JSON with the
  envelope (base64), sequence, manifest digest, key ids and audit anchor.
* ``POST /v1/sign-mcuboot``: ``{"request": SigningRequest, "image": base64, "header_size",
  "slot_size", "trailer_size"}`` → the MCUboot image's TLV area (base64; the caller holds
  header + image + protected TLVs, which are deterministic), its size and SHA-256, version,
  counter, sequence, key id and audit anchor (:mod:`.mcuboot`: only for a release this service
  signed; body limit ``max_mcuboot_body``; rate limited with ``/v1/sign``).
* ``GET /v1/public-key``: the signer's public key (PEM) and kid, for any authenticated role.
* ``GET /v1/health``: liveness, no authentication, no detail.
* Co-signing (:mod:`.cosign`, only with a ``cosign`` config): ``POST /v1/cosign`` files a request
  (``{"requests": [release, delta...]}``), ``GET /v1/cosign/{id}`` shows it (to its requester and
  the officers; the envelopes once complete), ``POST /v1/cosign/{id}/approve``
  (``{"request_digest": hex}``) signs it with the calling officer's key.

Tokens are stored as SHA-256 hashes with a requester id and a role; the presented token is
hashed and compared against every entry with :func:`hmac.compare_digest` (no early exit), so
neither the table nor response timing reveals a token. An entry may carry ``not_after`` (RFC 3339
UTC); past it the token is refused with 401 ``E_AUTH`` "token expired" (the expiry is looked at
only after the full scan, so an unknown token still costs exactly one pass over the table).
``POST /v1/sign`` is rate limited per requester id (token bucket, :class:`SignRate`): over the
limit the request is refused with 429 ``E_RATE_LIMIT`` and ``Retry-After`` before its body is
read, so it never reaches the policy, the HSM or the audit log; each refusal is logged at
WARNING with the requester id. Times come from injectable clocks (``clock`` wall time for
expiry, ``rate_clock`` monotonic for the buckets). Errors are typed JSON bodies
``{"error": "E_...", "detail": "..."}``. The body is read with a hard size limit before it is
parsed, and only after the credential checked out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ErrorCode, FormatError, OtaError
from ..server.pki.authlog import AuthFailures
from ..server.ratelimit import RateLimit, TokenBuckets, retry_after_header
from ..wire import decimal, loads_json
from .cosign import CosignService
from .mcuboot import mcuboot_answer, parse_mcuboot_body
from .openapi import openapi_schema
from .policy import Requester, Role, SigningRequest
from .service import SignedRelease, SigningService

log = logging.getLogger("otaguard.signing.http")

DEFAULT_MAX_BODY = 64 * 1024
DEFAULT_MAX_MCUBOOT_BODY = 8 * 1024 * 1024  # base64 of an MCU image (slots are a few MiB)
TOKEN_PREFIX = "otg_"

STATUS: dict[ErrorCode, int] = {
    ErrorCode.AUTH: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.POLICY: 403,
    ErrorCode.DOWNGRADE: 409,
    ErrorCode.FAST_FORWARD: 409,
    ErrorCode.SECURITY_COUNTER: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.RATE_LIMIT: 429,
    ErrorCode.MALFORMED: 400,
    ErrorCode.USAGE: 400,
    ErrorCode.ALGORITHM: 400,
    ErrorCode.UNSUPPORTED: 415,
    ErrorCode.HSM: 503,
    ErrorCode.PIN: 503,
    ErrorCode.AUDIT_CHAIN: 503,
    ErrorCode.AUDIT_SEAL: 503,
    ErrorCode.DATABASE: 503,
    ErrorCode.DUPLICATE_SIGNER: 409,
    ErrorCode.FOUR_EYES: 403,
    ErrorCode.REQUEST_CHANGED: 409,
    ErrorCode.REQUEST_EXPIRED: 410,
    ErrorCode.PENDING: 409,
    ErrorCode.CONFLICT: 409,
    ErrorCode.THRESHOLD: 409,
}


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


_RFC3339_UTC = re.compile(r"\A(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:Z|\+00:00)\Z")


def parse_utc(text: object) -> int:
    """``"2027-02-21T00:00:00Z"`` → POSIX seconds. Only UTC (``Z`` or ``+00:00``), no fractions."""
    m = _RFC3339_UTC.match(text) if isinstance(text, str) else None
    if m is None:
        raise FormatError(
            ErrorCode.MALFORMED, f"not an RFC 3339 UTC time like 2027-02-21T00:00:00Z: {text!r}"
        )
    try:
        y, mo, d, h, mi, sec = (int(g) for g in m.groups())
        return int(datetime(y, mo, d, h, mi, sec, tzinfo=UTC).timestamp())
    except ValueError:
        raise FormatError(ErrorCode.MALFORMED, f"no such time: {text!r}") from None


def format_utc(t: float) -> str:
    """POSIX seconds → ``"2027-02-21T00:00:00Z"`` (what :func:`parse_utc` reads back)."""
    return datetime.fromtimestamp(int(t), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class TokenEntry:
    sha256: bytes
    requester: str
    role: Role
    not_after: int | None = None  # POSIX seconds; None = never expires (legacy entries)


_REQUIRED = {"sha256", "requester", "role"}
_OPTIONAL = {"not_after"}


class TokenTable:
    def __init__(self, entries: list[TokenEntry]) -> None:
        self._entries = list(entries)

    @property
    def entries(self) -> tuple[TokenEntry, ...]:
        return tuple(self._entries)

    @classmethod
    def from_config(cls, items: object) -> TokenTable:
        if not isinstance(items, list):
            raise FormatError(ErrorCode.MALFORMED, "tokens must be a list")
        entries = []
        for it in items:
            if not isinstance(it, dict) or not _REQUIRED <= set(it) <= _REQUIRED | _OPTIONAL:
                raise FormatError(
                    ErrorCode.MALFORMED,
                    "each token needs exactly sha256, requester, role (and optional not_after)",
                )
            h, rid, role = it["sha256"], it["requester"], it["role"]
            if not isinstance(h, str) or len(h) != 64 or not isinstance(rid, str) or not rid:
                raise FormatError(ErrorCode.MALFORMED, "token sha256 must be 64 hex digits")
            not_after = None
            if "not_after" in it:
                try:
                    not_after = parse_utc(it["not_after"])
                except FormatError as err:
                    raise FormatError(
                        ErrorCode.MALFORMED, f"token for {rid!r}: not_after: {err.detail}"
                    ) from None
            try:
                entries.append(TokenEntry(bytes.fromhex(h), rid, Role(role), not_after))
            except ValueError:
                raise FormatError(ErrorCode.MALFORMED, f"bad token entry for {rid!r}") from None
        return cls(entries)

    def _lookup(self, token: str) -> TokenEntry | None:
        presented = hashlib.sha256(token.encode()).digest()
        found: TokenEntry | None = None
        for e in self._entries:  # no early exit: time does not depend on which entry matched
            if hmac.compare_digest(e.sha256, presented):
                found = e
        return found

    def check(self, token: str, now: float) -> Requester:
        """The requester behind ``token`` at time ``now``; else :class:`OtaError` ``E_AUTH``."""
        found = self._lookup(token)
        if found is None:
            raise OtaError(ErrorCode.AUTH, "invalid token")
        if found.not_after is not None and now > found.not_after:
            log.warning("expired signing token presented for requester %r", found.requester)
            raise OtaError(ErrorCode.AUTH, "token expired")
        return Requester(found.requester, found.role)

    def authenticate(self, token: str, now: float | None = None) -> Requester | None:
        """Like :meth:`check` but None when unknown or (``now`` given) expired."""
        try:
            return self.check(token, time.time() if now is None else now)
        except OtaError:
            return None


@dataclass(frozen=True)
class SignRate:
    """Per-requester limit on ``POST /v1/sign``: ``per_minute`` sustained, ``burst`` at once."""

    per_minute: float = 30.0
    burst: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.per_minute < math.inf or self.burst < 1:
            raise FormatError(ErrorCode.MALFORMED, "sign_rate: per_minute > 0 and burst >= 1")

    @classmethod
    def from_config(cls, obj: object) -> SignRate:
        if obj is None:
            return cls()
        if not isinstance(obj, dict) or not set(obj) <= {"per_minute", "burst"}:
            raise FormatError(
                ErrorCode.MALFORMED, 'sign_rate must be {"per_minute": N, "burst": M}'
            )
        d = cls()
        per_minute = obj.get("per_minute", d.per_minute)
        burst = obj.get("burst", d.burst)
        if (
            not isinstance(per_minute, int | float)
            or isinstance(per_minute, bool)
            or not isinstance(burst, int)
            or isinstance(burst, bool)
        ):
            raise FormatError(ErrorCode.MALFORMED, "sign_rate: per_minute and burst are numbers")
        return cls(float(per_minute), burst)

    def limit(self) -> RateLimit:
        return RateLimit(rate=self.per_minute / 60.0, burst=self.burst)


DEFAULT_SIGN_RATE = SignRate()


def status_of(code: ErrorCode) -> int:
    """A refusal the table does not name is still a refusal of the request (400), never a
    server fault: only E_INTERNAL is a 500."""
    return STATUS.get(code, 500 if code == ErrorCode.INTERNAL else 400)


class _Throttled(OtaError):
    """Over the per-requester signing rate: answered 429 with ``Retry-After``."""

    default_code = ErrorCode.RATE_LIMIT

    def __init__(self, wait: float) -> None:
        super().__init__(ErrorCode.RATE_LIMIT, "too many signing requests")
        self.wait = wait


def _error(err: OtaError, headers: dict[str, str] | None = None) -> JSONResponse:
    if isinstance(err, _Throttled):
        headers = {**(headers or {}), "Retry-After": retry_after_header(err.wait)}
    status = status_of(err.code)
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="otaguard-signing"'}
    return JSONResponse(err.to_dict(), status_code=status, headers=headers)


def _requester(request: Request, tokens: TokenTable, now: float) -> Requester:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise OtaError(ErrorCode.AUTH, "missing bearer token")
    return tokens.check(token.strip(), now)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        n = decimal(declared)
        if n is None:
            raise FormatError(ErrorCode.MALFORMED, "bad Content-Length")
        if n > limit:
            raise FormatError(ErrorCode.TOO_LARGE, f"request body over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise FormatError(ErrorCode.TOO_LARGE, f"request body over {limit} bytes")
    return bytes(body)


def signed_to_json(s: SignedRelease) -> dict[str, Any]:
    return {
        "envelope": base64.b64encode(s.envelope).decode(),
        "sequence": s.sequence,
        "manifest_digest": s.manifest_digest.hex(),
        "key_ids": list(s.key_ids),
        "vendor_id": str(s.info.vendor_id),
        "class_id": str(s.info.class_id),
        "audit": {"seq": s.audit.seq, "hash": s.audit.hash},
    }


def tuf_request_from_json(obj: object) -> tuple[SigningRequest, bytes | None]:
    """``{"request": SigningRequest, "previous_b64": base64 of targets.json | null}``."""
    if not isinstance(obj, dict) or "request" not in obj or set(obj) - {"request", "previous_b64"}:
        raise FormatError(ErrorCode.MALFORMED, 'want {"request": {...}, "previous_b64": ...}')
    prev = obj.get("previous_b64")
    if prev is not None and not isinstance(prev, str):
        raise FormatError(ErrorCode.MALFORMED, "previous_b64 must be a base64 string or null")
    try:
        previous = base64.b64decode(prev, validate=True) if prev is not None else None
    except (binascii.Error, ValueError):
        raise FormatError(ErrorCode.MALFORMED, "previous_b64 is not base64") from None
    return SigningRequest.from_dict(obj["request"]), previous


def create_app(
    service: SigningService,
    tokens: TokenTable,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    max_mcuboot_body: int = DEFAULT_MAX_MCUBOOT_BODY,
    sign_rate: SignRate = DEFAULT_SIGN_RATE,
    clock: Callable[[], float] = time.time,
    rate_clock: Callable[[], float] = time.monotonic,
    cosign: CosignService | None = None,
) -> Starlette:
    """``clock``: wall time for token expiry; ``rate_clock``: monotonic time for the buckets."""
    buckets = TokenBuckets(sign_rate.limit(), max_keys=10_000, clock=rate_clock)
    failures = AuthFailures(interval=10.0, clock=rate_clock)

    def authenticate(request: Request) -> Requester:
        """The requester, or E_AUTH logged (rate-limited, with the source address)."""
        try:
            return _requester(request, tokens, clock())
        except OtaError as err:
            if err.code == ErrorCode.AUTH:
                reason = "no_token" if err.detail == "missing bearer token" else "bad_token"
                failures.note("signing", reason, request.client.host if request.client else None)
            raise

    def admit_signer(request: Request) -> Requester:
        """Who may ask for a signature now: authenticated, not a viewer, within the
        per-requester rate (E_RATE_LIMIT with Retry-After), sending JSON."""
        who = authenticate(request)
        if who.role == Role.VIEWER:
            raise OtaError(ErrorCode.FORBIDDEN, f"role {who.role.value!r} may not sign")
        wait = buckets.take(who.id)
        if wait > 0:
            log.warning("sign rate limit: refused requester %r (retry in %.1f s)", who.id, wait)
            raise _Throttled(wait)
        if "json" not in request.headers.get("content-type", ""):
            raise FormatError(ErrorCode.UNSUPPORTED, "Content-Type must be application/json")
        return who

    async def sign(request: Request) -> Response:
        try:
            who = admit_signer(request)
            body = await _read_body(request, max_body)
            req = SigningRequest.from_dict(loads_json(body))
            signed = await run_in_threadpool(service.sign_release, req, who)
        except OtaError as err:
            if err.code == ErrorCode.INTERNAL:
                log.error("signing failed: %s", err)
            return _error(err)
        return JSONResponse(signed_to_json(signed))

    async def sign_mcuboot(request: Request) -> Response:
        try:
            who = admit_signer(request)
            body = await _read_body(request, max_mcuboot_body)
            req, image, geometry = parse_mcuboot_body(loads_json(body))
            signed = await run_in_threadpool(service.sign_mcuboot, req, who, image, geometry)
        except OtaError as err:
            if err.code == ErrorCode.INTERNAL:
                log.error("MCUboot signing failed: %s", err)
            return _error(err)
        return JSONResponse(mcuboot_answer(signed))

    async def sign_tuf(request: Request) -> Response:
        """TUF targets for a release this service signed (same policy, keys, audit log and
        per-requester rate as ``/v1/sign``; signing/tuf_targets.py)."""
        try:
            who = admit_signer(request)
            req, previous = tuf_request_from_json(loads_json(await _read_body(request, max_body)))
            signed = await run_in_threadpool(service.sign_tuf_targets, req, who, previous)
        except OtaError as err:
            if err.code == ErrorCode.INTERNAL:
                log.error("TUF targets signing failed: %s", err)
            return _error(err)
        return JSONResponse(
            {
                "targets_b64": base64.b64encode(signed.data).decode(),
                "version": signed.version,
                "audit": {"seq": signed.audit.seq, "hash": signed.audit.hash},
            }
        )

    async def public_key(request: Request) -> Response:
        try:
            authenticate(request)
        except OtaError as err:
            return _error(err)
        key = service.signer.public_key
        return JSONResponse(
            {
                "kid": key.key_id.hex(),
                "alg": int(service.signer.alg),
                "pem": key.to_pem().decode(),
            }
        )

    def cosign_or_404() -> CosignService:
        if cosign is None:
            raise OtaError(ErrorCode.NOT_FOUND, "co-signing is not configured on this service")
        return cosign

    async def cosign_create(request: Request) -> Response:
        try:
            who = admit_signer(request)
            cs = cosign_or_404()
            body = loads_json(await _read_body(request, max_body))
            if not isinstance(body, dict) or set(body) != {"requests"}:
                raise FormatError(ErrorCode.MALFORMED, 'want {"requests": [...]}')
            items = body["requests"]
            if not isinstance(items, list):
                raise FormatError(ErrorCode.MALFORMED, "requests must be a list")
            reqs = [SigningRequest.from_dict(x) for x in items]
            created = await run_in_threadpool(cs.create, reqs, who)
        except OtaError as err:
            return _error(err)
        return JSONResponse(created.view())

    async def cosign_get(request: Request) -> Response:
        try:
            who = authenticate(request)
            cs = cosign_or_404()
            found = await run_in_threadpool(cs.get, request.path_params["rid"], who)
        except OtaError as err:
            return _error(err)
        return JSONResponse(found.view())

    async def cosign_approve(request: Request) -> Response:
        try:
            who = authenticate(request)
            cs = cosign_or_404()
            if "json" not in request.headers.get("content-type", ""):
                raise FormatError(ErrorCode.UNSUPPORTED, "Content-Type must be application/json")
            body = loads_json(await _read_body(request, max_body))
            digest = body.get("request_digest") if isinstance(body, dict) else None
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise FormatError(
                    ErrorCode.MALFORMED, 'want {"request_digest": "<64 lowercase hex digits>"}'
                )
            done = await run_in_threadpool(
                cs.approve, request.path_params["rid"], who, bytes.fromhex(digest)
            )
        except OtaError as err:
            if err.code == ErrorCode.INTERNAL:
                log.error("co-signing failed: %s", err)
            return _error(err)
        return JSONResponse(done.view())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_schema())

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(OtaError(ErrorCode.NOT_FOUND, "no such endpoint"))

    return Starlette(
        routes=[
            Route("/v1/sign", sign, methods=["POST"]),
            Route("/v1/sign-mcuboot", sign_mcuboot, methods=["POST"]),
            Route("/v1/sign-tuf-targets", sign_tuf, methods=["POST"]),
            Route("/v1/public-key", public_key, methods=["GET"]),
            Route("/v1/health", health, methods=["GET"]),
            Route("/v1/openapi.json", openapi, methods=["GET"]),
            Route("/v1/cosign", cosign_create, methods=["POST"]),
            Route("/v1/cosign/{rid}", cosign_get, methods=["GET"]),
            Route("/v1/cosign/{rid}/approve", cosign_approve, methods=["POST"]),
        ],
        exception_handlers={404: not_found},
    )
