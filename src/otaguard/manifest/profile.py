"""The otaguard SUIT profile: ManifestInfo <-> SUIT_Manifest map (see docs/formats.md).

One component, one image, fixed command sequences. Encoding is deterministic (canonical CBOR),
so building the same ManifestInfo twice gives the same manifest bytes. Extraction is strict:
it accepts exactly what :func:`encode_manifest` can produce, and says why anything else is
refused (E_UNSUPPORTED for SUIT features outside the profile, E_CRITICAL_UNKNOWN for numbers
no SUIT draft defines, E_MALFORMED for wrong types).
"""

from __future__ import annotations

import uuid
from typing import Any

from .. import cborenc as enc
from ..crypto.algorithms import HASH_SIZES, HashAlg, hash_alg
from ..errors import ErrorCode, FormatError
from . import suit
from .envelope import loads_nested
from .ids import uuid_from_bytes
from .model import DeltaInfo, ManifestInfo
from .version import format_version, parse_version

COMPONENT_ID: tuple[bytes, ...] = (b"\x00",)
TEXT_LANGUAGE = "en"

# ManifestInfo.text keys <-> SUIT_Text_Map labels.
TEXT_TOP = {
    "description": suit.TEXT_MANIFEST_DESCRIPTION,
    "update_description": suit.TEXT_UPDATE_DESCRIPTION,
}
TEXT_COMPONENT = {
    "vendor": suit.TEXT_VENDOR_NAME,
    "model": suit.TEXT_MODEL_NAME,
    "vendor_domain": suit.TEXT_VENDOR_DOMAIN,
    "hw_rev": suit.TEXT_MODEL_INFO,
    "component_description": suit.TEXT_COMPONENT_DESCRIPTION,
    "version": suit.TEXT_COMPONENT_VERSION,
    "version_required": suit.TEXT_VERSION_REQUIRED,
}
_TEXT_TOP_REV = {v: k for k, v in TEXT_TOP.items()}
_TEXT_COMPONENT_REV = {v: k for k, v in TEXT_COMPONENT.items()}

# Shared-sequence parameters: standard ones only (the draft forbids custom parameters there).
_PARAMS_REQUIRED = {suit.P_VENDOR_ID, suit.P_CLASS_ID, suit.P_IMAGE_DIGEST, suit.P_IMAGE_SIZE}
_PARAMS_SHARED = _PARAMS_REQUIRED | {suit.P_USE_BEFORE, suit.P_VERSION}
# What layout 1 (legacy) put in the shared sequence besides; see extract_layout.
_PARAMS_LEGACY = {suit.P_OTA_SECURITY_COUNTER, suit.P_OTA_DELTA}
_MANIFEST_PROFILE_KEYS = {
    suit.MAN_VERSION,
    suit.MAN_SEQUENCE,
    suit.MAN_COMMON,
    suit.MAN_SET_VERSION,
    suit.MAN_VALIDATE,
    suit.MAN_INSTALL,
    suit.MAN_TEXT,
}


# --- encoding --------------------------------------------------------------------------------
# Written from byte fragments (otaguard.cborenc) rather than through a general encoder. The
# fragments below are also the layout the verifier's canonical route reads back in place
# (manifest/canonical.py), so a change here is a change there; its tests fail (the route is
# no longer taken) rather than accept anything else. tests/test_manifest_canonical.py holds
# this encoder against the same structure built as Python objects and encoded by cbor2.
#
# Layout 2 (draft-ietf-suit-manifest conformant, docs/formats.md): the shared sequence holds
# standard parameters and conditions only; otaguard's custom parameters sit in component
# sequences, the security counter in validate, the delta in install. Layout 1 (legacy, both
# custom parameters in the shared sequence) is still decoded for the migration period, never
# written.
LAYOUT_LEGACY = 1
LAYOUT_CURRENT = 2

