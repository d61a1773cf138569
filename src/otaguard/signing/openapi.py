"""The signing service's OpenAPI 3.1 document (``GET /v1/openapi.json``).

Written out rather than generated: the service has eight routes and their request schemas are the
contract CI and officers code against. A test checks that the document names exactly the
app's routes, and ``schemathesis`` drives the live service from it (no 5xx, every answer one
the document lists). The error statuses are the ones :data:`.http.STATUS` can give.
"""

from __future__ import annotations

from typing import Any

_STR: dict[str, Any] = {"type": "string"}
_INT: dict[str, Any] = {"type": "integer"}
_BOOL: dict[str, Any] = {"type": "boolean"}
_HEX = {"type": "string", "pattern": "^[0-9a-f]{64}([0-9a-f]{32})?$"}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(s: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [s, {"type": "null"}]}


_ERR = {"content": {"application/json": {"schema": _ref("Error")}}}


def _errors(*statuses: str) -> dict[str, Any]:
    text = {
        "400": "E_MALFORMED / E_USAGE / E_ALGORITHM and other refusals of the request",
        "401": "E_AUTH: missing, unknown or expired token",
        "403": "E_FORBIDDEN / E_POLICY / E_FOUR_EYES",
        "404": "E_NOT_FOUND (co-signing not configured, unknown request)",
        "409": "E_DOWNGRADE / E_FAST_FORWARD / E_SECURITY_COUNTER / E_CONFLICT / "
        "E_DUPLICATE_SIGNER / E_REQUEST_CHANGED / E_PENDING / E_THRESHOLD",
        "410": "E_REQUEST_EXPIRED",
        "413": "E_TOO_LARGE",
        "415": "E_UNSUPPORTED: Content-Type must be application/json",
        "429": "E_RATE_LIMIT (Retry-After)",
        "503": "E_HSM / E_PIN / E_AUDIT_* / E_DATABASE: the service cannot sign now",
    }
    return {s: {"description": text[s], **_ERR} for s in statuses}


_BODY_ERRORS = ("400", "401", "403", "404", "409", "410", "413", "415", "429", "503")

SCHEMAS: dict[str, Any] = {
    "McubootSignBody": {
        "type": "object",
        "additionalProperties": False,
        "required": ["request", "image"],
        "properties": {
            "request": {"$ref": "#/components/schemas/SigningRequest"},
            "image": {"type": "string", "contentEncoding": "base64"},
            "header_size": {"type": "integer", "minimum": 32, "maximum": 65535},
            "slot_size": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]},
            "trailer_size": {"type": "integer", "minimum": 0},
        },
    },
    "McubootSigned": {
        "type": "object",
        "required": [
            "tlvs",
            "mcuboot_size",
            "mcuboot_sha256",
            "version",
            "security_counter",
            "sequence",
            "key_id",
            "audit",
        ],
        "properties": {
            "tlvs": {"type": "string", "contentEncoding": "base64"},
            "mcuboot_size": _INT,
            "mcuboot_sha256": _HEX,
            "version": _STR,
            "security_counter": _INT,
            "sequence": _INT,
            "key_id": _STR,
            "audit": {"type": "object", "required": ["seq", "hash"]},
        },
    },
    "Error": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {"error": {"type": "string", "pattern": "^E_[A-Z0-9_]+$"}, "detail": _STR},
    },
    "SigningRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": [
            "image_digest",
            "image_size",
            "vendor",
            "model",
            "hw_rev",
            "version",
            "security_counter",
        ],
        "properties": {
            "image_digest": _HEX,
            "digest_alg": {"enum": ["sha256", "sha384"]},
            "image_size": {"type": "integer", "minimum": 0},
            "vendor": _STR,
            "model": _STR,
            "hw_rev": _STR,
            "version": _STR,
            "min_version": _nullable(_STR),
            "security_counter": {"type": "integer", "minimum": 0},
            "expires": _nullable({"type": "integer", "minimum": 0}),
            "uri": _nullable(_STR),
            "description": _nullable(_STR),
            "downgrade": _BOOL,
            "fast_forward": _BOOL,
            "delta_base_digest": _nullable(_HEX),
            "delta_patch_digest": _nullable(_HEX),
            "delta_patch_size": _nullable({"type": "integer", "minimum": 0}),
            "delta_patch_uri": _nullable(_STR),
        },
    },
    "Signed": {
        "type": "object",
        "required": ["envelope", "sequence", "manifest_digest", "key_ids", "audit"],
        "properties": {
            "envelope": _STR,
            "sequence": _INT,
            "manifest_digest": _STR,
            "key_ids": {"type": "array", "items": _STR},
            "vendor_id": _STR,
            "class_id": _STR,
            "audit": {
                "type": "object",
                "required": ["seq", "hash"],
                "properties": {"seq": _INT, "hash": _STR},
            },
        },
    },
    "CosignRequest": {"type": "object", "required": ["id", "status"]},
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _op(
    op_id: str,
    summary: str,
    ok: dict[str, Any],
    errors: tuple[str, ...],
    *,
    body: dict[str, Any] | None = None,
    auth: bool = True,
    rid: bool = False,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "security": [{"bearer": []}] if auth else [],
        "responses": {"200": {"description": "success", **_json(ok)}, **_errors(*errors)},
    }
    if rid:
        op["parameters"] = [{"name": "rid", "in": "path", "required": True, "schema": _STR}]
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    return op


