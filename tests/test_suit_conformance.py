"""Every envelope otaguard can produce follows draft-ietf-suit-manifest (issue 18).

The rules checked, on the raw bytes, with code of their own (not otaguard's decoder):

* the shared sequence holds only conditions and the draft's shared commands
  (set-component-index, run-sequence, try-each, override-parameters): no custom command
  (negative number), and no custom parameter (negative key) in any parameter map there
  ("suit-parameter-custom ... MUST NOT be used in the shared sequence");
* custom parameters, where otaguard has them, are private-use (< -255) and sit in a component
  sequence (validate, install);
* every map, at every nesting level (envelope, authentication wrapper, COSE headers, manifest,
  common, sequences, parameter values, text), is in RFC 8949 §4.2.1 core deterministic order:
  re-encoding each document with the independent encoder below gives the same bytes;
* the required elements are there: tag 107, authentication wrapper with a SUIT_Digest and at
  least one COSE_Sign1, manifest version 1, sequence number, common with components, vendor
  and class conditions in the shared sequence, validate;
* pycose (an independent COSE implementation) verifies every EdDSA/ES256 signature over the
  SUIT_Digest, and the digest matches the manifest bstr.

The envelopes: every builder in src/ (build_envelope via the device Lab, the simulator's
release set, the signing service, the `device provision` factory manifest, bench/manifest.py)
with full and delta releases, both digest algorithms, Ed25519/EdDSA and P-256 (ESP256/ES256)
keys and several signers, plus random ManifestInfo values through the encoder.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from pycose.headers import Algorithm
from pycose.messages import Sign1Message

from otaguard.crypto.algorithms import CoseAlg, HashAlg
from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.device.lab import Lab, image_bytes
from otaguard.manifest import suit
from otaguard.manifest.build import build_envelope, sign_manifest
from otaguard.manifest.model import DeltaInfo, ManifestInfo
from otaguard.manifest.profile import encode_manifest
from tests.suit_legacy import legacy_manifest
from tests.test_cose_interop import _pycose_key
from tests.test_manifest_canonical import infos

# draft-ietf-suit-manifest SUIT_Shared_Commands; every SUIT_Condition is allowed as well.
SHARED_COMMANDS = {
    suit.DIR_SET_COMPONENT_INDEX,
    suit.DIR_RUN_SEQUENCE,
    suit.DIR_TRY_EACH,
    suit.DIR_OVERRIDE_PARAMETERS,
}
CONDITIONS = {
    suit.COND_VENDOR_ID,
    suit.COND_CLASS_ID,
    suit.COND_IMAGE_MATCH,
    suit.COND_USE_BEFORE,
    suit.COND_COMPONENT_SLOT,
    suit.COND_CHECK_CONTENT,
    suit.COND_ABORT,
    suit.COND_DEVICE_ID,
    suit.COND_IMAGE_NOT_MATCH,
    suit.COND_MINIMUM_BATTERY,
    suit.COND_UPDATE_AUTHORIZED,
    suit.COND_VERSION,
}
PARAMETER_COMMANDS = {suit.DIR_SET_PARAMETERS, suit.DIR_OVERRIDE_PARAMETERS}
PRIVATE_USE_BELOW = -255


# --- an independent RFC 8949 §4.2.1 core deterministic encoder -------------------------------
def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for size, info in ((1, 24), (2, 25), (4, 26), (8, 27)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | info]) + n.to_bytes(size, "big")
    raise AssertionError("integer too large for a head")


def core(obj: Any) -> bytes:
    if obj is None:
        return b"\xf6"
    if obj is True or obj is False:
        return b"\xf5" if obj else b"\xf4"
    if isinstance(obj, int):
        return _head(0, obj) if obj >= 0 else _head(1, -1 - obj)
    if isinstance(obj, bytes):
        return _head(2, len(obj)) + obj
    if isinstance(obj, str):
        raw = obj.encode()
        return _head(3, len(raw)) + raw
    if isinstance(obj, list | tuple):
        return _head(4, len(obj)) + b"".join(core(x) for x in obj)
    if isinstance(obj, dict | cbor2.frozendict):
        pairs = sorted((core(k), core(v)) for k, v in obj.items())  # bytewise by encoded key
        return _head(5, len(pairs)) + b"".join(k + v for k, v in pairs)
    if isinstance(obj, cbor2.CBORTag):
        return _head(6, obj.tag) + core(obj.value)
    raise AssertionError(f"unexpected CBOR value {obj!r}")


def test_core_encoder_orders_bytewise_not_length_first() -> None:
    # 24 encodes as 0x1818, -1 as 0x20: bytewise puts 24 first, length-first would not.
    assert core({-1: 0, 24: 0}) == bytes.fromhex("a21818002000")
    assert core({-257: 1, 3: 2}) == bytes.fromhex("a2030239010001")


def doc(raw: bytes) -> Any:
    """Decode one nested document and hold it to core deterministic encoding."""
    obj = cbor2.loads(raw)
    assert core(obj) == raw, f"not core deterministic: {raw.hex()}"
    return obj


# --- the rules --------------------------------------------------------------------------------
def _pairs(seq: Any) -> list[tuple[Any, Any]]:
    assert isinstance(seq, list | tuple) and seq and len(seq) % 2 == 0
    return [(seq[i], seq[i + 1]) for i in range(0, len(seq), 2)]


def _parameter_values(params: Any) -> None:
    """Parameter values that are bstr-wrapped CBOR are documents too (digest, version, delta)."""
    for key in (suit.P_IMAGE_DIGEST, suit.P_VERSION, suit.P_OTA_DELTA):
        if key in params:
            doc(params[key])


def check_shared_sequence(raw: bytes) -> set[int]:
    """The draft's shared-sequence rules; returns the conditions it holds."""
    seen: set[int] = set()
    for cmd, arg in _pairs(doc(raw)):
        assert isinstance(cmd, int) and cmd >= 0, f"custom command {cmd} in the shared sequence"
        assert cmd in SHARED_COMMANDS | CONDITIONS, f"command {cmd} not allowed in shared"
        if cmd == suit.DIR_OVERRIDE_PARAMETERS:
            custom = [k for k in arg if not isinstance(k, int) or k < 0]
            assert not custom, f"custom parameter(s) {custom} in the shared sequence"
            _parameter_values(arg)
        if cmd == suit.DIR_RUN_SEQUENCE:
            seen |= check_shared_sequence(arg)
        if cmd in CONDITIONS:
            seen.add(cmd)
    return seen