_REP = enc.uint(suit.REP_POLICY)
_COMPONENT_KEY = enc.array([enc.bstr(c) for c in COMPONENT_ID])
_VERSION_GE = enc.integer(suit.VERSION_GREATER_EQUAL)
_ALG = {alg: enc.integer(int(alg)) for alg in HashAlg}
_UUID_HEAD = enc.head(2, 16)
_PAIR = enc.head(4, 2)  # a two-element array
# Map keys below are written in RFC 8949 core deterministic order (bytewise lexicographic of
# the encoded keys), which for these fixed key sets is the order of the lines; the encoding
# test checks it against a core deterministic encoder.
_P_VENDOR = enc.integer(suit.P_VENDOR_ID) + _UUID_HEAD
_P_CLASS = enc.integer(suit.P_CLASS_ID) + _UUID_HEAD
_P_DIGEST = enc.integer(suit.P_IMAGE_DIGEST)
_P_USE_BEFORE = enc.integer(suit.P_USE_BEFORE)
_P_SIZE = enc.integer(suit.P_IMAGE_SIZE)
_P_VERSION = enc.integer(suit.P_VERSION)
_P_URI = enc.integer(suit.P_URI)
_P_COUNTER = enc.integer(suit.P_OTA_SECURITY_COUNTER)
_P_DELTA = enc.integer(suit.P_OTA_DELTA)
_COND_REQUIRED = enc.uint(suit.COND_VENDOR_ID) + _REP + enc.uint(suit.COND_CLASS_ID) + _REP
_COND_USE_BEFORE = enc.uint(suit.COND_USE_BEFORE) + _REP
_COND_VERSION = enc.uint(suit.COND_VERSION) + _REP
_OVERRIDE = enc.uint(suit.DIR_OVERRIDE_PARAMETERS)
_COMMON_HEAD = (
    enc.head(5, 2)
    + enc.uint(suit.COMMON_COMPONENTS)
    + enc.array([enc.array([enc.bstr(c) for c in COMPONENT_ID])])
    + enc.uint(suit.COMMON_SHARED_SEQUENCE)
)
_M_VERSION = enc.uint(suit.MAN_VERSION) + enc.uint(1)
_M_SEQUENCE = enc.uint(suit.MAN_SEQUENCE)
_M_COMMON = enc.uint(suit.MAN_COMMON)
_M_SET_VERSION = enc.uint(suit.MAN_SET_VERSION)
_M_VALIDATE = enc.uint(suit.MAN_VALIDATE)
_M_INSTALL = enc.uint(suit.MAN_INSTALL)
_M_TEXT = enc.uint(suit.MAN_TEXT)
_IMAGE_MATCH = enc.uint(suit.COND_IMAGE_MATCH) + _REP
# validate: [override-parameters, {counter: uint}, image-match, rep]
_VALIDATE_HEAD = enc.head(4, 4) + _OVERRIDE + enc.head(5, 1) + _P_COUNTER
# install: [set-parameters, {? uri, ? delta}, (fetch, rep, image-match, rep) iff uri]
_SET_PARAMETERS = enc.uint(suit.DIR_SET_PARAMETERS)
_INSTALL_TAIL = enc.uint(suit.DIR_FETCH) + _REP + _IMAGE_MATCH
_DELTA_HEAD = enc.head(4, 4)


def encode_digest(alg: HashAlg, value: bytes) -> bytes:
    """SUIT_Digest ``[alg, bytes]``: the image digest here, the signed payload in the wrapper."""
    return _PAIR + _ALG[alg] + enc.bstr(value)


def _version(parts: tuple[int, ...]) -> bytes:
    return enc.array([enc.uint(p) for p in parts])


def encode_delta(d: DeltaInfo) -> bytes:
    """The delta parameter's value: bstr .cbor [base digest, patch digest, size, uri / nil]."""
    uri = enc.NULL if d.patch_uri is None else enc.tstr(d.patch_uri)
    patch = enc.bstr(d.base_digest) + enc.bstr(d.patch_digest) + enc.uint(d.patch_size)
    return enc.bstr(_DELTA_HEAD + patch + uri)


