"""The canonical route (manifest/canonical.py) and the byte-fragment encoder it relies on.

Two properties carry the whole design:
- the fragment encoder writes exactly what cbor2 writes for the same structure (checked
  against the structure built as Python objects, the way the profile was first written);
- for ANY input, verify_envelope (canonical route first) answers exactly as verify_strict:
  the same VerifiedManifest, or the same error code. The route only ever accepts.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otaguard import cbor
from otaguard.crypto.algorithms import CoseAlg, HashAlg
from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.errors import ErrorCode, OtaError
from otaguard.manifest import canonical, suit
from otaguard.manifest.build import assemble_envelope, build_envelope, sign_manifest
from otaguard.manifest.model import DeltaInfo, ManifestInfo
from otaguard.manifest.profile import TEXT_COMPONENT, TEXT_TOP, encode_manifest
from otaguard.manifest.verify import (
    decode_pinned,
    decode_pinned_strict,
    verify_envelope,
    verify_strict,
)
from otaguard.manifest.version import parse_version
from otaguard.trust.model import Role, Scope, StaticKeys, TrustedKey
from tests.test_manifest_verify import make_info

ED = SoftwareSigner(generate_private_key("ed25519"), CoseAlg.ED25519)
P256 = SoftwareSigner(generate_private_key("p256"), CoseAlg.ESP256)
KEYS = StaticKeys([ED.public_key, P256.public_key])


# --- the reference encoder: the profile as Python objects, encoded by cbor2 -------------------
def reference_manifest(info: ManifestInfo) -> bytes:
    """The conformant layout (2) built as Python objects and encoded by cbor.dumps."""

    def dig(alg: HashAlg, value: bytes) -> bytes:
        return cbor.dumps([int(alg), value])

    alg = HashAlg(info.digest_alg)
    params: dict[int, Any] = {
        suit.P_VENDOR_ID: info.vendor_id.bytes,
        suit.P_CLASS_ID: info.class_id.bytes,
        suit.P_IMAGE_DIGEST: dig(alg, info.image_digest),
        suit.P_IMAGE_SIZE: info.image_size,
    }
    conditions: list[Any] = [suit.COND_VENDOR_ID, suit.REP_POLICY, suit.COND_CLASS_ID, 15]
    if info.expires is not None:
        params[suit.P_USE_BEFORE] = info.expires
        conditions += [suit.COND_USE_BEFORE, suit.REP_POLICY]
    if info.min_version is not None:
        params[suit.P_VERSION] = cbor.dumps(
            [suit.VERSION_GREATER_EQUAL, list(parse_version(info.min_version))]
        )
        conditions += [suit.COND_VERSION, suit.REP_POLICY]
    common = {
        suit.COMMON_COMPONENTS: [[b"\x00"]],
        suit.COMMON_SHARED_SEQUENCE: cbor.dumps(
            [suit.DIR_OVERRIDE_PARAMETERS, params, *conditions]
        ),
    }
    validate = [
        suit.DIR_OVERRIDE_PARAMETERS,
        {suit.P_OTA_SECURITY_COUNTER: info.security_counter},
        suit.COND_IMAGE_MATCH,
        suit.REP_POLICY,
    ]
    manifest: dict[int, Any] = {
        suit.MAN_VERSION: 1,
        suit.MAN_SEQUENCE: info.sequence_number,
        suit.MAN_COMMON: cbor.dumps(common),
        suit.MAN_SET_VERSION: cbor.dumps(list(parse_version(info.version))),
        suit.MAN_VALIDATE: cbor.dumps(validate),
    }
    install: dict[int, Any] = {}
    if info.uri is not None:
        install[suit.P_URI] = info.uri
    if info.delta is not None:
        d = info.delta
        install[suit.P_OTA_DELTA] = cbor.dumps(
            [d.base_digest, d.patch_digest, d.patch_size, d.patch_uri]
        )
    if install:
        fetch = [suit.DIR_FETCH, 15, 3, 15] if info.uri is not None else []
        manifest[suit.MAN_INSTALL] = cbor.dumps([suit.DIR_SET_PARAMETERS, install, *fetch])
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


u64 = st.integers(0, 2**64 - 1)
versions = st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=8).map(
    lambda p: ".".join(map(str, p))
)
text_keys = st.sampled_from([*TEXT_TOP, *TEXT_COMPONENT]) | st.text(min_size=1, max_size=12)


@st.composite
def infos(draw: st.DrawFn) -> ManifestInfo:
    alg = draw(st.sampled_from(list(HashAlg)))
    size = 32 if alg == HashAlg.SHA256 else 48
    digest = st.binary(min_size=size, max_size=size)
    delta = None
    if draw(st.booleans()):
        delta = DeltaInfo(
            draw(digest),
            draw(digest),
            draw(u64),
            draw(st.none() | st.text(min_size=1, max_size=40)),
        )
    return ManifestInfo(
        sequence_number=draw(u64),
        vendor_id=uuid.UUID(bytes=draw(st.binary(min_size=16, max_size=16))),
        class_id=uuid.UUID(bytes=draw(st.binary(min_size=16, max_size=16))),
        digest_alg=alg,
        image_digest=draw(digest),
        image_size=draw(u64),
        version=draw(versions),
        min_version=draw(st.none() | versions),
        security_counter=draw(u64),
        expires=draw(st.none() | u64),
        uri=draw(st.none() | st.text(min_size=1, max_size=300)),
        text=draw(st.dictionaries(text_keys, st.text(max_size=30), max_size=6)),
        delta=delta,
    )


@settings(max_examples=300, deadline=None)
@given(infos())
def test_fragment_encoder_matches_cbor2(info: ManifestInfo) -> None:
    assert encode_manifest(info) == reference_manifest(info)


@settings(max_examples=200, deadline=None)
@given(infos())
def test_canonical_route_reads_back_every_profile_manifest(info: ManifestInfo) -> None:
    raw = encode_manifest(info)
    assert canonical.manifest_info(raw) == info


def outcome(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except OtaError as err:
        return err.code


@pytest.mark.parametrize("signers", [[ED], [P256], [ED, P256]], ids=["ed25519", "p256", "both"])
def test_canonical_route_is_taken_and_agrees(signers: list[SoftwareSigner]) -> None:
    env = build_envelope(make_info(), signers)
    fast = canonical.verify(env, KEYS, None)
    assert fast is not None  # our own envelopes never need the strict route
    strict = verify_strict(env, KEYS)
    assert (fast.info, fast.digest, fast.signers) == (
        strict.info,
        strict.manifest_digest,
        strict.signers,
    )
    assert verify_envelope(env, KEYS) == strict
    assert canonical.decode_pinned(env) is not None
    assert decode_pinned(env) == decode_pinned_strict(env)


def test_route_defers_every_rejection() -> None:
    """Each attack: the canonical route declines (None) and the strict route names the code."""
    info = make_info()
    env = build_envelope(info, [ED])
    other = SoftwareSigner(generate_private_key("ed25519"), CoseAlg.ED25519)
    scoped = TrustedKey(ED.public_key, frozenset(Role), (Scope(uuid.uuid4()),), 0, 2**62)

    class Scoped(StaticKeys):
        def resolve(
            self, kid: bytes | None, alg: CoseAlg, role: Role, now: int | None
        ) -> TrustedKey:
            super().resolve(kid, alg, role, now)
            return scoped

    tampered = bytearray(env)
    tampered[-5] ^= 1  # inside the manifest (text): digest no longer matches
    cases = [
        (bytes(tampered), KEYS, ErrorCode.DIGEST),
        (env, StaticKeys([other.public_key]), ErrorCode.UNTRUSTED_KEY),
        (build_envelope(info, [ED]), StaticKeys([ED.public_key], threshold=2), ErrorCode.THRESHOLD),
        (env, Scoped([ED.public_key]), ErrorCode.KEY_SCOPE),
    ]
    sig = bytearray(env)
    block_at = env.index(ED.public_key.key_id) + len(ED.public_key.key_id) + 3  # f6 58 40
    sig[block_at] ^= 0x80
    cases.append((bytes(sig), KEYS, ErrorCode.SIGNATURE))
    for data, keys, code in cases:
        assert canonical.verify(data, keys, None) is None
        assert outcome(verify_envelope, data, keys) == code
        assert outcome(verify_strict, data, keys) == code


def _variants(info: ManifestInfo) -> dict[str, bytes]:
    """Envelopes a strict SUIT reader accepts or rejects on its own terms but that are not
    byte-for-byte what otaguard writes; signed with a trusted key so only the form differs."""
    manifest = encode_manifest(info)
    payload = cbor.dumps([int(HashAlg.SHA256), hashlib.sha256(cbor.dumps(manifest)).digest()])
    good = sign_manifest(manifest, [ED])
    auth = cbor2.loads(good).value[suit.ENV_AUTH]
    blocks = cbor2.loads(auth)[1:]
    out = {
        # envelope members in the other order (cbor2 keeps insertion order when not canonical)
        "members reordered": cbor2.dumps(
            cbor2.CBORTag(107, {suit.ENV_MANIFEST: manifest, suit.ENV_AUTH: auth})
        ),
        # the digest's length written in two bytes (a non-minimal head) inside the wrapper
        "non-minimal head": cbor2.dumps(
            cbor2.CBORTag(
                107,
                {
                    suit.ENV_AUTH: b"\x82\x59\x00" + auth[2:],
                    suit.ENV_MANIFEST: manifest,
                },
            )
        ),
        "unsigned": assemble_envelope(manifest, payload, []),
        "untagged": cbor2.dumps({suit.ENV_AUTH: auth, suit.ENV_MANIFEST: manifest}),
    }
    # a manifest key the profile does not know, properly signed
    extra = cbor2.loads(manifest)
    extra[99] = 1
    out["unknown manifest key"] = sign_manifest(cbor.dumps(extra), [ED])
    # the manifest body in non-canonical key order, properly signed
    body = cbor2.loads(manifest)
    out["manifest keys reversed"] = sign_manifest(
        cbor2.dumps(dict(reversed(list(body.items())))), [ED]
    )
    # COSE_Sign1 with the payload embedded instead of detached
    block = cbor2.loads(blocks[0])
    prot, unprot, _, signature = block.value
    embedded = cbor2.dumps(cbor2.CBORTag(18, [prot, dict(unprot), payload, signature]))
    out["embedded payload"] = assemble_envelope(manifest, payload, [embedded])
    assert good not in out.values()
    return out


@pytest.mark.parametrize("name", list(_variants(make_info())))
def test_non_canonical_forms_go_to_the_strict_route(name: str) -> None:
    data = _variants(make_info())[name]
    assert canonical.verify(data, KEYS, None) is None
    assert outcome(verify_envelope, data, KEYS) == outcome(verify_strict, data, KEYS)


ENVELOPES = [
    build_envelope(make_info(), [ED]),
    build_envelope(make_info(expires=None, min_version=None, uri=None, text={}), [P256]),
]


def _mutate(draw: st.DrawFn, original: bytes) -> bytes:
    """One to three byte-level edits: flip a bit, set, insert or delete a byte."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data.insert(pos, draw(st.integers(0, 255)))
        elif len(data) > 1:
            del data[pos]
    return bytes(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    return _mutate(draw, draw(st.sampled_from(ENVELOPES)))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_both_routes_answer_alike_on_mutations(data: bytes) -> None:
    assert outcome(verify_envelope, data, KEYS) == outcome(verify_strict, data, KEYS)
    assert outcome(decode_pinned, data) == outcome(decode_pinned_strict, data)


@settings(max_examples=200, deadline=None)
@given(infos())
def test_both_routes_answer_alike_on_any_profile_manifest(info: ManifestInfo) -> None:
    """Whatever the field values (out-of-scope ids, huge counters, odd text), same answer."""
    env = build_envelope(info, [ED])
    assert outcome(verify_envelope, env, KEYS) == outcome(verify_strict, env, KEYS)


# --- the body reader: exactly the encoder's output, nothing else --------------------------------
@st.composite
def mutated_manifests(draw: st.DrawFn) -> bytes:
    return _mutate(draw, encode_manifest(draw(infos())))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_manifests())