def check_command_sequence(raw: bytes) -> None:
    """A component command sequence: custom parameters allowed, private-use numbers only."""
    for cmd, arg in _pairs(doc(raw)):
        assert isinstance(cmd, int)
        if cmd in PARAMETER_COMMANDS:
            for key in arg:
                assert key >= 0 or key < PRIVATE_USE_BELOW, f"parameter {key} is not private-use"
            _parameter_values(arg)


def check_envelope(data: bytes) -> dict[int, Any]:
    """Assert every rule on one envelope; returns the decoded manifest."""
    outer = doc(data)
    assert isinstance(outer, cbor2.CBORTag) and outer.tag == suit.TAG_ENVELOPE
    env = outer.value
    assert set(env) == {suit.ENV_AUTH, suit.ENV_MANIFEST}
    auth = doc(env[suit.ENV_AUTH])
    assert len(auth) >= 2, "at least one authentication block"
    alg, digest = doc(auth[0])
    manifest_bstr = core(env[suit.ENV_MANIFEST])
    hashes = {int(HashAlg.SHA256): hashlib.sha256, int(HashAlg.SHA384): hashlib.sha384}
    assert hashes[alg](manifest_bstr).digest() == digest
    for block in auth[1:]:
        sign1 = doc(block)
        assert isinstance(sign1, cbor2.CBORTag) and sign1.tag == suit.TAG_SIGN1
        protected, unprotected, payload, _sig = sign1.value
        assert set(doc(protected)) == {1} and set(unprotected) == {4} and payload is None

    manifest = doc(env[suit.ENV_MANIFEST])
    assert manifest[suit.MAN_VERSION] == 1
    assert isinstance(manifest[suit.MAN_SEQUENCE], int) and manifest[suit.MAN_SEQUENCE] >= 0
    assert suit.MAN_VALIDATE in manifest
    common = doc(manifest[suit.MAN_COMMON])
    assert common[suit.COMMON_COMPONENTS]
    conditions = check_shared_sequence(common[suit.COMMON_SHARED_SEQUENCE])
    assert {suit.COND_VENDOR_ID, suit.COND_CLASS_ID} <= conditions
    for key in suit.COMMAND_SEQUENCES & set(manifest):
        check_command_sequence(manifest[key])
    doc(manifest[suit.MAN_SET_VERSION])
    if suit.MAN_TEXT in manifest:
        doc(manifest[suit.MAN_TEXT])
    return dict(manifest)


