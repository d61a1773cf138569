"""Builder round trips and every rejection path of the verifier, by exact error code."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import replace
from typing import Any

import pytest

from otaguard import cbor
from otaguard.crypto.algorithms import CoseAlg, HashAlg
from otaguard.crypto.cose import sign1
from otaguard.crypto.keys import PublicKey
from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.errors import ErrorCode, OtaError, TrustError
from otaguard.manifest import suit
from otaguard.manifest.build import (
    assemble_envelope,
    build_envelope,
    build_unsigned,
    manifest_digest,
    sign_manifest,
)
from otaguard.manifest.ids import class_id, vendor_id
from otaguard.manifest.model import DeltaInfo, ManifestInfo
from otaguard.manifest.profile import encode_manifest
from otaguard.manifest.verify import authenticate_envelope, verify_envelope
from otaguard.trust.model import Role, Scope, StaticKeys, TrustedKey

VENDOR = vendor_id("acme.example")
CLASS = class_id(VENDOR, "sensor", "r2")


def make_info(**kw: Any) -> ManifestInfo:
    base = ManifestInfo(
        sequence_number=7,
        vendor_id=VENDOR,
        class_id=CLASS,
        digest_alg=HashAlg.SHA256,
        image_digest=hashlib.sha256(b"firmware").digest(),
        image_size=123456,
        version="1.4.2",
        min_version="1.2.0",
        security_counter=3,
        expires=1_900_000_000,
        uri="https://updates.acme.example/fw/sensor/r2/1.4.2.bin",
        text={"model": "sensor", "hw_rev": "r2"},
    )
    return replace(base, **kw)


def signer(kind: str = "ed25519", alg: CoseAlg | None = None) -> SoftwareSigner:
    return SoftwareSigner(generate_private_key(kind), alg)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ed() -> SoftwareSigner:
    return signer("ed25519")


@pytest.fixture(scope="module")
def ed2() -> SoftwareSigner:
    return signer("ed25519")


def code_of(fn: Any, *args: Any, **kw: Any) -> ErrorCode:
    with pytest.raises(OtaError) as exc:
        fn(*args, **kw)
    return exc.value.code


# --- round trips --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "alg"),
    [
        ("ed25519", CoseAlg.ED25519),
        ("ed25519", CoseAlg.EDDSA),
        ("p256", CoseAlg.ESP256),
        ("p256", CoseAlg.ES256),
    ],
)
def test_round_trip_all_algorithms(kind: str, alg: CoseAlg) -> None:
    s = signer(kind, alg)
    info = make_info()
    env = build_envelope(info, [s])
    vm = verify_envelope(env, StaticKeys([s.public_key]), now=1_800_000_000)
    assert vm.info == info
    assert vm.envelope == env
    assert [t.key for t in vm.signers] == [s.public_key]
    block = cbor.loads(cbor.loads(cbor.loads(env).value[suit.ENV_AUTH])[1])
    assert cbor.loads(block.value[0]) == {1: int(alg)}
    assert block.value[2] is None  # detached payload


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"min_version": None, "expires": None, "uri": None, "text": {}},
        {"digest_alg": HashAlg.SHA384, "image_digest": hashlib.sha384(b"x").digest()},
        {
            "delta": DeltaInfo(
                hashlib.sha256(b"old").digest(), hashlib.sha256(b"patch").digest(), 999, None
            )
        },
        {
            "delta": DeltaInfo(
                hashlib.sha256(b"old").digest(),
                hashlib.sha256(b"patch").digest(),
                4096,
                "https://updates.acme.example/fw/p.bin",
            ),
            "text": {"description": "d", "model": "m", "hw_rev": "r", "custom": "x"},
        },
        {"sequence_number": 2**63, "security_counter": 0, "image_size": 0, "version": "2"},
    ],
)
def test_round_trip_profile_variants(ed: SoftwareSigner, changes: dict[str, Any]) -> None:
    info = make_info(**changes)
    env = build_envelope(info, [ed])
    assert verify_envelope(env, StaticKeys([ed.public_key])).info == info
    # deterministic: same info, same manifest bytes
    assert encode_manifest(info) == encode_manifest(info)


def test_size_target(ed: SoftwareSigner) -> None:
    assert len(build_envelope(make_info(), [ed])) <= 400


def test_two_signers_threshold(ed: SoftwareSigner, ed2: SoftwareSigner) -> None:
    info = make_info()
    keys = StaticKeys([ed.public_key, ed2.public_key], threshold=2)
    vm = verify_envelope(build_envelope(info, [ed, ed2]), keys)
    assert {t.key for t in vm.signers} == {ed.public_key, ed2.public_key}
    assert code_of(verify_envelope, build_envelope(info, [ed]), keys) == ErrorCode.THRESHOLD
    # the same key twice is one signer
    assert code_of(verify_envelope, build_envelope(info, [ed, ed]), keys) == ErrorCode.THRESHOLD


def test_one_good_signature_among_bad_ones_is_enough(
    ed: SoftwareSigner, ed2: SoftwareSigner
) -> None:
    env = build_envelope(make_info(), [ed2, ed])  # ed2 unknown to the resolver
    vm = verify_envelope(env, StaticKeys([ed.public_key]))
    assert [t.key for t in vm.signers] == [ed.public_key]


# --- envelope-shape negatives --------------------------------------------------------------
def test_truncated(ed: SoftwareSigner) -> None:
    env = build_envelope(make_info(), [ed])
    for cut in (1, 10, len(env) // 2, len(env) - 1):
        assert code_of(verify_envelope, env[:cut], StaticKeys([ed.public_key])) == (
            ErrorCode.MALFORMED
        )
    assert code_of(verify_envelope, b"", StaticKeys([ed.public_key])) == ErrorCode.MALFORMED


def test_wrong_tags(ed: SoftwareSigner) -> None:
    env = build_envelope(make_info(), [ed])
    keys = StaticKeys([ed.public_key])
    assert env[:2] == b"\xd8\x6b"
    assert code_of(verify_envelope, b"\xd8\x6a" + env[2:], keys) == ErrorCode.MALFORMED
    assert code_of(verify_envelope, env[2:], keys) == ErrorCode.MALFORMED  # untagged
    assert authenticate_envelope(env[2:], keys).tagged is False  # generic layer allows it
    # COSE_Sign1 without its tag 18
    outer = cbor.loads(env).value
    auth = cbor.loads(outer[suit.ENV_AUTH])
    untagged = cbor.dumps(cbor.loads(auth[1]).value)
    env2 = assemble_envelope(outer[suit.ENV_MANIFEST], auth[0], [untagged])
    assert code_of(verify_envelope, env2, keys) == ErrorCode.MALFORMED
    # COSE_Mac0 (tag 17) instead of a signature
    mac = cbor.dumps(cbor.Tag(17, cbor.loads(auth[1]).value))
    env3 = assemble_envelope(outer[suit.ENV_MANIFEST], auth[0], [mac])
    assert code_of(verify_envelope, env3, keys) == ErrorCode.UNSUPPORTED


def test_duplicate_map_keys(ed: SoftwareSigner) -> None:
    env = build_envelope(make_info(), [ed])
    outer = cbor.loads(env).value
    man = cbor.dumps(outer[3])
    auth = cbor.dumps(outer[2])
    dup = b"\xd8\x6b\xa3\x02" + auth + b"\x03" + man + b"\x03" + man
    assert code_of(verify_envelope, dup, StaticKeys([ed.public_key])) == ErrorCode.MALFORMED


def test_indefinite_length(ed: SoftwareSigner) -> None:
    env = build_envelope(make_info(), [ed])
    outer = cbor.loads(env).value
    body = b"\x02" + cbor.dumps(outer[2]) + b"\x03" + cbor.dumps(outer[3])
    indef = b"\xd8\x6b\xbf" + body + b"\xff"
    assert code_of(verify_envelope, indef, StaticKeys([ed.public_key])) == ErrorCode.MALFORMED


def test_deep_nesting_and_huge_lengths(ed: SoftwareSigner) -> None:
    keys = StaticKeys([ed.public_key])
    deep = b"\xd8\x6b" + b"\x81" * 200 + b"\x00"
    assert code_of(verify_envelope, deep, keys) == ErrorCode.TOO_LARGE
    huge_bstr = b"\xd8\x6b\xa1\x03\x5b" + (2**40).to_bytes(8, "big") + b"\x00"
    assert code_of(verify_envelope, huge_bstr, keys) == ErrorCode.MALFORMED
    huge_map = b"\xd8\x6b\xbb" + (2**60).to_bytes(8, "big")
    assert code_of(verify_envelope, huge_map, keys) == ErrorCode.MALFORMED
    env = build_envelope(make_info(), [ed])
    assert code_of(verify_envelope, env, keys, max_size=len(env) - 1) == ErrorCode.TOO_LARGE
    assert code_of(verify_envelope, env + b"\x00" * 70000, keys) == ErrorCode.TOO_LARGE
    assert code_of(verify_envelope, env + b"\x00", keys) == ErrorCode.MALFORMED  # trailing


def test_unknown_envelope_element(ed: SoftwareSigner) -> None:
    env = build_envelope(make_info(), [ed])
    outer = dict(cbor.loads(env).value)
    outer[99] = b"\x00"
    bad = cbor.dumps(cbor.Tag(107, outer))
    assert code_of(verify_envelope, bad, StaticKeys([ed.public_key])) == (
        ErrorCode.CRITICAL_UNKNOWN
    )
    outer.pop(99)
    outer["#payload"] = b"hello"  # integrated payloads are SUIT, but not our profile
    bad = cbor.dumps(cbor.Tag(107, outer))
    assert code_of(verify_envelope, bad, StaticKeys([ed.public_key])) == ErrorCode.UNSUPPORTED


def _resign(ed: SoftwareSigner, mutate: Any, info: ManifestInfo | None = None) -> bytes:
    """Re-sign a manifest changed by ``mutate`` (a correctly signed but odd manifest)."""
    manifest = cbor.loads(encode_manifest(info or make_info()))
    mutate(manifest)
    return sign_manifest(cbor.dumps(manifest), [ed])


def _mutate_shared(fn: Any) -> Any:
    def inner(manifest: dict[Any, Any]) -> None:
        common = cbor.loads(manifest[3])
        shared = cbor.loads(common[4])
        fn(shared)
        common[4] = cbor.dumps(shared)
        manifest[3] = cbor.dumps(common)

    return inner


def _mutate_validate(fn: Any) -> Any:
    def inner(manifest: dict[Any, Any]) -> None:
        validate = cbor.loads(manifest[suit.MAN_VALIDATE])
        fn(validate)
        manifest[suit.MAN_VALIDATE] = cbor.dumps(validate)

    return inner


def test_unknown_critical_elements(ed: SoftwareSigner) -> None:
    keys = StaticKeys([ed.public_key])
    env = _resign(ed, lambda m: m.__setitem__(99, b"\x00"))
    assert code_of(verify_envelope, env, keys) == ErrorCode.CRITICAL_UNKNOWN
    assert code_of(authenticate_envelope, env, keys) == ErrorCode.CRITICAL_UNKNOWN
    env = _resign(ed, _mutate_shared(lambda s: s[1].__setitem__(-300, 1)))
    assert code_of(verify_envelope, env, keys) == ErrorCode.CRITICAL_UNKNOWN
    env = _resign(ed, _mutate_shared(lambda s: s.extend([77, 15])))
    assert code_of(verify_envelope, env, keys) == ErrorCode.CRITICAL_UNKNOWN
    # known SUIT features outside the profile
    env = _resign(ed, _mutate_shared(lambda s: s.extend([suit.DIR_INVOKE, 15])))
    assert code_of(verify_envelope, env, keys) == ErrorCode.UNSUPPORTED
    env = _resign(ed, lambda m: m.__setitem__(suit.MAN_INVOKE, cbor.dumps([23, 2])))
    assert code_of(verify_envelope, env, keys) == ErrorCode.UNSUPPORTED


def test_multiple_components_unsupported(ed: SoftwareSigner) -> None:
    def two(manifest: dict[Any, Any]) -> None:
        common = cbor.loads(manifest[3])
        common[2] = [[b"\x00"], [b"\x01"]]
        manifest[3] = cbor.dumps(common)

    env = _resign(ed, two)
    assert code_of(verify_envelope, env, StaticKeys([ed.public_key])) == ErrorCode.UNSUPPORTED


def test_wrong_manifest_version(ed: SoftwareSigner) -> None:
    keys = StaticKeys([ed.public_key])
    for v in (2, 0, "1"):
        env = _resign(ed, lambda m, v=v: m.__setitem__(1, v))
        assert code_of(verify_envelope, env, keys) == ErrorCode.VERSION


def test_missing_profile_fields_are_malformed(ed: SoftwareSigner) -> None:
    keys = StaticKeys([ed.public_key])
    env = _resign(ed, _mutate_validate(lambda s: s[1].pop(suit.P_OTA_SECURITY_COUNTER)))
    assert code_of(verify_envelope, env, keys) == ErrorCode.MALFORMED
    env = _resign(ed, _mutate_validate(lambda s: s[1].__setitem__(suit.P_OTA_SECURITY_COUNTER, -1)))
    assert code_of(verify_envelope, env, keys) == ErrorCode.MALFORMED
    env = _resign(ed, _mutate_shared(lambda s: s[1].__setitem__(suit.P_IMAGE_SIZE, -1)))
    assert code_of(verify_envelope, env, keys) == ErrorCode.MALFORMED
    env = _resign(ed, lambda m: m.pop(suit.MAN_SET_VERSION))
    assert code_of(verify_envelope, env, keys) == ErrorCode.MALFORMED


def test_digest_mismatch(ed: SoftwareSigner) -> None:
    env = build_envelope(make_info(), [ed])
    uri = b"https://updates.acme.example"
    pos = env.index(uri)
    tampered = env[:pos] + b"http://" + b"x" + env[pos + 8 :]
    assert len(tampered) == len(env)
    assert code_of(verify_envelope, tampered, StaticKeys([ed.public_key])) == ErrorCode.DIGEST


def test_signature_by_unknown_key(ed: SoftwareSigner, ed2: SoftwareSigner) -> None:
    env = build_envelope(make_info(), [ed2])
    assert code_of(verify_envelope, env, StaticKeys([ed.public_key])) == ErrorCode.UNTRUSTED_KEY


def test_tampered_signature(ed: SoftwareSigner) -> None:
    env = build_envelope(make_info(), [ed])
    sig = cbor.loads(cbor.loads(cbor.loads(env).value[2])[1]).value[3]
    pos = env.index(sig) + 5
    tampered = env[:pos] + bytes([env[pos] ^ 0x40]) + env[pos + 1 :]
    assert code_of(verify_envelope, tampered, StaticKeys([ed.public_key])) == ErrorCode.SIGNATURE


def test_algorithm_not_allowed(ed: SoftwareSigner) -> None:
    info = make_info()
    manifest = encode_manifest(info)
    payload = manifest_digest(manifest)
    good = sign1(ed, payload)
    keys = StaticKeys([ed.public_key])
    for alg in (-35, -257, -37, 0):  # ES384, RS256, PS256, reserved
        prot = cbor.dumps({1: alg})
        block = cbor.dumps(cbor.Tag(18, [prot, {4: ed.public_key.key_id}, None, good.signature]))
        env = assemble_envelope(manifest, payload, [block])
        assert code_of(verify_envelope, env, keys) == ErrorCode.ALGORITHM
    # an allowed algorithm that does not fit the key (ES256 claimed for an Ed25519 key)
    prot = cbor.dumps({1: -7})
    block = cbor.dumps(cbor.Tag(18, [prot, {4: ed.public_key.key_id}, None, good.signature]))
    env = assemble_envelope(manifest, payload, [block])
    assert code_of(verify_envelope, env, keys) == ErrorCode.ALGORITHM
    # unsupported manifest digest algorithm (SHA-512)
    bad_payload = cbor.dumps([-44, hashlib.sha512(cbor.dumps(manifest)).digest()])
    env = assemble_envelope(manifest, bad_payload, [sign1(ed, bad_payload).encode()])
    assert code_of(verify_envelope, env, keys) == ErrorCode.ALGORITHM


def test_missing_authentication(ed: SoftwareSigner) -> None:
    keys = StaticKeys([ed.public_key])
    info = make_info()
    assert code_of(verify_envelope, build_unsigned(info), keys) == ErrorCode.NO_AUTH
    no_wrapper = cbor.dumps(cbor.Tag(107, {3: encode_manifest(info)}))
    assert code_of(verify_envelope, no_wrapper, keys) == ErrorCode.NO_AUTH
    assert code_of(verify_envelope, cbor.dumps(cbor.Tag(107, {2: b"\x80"})), keys) == (
        ErrorCode.MALFORMED
    )


def test_unprotected_headers_other_than_kid_refused(ed: SoftwareSigner) -> None:
    manifest = encode_manifest(make_info())
    payload = manifest_digest(manifest)
    s = sign1(ed, payload)
    block = cbor.dumps(
        cbor.Tag(18, [s.protected, {4: ed.public_key.key_id, 5: b"x"}, None, s.signature])
    )
    env = assemble_envelope(manifest, payload, [block])
    assert code_of(verify_envelope, env, StaticKeys([ed.public_key])) == ErrorCode.MALFORMED


def test_embedded_payload_must_equal_digest(ed: SoftwareSigner) -> None:
    manifest = encode_manifest(make_info())
    payload = manifest_digest(manifest)
    embedded = sign1(ed, payload, detached=False).encode()
    env = assemble_envelope(manifest, payload, [embedded])
    assert verify_envelope(env, StaticKeys([ed.public_key])).info == make_info()
    other = sign1(ed, b"something else", detached=False).encode()
    env = assemble_envelope(manifest, payload, [other])
    assert code_of(verify_envelope, env, StaticKeys([ed.public_key])) == ErrorCode.DIGEST


# --- trust decisions through a resolver ---------------------------------------------------
class Resolver:
    """A small KeyResolver: fixed TrustedKeys by kid, optional per-kid failure codes."""

    def __init__(
        self,
        keys: list[TrustedKey],
        threshold: int = 1,
        fail: dict[bytes, ErrorCode] | None = None,
    ) -> None:
        self.keys = {k.key_id: k for k in keys}
        self._threshold = threshold
        self.fail = fail or {}
        self.calls: list[tuple[bytes | None, Role, int | None]] = []

    @property
    def threshold(self) -> int:
        return self._threshold

    def resolve(self, kid: bytes | None, alg: CoseAlg, role: Role, now: int | None) -> TrustedKey:
        self.calls.append((kid, role, now))
        if kid in self.fail:
            raise TrustError(self.fail[kid], "configured failure")
        if kid is None or kid not in self.keys:
            raise TrustError(ErrorCode.UNTRUSTED_KEY, "unknown kid")
        tk = self.keys[kid]
        tk.key.check_alg(alg)
        tk.check_role(role)
        tk.check_time(now)
        return tk


def trusted(pk: PublicKey, *scopes: Scope, nb: int = 0, na: int = 2**40) -> TrustedKey:
    return TrustedKey(pk, frozenset({Role.FIRMWARE}), scopes or (Scope(VENDOR),), nb, na, "t")


def test_resolver_asked_for_firmware_role(ed: SoftwareSigner) -> None:
    r = Resolver([trusted(ed.public_key)])
    verify_envelope(build_envelope(make_info(), [ed]), r, now=1234)
    assert r.calls == [(ed.public_key.key_id, Role.FIRMWARE, 1234)]


def test_key_scope(ed: SoftwareSigner) -> None:
    env = build_envelope(make_info(), [ed])
    ok = [
        Scope(VENDOR),
        Scope(VENDOR, frozenset({CLASS})),
        Scope(VENDOR, frozenset({uuid.uuid4(), CLASS})),
    ]
    for scope in ok:
        verify_envelope(env, Resolver([trusted(ed.public_key, scope)]))
        authenticate_envelope(env, Resolver([trusted(ed.public_key, scope)]))
    bad = [Scope(vendor_id("other.example")), Scope(VENDOR, frozenset({uuid.uuid4()}))]
    for scope in bad:
        r = Resolver([trusted(ed.public_key, scope)])
        assert code_of(verify_envelope, env, r) == ErrorCode.KEY_SCOPE
        assert code_of(authenticate_envelope, env, r) == ErrorCode.KEY_SCOPE


def test_key_scope_checked_for_every_counted_signer(
    ed: SoftwareSigner, ed2: SoftwareSigner
) -> None:
    env = build_envelope(make_info(), [ed, ed2])
    r = Resolver([trusted(ed.public_key), trusted(ed2.public_key, Scope(vendor_id("x.example")))])
    assert code_of(verify_envelope, env, r) == ErrorCode.KEY_SCOPE


@pytest.mark.parametrize("code", [ErrorCode.KEY_REVOKED, ErrorCode.KEY_EXPIRED])
def test_revoked_and_expired_keys(ed: SoftwareSigner, code: ErrorCode) -> None:
    env = build_envelope(make_info(), [ed])
    r = Resolver([trusted(ed.public_key)], fail={ed.public_key.key_id: code})
    assert code_of(verify_envelope, env, r) == code


def test_expired_by_time_window(ed: SoftwareSigner) -> None:
    env = build_envelope(make_info(), [ed])
    r = Resolver([trusted(ed.public_key, nb=100, na=200)])
    verify_envelope(env, r, now=150)
    assert code_of(verify_envelope, env, r, now=201) == ErrorCode.KEY_EXPIRED
    assert code_of(verify_envelope, env, r, now=99) == ErrorCode.KEY_EXPIRED


def test_most_specific_error_wins(ed: SoftwareSigner, ed2: SoftwareSigner) -> None:
    env = build_envelope(make_info(), [ed2, ed])  # ed2 unknown, ed revoked
    r = Resolver([trusted(ed.public_key)], fail={ed.public_key.key_id: ErrorCode.KEY_REVOKED})
    assert code_of(verify_envelope, env, r) == ErrorCode.KEY_REVOKED


def test_threshold_with_resolver(ed: SoftwareSigner, ed2: SoftwareSigner) -> None:
    r = Resolver([trusted(ed.public_key), trusted(ed2.public_key)], threshold=2)
    info = make_info()
    assert len(verify_envelope(build_envelope(info, [ed, ed2]), r).signers) == 2
    assert code_of(verify_envelope, build_envelope(info, [ed]), r) == ErrorCode.THRESHOLD
    assert code_of(verify_envelope, build_envelope(info, [ed, ed]), r) == ErrorCode.THRESHOLD


def test_limits_apply_inside_signed_manifest(ed: SoftwareSigner) -> None:
    """A correctly signed manifest is still decoded under limits (depth, items)."""
    keys = StaticKeys([ed.public_key])
    deep: Any = 0
    for _ in range(40):
        deep = [deep]
    manifest = cbor.loads(encode_manifest(make_info()))
    manifest[suit.MAN_TEXT] = cbor.dumps(deep)
    env = sign_manifest(cbor.dumps(manifest), [ed])
    assert code_of(verify_envelope, env, keys) == ErrorCode.TOO_LARGE
    manifest[suit.MAN_TEXT] = cbor.dumps(list(range(5000)))
    env = sign_manifest(cbor.dumps(manifest), [ed])
    assert code_of(verify_envelope, env, keys) == ErrorCode.TOO_LARGE


# --- G9: signed manifests carrying SUIT features the otaguard profile does not implement -----
def _profile_manifest() -> dict[Any, Any]:
    """The manifest map of an otaguard envelope, taken from the unsigned builder's output."""
    outer = cbor.loads(build_unsigned(make_info())).value
    manifest = cbor.loads(outer[suit.ENV_MANIFEST])
    assert isinstance(manifest, dict)
    return manifest


