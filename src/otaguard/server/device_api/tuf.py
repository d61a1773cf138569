"""The TUF routes of the device listener (metadata and targets, after the device identity
check); the admin side is :mod:`..admin_api.tuf`."""

from __future__ import annotations

from collections.abc import Iterator

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ...errors import ErrorCode, ServerError
from ..context import tuf_repo
from .gate import DeviceGate

TUF_JSON = "application/json"


def device_tuf_routes(srv: DeviceGate) -> list[Route]:
    async def metadata(request: Request) -> Response:
        await srv.identify(request)
        repo = tuf_repo(srv)
        name = request.path_params["name"]
        if name == "timestamp.json":
            data = await run_in_threadpool(repo.timestamp_bytes)
        else:
            data = await run_in_threadpool(repo.metadata_bytes, name)
        return Response(data, media_type=TUF_JSON, headers={"Cache-Control": "no-store"})

    async def target(request: Request) -> Response:
        await srv.identify(request)
        digest = tuf_repo(srv).target_blob(request.path_params["path"])
        size = await run_in_threadpool(srv.blobs.size, digest)
        if size is None:
            raise ServerError(ErrorCode.NOT_FOUND, "target blob missing", 404)
        chunks: Iterator[bytes] = iter(())
        if size:  # opened (and verified) before the response starts: a 404/503, not a cut body
            chunks = await run_in_threadpool(srv.blobs.open_range, digest, 0, size - 1)
        return StreamingResponse(
            chunks,
            media_type="application/octet-stream",
            headers={"Content-Length": str(size)},
        )

    return [
        Route("/tuf/targets/{path:path}", target, methods=["GET"]),
        Route("/tuf/{name}", metadata, methods=["GET"]),
    ]