def openapi_schema() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "otaguard signing service API",
            "version": "1",
            "description": "Release signing in the HSM for CI (role release), with policy, "
            "audit and co-signing (two-person rule). Bearer tokens from the service's config.",
        },
        "paths": {
            "/v1/sign": {
                "post": _op(
                    "sign",
                    "Sign one release manifest (policy-checked, audited)",
                    _ref("Signed"),
                    _BODY_ERRORS,
                    body=_ref("SigningRequest"),
                )
            },
            "/v1/sign-mcuboot": {
                "post": _op(
                    "sign_mcuboot",
                    "Sign the MCUboot image of a release this service signed (same policy, "
                    "floors and audit log); answers the image's TLV area",
                    _ref("McubootSigned"),
                    _BODY_ERRORS,
                    body=_ref("McubootSignBody"),
                )
            },
            "/v1/sign-tuf-targets": {
                "post": _op(
                    "sign_tuf_targets",
                    "Sign TUF targets metadata for a release this service signed (policy-checked,"
                    " audited as sign-tuf-targets; E_POLICY when no such release or expiry beyond"
                    " policy, E_UNSUPPORTED for sha384 images)",
                    {
                        "type": "object",
                        "required": ["targets_b64", "version", "audit"],
                        "properties": {
                            "targets_b64": _STR,
                            "version": _INT,
                            "audit": {"type": "object", "required": ["seq", "hash"]},
                        },
                    },
                    _BODY_ERRORS,
                    body={
                        "type": "object",
                        "required": ["request"],
                        "additionalProperties": False,
                        "properties": {
                            "request": _ref("SigningRequest"),
                            "previous_b64": _nullable(_STR),
                        },
                    },
                )
            },
            "/v1/public-key": {
                "get": _op(
                    "public_key",
                    "The signing key's public key",
                    {"type": "object", "required": ["kid", "alg", "pem"]},
                    ("401", "429", "503"),
                )
            },
            "/v1/health": {"get": _op("health", "Liveness", {"type": "object"}, (), auth=False)},
            "/v1/openapi.json": {
                "get": _op("openapi", "This document", {"type": "object"}, (), auth=False)
            },
            "/v1/cosign": {
                "post": _op(
                    "cosign_create",
                    "File a release (and its deltas) for co-signing",
                    _ref("CosignRequest"),
                    _BODY_ERRORS,
                    body={
                        "type": "object",
                        "required": ["requests"],
                        "additionalProperties": False,
                        "properties": {
                            "requests": {"type": "array", "items": _ref("SigningRequest")}
                        },
                    },
                )
            },
            "/v1/cosign/{rid}": {
                "get": _op(
                    "cosign_get",
                    "A co-signing request's state (the envelopes once complete)",
                    _ref("CosignRequest"),
                    ("400", "401", "403", "404", "410", "429", "503"),
                    rid=True,
                )
            },
            "/v1/cosign/{rid}/approve": {
                "post": _op(
                    "cosign_approve",
                    "Approve (sign) the request whose digest the officer reviewed",
                    _ref("CosignRequest"),
                    _BODY_ERRORS,
                    body={
                        "type": "object",
                        "required": ["request_digest"],
                        "properties": {"request_digest": _HEX},
                    },
                    rid=True,
                )
            },
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
