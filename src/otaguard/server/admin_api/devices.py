"""Admin API, devices: assign a release, show a device (with its last report and assignment),
revoke its certificate."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...errors import ErrorCode, ServerError
from ..storage import admin_queries as q
from ..storage import store
from .auth import authorize

if TYPE_CHECKING:
    from ..context import ServerContext


def device_admin_routes(srv: ServerContext) -> list[Route]:
    """Assignment of a release to a device, device detail, revocation."""

    async def assign(request: Request) -> Response:
        await authorize(srv, request, "assign")
        body = await srv.read_json(request)
        serial, release_id = body.get("serial"), body.get("release_id")
        if not isinstance(serial, str) or not isinstance(release_id, int):
            raise ServerError(ErrorCode.MALFORMED, "need serial (str) and release_id (int)", 400)

        def work() -> None:
            with srv.db.write() as conn:
                _assign(conn, serial, release_id)

        await run_in_threadpool(work)
        return JSONResponse({"serial": serial, "release_id": release_id}, status_code=201)

    async def device(request: Request) -> Response:
        await authorize(srv, request, "read")
        serial = request.path_params["serial"]

        def work() -> dict[str, Any]:
            with srv.db.read() as conn:
                dev = store.device_by_serial(conn, serial)
                if dev is None:
                    raise ServerError(ErrorCode.NOT_FOUND, f"no device {serial}", 404)
                return {
                    **store.device_view(conn, dev),
                    "last_report": q.last_report(conn, dev.id),
                    "assignment": q.assignment(conn, dev.id),
                }

        return JSONResponse(await run_in_threadpool(work))

    async def revoke(request: Request) -> Response:
        await authorize(srv, request, "security")
        serial = request.path_params["serial"]

        def work() -> None:
            with srv.db.write() as conn:
                store.revoke_device(conn, serial)

        await run_in_threadpool(work)
        return JSONResponse({"serial": serial, "revoked": True})

    return [
        Route("/admin/v1/assignments", assign, methods=["POST"]),
        Route("/admin/v1/devices/{serial}", device, methods=["GET"]),
        Route("/admin/v1/devices/{serial}/revoke", revoke, methods=["POST"]),
    ]


def _assign(conn: Connection, serial: str, release_id: int) -> None:
    from ...manifest.ids import class_id

    dev = store.device_by_serial(conn, serial)
    if dev is None:
        raise ServerError(ErrorCode.NOT_FOUND, f"no device {serial}", 404)
    rel = store.release_by_id(conn, release_id)
    if rel is None:
        raise ServerError(ErrorCode.NOT_FOUND, f"no release {release_id}", 404)
    if str(class_id(uuid.UUID(rel.vendor_id), dev.model, dev.hw_rev)) != rel.class_id:
        raise ServerError(
            ErrorCode.INCOMPATIBLE,
            f"release {release_id} is for {rel.model}/{rel.hw_rev}, device is "
            f"{dev.model}/{dev.hw_rev}",
            409,
        )
    store.assign(conn, dev.id, release_id, None)
