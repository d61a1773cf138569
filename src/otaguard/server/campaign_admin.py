"""Admin API: campaigns, fleet views (devices, groups, releases) and the OpenAPI schema.

Roles (``admin.PERMISSIONS``): ``viewer`` reads; ``operator`` controls campaigns and device
groups; ``release-manager`` uploads releases; ``security-officer`` revokes devices, publishes
key lists and may do everything else. An insufficient role is 403 ``E_FORBIDDEN``.

The OpenAPI 3.1 document (``GET /admin/v1/openapi.json``) is built from the admin app's actual
routes: every route gets an operation, described by :data:`OPS` where we wrote one (summary,
role, parameters, request and response schemas) and by its endpoint docstring otherwise, so
the schema cannot silently miss a route.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..errors import ErrorCode, ServerError
from ..wire import decimal
from . import admin_queries as q
from . import store
from .admin import authorize

if TYPE_CHECKING:
    from .app import UpdateServer

ACTIONS = ("start", "pause", "resume", "abort")


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    v = request.query_params.get(name)
    if v is None:
        return default
    n = decimal(v)
    if n is None or not lo <= n <= hi:
        raise ServerError(ErrorCode.MALFORMED, f"{name} must be an integer in [{lo}, {hi}]", 400)
    return n


def campaign_routes(srv: UpdateServer) -> list[Route]:
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
            r = body.get("reason")
            if r is not None and (not isinstance(r, str) or not 0 < len(r) <= 200):
                raise ServerError(ErrorCode.MALFORMED, "reason: 1-200 characters", 400)
            reason = r
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
        return JSONResponse(openapi_schema(routes))

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


# --- OpenAPI --------------------------------------------------------------------------------

_OBJ: dict[str, Any] = {"type": "object"}
_STR: dict[str, Any] = {"type": "string"}
_INT: dict[str, Any] = {"type": "integer"}
_NUM: dict[str, Any] = {"type": "number"}
_BOOL: dict[str, Any] = {"type": "boolean"}


def _nullable(s: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [s, {"type": "null"}]}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _arr(s: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": s}


_STATES = ["pending", "offered", "downloading", "installed", "succeeded", "failed", "reverted"]

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {"error": {"type": "string", "pattern": "^E_[A-Z0-9_]+$"}, "detail": _STR},
    },
    "Selector": {
        "type": "object",
        "required": ["model"],
        "additionalProperties": False,
        "properties": {
            "model": _STR,
            "hw_rev": _nullable(_STR),
            "min_version": _nullable(_STR),
            "min_inclusive": _BOOL,
            "max_version": _nullable(_STR),
            "max_inclusive": _BOOL,
            "groups": _arr(_STR),
            "serials": _arr(_STR),
            "exclude": _arr(_STR),
        },
    },
    "Phase": {
        "type": "object",
        "required": ["fraction"],
        "additionalProperties": False,
        "properties": {
            "fraction": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "rate_per_hour": _nullable(_NUM),
            "burst": _nullable(_INT),
            "min_soak_s": _nullable(_NUM),
        },
    },
    "FailureThreshold": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "max_failed": _nullable(_INT),
            "max_failed_fraction": _nullable(_NUM),
            "min_finished": _INT,
        },
    },
    "CampaignCreate": {
        "type": "object",
        "required": ["id", "release_id", "selector"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"},
            "release_id": _INT,
            "selector": _ref("Selector"),
            "phases": _arr(_ref("Phase")),
            "success_threshold": {"anyOf": [_NUM, {"const": "all_finished"}]},
            "min_soak_s": _NUM,
            "failure": _ref("FailureThreshold"),
            "deadline": _nullable(_NUM),
            "sla_window_s": _NUM,
            "name": _nullable(_STR),
        },
    },
    "Counts": {
        "type": "object",
        "required": _STATES,
        "properties": {s: _INT for s in _STATES},
    },
    "Sla": {
        "type": "object",
        "properties": {
            "status": {"enum": ["none", "on_track", "at_risk", "missed", "met"]},
            "deadline": _nullable(_NUM),
            "projected_completion": _nullable(_NUM),
            "rate_per_hour": _nullable(_NUM),
            "remaining": _INT,
        },
    },
    "Campaign": {
        "type": "object",
        "required": ["id", "status", "phase", "counts"],
        "properties": {
            "id": _STR,
            "name": _nullable(_STR),
            "status": {"enum": ["draft", "running", "paused", "completed", "aborted"]},
            "release": _OBJ,
            "selector": _ref("Selector"),
            "phase": {"type": "integer", "minimum": 1},
            "phases": _arr(_ref("Phase")),
            "quota": _INT,
            "target_size": _INT,
            "counts": _ref("Counts"),
            "pause_reason": _nullable(_STR),
            "paused_auto": _BOOL,
            "sla": _ref("Sla"),
            "stragglers": _arr(_STR),
            "history": _arr(_OBJ),
        },
    },
    "Release": {
        "type": "object",
        "properties": {
            "id": _INT,
            "model": _STR,
            "hw_rev": _STR,
            "version": _STR,
            "min_version": _nullable(_STR),
            "security_counter": _INT,
            "manifest_digest": _STR,
        },
    },
    "Device": {
        "type": "object",
        "properties": {
            "serial": _STR,
            "model": _STR,
            "hw_rev": _STR,
            "groups": _arr(_STR),
            "revoked": _BOOL,
            "current_version": _nullable(_STR),
            "last_seen": _nullable(_INT),
            "suspect": _BOOL,
        },
    },
}


def _q(name: str, schema: dict[str, Any], desc: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": desc}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _bin_body(ctype: str) -> dict[str, Any]:
    return {"required": True, "content": {ctype: {"schema": {"type": "string"}}}}


# (METHOD, path) → summary, role, and optional parameters / requestBody / 2xx response schema
OPS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/admin/v1/openapi.json"): {"summary": "This OpenAPI document", "role": None},
    ("GET", "/healthz"): {"summary": "Liveness", "role": None},
    ("GET", "/admin/v1/campaigns"): {
        "summary": "List campaigns",
        "role": "read",
        "parameters": [
            _q("status", {"enum": ["draft", "running", "paused", "completed", "aborted"]})
        ],
        "response": {"type": "object", "properties": {"campaigns": _arr(_ref("Campaign"))}},
    },
    ("POST", "/admin/v1/campaigns"): {
        "summary": "Create a draft campaign (E_INCOMPATIBLE, E_CONFLICT, E_MALFORMED, E_CAMPAIGN)",
        "role": "campaign",
        "body": _json_body(_ref("CampaignCreate")),
        "status": "201",
        "response": _ref("Campaign"),
    },
    ("GET", "/admin/v1/campaigns/{name}"): {
        "summary": "Campaign status (evaluated now): phase, counts, SLA, pause reason, stragglers",
        "role": "read",
        "parameters": [_q("stale_after", _INT, "seconds without check-in → straggler")],
        "response": _ref("Campaign"),
    },
    ("POST", "/admin/v1/campaigns/{name}/{action}"): {
        "summary": "start | pause | resume | abort (E_CAMPAIGN_STATE if not allowed now)",
        "role": "campaign",
        "body": {
            "required": False,
            "content": {
                "application/json": {"schema": {"type": "object", "properties": {"reason": _STR}}}
            },
        },
        "response": _ref("Campaign"),
    },
    ("GET", "/admin/v1/devices"): {
        "summary": "List/filter devices",
        "role": "read",
        "parameters": [
            _q("model", _STR),
            _q("hw_rev", _STR),
            _q("group", _STR),
            _q("version", _STR),
            _q("suspect", {"enum": ["true", "false"]}),
            _q("limit", _INT),
            _q("offset", _INT),
        ],
        "response": {
            "type": "object",
            "properties": {"total": _INT, "devices": _arr(_ref("Device"))},
        },
    },
    ("GET", "/admin/v1/devices/{serial}"): {
        "summary": "One device: check-in facts, last status report, probe history",
        "role": "read",
        "response": _ref("Device"),
    },
    ("GET", "/admin/v1/devices/{serial}/campaigns"): {
        "summary": "A device's progress in its campaigns",
        "role": "read",
    },
    ("PUT", "/admin/v1/devices/{serial}/groups"): {
        "summary": "Replace a device's groups",
        "role": "devices",
        "body": _json_body(
            {"type": "object", "required": ["groups"], "properties": {"groups": _arr(_STR)}}
        ),
    },
    ("POST", "/admin/v1/devices/{serial}/revoke"): {
        "summary": "Revoke a device certificate",
        "role": "security",
    },
    ("GET", "/admin/v1/groups"): {"summary": "Device groups and sizes", "role": "read"},
    ("GET", "/admin/v1/releases"): {
        "summary": "List releases",
        "role": "read",
        "parameters": [_q("model", _STR), _q("hw_rev", _STR)],
        "response": {"type": "object", "properties": {"releases": _arr(_ref("Release"))}},
    },
    ("GET", "/admin/v1/releases/{release_id}"): {
        "summary": "One release with its deltas",
        "role": "read",
        "response": _ref("Release"),
    },
    ("POST", "/admin/v1/releases"): {
        "summary": "Upload a signed release (verified on upload)",
        "role": "release",
        "parameters": [{"name": "image", "in": "query", "required": True, "schema": _STR}],
        "body": _bin_body("application/suit-envelope+cose"),
        "status": "201",
    },
    ("POST", "/admin/v1/images"): {
        "summary": "Upload an image blob",
        "role": "release",
        "body": _bin_body("application/octet-stream"),
        "status": "201",
    },
    ("POST", "/admin/v1/releases/{release_id}/deltas"): {
        "summary": "Upload a delta for a release",
        "role": "release",
        "parameters": [
            {"name": "patch", "in": "query", "required": True, "schema": _STR},
            _q("base_version", _STR),
        ],
        "body": _bin_body("application/suit-envelope+cose"),
        "status": "201",
    },
    ("POST", "/admin/v1/assignments"): {
        "summary": "Assign one device a release directly (outside campaigns)",
        "role": "assign",
        "body": _json_body(
            {
                "type": "object",
                "required": ["serial", "release_id"],
                "properties": {"serial": _STR, "release_id": _INT},
            }
        ),
        "status": "201",
    },
    ("PUT", "/admin/v1/keylist"): {
        "summary": "Publish a signed key-list update",
        "role": "security",
        "body": _bin_body("application/cose"),
        "status": "201",
    },
}

_PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}")


def _errors(role: str | None) -> dict[str, Any]:
    err = {"content": {"application/json": {"schema": _ref("Error")}}}
    out: dict[str, Any] = {
        "400": {"description": "E_MALFORMED and other input errors", **err},
        "404": {"description": "E_NOT_FOUND", **err},
    }
    if role is not None:
        out["401"] = {"description": "E_AUTH: missing or unknown token", **err}
        out["403"] = {"description": "E_FORBIDDEN: role not allowed", **err}
        out["409"] = {"description": "E_CONFLICT / E_CAMPAIGN_STATE / E_EXISTS", **err}
        out["422"] = {"description": "E_INCOMPATIBLE / E_CAMPAIGN", **err}
    return out


def openapi_schema(routes: list[BaseRoute]) -> dict[str, Any]:
    from .admin import PERMISSIONS

    paths: dict[str, Any] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        path = _PARAM_RE.sub(lambda mt: "{" + mt.group(1) + "}", route.path)
        names = _PARAM_RE.findall(route.path)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            doc = OPS.get((method, path))
            if doc is None:
                first = (route.endpoint.__doc__ or route.name or "").strip().splitlines()
                doc = {"summary": first[0] if first else path, "role": "read"}
            role = doc.get("role")
            op: dict[str, Any] = {
                "operationId": f"{method.lower()}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_')}",
                "summary": doc["summary"],
                "parameters": [
                    {"name": n, "in": "path", "required": True, "schema": _STR} for n in names
                ]
                + list(doc.get("parameters", [])),
                "responses": {
                    doc.get("status", "200"): {
                        "description": "success",
                        "content": {"application/json": {"schema": doc.get("response", _OBJ)}},
                    },
                    **_errors(role),
                },
            }
            if role is not None:
                op["security"] = [{"bearer": []}]
                roles = sorted(PERMISSIONS.get(role, ()))
                op["description"] = f"Roles: {', '.join(roles)}."
            else:
                op["security"] = []
            if "body" in doc:
                op["requestBody"] = doc["body"]
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "otaguard admin API",
            "version": "1",
            "description": "Releases, devices, groups and phased campaigns. Bearer tokens with "
            "roles viewer, operator, release-manager, security-officer.",
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