def _sign_edited(ed: SoftwareSigner, manifest: dict[Any, Any]) -> bytes:
    env = sign_manifest(cbor.dumps(manifest), [ed])
    # The signature is valid: the profile-independent verifier accepts the envelope, so only
    # the profile check can refuse it.
    assert authenticate_envelope(env, StaticKeys([ed.public_key])).signers
    return env


_FETCH_DEP = cbor.dumps(
    [
        suit.DIR_SET_PARAMETERS,
        {suit.P_URI: "https://updates.acme.example/dep.suit"},
        suit.DIR_FETCH,
        suit.REP_POLICY,
        suit.COND_IMAGE_MATCH,
        suit.REP_POLICY,
    ]
)


def test_signed_manifest_with_dependencies_is_unsupported(ed: SoftwareSigner) -> None:
    keys = StaticKeys([ed.public_key])
    # suit-dependencies in common: component 0 is declared a dependency manifest.
    manifest = _profile_manifest()
    common = cbor.loads(manifest[suit.MAN_COMMON])
    common[suit.COMMON_DEPENDENCIES] = {0: {1: [b"dep"]}}
    manifest[suit.MAN_COMMON] = cbor.dumps(common)
    env = _sign_edited(ed, manifest)
    assert code_of(verify_envelope, env, keys) == ErrorCode.UNSUPPORTED
    # suit-dependency-resolution inside the manifest.
    manifest = _profile_manifest()
    manifest[suit.MAN_DEPENDENCY_RESOLUTION] = _FETCH_DEP
    env = _sign_edited(ed, manifest)
    assert code_of(verify_envelope, env, keys) == ErrorCode.UNSUPPORTED


