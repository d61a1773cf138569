"""The composition root of the update server: the device and admin ASGI apps, built from the
route modules of :mod:`.device_api` and :mod:`.admin_api` over :mod:`.context`.

They are separate apps for separate listeners (device: mTLS identity; admin: bearer tokens).
Every refusal is JSON ``{"error": code, "detail": ...}`` with a status from the error. The
server holds no signing key: releases are verified on upload against the trust anchors it is
configured with, and devices verify them again.
"""

from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ErrorCode, OtaError, ServerError
from .admin_api.metrics import metrics_endpoint
from .admin_api.routes import admin_routes
from .admin_api.tuf import admin_tuf_routes
from .context import RateLimited, error_response
from .dashboard.routes import dashboard_routes
from .device_api.endpoints import DeviceApi
from .metrics import MetricsMiddleware
from .ratelimit import TokenBuckets, retry_after_header

log = logging.getLogger("otaguard.server")


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


class UpdateServer(DeviceApi):
    """The server process's state (:class:`.context.ServerContext`) with the device API
    (:class:`.device_api.endpoints.DeviceApi`); builds the two listeners' ASGI apps."""

    # --- app -----------------------------------------------------------------------------------
    def asgi(self, part: str = "device") -> ASGIApp:
        """The device API (for the mTLS listener) or the admin API (for its own listener).

        They are separate apps on separate listeners: the device listener requires a client
        certificate in the handshake, the admin listener authenticates bearer tokens, and
        neither serves the other's routes.
        """
        routes: list[BaseRoute]
        if part == "device":
            routes = self.device_routes()
        elif part == "admin":
            routes = [
                *admin_routes(self),
                *admin_tuf_routes(self),
                Route("/healthz", self.health, methods=["GET"]),
                Route("/metrics", metrics_endpoint(self), methods=["GET"]),
                *dashboard_routes(self),  # the operators' web pages under /ui/
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
