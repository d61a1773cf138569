"""Generic, UNVERIFIED rendering of any SUIT envelope for humans (``otaguard manifest show``).

It decodes every draft example and foreign envelope it can (tagged or not, severed members,
integrated payloads and dependencies), names SUIT elements, and checks digests it can compute,
but it never checks a signature: everything it returns is marked UNVERIFIED. Limits and strict
CBOR still apply; malformed input raises OtaError like everywhere else.
"""

from __future__ import annotations

import hmac
from typing import Any

from .. import cbor
from ..crypto.algorithms import HashAlg, digest_bytes
from ..errors import ErrorCode, FormatError, OtaError
from . import suit
from .envelope import MAX_ENVELOPE_SIZE, loads_nested, parse_envelope

UNVERIFIED_NOTE = "UNVERIFIED: signatures were NOT checked; do not trust these fields"
MAX_NESTING = 4


def jsonable(obj: Any) -> Any:
    """Make decoded CBOR printable as JSON: bytes→hex, tags→{tag, value}, keys→strings."""
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, list | tuple):
        return [jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {_key(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, cbor.Tag):
        return {"tag": obj.tag, "value": jsonable(obj.value)}
    if obj is None or isinstance(obj, bool | int | str | float):
        return obj
    return str(obj)


def _key(k: Any) -> str:
    if isinstance(k, tuple):
        return "[" + ", ".join(f"h'{x.hex()}'" if isinstance(x, bytes) else str(x) for x in k) + "]"
    if isinstance(k, bytes):
        return k.hex()
    return str(k)


def _digest(obj: Any) -> Any:
    if isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int):
        return {
            "alg": suit.DIGEST_ALG_NAMES.get(obj[0], obj[0]),
            "value": jsonable(obj[1]),
        }
    return jsonable(obj)


def _param(key: Any, value: Any) -> tuple[str, Any]:
    name = suit.PARAMETERS.get(
        key, f"custom({key})" if isinstance(key, int) and key < 0 else str(key)
    )
    if key == suit.P_IMAGE_DIGEST and isinstance(value, bytes):
        return name, _digest(loads_nested(value, "image-digest"))
    if key in (suit.P_VERSION, suit.P_OTA_DELTA, suit.P_COMPONENT_METADATA, suit.P_WAIT_INFO) and (
        isinstance(value, bytes)
    ):
        return name, jsonable(loads_nested(value, name))
    return name, jsonable(value)


def _sequence(raw: Any, what: str, depth: int = 0) -> Any:
    if isinstance(raw, list):  # severed: the manifest holds only a digest
        return {"severed_digest": _digest(raw)}
    if not isinstance(raw, bytes):
        raise FormatError(ErrorCode.MALFORMED, f"{what} must be a byte string")
    seq = loads_nested(raw, what)
    if not isinstance(seq, list) or len(seq) % 2:
        raise FormatError(ErrorCode.MALFORMED, f"{what} must be command/argument pairs")
    out = []
    for i in range(0, len(seq), 2):
        cmd, arg = seq[i], seq[i + 1]
        name = suit.COMMANDS.get(
            cmd, f"custom({cmd})" if isinstance(cmd, int) and cmd < 0 else f"unknown({cmd})"
        )
        if cmd in (suit.DIR_SET_PARAMETERS, suit.DIR_OVERRIDE_PARAMETERS) and isinstance(arg, dict):
            rendered: Any = dict(_param(k, v) for k, v in arg.items())
        elif cmd == suit.DIR_RUN_SEQUENCE and isinstance(arg, bytes) and depth < MAX_NESTING:
            rendered = _sequence(arg, f"{what}/run-sequence", depth + 1)
        elif cmd == suit.DIR_TRY_EACH and isinstance(arg, list) and depth < MAX_NESTING:
            rendered = [
                _sequence(a, f"{what}/try-each", depth + 1) if isinstance(a, bytes) else None
                for a in arg
            ]
        elif cmd == suit.DIR_OVERRIDE_MULTIPLE and isinstance(arg, dict):
            rendered = {
                _key(k): dict(_param(pk, pv) for pk, pv in v.items())
                if isinstance(v, dict)
                else jsonable(v)
                for k, v in arg.items()
            }
        else:
            rendered = jsonable(arg)
        out.append({"command": name, "arg": rendered})
    return out


def _text(raw: Any) -> Any:
    if isinstance(raw, list):
        return {"severed_digest": _digest(raw)}
    obj = loads_nested(raw, "text") if isinstance(raw, bytes) else raw
    if not isinstance(obj, dict):
        return jsonable(obj)

    def named(m: Any) -> Any:
        if not isinstance(m, dict):
            return jsonable(m)
        out: dict[str, Any] = {}
        for k, v in m.items():
            if isinstance(k, tuple):
                out[_key(k)] = (
                    {
                        suit.TEXT_COMPONENT_KEYS.get(ck, str(ck)): jsonable(cv)
                        for ck, cv in v.items()
                    }
                    if isinstance(v, dict)
                    else jsonable(v)
                )
            else:
                out[suit.TEXT_KEYS.get(k, str(k))] = jsonable(v)
        return out

    # -34 text maps are keyed by language tag; older ones are not.
    if all(isinstance(k, str) for k in obj):
        return {lang: named(m) for lang, m in obj.items()}
    return named(obj)


def _common(raw: Any) -> Any:
    common = loads_nested(raw, "common") if isinstance(raw, bytes) else raw
    if not isinstance(common, dict):
        raise FormatError(ErrorCode.MALFORMED, "SUIT common must be a map")
    out: dict[str, Any] = {}
    for k, v in common.items():
        name = suit.COMMON_KEYS.get(k, str(k))
        if k == suit.COMMON_SHARED_SEQUENCE:
            out[name] = _sequence(v, "shared sequence")
        else:
            out[name] = jsonable(v)
    return out


def render_manifest(manifest: Any) -> dict[str, Any]:
    if not isinstance(manifest, dict):
        raise FormatError(ErrorCode.MALFORMED, "SUIT manifest must be a map")
    out: dict[str, Any] = {}
    for k, v in manifest.items():
        name = suit.MANIFEST_KEYS.get(k, f"unknown({k})")
        if k == suit.MAN_COMMON:
            out[name] = _common(v)
        elif k in suit.COMMAND_SEQUENCES:
            out[name] = _sequence(v, name)
        elif k == suit.MAN_TEXT:
            out[name] = _text(v)
        elif k == suit.MAN_SET_VERSION and isinstance(v, bytes):
            out[name] = jsonable(loads_nested(v, name))
        elif isinstance(v, list) and k in suit.SEVERABLE:
            out[name] = {"severed_digest": _digest(v)}
        else:
            out[name] = jsonable(v)
    return out


def _auth(raw: bytes, manifest_span: bytes) -> dict[str, Any]:
    arr = loads_nested(raw, "authentication wrapper")
    if not isinstance(arr, list) or not arr or not all(isinstance(x, bytes) for x in arr):
        raise FormatError(ErrorCode.MALFORMED, "authentication wrapper must be [+ bstr]")
    dig = loads_nested(arr[0], "manifest digest")
    out: dict[str, Any] = {"digest": _digest(dig)}
    try:
        alg = HashAlg(dig[0])
        out["digest_matches_manifest"] = hmac.compare_digest(
            digest_bytes(manifest_span, alg), dig[1]
        )
    except (ValueError, TypeError, IndexError, KeyError, OtaError):
        out["digest_matches_manifest"] = None  # algorithm we cannot compute
    blocks = []
    for b in arr[1:]:
        obj = loads_nested(b, "authentication block")
        entry: dict[str, Any] = {"type": "unknown"}
        if isinstance(obj, cbor.Tag):
            entry["type"] = {
                suit.TAG_SIGN1: "COSE_Sign1",
                suit.TAG_MAC0: "COSE_Mac0",
                suit.TAG_SIGN: "COSE_Sign",
                suit.TAG_MAC: "COSE_Mac",
            }.get(obj.tag, f"tag {obj.tag}")
            value = obj.value
            if isinstance(value, list) and len(value) >= 4 and isinstance(value[0], bytes):
                prot = loads_nested(value[0], "COSE protected header") if value[0] else {}
                alg_id = prot.get(1) if isinstance(prot, dict) else None
                entry["alg"] = (
                    suit.COSE_ALG_NAMES.get(alg_id, alg_id) if isinstance(alg_id, int) else alg_id
                )
                unprot = value[1] if isinstance(value[1], dict) else {}
                kid = unprot.get(4, prot.get(4) if isinstance(prot, dict) else None)
                entry["kid"] = jsonable(kid)
                entry["payload"] = "detached" if value[2] is None else jsonable(value[2])
        blocks.append(entry)
    out["blocks"] = blocks
    return out


def decode_unverified(
    data: bytes, *, max_size: int = MAX_ENVELOPE_SIZE, _depth: int = 0
) -> dict[str, Any]:
    """Decode any SUIT envelope for display. NOTHING in the result is authenticated."""
    raw = parse_envelope(data, max_size=max_size, require_tag=False)
    manifest = loads_nested(raw.members[suit.ENV_MANIFEST], "manifest")
    out: dict[str, Any] = {
        "UNVERIFIED": UNVERIFIED_NOTE,
        "size": len(raw.data),
        "tagged": raw.tagged,
    }
    if suit.ENV_AUTH in raw.members:
        out["authentication"] = _auth(raw.members[suit.ENV_AUTH], raw.spans[suit.ENV_MANIFEST])
    else:
        out["authentication"] = None
    out["manifest"] = render_manifest(manifest)
    severed: dict[str, Any] = {}
    integrated: dict[str, Any] = {}
    for key, value in raw.members.items():
        if isinstance(key, int) and key in suit.SEVERABLE:
            name = suit.MANIFEST_KEYS[key]
            held = manifest.get(key) if isinstance(manifest, dict) else None
            ok = None
            if isinstance(held, list) and len(held) == 2:
                try:
                    ok = hmac.compare_digest(
                        digest_bytes(raw.spans[key], HashAlg(held[0])), held[1]
                    )
                except (ValueError, TypeError, OtaError):
                    ok = None
            content: Any
            if key == suit.MAN_TEXT:
                content = _text(value)
            elif key in suit.COMMAND_SEQUENCES:
                content = _sequence(value, name)
            else:
                content = jsonable(loads_nested(value, name))
            severed[name] = {"digest_ok": ok, "content": content}
        elif isinstance(key, str):
            entry: dict[str, Any] = {"size": len(value)}
            if _depth < 2:
                try:
                    entry["envelope"] = decode_unverified(
                        value, max_size=max_size, _depth=_depth + 1
                    )
                except OtaError:
                    entry["envelope"] = None  # a raw payload, not a nested envelope
            integrated[key] = entry
    out["severed"] = severed
    out["integrated"] = integrated
    if _depth == 0:
        from .model import info_to_dict
        from .profile import extract_info

        try:
            out["otaguard_profile"] = info_to_dict(extract_info(manifest))
        except OtaError as err:
            out["otaguard_profile"] = {"error": err.code.value, "detail": err.detail}
        except Exception as exc:  # profile mapping must not break display of foreign files
            out["otaguard_profile"] = {"error": ErrorCode.MALFORMED.value, "detail": str(exc)}
    return out
