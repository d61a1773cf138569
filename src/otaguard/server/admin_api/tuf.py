"""HTTP routes of the TUF repository (:mod:`.tufrepo`).

Device listener (mTLS, the same identity and rate limits as every device request): the
metadata and target files a TUF client (python-tuf ngclient) fetches, under ``/tuf/``. A fleet
whose devices run a TUF client already holds certificates from the fleet CA, so the repository
needs no second, public listener. Admin listener: the online public keys (for the root
ceremony), root upload (security officer) and targets upload (release manager).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...tufrepo.metadata import MAX_METADATA
from ..context import tuf_repo
from .auth import authorize

if TYPE_CHECKING:
    from ..context import ServerContext


def admin_tuf_routes(srv: ServerContext) -> list[Route]:

    async def online_keys(request: Request) -> Response:
        await authorize(srv, request, "read")
        keys = tuf_repo(srv).online_keys()
        return JSONResponse({role: k.to_pem().decode() for role, k in keys.items()})

    async def put_root(request: Request) -> Response:
        who = await authorize(srv, request, "security")
        repo = tuf_repo(srv)
        data = await srv.read_body(request, MAX_METADATA)
        version = await run_in_threadpool(repo.put_root, data)
        return JSONResponse({"version": version, "uploaded_by": who}, status_code=201)

    async def put_targets(request: Request) -> Response:
        who = await authorize(srv, request, "release")
        repo = tuf_repo(srv)
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