def encode_manifest(info: ManifestInfo) -> bytes:
    """Serialise ``info`` as a SUIT_Manifest (the bytes that go into envelope key 3)."""
    version, min_version = info.validate()
    alg = HashAlg(info.digest_alg)
    n_params = 4
    params = (
        _P_VENDOR
        + info.vendor_id.bytes
        + _P_CLASS
        + info.class_id.bytes
        + _P_DIGEST
        + enc.bstr(encode_digest(alg, info.image_digest))
    )
    conditions, n_conditions = _COND_REQUIRED, 2
    if info.expires is not None:
        params += _P_USE_BEFORE + enc.uint(info.expires)
        conditions += _COND_USE_BEFORE
        n_conditions += 1
        n_params += 1
    params += _P_SIZE + enc.uint(info.image_size)
    if min_version is not None:
        minimum = _PAIR + _VERSION_GE + _version(min_version)  # [>=, version]
        params += _P_VERSION + enc.bstr(minimum)
        conditions += _COND_VERSION
        n_conditions += 1
        n_params += 1
    # [override-parameters, {standard params}, condition, policy, ...]: no custom element
    shared = (
        enc.head(4, 2 + 2 * n_conditions) + _OVERRIDE + enc.head(5, n_params) + params + conditions
    )
    validate = _VALIDATE_HEAD + enc.uint(info.security_counter) + _IMAGE_MATCH
    body = (
        _M_VERSION
        + _M_SEQUENCE
        + enc.uint(info.sequence_number)
        + _M_COMMON
        + enc.bstr(_COMMON_HEAD + enc.bstr(shared))
        + _M_SET_VERSION
        + enc.bstr(_version(version))
        + _M_VALIDATE
        + enc.bstr(validate)
    )
    entries = 5
    if info.uri is not None or info.delta is not None:
        body += _M_INSTALL + enc.bstr(encode_install(info.uri, info.delta))
        entries += 1
    if info.text:
        body += _M_TEXT + enc.bstr(encode_text(info.text))
        entries += 1
    return enc.head(5, entries) + body


def encode_install(uri: str | None, delta: DeltaInfo | None) -> bytes:
    """The install sequence: where the image comes from (uri), and the patch that may stand
    in for it (delta); fetch and image-match only when there is a uri to fetch from."""
    params = b""
    if uri is not None:
        params += _P_URI + enc.tstr(uri)
    if delta is not None:
        params += _P_DELTA + encode_delta(delta)
    n_map = (uri is not None) + (delta is not None)
    if uri is None:
        return enc.head(4, 2) + _SET_PARAMETERS + enc.head(5, n_map) + params
    return enc.head(4, 6) + _SET_PARAMETERS + enc.head(5, n_map) + params + _INSTALL_TAIL


def encode_text(text: dict[str, str]) -> bytes:
    """SUIT_Text_Map for one language: profile names map to SUIT labels, other keys stay text
    (documented extension) and belong to the component."""
    top: list[tuple[bytes, bytes]] = []
    comp: list[tuple[bytes, bytes]] = []
    for key, value in text.items():
        if key in TEXT_TOP:
            top.append((enc.uint(TEXT_TOP[key]), enc.tstr(value)))
        elif key in TEXT_COMPONENT:
            comp.append((enc.uint(TEXT_COMPONENT[key]), enc.tstr(value)))
        else:
            comp.append((enc.tstr(key), enc.tstr(value)))  # documented extension
    if comp:
        top.append((_COMPONENT_KEY, enc.cmap(comp)))
    return _TEXT_HEAD + enc.cmap(top)


_TEXT_HEAD = enc.head(5, 1) + enc.tstr(TEXT_LANGUAGE)


