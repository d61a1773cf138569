"""Admin API: campaigns, fleet views (devices, groups, releases) and the OpenAPI endpoint.

Roles (``admin.PERMISSIONS``): ``viewer`` reads; ``operator`` controls campaigns and device
groups; ``release-manager`` uploads releases; ``security-officer`` revokes devices, publishes
key lists and may do everything else. An insufficient role is 403 ``E_FORBIDDEN``.

The OpenAPI 3.1 document (``GET /admin/v1/openapi.json``) describes both listeners; it is
built in :mod:`.openapi` from the apps' actual routes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...errors import ErrorCode, ServerError
from ...wire import decimal
from ..storage import admin_queries as q
from ..storage import store
from .auth import authorize
from .openapi import openapi_schema

if TYPE_CHECKING:
    from ..context import ServerContext

ACTIONS = ("start", "pause", "resume", "abort")


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    v = request.query_params.get(name)
    if v is None:
        return default
    n = decimal(v)
    if n is None or not lo <= n <= hi:
        raise ServerError(ErrorCode.MALFORMED, f"{name} must be an integer in [{lo}, {hi}]", 400)
    return n


def check_reason(r: object) -> str | None:
    """A campaign action's optional reason (API and dashboard): 1-200 characters."""
    if r is None:
        return None
    if not isinstance(r, str) or not 0 < len(r) <= 200:
        raise ServerError(ErrorCode.MALFORMED, "reason: 1-200 characters", 400)
    return r


def campaign_routes(srv: ServerContext) -> list[Route]:
    svc = srv.campaigns

    async def list_campaigns(request: Request) -> Response:
        """List campaigns (newest first)."""
        await authorize(srv, request, "read")
        status = request.query_params.get("status")
        return JSONResponse({"campaigns": await run_in_threadpool(svc.list_campaigns, status)})

    async def create_campaign(request: Request) -> Response:
        """Create a draft campaign."""
        who = await authorize(srv, request, "campaign")
        body = await srv.read_json(request)
        out = await run_in_threadpool(svc.create, body, who)
        return JSONResponse(out, status_code=201)

    async def campaign_status(request: Request) -> Response:
        """Campaign status: phase, counts, SLA, pause reason, stragglers."""
        await authorize(srv, request, "read")
        stale = _int_param(request, "stale_after", 2 * srv.settings.poll_interval, 1, 365 * 86400)
        name = request.path_params["name"]
        return JSONResponse(await run_in_threadpool(svc.status, name, stale_after=stale))

    async def campaign_action(request: Request) -> Response:
        """start / pause / resume / abort a campaign."""
        await authorize(srv, request, "campaign")
        action = request.path_params["action"]
        if action not in ACTIONS:
            raise ServerError(ErrorCode.NOT_FOUND, f"no campaign action {action!r}", 404)
        reason = None
        if request.headers.get("content-length", "0") != "0":
            body = await srv.read_json(request)
            reason = check_reason(body.get("reason"))
        name = request.path_params["name"]
        return JSONResponse(await run_in_threadpool(svc.transition, name, action, reason))

    async def list_devices(request: Request) -> Response:
        """List/filter devices."""
        await authorize(srv, request, "read")
        p = request.query_params
        suspect = p.get("suspect")
        if suspect not in (None, "true", "false"):
            raise ServerError(ErrorCode.MALFORMED, "suspect must be true or false", 400)

        def work() -> dict[str, Any]:
            with srv.db.read() as conn:
                return q.list_devices(
                    conn,
                    model=p.get("model"),
                    hw_rev=p.get("hw_rev"),
                    group=p.get("group"),
                    version=p.get("version"),
                    suspect=None if suspect is None else suspect == "true",
                    limit=_int_param(request, "limit", 100, 1, q.MAX_PAGE),
                    offset=_int_param(request, "offset", 0, 0, 10**9),
                )

        return JSONResponse(await run_in_threadpool(work))

    async def device_campaigns(request: Request) -> Response:
        """A device's progress in every campaign it belongs to."""
        await authorize(srv, request, "read")
        serial = request.path_params["serial"]

        def work() -> list[dict[str, Any]]:
            with srv.db.read() as conn:
                dev = store.device_by_serial(conn, serial)
                if dev is None:
                    raise ServerError(ErrorCode.NOT_FOUND, f"no device {serial}", 404)
                return svc.device_progress(conn, dev.id)

        return JSONResponse({"serial": serial, "campaigns": await run_in_threadpool(work)})

    async def set_groups(request: Request) -> Response:
        """Replace a device's groups."""
        await authorize(srv, request, "devices")
        body = await srv.read_json(request)
        groups = q.check_groups(body.get("groups"))
        serial = request.path_params["serial"]

        def work() -> list[str]:
            with srv.db.write() as conn:
                return q.set_groups(conn, serial, groups)

        return JSONResponse({"serial": serial, "groups": await run_in_threadpool(work)})

    async def list_groups(request: Request) -> Response:
        """Device groups and their sizes."""
        await authorize(srv, request, "read")

        def work() -> list[dict[str, Any]]:
            with srv.db.read() as conn:
                return q.list_groups(conn)

        return JSONResponse({"groups": await run_in_threadpool(work)})

    async def list_releases(request: Request) -> Response:
        """List releases."""
        await authorize(srv, request, "read")
        p = request.query_params

        def work() -> list[dict[str, Any]]:
            with srv.db.read() as conn:
                return q.list_releases(conn, model=p.get("model"), hw_rev=p.get("hw_rev"))

        return JSONResponse({"releases": await run_in_threadpool(work)})

    async def openapi(request: Request) -> Response:
        """The OpenAPI 3.1 document of this API."""
        routes = getattr(request.app, "routes", [])
        return JSONResponse(openapi_schema(routes, srv.device_routes()))

    return [
        Route("/admin/v1/openapi.json", openapi, methods=["GET"]),
        Route("/admin/v1/campaigns", list_campaigns, methods=["GET"]),
        Route("/admin/v1/campaigns", create_campaign, methods=["POST"]),
        Route("/admin/v1/campaigns/{name}", campaign_status, methods=["GET"]),
        Route("/admin/v1/campaigns/{name}/{action}", campaign_action, methods=["POST"]),
        Route("/admin/v1/devices", list_devices, methods=["GET"]),
        Route("/admin/v1/devices/{serial}/campaigns", device_campaigns, methods=["GET"]),
        Route("/admin/v1/devices/{serial}/groups", set_groups, methods=["PUT"]),
        Route("/admin/v1/groups", list_groups, methods=["GET"]),
        Route("/admin/v1/releases", list_releases, methods=["GET"]),
    ]