def test_signed_manifest_with_severed_dependency_resolution_is_unsupported(
    ed: SoftwareSigner,
) -> None:
    """Severed: the manifest holds the digest, the envelope the (digest-matching) sequence."""
    keys = StaticKeys([ed.public_key])
    manifest = _profile_manifest()
    manifest[suit.MAN_DEPENDENCY_RESOLUTION] = [
        int(HashAlg.SHA256),
        hashlib.sha256(cbor.dumps(_FETCH_DEP)).digest(),
    ]
    outer = dict(cbor.loads(sign_manifest(cbor.dumps(manifest), [ed])).value)
    outer[suit.MAN_DEPENDENCY_RESOLUTION] = _FETCH_DEP
    env = cbor.dumps(cbor.Tag(suit.TAG_ENVELOPE, outer))
    assert authenticate_envelope(env, keys).severed == {suit.MAN_DEPENDENCY_RESOLUTION: _FETCH_DEP}
    assert code_of(verify_envelope, env, keys) == ErrorCode.UNSUPPORTED


@pytest.mark.parametrize(
    "command",
    [suit.DIR_PROCESS_DEPENDENCY, suit.COND_IS_DEPENDENCY, suit.COND_DEPENDENCY_INTEGRITY],
    ids=["process-dependency", "is-dependency", "dependency-integrity"],
)
def test_signed_dependency_commands_are_unsupported(ed: SoftwareSigner, command: int) -> None:
    manifest = _profile_manifest()
    common = cbor.loads(manifest[suit.MAN_COMMON])
    shared = cbor.loads(common[suit.COMMON_SHARED_SEQUENCE])
    shared += [command, suit.REP_POLICY]
    common[suit.COMMON_SHARED_SEQUENCE] = cbor.dumps(shared)
    manifest[suit.MAN_COMMON] = cbor.dumps(common)
    env = _sign_edited(ed, manifest)
    assert code_of(verify_envelope, env, StaticKeys([ed.public_key])) == ErrorCode.UNSUPPORTED