def test_body_reader_accepts_only_what_the_encoder_writes(raw: bytes) -> None:
    """A mutated manifest is either declined or is itself the encoding of what was read (a
    mutation inside a value, such as a digest byte or a text character, can be)."""
    info = canonical.manifest_info(raw)
    if info is not None:
        assert encode_manifest(info) == raw


def _tweaked(change: Any) -> bytes:
    """make_info()'s manifest with one layer decoded, changed by ``change`` and re-encoded
    canonically: values the encoder refuses to write (it validates first), in a correct form."""
    manifest = cbor2.loads(encode_manifest(make_info()))
    common = cbor2.loads(manifest[suit.MAN_COMMON])
    shared = cbor2.loads(common[suit.COMMON_SHARED_SEQUENCE])
    layers = {
        "manifest": manifest,
        "params": shared[1],
        "install": cbor2.loads(manifest[suit.MAN_INSTALL]),
        "validate": cbor2.loads(manifest[suit.MAN_VALIDATE]),
        "text": cbor2.loads(manifest[suit.MAN_TEXT]),
    }
    change(layers)
    manifest[suit.MAN_VALIDATE] = cbor.dumps(layers["validate"])
    common[suit.COMMON_SHARED_SEQUENCE] = cbor.dumps(shared)
    manifest[suit.MAN_COMMON] = cbor.dumps(common)
    manifest[suit.MAN_INSTALL] = cbor.dumps(layers["install"])
    manifest[suit.MAN_TEXT] = cbor.dumps(layers["text"])
    return cbor.dumps(manifest)


