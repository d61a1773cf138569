"""Admin API, the signed key list: publish a new one (security officer); devices fetch it from
the device listener."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...errors import ErrorCode, OtaError, ServerError
from ..storage import store
from .auth import authorize

if TYPE_CHECKING:
    from ..context import ServerContext


def keylist_routes(srv: ServerContext) -> list[Route]:
    """Key-list publication (security officer)."""

    async def put_keylist(request: Request) -> Response:
        await authorize(srv, request, "security")
        doc = await srv.read_body(request, srv.settings.max_envelope)
        version = await run_in_threadpool(_publish_keylist, srv, doc)
        return JSONResponse({"version": version}, status_code=201)

    return [
        Route("/admin/v1/keylist", put_keylist, methods=["PUT"]),
    ]


def _publish_keylist(srv: ServerContext, doc: bytes) -> int:
    from ...trust.store import TrustStore

    current = srv.trust.fresh()
    if not isinstance(current, TrustStore):
        raise ServerError(ErrorCode.UNTRUSTED_KEY, "key lists need a trust bundle (root)", 409)
    try:
        new = current.apply_update(doc)
    except OtaError as err:
        raise ServerError(
            err.code, err.detail, 409 if err.code == ErrorCode.REPLAY else 400
        ) from None
    with srv.db.write() as conn:
        store.put_keylist(conn, new.version, doc)
    srv.trust.replace(new)
    return new.version
