"""The published OpenAPI 3.1 document of both server listeners.

One document describes the admin API (bearer tokens) and the device API (mutual TLS), because
operators and device-firmware authors read one contract and because ``schemathesis`` drives
both listeners from it in the test suite (no 5xx, no response outside its schema). Each path
item names its listener in ``servers``; each operation is tagged ``admin`` or ``device``.

The document is built from the apps' actual routes: every route gets an operation, described
by :data:`ADMIN_OPS` / :data:`DEVICE_OPS` where we wrote one and by its endpoint docstring
otherwise, so the document cannot silently miss a route. The error responses listed are every
status the server's error handlers can produce for that kind of route.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.routing import BaseRoute, Route

from .auth import PERMISSIONS

ENVELOPE_TYPE = "application/suit-envelope+cose"
KEYLIST_TYPE = "application/cose; cose-type=cose-sign1"


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
ADMIN_OPS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/admin/v1/openapi.json"): {"summary": "This OpenAPI document", "role": None},
    ("GET", "/healthz"): {
        "summary": "Health: the database and the blob store answer (503 naming the failed check)",
        "role": None,
        "response": _ref("Health"),
        "override": {"503": {"description": "a check failed", "schema": _ref("Health")}},
    },
    ("GET", "/metrics"): {
        "summary": "Prometheus metrics (text exposition format; any admin role)",
        "role": "read",
        "media": "text/plain; version=0.0.4; charset=utf-8",
    },
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
        "summary": "One device: check-in facts, last status report, assignment, probe history",
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
    ("POST", "/admin/v1/releases/{release_id}/mcuboot"): {
        "summary": "Attach a release's MCUboot image (an uploaded blob), verified on upload: "
        "signed by a trusted signer of the release, same image, version and SEC_CNT "
        "(E_UNTRUSTED_KEY, E_SIGNATURE, E_DIGEST, E_CONFLICT, E_EXISTS)",
        "role": "release",
        "parameters": [{"name": "image", "in": "query", "required": True, "schema": _STR}],
        "status": "201",
        "response": {
            "type": "object",
            "required": ["release_id", "blob", "size", "mcuboot_version", "key_id"],
            "properties": {
                "release_id": _INT,
                "blob": _STR,
                "size": _INT,
                "mcuboot_version": _STR,
                "key_id": _STR,
            },
        },
    },
    ("PUT", "/admin/v1/classes/{class_id}/format"): {
        "summary": "The image format a device class consumes: 'suit' (default) or 'mcuboot' "
        "(its devices are offered releases' MCUboot images)",
        "role": "release",
        "body": _json_body(
            {
                "type": "object",
                "required": ["format"],
                "additionalProperties": False,
                "properties": {"format": {"enum": ["suit", "mcuboot"]}},
            }
        ),
        "response": {
            "type": "object",
            "required": ["class_id", "format"],
            "properties": {"class_id": _STR, "format": _STR},
        },
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
    ("GET", "/admin/v1/certificates/expiring"): {
        "summary": "Devices whose certificate expires within a duration, soonest first",
        "role": "read",
        "parameters": [
            _q("within", {"type": "string", "pattern": "^[0-9]{1,6}[smhd]?$"}, "e.g. 30d"),
            _q("limit", _INT),
        ],
        "response": {
            "type": "object",
            "required": ["within", "now", "devices"],
            "properties": {"within": _INT, "now": _INT, "devices": _arr(_OBJ)},
        },
    },
    ("PUT", "/admin/v1/keylist"): {
        "summary": "Publish a signed key-list update",
        "role": "security",
        "body": _bin_body("application/cose"),
        "status": "201",
    },
}


_HEXS = {"type": "string", "pattern": "^[0-9a-f]{1,256}$"}
_VERS = {"type": "string", "pattern": "^[0-9]{1,9}(\\.[0-9]{1,9}){0,3}$"}
_ERRC = {"type": "string", "pattern": "^E_[A-Z0-9_]{1,30}$"}

DEVICE_SCHEMAS: dict[str, Any] = {
    "Health": {
        "type": "object",
        "required": ["ok", "checks"],
        "properties": {
            "ok": _BOOL,
            "checks": {"type": "object", "additionalProperties": {"enum": ["ok", "failed"]}},
        },
    },
    "Checkin": {
        "type": "object",
        "required": ["version"],
        "properties": {
            "version": _VERS,
            "security_counter": {"type": "integer", "minimum": 0},
            "keylist_version": {"type": "integer", "minimum": 0},
            "running_digest": _HEXS,
            "last_error": _ERRC,
            "slot_state": {"anyOf": [_OBJ, _STR]},
            "serial": _STR,
        },
    },
    "CheckinAnswer": {
        "type": "object",
        "required": ["update"],
        "properties": {
            "update": _nullable(_OBJ),
            "keylist_version": _nullable(_INT),
            "poll_interval": _NUM,
        },
    },
    "Report": {
        "type": "object",
        "required": ["report_id", "state"],
        "properties": {
            "report_id": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"},
            "state": {"type": "string", "pattern": "^[a-z_]{1,32}$"},
            "manifest_digest": _HEXS,
            "error": _ERRC,
            "version": _VERS,
            "detail": {"type": "string", "maxLength": 500},
            "serial": _STR,
        },
    },
}

_BLOB = {"type": "string", "pattern": "^[0-9a-f]{64}$"}

DEVICE_OPS: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/checkin"): {
        "summary": "Check in: report facts, learn of an assigned update (E_IDENTITY, E_REVOKED)",
        "body": _json_body(_ref("Checkin")),
        "response": _ref("CheckinAnswer"),
    },
    ("POST", "/v1/reports"): {
        "summary": "Report install progress; idempotent by report_id (200 for a repeat)",
        "body": _json_body(_ref("Report")),
        "status": "201",
        "also": {"200": "a repeat of an acknowledged report"},
    },
    ("GET", "/v1/manifests/{digest}"): {
        "summary": "The signed SUIT envelope of the device's assigned release",
        "path": {"digest": _BLOB},
        "media": ENVELOPE_TYPE,
        "also": {"304": "If-None-Match matched"},
    },
    ("GET", "/v1/images/{digest}"): {
        "summary": "Image or patch bytes of the device's assignment; Range for resuming",
        "path": {"digest": _BLOB},
        "headers": ["range", "if-range", "if-none-match"],
        "media": "application/octet-stream",
        "also": {
            "206": "a byte range",
            "304": "If-None-Match matched",
            "416": "E_RANGE: range outside the image",
        },
    },
    ("GET", "/v1/keylist"): {
        "summary": "The newest signed key list (E_NOT_FOUND before one is published)",
        "headers": ["if-none-match"],
        "media": KEYLIST_TYPE,
        "also": {"304": "If-None-Match matched"},
    },
    ("POST", "/v1/certificate"): {
        "summary": "Renew the device certificate: a CSR (PEM or DER) for the same serial; the "
        "new certificate is pending until first used (E_IDENTITY, E_ALGORITHM, E_SIGNATURE)",
        "body": _bin_body("application/pkcs10"),
        "status": "201",
        "media": "application/pem-certificate-chain",
    },
    ("GET", "/healthz"): {"summary": "Health", "response": _ref("Health")},
}

# The TUF repository (server/admin_api/tuf.py): metadata for devices that run a TUF client.
_TUF_META = {
    "type": "string",
    "pattern": "^(timestamp|[1-9][0-9]{0,9}\\.(root|targets|snapshot))\\.json$",
}
DEVICE_OPS.update(
    {
        ("GET", "/tuf/{name}"): {
            "summary": "TUF metadata: timestamp.json (re-signed when half its lifetime is "
            "gone), N.root.json, N.snapshot.json, N.targets.json (E_NOT_FOUND otherwise)",
            "path": {"name": _TUF_META},
            "response": _OBJ,
        },
        ("GET", "/tuf/targets/{path}"): {
            "summary": "A TUF target file, <dir>/<sha256>.<name> as the current targets "
            "metadata lists it (consistent snapshots)",
            "media": "application/octet-stream",
        },
    }
)
ADMIN_OPS.update(
    {
        ("GET", "/admin/v1/tuf/online-keys"): {
            "summary": "The server's TUF snapshot and timestamp public keys (PEM), for the "
            "root ceremony (otaguard tuf root --online-keys)",
            "role": "read",
            "response": {
                "type": "object",
                "required": ["snapshot", "timestamp"],
                "properties": {"snapshot": _STR, "timestamp": _STR},
            },
        },
        ("PUT", "/admin/v1/tuf/root"): {
            "summary": "Upload TUF root metadata: the first, or the next version signed by the "
            "old and new root keys (E_SIGNATURE, E_REPLAY, E_EXPIRED, E_UNTRUSTED_KEY)",
            "role": "security",
            "body": _bin_body("application/json"),
            "status": "201",
            "response": {
                "type": "object",
                "required": ["version"],
                "properties": {"version": _INT, "uploaded_by": _STR},
            },
        },
        ("PUT", "/admin/v1/tuf/targets"): {
            "summary": "Publish TUF targets metadata signed by the release key; the server then "
            "signs snapshot and timestamp (E_SIGNATURE, E_POLICY: expiry beyond policy, "
            "E_EXPIRED, E_REPLAY, E_NOT_FOUND: image not uploaded)",
            "role": "release",
            "body": _bin_body("application/json"),
            "status": "201",
            "response": {
                "type": "object",
                "required": ["version"],
                "properties": {"version": _INT, "uploaded_by": _STR},
            },
        },
    }
)

_PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}")
_ERR = {"content": {"application/json": {"schema": _ref("Error")}}}


def _errors(kind: str, role: str | None) -> dict[str, Any]:
    """Every error status the handlers can give this kind of route (``app._status_of``)."""
    out: dict[str, Any] = {
        "400": {"description": "E_MALFORMED and other input errors", **_ERR},
        "404": {"description": "E_NOT_FOUND (E_NO_ISSUER: renewal is off)", **_ERR},
        "405": {"description": "E_USAGE: method not allowed", **_ERR},
        "413": {"description": "E_TOO_LARGE: body over the limit", **_ERR},
        "429": {"description": "E_RATE_LIMITED (Retry-After)", **_ERR},
        "503": {
            "description": "E_DATABASE / E_STORAGE / E_UNAVAILABLE: retry later (Retry-After)",
            **_ERR,
        },
    }
    if kind == "device":
        out["401"] = {"description": "E_AUTH: no usable client certificate", **_ERR}
        out["403"] = {"description": "E_IDENTITY / E_REVOKED / E_PROBE", **_ERR}
        out["409"] = {"description": "E_CONFLICT", **_ERR}
        out["422"] = {"description": "E_INCOMPATIBLE", **_ERR}
    elif role is not None:
        out["401"] = {"description": "E_AUTH: missing or unknown token", **_ERR}
        out["403"] = {"description": "E_FORBIDDEN: role not allowed", **_ERR}
        out["409"] = {"description": "E_CONFLICT / E_CAMPAIGN_STATE / E_EXISTS", **_ERR}
        out["422"] = {"description": "E_INCOMPATIBLE / E_CAMPAIGN / E_UNTRUSTED_KEY", **_ERR}
    return out


def _operations(
    routes: list[BaseRoute], kind: str, ops: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        path = _PARAM_RE.sub(lambda mt: "{" + mt.group(1) + "}", route.path)
        names = _PARAM_RE.findall(route.path)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            doc = ops.get((method, path))
            if doc is None:
                first = (route.endpoint.__doc__ or route.name or "").strip().splitlines()
                doc = {"summary": first[0] if first else path, "role": "read"}
            role = doc.get("role") if kind == "admin" else None
            media = doc.get("media", "application/json")
            body_schema = doc.get("response", _OBJ) if media == "application/json" else _STR
            responses: dict[str, Any] = {
                doc.get("status", "200"): {
                    "description": "success",
                    "content": {media: {"schema": body_schema}},
                },
                **_errors(kind, role),
            }
            for status, text in doc.get("also", {}).items():
                if status in ("304",):
                    responses[status] = {"description": text}
                elif status == "416":
                    responses[status] = {"description": text, **_ERR}
                else:
                    responses[status] = {
                        "description": text,
                        "content": {
                            media: {"schema": _OBJ if media == "application/json" else _STR}
                        },
                    }
            for status, spec in doc.get("override", {}).items():
                responses[status] = {
                    "description": spec["description"],
                    "content": {media: {"schema": spec["schema"]}},
                }
            params = [
                {
                    "name": n,
                    "in": "path",
                    "required": True,
                    "schema": doc.get("path", {}).get(n, _STR),
                }
                for n in names
            ]
            params += [
                {"name": h, "in": "header", "required": False, "schema": _STR}
                for h in doc.get("headers", [])
            ]
            op: dict[str, Any] = {
                "operationId": f"{kind}_{method.lower()}_"
                + re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_"),
                "tags": [kind],
                "summary": doc["summary"],
                "parameters": params + list(doc.get("parameters", [])),
                "responses": responses,
            }
            if kind == "device":
                op["security"] = [] if path == "/healthz" else [{"deviceTls": []}]
            elif role is not None:
                op["security"] = [{"bearer": []}]
                op["description"] = f"Roles: {', '.join(sorted(PERMISSIONS.get(role, ())))}."
            else:
                op["security"] = []
            if "body" in doc:
                op["requestBody"] = doc["body"]
            item = paths.setdefault(path, {"servers": [_LISTENER[kind]]})
            item[method.lower()] = op
    return paths


_LISTENER = {
    "admin": {"url": "/", "description": "admin listener (TLS, bearer token)"},
    "device": {"url": "/", "description": "device listener (mutual TLS)"},
}


def openapi_schema(admin: list[BaseRoute], device: list[BaseRoute]) -> dict[str, Any]:
    """The document; a path both listeners serve (``/healthz``) is one item with both servers."""
    paths = _operations(admin, "admin", ADMIN_OPS)
    for path, item in _operations(device, "device", DEVICE_OPS).items():
        if path in paths:
            paths[path]["servers"] = [_LISTENER["admin"], _LISTENER["device"]]
        else:
            paths[path] = item
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "otaguard update server API",
            "version": "1",
            "description": "Admin listener: releases, devices, groups, phased campaigns, key "
            "rotation (bearer tokens with roles viewer, operator, release-manager, "
            "security-officer). Device listener: check-in, reports, manifests, images, key "
            "list (mutual TLS with the fleet CA's device certificates).",
        },
        "paths": paths,
        "components": {
            "schemas": {**SCHEMAS, **DEVICE_SCHEMAS},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "deviceTls": {"type": "mutualTLS"},
            },
        },
        "security": [{"bearer": []}],
    }