def _set(layer: str, key: Any, value: Any) -> Any:
    def change(layers: dict[str, Any]) -> None:
        target = layers[layer]
        if layer in ("install", "validate"):
            target = target[1]
        elif layer == "text":
            target = target["en"][(b"\x00",)]
        target[key] = value

    return change


def _version(parts: list[Any]) -> Any:
    return _set("manifest", suit.MAN_SET_VERSION, cbor.dumps(parts))


OUT_OF_PROFILE = {
    "uri longer than 1024 bytes": _set("install", suit.P_URI, "h" * 1025),
    "empty uri": _set("install", suit.P_URI, ""),
    "text value longer than 1024 bytes": _set("text", 2, "x" * 1025),
    "17 text entries": lambda layers: layers["text"]["en"][(b"\x00",)].update(
        {f"k{i}": "v" for i in range(17)}
    ),
    "empty text key": _set("text", "", "v"),
    "labelled text under its name": _set("text", "model", "x"),
    "version of 9 components": _version([1] * 9),
    "empty version": _version([]),
    "version component 2**32": _version([1, 2**32]),
    "min version component 2**32": _set(
        "params", suit.P_VERSION, cbor.dumps([suit.VERSION_GREATER_EQUAL, [2**32]])
    ),
    "31-byte image digest": _set(
        "params", suit.P_IMAGE_DIGEST, cbor.dumps([int(HashAlg.SHA256), bytes(31)])
    ),
    "sequence number 2**64 (bignum)": _set("manifest", suit.MAN_SEQUENCE, 2**64),
    "negative image size": _set("params", suit.P_IMAGE_SIZE, -1),
    "counter as true": _set("validate", suit.P_OTA_SECURITY_COUNTER, True),
    "expiry as float": _set("params", suit.P_USE_BEFORE, 1.5),
}