@pytest.mark.parametrize(
    ("element", "value"),
    [
        (suit.MAN_REFERENCE_URI, "https://updates.acme.example/m.suit"),
        (suit.MAN_COMPONENT_ID, [b"\x00"]),
        (suit.MAN_LOAD, cbor.dumps([suit.DIR_COPY, suit.REP_POLICY])),
        (suit.MAN_COSWID, b"\xa0"),
        (suit.MAN_PAYLOAD_FETCH, _FETCH_DEP),
        (suit.MAN_CANDIDATE_VERIFICATION, cbor.dumps([suit.COND_IMAGE_MATCH, suit.REP_POLICY])),
        (suit.MAN_UNINSTALL, cbor.dumps([suit.DIR_UNLINK, suit.REP_POLICY])),
    ],
    ids=[
        "reference-uri",
        "component-id",
        "load",
        "coswid",
        "payload-fetch",
        "candidate",
        "uninstall",
    ],
)
def test_signed_manifest_elements_outside_the_profile(
    ed: SoftwareSigner, element: int, value: object
) -> None:
    manifest = _profile_manifest()
    manifest[element] = value
    env = _sign_edited(ed, manifest)
    assert code_of(verify_envelope, env, StaticKeys([ed.public_key])) == ErrorCode.UNSUPPORTED
