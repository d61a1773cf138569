"""Test-only encoder of manifest layout 1 (legacy), as otaguard wrote it before the conformant
layout: the security counter (-257) and the delta (-258) as custom parameters in the shared
sequence. Devices in the field hold envelopes in this layout and must keep accepting them for
the transition period (docs/formats.md, "Migration from layout 1"); nothing in src/ writes it.
"""

from __future__ import annotations

from typing import Any

from otaguard import cbor
from otaguard.crypto.algorithms import HashAlg
from otaguard.manifest import suit
from otaguard.manifest.profile import TEXT_COMPONENT, TEXT_TOP
from otaguard.manifest.version import parse_version


def legacy_manifest(info: Any) -> bytes:
    """``info`` (a ManifestInfo) as a layout-1 SUIT_Manifest."""
    alg = HashAlg(info.digest_alg)
    params: dict[int, Any] = {
        suit.P_VENDOR_ID: info.vendor_id.bytes,
        suit.P_CLASS_ID: info.class_id.bytes,
        suit.P_IMAGE_DIGEST: cbor.dumps([int(alg), info.image_digest]),
        suit.P_IMAGE_SIZE: info.image_size,
        suit.P_OTA_SECURITY_COUNTER: info.security_counter,
    }
    conditions: list[Any] = [suit.COND_VENDOR_ID, 15, suit.COND_CLASS_ID, 15]
    if info.expires is not None:
        params[suit.P_USE_BEFORE] = info.expires
        conditions += [suit.COND_USE_BEFORE, 15]
    if info.min_version is not None:
        params[suit.P_VERSION] = cbor.dumps(
            [suit.VERSION_GREATER_EQUAL, list(parse_version(info.min_version))]
        )
        conditions += [suit.COND_VERSION, 15]
    if info.delta is not None:
        d = info.delta
        params[suit.P_OTA_DELTA] = cbor.dumps(
            [d.base_digest, d.patch_digest, d.patch_size, d.patch_uri]
        )
    common = {
        suit.COMMON_COMPONENTS: [[b"\x00"]],
        suit.COMMON_SHARED_SEQUENCE: cbor.dumps(
            [suit.DIR_OVERRIDE_PARAMETERS, params, *conditions]
        ),
    }
    manifest: dict[int, Any] = {
        suit.MAN_VERSION: 1,
        suit.MAN_SEQUENCE: info.sequence_number,
        suit.MAN_COMMON: cbor.dumps(common),
        suit.MAN_SET_VERSION: cbor.dumps(list(parse_version(info.version))),
        suit.MAN_VALIDATE: cbor.dumps([suit.COND_IMAGE_MATCH, 15]),
    }
    if info.uri is not None:
        manifest[suit.MAN_INSTALL] = cbor.dumps(
            [suit.DIR_SET_PARAMETERS, {suit.P_URI: info.uri}, suit.DIR_FETCH, 15, 3, 15]
        )
    if info.text:
        top: dict[Any, Any] = {}
        comp: dict[Any, str] = {}
        for key, value in info.text.items():
            if key in TEXT_TOP:
                top[TEXT_TOP[key]] = value
            else:
                comp[TEXT_COMPONENT.get(key, key)] = value
        if comp:
            top[(b"\x00",)] = comp
        manifest[suit.MAN_TEXT] = cbor.dumps({"en": top})
    return cbor.dumps(manifest)