@pytest.mark.parametrize("name", list(OUT_OF_PROFILE))
def test_values_the_encoder_refuses_are_declined(name: str) -> None:
    """Canonically encoded and properly signed, but outside the profile's ranges: the body
    reader declines, and the answer (here always a rejection) comes from the strict route."""
    raw = _tweaked(OUT_OF_PROFILE[name])
    assert raw != encode_manifest(make_info())
    assert canonical.manifest_info(raw) is None
    env = sign_manifest(raw, [ED])
    answer = outcome(verify_envelope, env, KEYS)
    assert answer == outcome(verify_strict, env, KEYS)
    assert isinstance(answer, ErrorCode)


def test_the_unchanged_tweak_is_accepted() -> None:
    """The control for the test above: the same re-encoding with nothing changed is read."""
    raw = _tweaked(lambda layers: None)
    assert raw == encode_manifest(make_info())
    assert canonical.manifest_info(raw) == make_info()


def test_text_keys_out_of_order_are_declined() -> None:
    """The text map's keys in reverse order (cbor2 keeps insertion order when not canonical):
    same content, another encoding. The body reader declines it; the strict route decides."""
    info = make_info(text={"description": "d", "model": "m", "hw_rev": "r", "zz-extra": "x"})
    manifest = cbor2.loads(encode_manifest(info))
    text = cbor2.loads(manifest[suit.MAN_TEXT])
    component = text["en"][(b"\x00",)]
    reversed_component = dict(reversed(list(component.items())))
    for layer in (
        {"en": {**text["en"], (b"\x00",): reversed_component}},
        {"en": dict(reversed(list(text["en"].items())))},
    ):
        manifest[suit.MAN_TEXT] = cbor2.dumps(layer)
        raw = cbor2.dumps(manifest)
        assert raw != encode_manifest(info)
        assert canonical.manifest_info(raw) is None
        env = sign_manifest(raw, [ED])
        assert outcome(verify_envelope, env, KEYS) == outcome(verify_strict, env, KEYS)
    manifest[suit.MAN_TEXT] = cbor2.dumps(text)  # the control: canonical again, and read
    assert canonical.manifest_info(cbor2.dumps(manifest)) == info
