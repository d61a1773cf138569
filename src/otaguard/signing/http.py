"""HTTP front of the signing service (Starlette). CI holds a bearer token, never a key.

* ``POST /v1/sign``: JSON :class:`~otaguard.signing.policy.SigningRequest` → JSON with the
  envelope (base64), sequence, manifest digest, key ids and audit anchor.
* ``GET /v1/public-key``: the signer's public key (PEM) and kid, for any authenticated role.
* ``GET /v1/health``: liveness, no authentication, no detail.

Tokens are stored as SHA-256 hashes with a requester id and a role; the presented token is
hashed and compared against every entry with :func:`hmac.compare_digest` (no early exit), so
neither the table nor response timing reveals a token. Errors are typed JSON bodies
``{"error": "E_...", "detail": "..."}``. The body is read with a hard size limit before it is
parsed, and only after the credential checked out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ErrorCode, FormatError, OtaError
from .policy import Requester, Role, SigningRequest
from .service import SignedRelease, SigningService

log = logging.getLogger("otaguard.signing.http")

DEFAULT_MAX_BODY = 64 * 1024
TOKEN_PREFIX = "otg_"

STATUS: dict[ErrorCode, int] = {
    ErrorCode.AUTH: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.POLICY: 403,
    ErrorCode.DOWNGRADE: 409,
    ErrorCode.SECURITY_COUNTER: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.MALFORMED: 400,
    ErrorCode.USAGE: 400,
    ErrorCode.ALGORITHM: 400,
    ErrorCode.UNSUPPORTED: 415,
    ErrorCode.HSM: 503,
    ErrorCode.PIN: 503,
    ErrorCode.AUDIT_CHAIN: 503,
    ErrorCode.AUDIT_SEAL: 503,
    ErrorCode.DATABASE: 503,
}


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenEntry:
    sha256: bytes
    requester: str
    role: Role


class TokenTable:
    def __init__(self, entries: list[TokenEntry]) -> None:
        self._entries = list(entries)

    @classmethod
    def from_config(cls, items: object) -> TokenTable:
        if not isinstance(items, list):
            raise FormatError(ErrorCode.MALFORMED, "tokens must be a list")
        entries = []
        for it in items:
            if not isinstance(it, dict) or set(it) != {"sha256", "requester", "role"}:
                raise FormatError(
                    ErrorCode.MALFORMED, "each token needs exactly sha256, requester, role"
                )
            h, rid, role = it["sha256"], it["requester"], it["role"]
            if not isinstance(h, str) or len(h) != 64 or not isinstance(rid, str) or not rid:
                raise FormatError(ErrorCode.MALFORMED, "token sha256 must be 64 hex digits")
            try:
                entries.append(TokenEntry(bytes.fromhex(h), rid, Role(role)))
            except ValueError:
                raise FormatError(ErrorCode.MALFORMED, f"bad token entry for {rid!r}") from None
        return cls(entries)

    def authenticate(self, token: str) -> Requester | None:
        presented = hashlib.sha256(token.encode()).digest()
        found: TokenEntry | None = None
        for e in self._entries:  # no early exit: time does not depend on which entry matched
            if hmac.compare_digest(e.sha256, presented):
                found = e
        return None if found is None else Requester(found.requester, found.role)


def _error(err: OtaError) -> JSONResponse:
    status = STATUS.get(err.code, 500)
    headers = {"WWW-Authenticate": 'Bearer realm="otaguard-signing"'} if status == 401 else None
    return JSONResponse(err.to_dict(), status_code=status, headers=headers)


def _requester(request: Request, tokens: TokenTable) -> Requester:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise OtaError(ErrorCode.AUTH, "missing bearer token")
    who = tokens.authenticate(token.strip())
    if who is None:
        raise OtaError(ErrorCode.AUTH, "invalid token")
    return who


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise FormatError(ErrorCode.MALFORMED, "bad Content-Length")
        if int(declared) > limit:
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


def create_app(
    service: SigningService, tokens: TokenTable, *, max_body: int = DEFAULT_MAX_BODY
) -> Starlette:
    async def sign(request: Request) -> Response:
        try:
            who = _requester(request, tokens)
            if who.role == Role.VIEWER:
                raise OtaError(ErrorCode.FORBIDDEN, f"role {who.role.value!r} may not sign")
            if "json" not in request.headers.get("content-type", ""):
                raise FormatError(ErrorCode.UNSUPPORTED, "Content-Type must be application/json")
            body = await _read_body(request, max_body)
            try:
                obj = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise FormatError(ErrorCode.MALFORMED, "body is not JSON") from None
            req = SigningRequest.from_dict(obj)
            signed = await run_in_threadpool(service.sign_release, req, who)
        except OtaError as err:
            if err.code == ErrorCode.INTERNAL:
                log.error("signing failed: %s", err)
            return _error(err)
        return JSONResponse(signed_to_json(signed))

    async def public_key(request: Request) -> Response:
        try:
            _requester(request, tokens)
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

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(OtaError(ErrorCode.NOT_FOUND, "no such endpoint"))

    return Starlette(
        routes=[
            Route("/v1/sign", sign, methods=["POST"]),
            Route("/v1/public-key", public_key, methods=["GET"]),
            Route("/v1/health", health, methods=["GET"]),
        ],
        exception_handlers={404: not_found},
    )
