"""COSE_Sign1: round trips and every refusal, with exact error codes."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otaguard.crypto import cose
from otaguard.crypto.algorithms import CoseAlg, KeyKind
from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.errors import CryptoError, ErrorCode, FormatError, OtaError

PAYLOAD = b"the payload: a SUIT digest, usually"


@pytest.fixture(scope="module", params=["ed25519", "p256"])
def signer(request: pytest.FixtureRequest) -> SoftwareSigner:
    kind: KeyKind = request.param
    return SoftwareSigner(generate_private_key(kind))


def _raw(msg: bytes) -> list[Any]:
    tag = cbor2.loads(msg)
    assert tag.tag == 18
    return [dict(x) if isinstance(x, cbor2.frozendict) else x for x in tag.value]


def _enc(arr: list[Any], tag: int | None = 18) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(tag, arr) if tag is not None else arr, canonical=True)


def _resign(signer: SoftwareSigner, protected: bytes, unprotected: dict[Any, Any]) -> bytes:
    """A correctly signed message with an arbitrary protected header (for header tests)."""
    sig = signer.sign(cbor2.dumps(["Signature1", protected, b"", PAYLOAD]))
    return _enc([protected, unprotected, None, sig])


def _code(fn: Any, *args: Any, **kw: Any) -> ErrorCode:
    with pytest.raises(OtaError) as e:
        fn(*args, **kw)
    return e.value.code


def _verify(data: bytes, signer: SoftwareSigner, payload: bytes | None = PAYLOAD) -> None:
    cose.decode_sign1(data).verify(signer.public_key, payload)


@pytest.mark.parametrize("detached", [True, False])
def test_round_trip(signer: SoftwareSigner, detached: bool) -> None:
    msg = cose.sign1(signer, PAYLOAD, detached=detached)
    data = msg.encode()
    s1 = cose.decode_sign1(data, tag_required=True)
    assert s1.alg == signer.alg
    assert s1.kid == signer.public_key.key_id
    assert s1.protected == msg.protected
    assert s1.payload == (None if detached else PAYLOAD)
    s1.verify(signer.public_key, PAYLOAD)
    if not detached:
        s1.verify(signer.public_key)  # embedded payload needs no external one
    # untagged encoding decodes too unless the tag is required
    untagged = msg.encode(tagged=False)
    cose.decode_sign1(untagged).verify(signer.public_key, PAYLOAD)
    assert _code(cose.decode_sign1, untagged, tag_required=True) == ErrorCode.MALFORMED


def test_polymorphic_algs_and_no_kid() -> None:
    for kind, alg in (("ed25519", CoseAlg.EDDSA), ("p256", CoseAlg.ES256)):
        s = SoftwareSigner(generate_private_key(kind), alg)  # type: ignore[arg-type]
        data = cose.sign1(s, PAYLOAD, include_kid=False).encode()
        d = cose.decode_sign1(data)
        assert d.alg == alg and d.kid is None
        d.verify(s.public_key, PAYLOAD)


def test_tampering_refused(signer: SoftwareSigner) -> None:
    data = cose.sign1(signer, PAYLOAD).encode()
    # payload
    assert _code(_verify, data, signer, PAYLOAD + b".") == ErrorCode.SIGNATURE
    # signature
    arr = _raw(data)
    arr[3] = bytes([arr[3][0] ^ 0x01]) + arr[3][1:]
    assert _code(_verify, _enc(arr), signer) == ErrorCode.SIGNATURE
    # protected header: add a content type, keep the signature
    arr = _raw(data)
    arr[0] = cbor2.dumps({1: int(signer.alg), 3: 0}, canonical=True)
    assert _code(_verify, _enc(arr), signer) == ErrorCode.SIGNATURE
    # wrong key of the same type
    other = SoftwareSigner(generate_private_key(signer.public_key.kind))
    assert _code(cose.decode_sign1(data).verify, other.public_key, PAYLOAD) == ErrorCode.SIGNATURE
    # a key of the other type
    other_kind: KeyKind = "p256" if signer.public_key.kind == "ed25519" else "ed25519"
    other = SoftwareSigner(generate_private_key(other_kind))
    assert _code(cose.decode_sign1(data).verify, other.public_key, PAYLOAD) == ErrorCode.ALGORITHM


def test_embedded_payload_must_match_expected(signer: SoftwareSigner) -> None:
    data = cose.sign1(signer, PAYLOAD, detached=False).encode()
    assert _code(_verify, data, signer, b"something else") == ErrorCode.DIGEST
    detached = cose.sign1(signer, PAYLOAD).encode()
    assert _code(_verify, detached, signer, None) == ErrorCode.MALFORMED


def test_alg_only_in_unprotected_refused(signer: SoftwareSigner) -> None:
    data = _resign(signer, cbor2.dumps({}), {1: int(signer.alg)})
    assert _code(cose.decode_sign1, data) == ErrorCode.ALGORITHM
    data = _resign(signer, b"", {1: int(signer.alg)})  # empty protected bstr
    assert _code(cose.decode_sign1, data) == ErrorCode.ALGORITHM


def test_label_in_both_buckets_refused(signer: SoftwareSigner) -> None:
    data = _resign(signer, cbor2.dumps({1: int(signer.alg)}), {1: int(signer.alg)})
    assert _code(cose.decode_sign1, data) == ErrorCode.MALFORMED


@pytest.mark.parametrize("alg", [-35, -36, -257, -37, 0, "EdDSA", True, -8.0])
def test_disallowed_algorithms(signer: SoftwareSigner, alg: object) -> None:
    # floats are refused by the strict CBOR profile before the alg check
    data = _resign(signer, cbor2.dumps({1: alg}), {})
    assert _code(cose.decode_sign1, data) in (
        (ErrorCode.MALFORMED,) if isinstance(alg, float) else (ErrorCode.ALGORITHM,)
    )


def test_crit(signer: SoftwareSigner) -> None:
    alg = int(signer.alg)
    ok = _resign(signer, cbor2.dumps({1: alg, 2: [3], 3: 0}), {})
    _verify(ok, signer)
    unknown = _resign(signer, cbor2.dumps({1: alg, 2: [99], 99: 1}), {})
    assert _code(cose.decode_sign1, unknown) == ErrorCode.CRITICAL_UNKNOWN
    unknown_text = _resign(signer, cbor2.dumps({1: alg, 2: ["x-ext"], "x-ext": 1}), {})
    assert _code(cose.decode_sign1, unknown_text) == ErrorCode.CRITICAL_UNKNOWN
    for bad in ([], 1, [[1]], [b"\x01"], [True]):
        data = _resign(signer, cbor2.dumps({1: alg, 2: bad}), {})
        assert _code(cose.decode_sign1, data) == ErrorCode.MALFORMED, bad


def test_structure_refusals(signer: SoftwareSigner) -> None:
    good = _raw(cose.sign1(signer, PAYLOAD).encode())
    cases: list[bytes] = [
        _enc(good[:3]),
        _enc([*good, b""]),
        _enc(good, tag=98),  # COSE_Sign, not COSE_Sign1
        _enc([good[0], [], None, good[3]]),  # unprotected not a map
        _enc([cbor2.dumps([1, -8]), {}, None, good[3]]),  # protected not a map
        _enc([{1: -8}, {}, None, good[3]]),  # protected not a bstr
        _enc([good[0], {}, "text payload", good[3]]),
        _enc([good[0], {}, None, "sig"]),
        _enc([good[0], {4: "kid as text"}, None, good[3]]),
        _enc([b"\xa1\x01\x38\x12", {}, None, good[3]]),  # non-minimal -19 in protected
        b"\xd2\x84",  # truncated
    ]
    for data in cases:
        assert _code(cose.decode_sign1, data) == ErrorCode.MALFORMED, data.hex()
    assert _code(cose.decode_sign1, b"\x40" + b"\x00" * 20000) == ErrorCode.TOO_LARGE


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutations_never_verify_with_changed_content(signer: SoftwareSigner, data: Any) -> None:
    """Any byte flip either fails decode/verify, or left protected/payload/signature as signed.

    (Flips inside the unprotected kid are harmless by design: only the protected header is
    authenticated, and the kid only selects a key.)
    """
    good = cose.sign1(signer, PAYLOAD, detached=bool(data.draw(st.booleans()))).encode()
    orig = cose.decode_sign1(good)
    i = data.draw(st.integers(min_value=0, max_value=len(good) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    mutated = bytearray(good)
    mutated[i] ^= 1 << bit
    try:
        s1 = cose.decode_sign1(bytes(mutated))
        s1.verify(signer.public_key, PAYLOAD)
    except (FormatError, CryptoError):
        return
    assert (s1.protected, s1.payload, s1.signature) == (
        orig.protected,
        orig.payload,
        orig.signature,
    )
