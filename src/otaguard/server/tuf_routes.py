"""HTTP routes of the TUF repository (:mod:`.tufrepo`).

Device listener (mTLS, the same identity and rate limits as every device request): the
metadata and target files a TUF client (python-tuf ngclient) fetches, under ``/tuf/``. A fleet
whose devices run a TUF client already holds certificates from the fleet CA, so the repository
needs no second, public listener. Admin listener: the online public keys (for the root
ceremony), root upload (security officer) and targets upload (release manager).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import ErrorCode, ServerError
from ..tufrepo.metadata import MAX_METADATA
from .tufrepo import TufRepository

if TYPE_CHECKING:
    from .app import UpdateServer

TUF_JSON = "application/json"


def _repo(srv: UpdateServer) -> TufRepository:
    repo = srv.tuf
    if repo is None:
        raise ServerError(ErrorCode.NOT_FOUND, "this server has no TUF repository", 404)
    return repo


def device_tuf_routes(srv: UpdateServer) -> list[Route]:
    async def metadata(request: Request) -> Response:
        await srv.identify(request)
        repo = _repo(srv)
        name = request.path_params["name"]
        if name == "timestamp.json":
            data = await run_in_threadpool(repo.timestamp_bytes)
        else:
            data = await run_in_threadpool(repo.metadata_bytes, name)
        return Response(data, media_type=TUF_JSON, headers={"Cache-Control": "no-store"})

    async def target(request: Request) -> Response:
        await srv.identify(request)
        digest = _repo(srv).target_blob(request.path_params["path"])
        size = await run_in_threadpool(srv.blobs.size, digest)
        if size is None:
            raise ServerError(ErrorCode.NOT_FOUND, "target blob missing", 404)
        chunks: Iterator[bytes] = iter(())
        if size:
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


def admin_tuf_routes(srv: UpdateServer) -> list[Route]:
    from .admin import authorize

    async def online_keys(request: Request) -> Response:
        await authorize(srv, request, "read")
        keys = _repo(srv).online_keys()
        return JSONResponse({role: k.to_pem().decode() for role, k in keys.items()})

    async def put_root(request: Request) -> Response:
        who = await authorize(srv, request, "security")
        repo = _repo(srv)
        data = await srv.read_body(request, MAX_METADATA)
        version = await run_in_threadpool(repo.put_root, data)
        return JSONResponse({"version": version, "uploaded_by": who}, status_code=201)

    async def put_targets(request: Request) -> Response:
        who = await authorize(srv, request, "release")
        repo = _repo(srv)
        data = await srv.read_body(request, MAX_METADATA)
        version = await run_in_threadpool(
            repo.put_targets, data, lambda d: srv.blobs.size(d) is not None
        )
        return JSONResponse({"version": version, "uploaded_by": who}, status_code=201)

    return [
        Route("/admin/v1/tuf/online-keys", online_keys, methods=["GET"]),
        Route("/admin/v1/tuf/root", put_root, methods=["PUT"]),
        Route("/admin/v1/tuf/targets", put_targets, methods=["PUT"]),
    ]