def check_signatures(data: bytes, keys: dict[bytes, Any]) -> int:
    """pycose verifies each EdDSA/ES256 block over the SUIT_Digest; returns how many."""
    auth = cbor2.loads(cbor2.loads(data).value[suit.ENV_AUTH])
    checked = 0
    for block in auth[1:]:
        tag = cbor2.loads(block)
        arr = [dict(x) if isinstance(x, cbor2.frozendict) else x for x in tag.value]
        if cbor2.loads(arr[0])[1] not in (CoseAlg.EDDSA, CoseAlg.ES256):
            continue  # pycose 1.1 does not know -19/-9 (tests/test_cose_interop.py)
        kid = arr[1][4]
        msg = Sign1Message.from_cose_obj(arr, True)
        msg.key = _pycose_key(keys[kid])
        assert msg.get_attr(Algorithm) is not None
        assert msg.verify_signature(detached_payload=auth[0])
        checked += 1
    return checked


# --- every envelope the project produces -----------------------------------------------------
def _signer(kind: str, alg: CoseAlg) -> SoftwareSigner:
    return SoftwareSigner(generate_private_key(kind), alg)  # type: ignore[arg-type]


SIGNERS = {
    "ed25519": _signer("ed25519", CoseAlg.ED25519),
    "eddsa": _signer("ed25519", CoseAlg.EDDSA),
    "esp256": _signer("p256", CoseAlg.ESP256),
    "es256": _signer("p256", CoseAlg.ES256),
}
KEYS = {s.public_key.key_id: s.public_key for s in SIGNERS.values()}
V1 = image_bytes(5000, 1)
V2 = image_bytes(6000, 2)


def _info(alg: HashAlg, **kw: Any) -> ManifestInfo:
    h = hashlib.sha256 if alg == HashAlg.SHA256 else hashlib.sha384
    base = ManifestInfo(
        sequence_number=1_800_000_000,
        vendor_id=uuid.uuid5(uuid.NAMESPACE_DNS, "hvac.example.com"),
        class_id=uuid.uuid4(),
        digest_alg=alg,
        image_digest=h(V2).digest(),
        image_size=len(V2),
        version="2.1.0",
        min_version="2.0.0",
        security_counter=7,
        expires=1_900_000_000,
        uri="https://fw.example.com/ctl-9/2.1.0.bin",
        text={"model": "ctl-9", "hw_rev": "rev-b", "description": "d", "build": "x"},
    )
    return replace(base, **kw)


def _delta(alg: HashAlg, uri: str | None) -> DeltaInfo:
    h = hashlib.sha256 if alg == HashAlg.SHA256 else hashlib.sha384
    return DeltaInfo(h(V1).digest(), h(b"patch").digest(), 5, uri)