# --- extraction --------------------------------------------------------------------------------
def _uint(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 2**64 - 1:
        raise FormatError(ErrorCode.MALFORMED, f"{what} must be an unsigned integer")
    return v


def _bstr(v: Any, what: str) -> bytes:
    if not isinstance(v, bytes):
        raise FormatError(ErrorCode.MALFORMED, f"{what} must be a byte string")
    return v


def _tstr(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise FormatError(ErrorCode.MALFORMED, f"{what} must be a text string")
    return v


def _unknown(what: str, key: Any, known: dict[Any, str]) -> FormatError:
    if key in known:
        return FormatError(
            ErrorCode.UNSUPPORTED, f"{what} {known[key]} ({key}) is outside the otaguard profile"
        )
    return FormatError(ErrorCode.CRITICAL_UNKNOWN, f"unknown {what} {key!r}")


def _digest_param(raw: Any, what: str) -> tuple[HashAlg, bytes]:
    obj = loads_nested(_bstr(raw, what), what)
    if not isinstance(obj, list) or len(obj) != 2 or not isinstance(obj[0], int):
        raise FormatError(ErrorCode.MALFORMED, f"{what} must be a SUIT_Digest")
    alg = hash_alg(obj[0])
    value = obj[1]
    if not isinstance(value, bytes) or len(value) != HASH_SIZES[alg]:
        raise FormatError(ErrorCode.MALFORMED, f"{what} must be {HASH_SIZES[alg]} bytes")
    return alg, value


def _pairs(seq: Any, what: str) -> list[tuple[Any, Any]]:
    if not isinstance(seq, list) or not seq or len(seq) % 2:
        raise FormatError(ErrorCode.MALFORMED, f"{what} must be command/argument pairs")
    pairs = [(seq[i], seq[i + 1]) for i in range(0, len(seq), 2)]
    for cmd, _ in pairs:
        if not isinstance(cmd, int) or isinstance(cmd, bool):
            raise FormatError(ErrorCode.MALFORMED, f"{what}: command {cmd!r} is not an integer")
    return pairs


def _rep(v: Any, what: str) -> None:
    _uint(v, f"{what} reporting policy")


def _version_parts(v: Any, what: str) -> str:
    if not isinstance(v, list) or not v:
        raise FormatError(ErrorCode.MALFORMED, f"{what} must be a non-empty integer array")
    for p in v:
        _uint(p, what)
    text = format_version(v)
    parse_version(text)
    return text


def extract_info(manifest: dict[Any, Any]) -> ManifestInfo:
    """Map an (authenticated, decoded) SUIT_Manifest onto the otaguard profile."""
    return extract_layout(manifest)[0]


def extract_layout(manifest: dict[Any, Any]) -> tuple[ManifestInfo, int]:
    """:func:`extract_info` and which layout the manifest used (LAYOUT_CURRENT or, for
    envelopes signed before the conformant layout, LAYOUT_LEGACY; docs/formats.md).

    One decoding path per layout, both ending in the same ManifestInfo; every check that
    follows (ManifestInfo.validate here, the device's conditions) operates on that."""
    for key in manifest:
        if key not in _MANIFEST_PROFILE_KEYS:
            raise _unknown("manifest element", key, suit.MANIFEST_KEYS)
    if manifest.get(suit.MAN_VERSION) != 1:
        raise FormatError(ErrorCode.VERSION, "manifest version must be 1")
    sequence_number = _uint(manifest.get(suit.MAN_SEQUENCE), "sequence number")
    params = _shared_parameters(manifest)
    # The legacy layout is recognised by its custom parameters in the shared sequence (which
    # the conformant layout never has there) and decoded by its own path.
    legacy = any(k in params for k in _PARAMS_LEGACY)
    if legacy:
        if suit.P_OTA_SECURITY_COUNTER not in params:
            raise FormatError(
                ErrorCode.MALFORMED, "missing parameter(s) ['otaguard-security-counter']"
            )
        counter, delta_raw = params[suit.P_OTA_SECURITY_COUNTER], params.get(suit.P_OTA_DELTA)
        _legacy_validate(manifest)
        uri = _legacy_install(manifest)
    else:
        counter = _validate(manifest)
        uri, delta_raw = _install(manifest)

    vendor_id = uuid_from_bytes(params[suit.P_VENDOR_ID], "vendor-id")
    class_id = uuid_from_bytes(params[suit.P_CLASS_ID], "class-id")
    digest_alg, image_digest = _digest_param(params[suit.P_IMAGE_DIGEST], "image-digest")
    image_size = _uint(params[suit.P_IMAGE_SIZE], "image-size")
    security_counter = _uint(counter, "security counter")
    expires = (
        _uint(params[suit.P_USE_BEFORE], "use-before") if suit.P_USE_BEFORE in params else None
    )
    min_version = None
    if suit.P_VERSION in params:
        vm = loads_nested(_bstr(params[suit.P_VERSION], "version"), "version")
        if not isinstance(vm, list) or len(vm) != 2:
            raise FormatError(ErrorCode.MALFORMED, "version parameter must be [type, value]")
        if vm[0] != suit.VERSION_GREATER_EQUAL:
            raise FormatError(
                ErrorCode.UNSUPPORTED, f"version comparison {vm[0]!r} (profile uses >= only)"
            )
        min_version = _version_parts(vm[1], "minimum version")
    delta = None if delta_raw is None else _delta(delta_raw, digest_alg)

    if suit.MAN_SET_VERSION not in manifest:
        raise FormatError(ErrorCode.MALFORMED, "set-version (firmware version) is required")
    version = _version_parts(
        loads_nested(_bstr(manifest[suit.MAN_SET_VERSION], "set-version"), "set-version"),
        "set-version",
    )

    text: dict[str, str] = {}
    if suit.MAN_TEXT in manifest:
        raw_text = manifest[suit.MAN_TEXT]
        if isinstance(raw_text, list):
            raise FormatError(ErrorCode.UNSUPPORTED, "severed text is outside the profile")
        text = decode_text(loads_nested(_bstr(raw_text, "text"), "text"))

    info = ManifestInfo(
        sequence_number=sequence_number,
        vendor_id=vendor_id,
        class_id=class_id,
        digest_alg=digest_alg,
        image_digest=image_digest,
        image_size=image_size,
        version=version,
        min_version=min_version,
        security_counter=security_counter,
        expires=expires,
        uri=uri,
        text=text,
        delta=delta,
    )
    info.validate()
    return info, LAYOUT_LEGACY if legacy else LAYOUT_CURRENT


def _shared_parameters(manifest: dict[Any, Any]) -> dict[Any, Any]:
    """common: exactly one component, and the shared sequence's parameters and conditions."""
    common = loads_nested(_bstr(manifest.get(suit.MAN_COMMON), "common"), "common")
    if not isinstance(common, dict):
        raise FormatError(ErrorCode.MALFORMED, "SUIT common must be a map")
    for key in common:
        if key not in (suit.COMMON_COMPONENTS, suit.COMMON_SHARED_SEQUENCE):
            raise _unknown("common element", key, suit.COMMON_KEYS)
    components = common.get(suit.COMMON_COMPONENTS)
    if not isinstance(components, list) or not components:
        raise FormatError(ErrorCode.MALFORMED, "common must list the components")
    if len(components) != 1:
        raise FormatError(
            ErrorCode.UNSUPPORTED,
            f"{len(components)} components: the otaguard profile updates exactly one image",
        )
    if components[0] != list(COMPONENT_ID):
        raise FormatError(ErrorCode.UNSUPPORTED, f"component id {components[0]!r} (want [h'00'])")
    shared_raw = _bstr(common.get(suit.COMMON_SHARED_SEQUENCE), "shared sequence")
    shared = _pairs(loads_nested(shared_raw, "shared sequence"), "shared sequence")
    if shared[0][0] != suit.DIR_OVERRIDE_PARAMETERS or not isinstance(shared[0][1], dict):
        raise FormatError(
            ErrorCode.UNSUPPORTED, "shared sequence must start with override-parameters"
        )
    params: dict[Any, Any] = shared[0][1]
    for key in params:
        if key not in _PARAMS_SHARED | _PARAMS_LEGACY:
            raise _unknown("parameter", key, suit.PARAMETERS)
    missing = _PARAMS_REQUIRED - set(params)
    if missing:
        names = sorted(suit.PARAMETERS[m] for m in missing)
        raise FormatError(ErrorCode.MALFORMED, f"missing parameter(s) {names}")
    conditions: list[int] = []
    allowed_conditions = {
        suit.COND_VENDOR_ID,
        suit.COND_CLASS_ID,
        suit.COND_USE_BEFORE,
        suit.COND_VERSION,
    }
    for cmd, arg in shared[1:]:
        if cmd not in allowed_conditions:
            raise _unknown("command", cmd, suit.COMMANDS)
        if cmd in conditions:
            raise FormatError(ErrorCode.MALFORMED, f"condition {cmd} repeated")
        _rep(arg, suit.COMMANDS[cmd])
        conditions.append(cmd)
    if suit.COND_VENDOR_ID not in conditions or suit.COND_CLASS_ID not in conditions:
        raise FormatError(ErrorCode.MALFORMED, "vendor and class conditions are required")
    if (suit.P_USE_BEFORE in params) != (suit.COND_USE_BEFORE in conditions):
        raise FormatError(ErrorCode.MALFORMED, "use-before parameter and condition must pair")
    if (suit.P_VERSION in params) != (suit.COND_VERSION in conditions):
        raise FormatError(ErrorCode.MALFORMED, "version parameter and condition must pair")
    return params


def _sequence(manifest: dict[Any, Any], key: int, what: str) -> list[tuple[Any, Any]] | None:
    raw = manifest.get(key)
    if raw is None:
        return None
    if isinstance(raw, list):
        raise FormatError(ErrorCode.UNSUPPORTED, f"severed {what} is outside the profile")
    return _pairs(loads_nested(_bstr(raw, what), what), what)


def _validate(manifest: dict[Any, Any]) -> Any:
    """validate = [override-parameters, {security counter}, image-match, rep]: the counter."""
    pairs = _sequence(manifest, suit.MAN_VALIDATE, "validate")
    if pairs is None:
        raise FormatError(ErrorCode.MALFORMED, "validate (image-match) is required")
    if [c for c, _ in pairs] != [suit.DIR_OVERRIDE_PARAMETERS, suit.COND_IMAGE_MATCH]:
        raise _seq_error("validate", pairs)
    params = pairs[0][1]
    if not isinstance(params, dict):
        raise FormatError(ErrorCode.MALFORMED, "validate parameters must be a map")
    for key in params:
        if key != suit.P_OTA_SECURITY_COUNTER:
            raise _unknown("validate parameter", key, suit.PARAMETERS)
    if suit.P_OTA_SECURITY_COUNTER not in params:
        raise FormatError(ErrorCode.MALFORMED, "missing parameter(s) ['otaguard-security-counter']")
    _rep(pairs[1][1], "image-match")
    return params[suit.P_OTA_SECURITY_COUNTER]


def _install(manifest: dict[Any, Any]) -> tuple[str | None, Any]:
    """install = [set-parameters, {? uri, ? delta}, (fetch, rep, image-match, rep) iff uri]."""
    pairs = _sequence(manifest, suit.MAN_INSTALL, "install")
    if pairs is None:
        return None, None
    shape = [c for c, _ in pairs]
    params = pairs[0][1]
    if shape[0] != suit.DIR_SET_PARAMETERS or not isinstance(params, dict):
        raise _seq_error("install", pairs)
    for key in params:
        if key not in (suit.P_URI, suit.P_OTA_DELTA):
            raise _unknown("install parameter", key, suit.PARAMETERS)
    if not params:
        raise FormatError(ErrorCode.MALFORMED, "install sets no parameter")
    want = [suit.DIR_SET_PARAMETERS]
    if suit.P_URI in params:
        want += [suit.DIR_FETCH, suit.COND_IMAGE_MATCH]
    if shape != want:
        raise _seq_error("install", pairs)
    for cmd, arg in pairs[1:]:
        _rep(arg, suit.COMMANDS[cmd])
    uri = _tstr(params[suit.P_URI], "uri") if suit.P_URI in params else None
    return uri, params.get(suit.P_OTA_DELTA)


def _legacy_validate(manifest: dict[Any, Any]) -> None:
    """Layout 1: validate = [image-match, rep]."""
    pairs = _sequence(manifest, suit.MAN_VALIDATE, "validate")
    if pairs is None:
        raise FormatError(ErrorCode.MALFORMED, "validate (image-match) is required")
    if len(pairs) != 1 or pairs[0][0] != suit.COND_IMAGE_MATCH:
        raise _seq_error("validate", pairs)
    _rep(pairs[0][1], "image-match")


def _legacy_install(manifest: dict[Any, Any]) -> str | None:
    """Layout 1: install = [set-parameters, {uri}, fetch, rep, image-match, rep] or absent."""
    pairs = _sequence(manifest, suit.MAN_INSTALL, "install")
    if pairs is None:
        return None
    shape = [c for c, _ in pairs]
    if shape != [suit.DIR_SET_PARAMETERS, suit.DIR_FETCH, suit.COND_IMAGE_MATCH]:
        raise _seq_error("install", pairs)
    uri_params = pairs[0][1]
    if not isinstance(uri_params, dict) or set(uri_params) != {suit.P_URI}:
        raise FormatError(ErrorCode.UNSUPPORTED, "install may only set the uri parameter")
    _rep(pairs[1][1], "fetch")
    _rep(pairs[2][1], "image-match")
    return _tstr(uri_params[suit.P_URI], "uri")


def _seq_error(what: str, pairs: list[tuple[Any, Any]]) -> FormatError:
    for cmd, _ in pairs:
        if cmd not in suit.COMMANDS:
            return FormatError(ErrorCode.CRITICAL_UNKNOWN, f"{what}: unknown command {cmd}")
    return FormatError(
        ErrorCode.UNSUPPORTED, f"{what} sequence {[c for c, _ in pairs]} is outside the profile"
    )


def _delta(raw: Any, alg: HashAlg) -> DeltaInfo:
    obj = loads_nested(_bstr(raw, "delta"), "delta")
    if not isinstance(obj, list) or len(obj) != 4:
        raise FormatError(ErrorCode.MALFORMED, "delta must be [base, patch-digest, size, uri]")
    base, patch, size, uri = obj
    for value, what in ((base, "delta base digest"), (patch, "delta patch digest")):
        if not isinstance(value, bytes) or len(value) != HASH_SIZES[alg]:
            raise FormatError(ErrorCode.MALFORMED, f"{what} must be {HASH_SIZES[alg]} bytes")
    if uri is not None:
        _tstr(uri, "delta patch uri")
    return DeltaInfo(base, patch, _uint(size, "delta patch size"), uri)


def decode_text(obj: Any) -> dict[str, str]:
    if not isinstance(obj, dict) or len(obj) != 1:
        raise FormatError(ErrorCode.UNSUPPORTED, "text must hold exactly one language")
    ((lang, top),) = obj.items()
    if not isinstance(lang, str) or not isinstance(top, dict):
        raise FormatError(ErrorCode.MALFORMED, "text map must be {language: {...}}")
    text: dict[str, str] = {}
    for key, value in top.items():
        if key == COMPONENT_ID:
            if not isinstance(value, dict):
                raise FormatError(ErrorCode.MALFORMED, "component text must be a map")
            for ckey, cvalue in value.items():
                if isinstance(ckey, str) and ckey not in TEXT_COMPONENT:
                    name = ckey
                elif isinstance(ckey, int) and ckey in _TEXT_COMPONENT_REV:
                    name = _TEXT_COMPONENT_REV[ckey]
                else:
                    raise _unknown("text component key", ckey, suit.TEXT_COMPONENT_KEYS)
                text[name] = _tstr(cvalue, f"text {name}")
        elif isinstance(key, int) and key in _TEXT_TOP_REV:
            text[_TEXT_TOP_REV[key]] = _tstr(value, "text")
        else:
            raise _unknown("text key", key, suit.TEXT_KEYS)
    return text


def identities(info: ManifestInfo) -> tuple[uuid.UUID, uuid.UUID]:
    return info.vendor_id, info.class_id
