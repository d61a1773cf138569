"""The admin listener's ``/metrics`` (Prometheus text format, any admin role)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from .auth import authorize

if TYPE_CHECKING:
    from ..context import ServerContext


def metrics_endpoint(srv: ServerContext) -> Any:
    async def metrics(request: Request) -> Response:
        """Prometheus text format (any admin role)."""
        await authorize(srv, request, "read")
        body = await run_in_threadpool(srv.metrics.render)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return metrics