def produced() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for alg in HashAlg:
        for name, signer in SIGNERS.items():
            a = alg.name.lower()
            out[f"full/{a}/{name}"] = build_envelope(_info(alg), [signer])
            out[f"delta/{a}/{name}"] = build_envelope(
                _info(alg, delta=_delta(alg, "https://fw.example.com/p")), [signer]
            )
        out[f"minimal/{a}"] = build_envelope(
            _info(alg, min_version=None, expires=None, uri=None, text={}), [SIGNERS["eddsa"]]
        )
        out[f"delta-no-uri/{a}"] = build_envelope(
            _info(alg, uri=None, delta=_delta(alg, None)), [SIGNERS["es256"]]
        )
        out[f"multi-signer/{a}"] = build_envelope(_info(alg), list(SIGNERS.values()))
    lab = Lab(kind="p256")
    out["lab/release"] = lab.release(V2, version="2.0.0", seq=2, counter=2)
    out["lab/delta"] = lab.delta_release(V1, V2, b"patch", version="2.0.0", seq=2, counter=2)
    return out


PRODUCED = produced()


@pytest.mark.parametrize("name", sorted(PRODUCED))
def test_every_built_envelope_is_conformant(name: str) -> None:
    check_envelope(PRODUCED[name])
    if not name.startswith("lab/"):
        assert check_signatures(PRODUCED[name], KEYS) >= ("eddsa" in name or "es256" in name)


def test_multi_signer_envelopes_verify_with_pycose() -> None:
    assert check_signatures(PRODUCED["multi-signer/sha256"], KEYS) == 2  # EdDSA and ES256


def test_simulator_releases_are_conformant(tmp_path: Path) -> None:
    from otaguard.sim.world import make_keys, make_releases

    keys = make_keys(tmp_path, rotation=True, mode="software")
    rel = make_releases(keys, 4096, 1, 1_800_000_000)
    for data in (rel.factory_manifest, rel.new_manifest, rel.delta_manifest, rel.other_manifest):
        check_envelope(data)


def test_signing_service_releases_are_conformant(tmp_path: Path) -> None:
    from tests.test_signing_service import CI, Env, make_request

    env = Env(tmp_path)
    full = env.service.sign_release(make_request(), CI)
    check_envelope(full.envelope)
    delta = env.service.sign_release(
        make_request(
            delta_base_digest=b"\x01" * 32,
            delta_patch_digest=b"\x02" * 32,
            delta_patch_size=100,
            delta_patch_uri="https://u.example.com/p",
        ),
        CI,
    )
    manifest = check_envelope(delta.envelope)
    assert suit.MAN_INSTALL in manifest


def test_bench_envelope_is_conformant() -> None:
    from bench.manifest import our_envelope

    check_envelope(our_envelope()[0])


@settings(max_examples=150, deadline=None)
@given(infos())
def test_random_manifests_are_conformant(info: ManifestInfo) -> None:
    check_envelope(build_envelope(info, [SIGNERS["ed25519"]]))


def test_the_checker_refuses_the_legacy_layout() -> None:
    """The control: layout 1 (custom parameters in the shared sequence) fails the rules."""
    legacy = sign_manifest(legacy_manifest(_info(HashAlg.SHA256)), [SIGNERS["eddsa"]])
    with pytest.raises(AssertionError, match="custom parameter"):
        check_envelope(legacy)


def test_the_checker_refuses_length_first_order() -> None:
    """The control for the order check: {24: .., -1: ..} written length-first is refused."""
    length_first = cbor2.dumps({24: 0, -1: 0}, canonical=True)
    assert length_first == bytes.fromhex("a22000181800")
    with pytest.raises(AssertionError, match="not core deterministic"):
        doc(length_first)


def test_the_encoder_writes_no_custom_parameter_in_shared() -> None:
    manifest = cbor2.loads(
        encode_manifest(_info(HashAlg.SHA256, delta=_delta(HashAlg.SHA256, None)))
    )
    common = cbor2.loads(manifest[suit.MAN_COMMON])
    shared = cbor2.loads(common[suit.COMMON_SHARED_SEQUENCE])
    assert all(k >= 0 for k in shared[1])
    validate = cbor2.loads(manifest[suit.MAN_VALIDATE])
    assert validate[1] == {suit.P_OTA_SECURITY_COUNTER: 7}
    install = cbor2.loads(manifest[suit.MAN_INSTALL])
    assert set(install[1]) == {suit.P_URI, suit.P_OTA_DELTA}
