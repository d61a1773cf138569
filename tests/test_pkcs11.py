"""PKCS#11 signer against real SoftHSM2 tokens, and the RFC 7512 URI parser."""

from __future__ import annotations

from pathlib import Path

import cbor2
import pkcs11 as p11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from otaguard.crypto import cose
from otaguard.crypto.algorithms import CoseAlg
from otaguard.crypto.keys import PublicKey
from otaguard.crypto.pkcs11 import (
    Pkcs11Signer,
    Pkcs11Uri,
    export_public_key,
    generate_keypair,
    list_keys,
    parse_pkcs11_uri,
    token_session,
)
from otaguard.errors import ErrorCode, OtaError

from .conftest import SoftHsmToken

softhsm = pytest.mark.softhsm


def _code(exc: pytest.ExceptionInfo[OtaError]) -> ErrorCode:
    return exc.value.code


# --- key generation inside the token -----------------------------------------------------------


@softhsm
@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_generate_sign_and_verify_with_cryptography(softhsm_token: SoftHsmToken, kind: str) -> None:
    t = softhsm_token
    pub = generate_keypair(t.label, "release", kind, pin=t.pin, module=t.module)  # type: ignore[arg-type]
    assert pub.kind == kind
    assert export_public_key(t.uri("release"), pin=t.pin) == pub
    keys = list_keys(t.uri(), pin=t.pin)
    assert [(k.label, k.kind, k.public_key, k.id) for k in keys] == [
        ("release", kind, pub, pub.key_id)
    ]

    payload = b"suit-digest-bytes" * 3
    with Pkcs11Signer.open(t.uri("release"), pin=t.pin) as signer:
        assert signer.public_key == pub
        assert signer.alg == (CoseAlg.ED25519 if kind == "ed25519" else CoseAlg.ESP256)
        msg = cose.sign1(signer, payload)
    encoded = msg.encode()

    # Verify independently of otaguard: rebuild Sig_structure with cbor2, check with cryptography.
    tag = cbor2.loads(encoded)
    assert tag.tag == 18
    protected, unprotected, body, signature = tag.value
    assert body is None  # detached
    assert cbor2.loads(protected) == {1: int(signer.alg)}
    assert unprotected == {4: pub.key_id}
    tbs = cbor2.dumps(["Signature1", protected, b"", payload])
    key = serialization.load_der_public_key(pub.to_der())
    if kind == "ed25519":
        assert isinstance(key, ed25519.Ed25519PublicKey)
        key.verify(signature, tbs)
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert len(signature) == 64
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        key.verify(der, tbs, ec.ECDSA(hashes.SHA256()))
    # and through otaguard, including a tamper check
    cose.decode_sign1(encoded).verify(pub, payload)
    with pytest.raises(OtaError) as e:
        cose.decode_sign1(encoded).verify(pub, payload + b"x")
    assert _code(e) == ErrorCode.SIGNATURE


@softhsm
@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_private_key_is_sensitive_and_not_extractable(
    softhsm_token: SoftHsmToken, kind: str
) -> None:
    t = softhsm_token
    pub = generate_keypair(t.uri(), "k", kind, pin=t.pin)  # type: ignore[arg-type]
    with token_session(t.uri(), pin=t.pin) as session:
        priv = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="k")
        assert priv[Attribute.TOKEN] is True
        assert priv[Attribute.SENSITIVE] is True
        assert priv[Attribute.EXTRACTABLE] is False
        assert priv[Attribute.NEVER_EXTRACTABLE] is True
        assert priv[Attribute.ALWAYS_SENSITIVE] is True
        assert bytes(priv[Attribute.ID]) == pub.key_id  # id= URIs match the COSE kid
        with pytest.raises(p11.AttributeSensitive):
            priv[Attribute.VALUE]
    # the key id is usable as a URI selector
    with Pkcs11Signer.open(t.uri(id=pub.key_id), pin=t.pin) as signer:
        assert signer.public_key == pub


@softhsm
def test_signatures_verify_across_sessions_and_survive_close_of_other_signer(
    softhsm_token: SoftHsmToken,
) -> None:
    t = softhsm_token
    generate_keypair(t.label, "a", "ed25519", pin=t.pin)
    generate_keypair(t.label, "b", "p256", pin=t.pin)
    s1 = Pkcs11Signer.open(t.uri("a"), pin=t.pin)
    s2 = Pkcs11Signer.open(t.uri("b"), pin=t.pin)
    # a later caller with the wrong PIN is refused although the token is logged in
    with pytest.raises(OtaError) as e:
        Pkcs11Signer.open(t.uri("a"), pin=t.pin + "0")
    assert _code(e) == ErrorCode.PIN
    s1.close()
    # closing s1 must not log s2 out (PKCS#11 login state is per token, not per session)
    sig = s2.sign(b"data")
    s2.public_key.verify(s2.alg, sig, b"data")
    s2.close()
    with pytest.raises(OtaError) as e:
        s2.sign(b"data")
    assert _code(e) == ErrorCode.HSM


@softhsm
def test_explicit_polymorphic_alg_and_mismatch(softhsm_token: SoftHsmToken) -> None:
    t = softhsm_token
    generate_keypair(t.label, "ed", "ed25519", pin=t.pin)
    with Pkcs11Signer.open(t.uri("ed"), pin=t.pin, alg=CoseAlg.EDDSA) as s:
        assert s.alg == CoseAlg.EDDSA
        cose.sign1(s, b"x").verify(s.public_key, b"x")
    with pytest.raises(OtaError) as e:
        Pkcs11Signer.open(t.uri("ed"), pin=t.pin, alg=CoseAlg.ES256)
    assert _code(e) == ErrorCode.ALGORITHM


@softhsm
def test_self_check_catches_a_bad_token_signature(softhsm_token: SoftHsmToken) -> None:
    """If the token signs with a key other than the exported one, sign() refuses."""
    t = softhsm_token
    generate_keypair(t.label, "a", "ed25519", pin=t.pin)
    other = PublicKey(ed25519.Ed25519PrivateKey.generate().public_key())
    with Pkcs11Signer.open(t.uri("a"), pin=t.pin) as s:
        s._public = other  # simulate a token that returns a wrong/corrupt signature
        with pytest.raises(OtaError) as e:
            s.sign(b"payload")
    assert _code(e) == ErrorCode.HSM


# --- refusals with exact codes -----------------------------------------------------------------


@softhsm
def test_wrong_pin(softhsm_token: SoftHsmToken) -> None:
    t = softhsm_token
    generate_keypair(t.label, "a", "ed25519", pin=t.pin)
    bad = "wrong-" + t.pin
    with pytest.raises(OtaError) as e:
        Pkcs11Signer.open(t.uri("a"), pin=bad)
    assert _code(e) == ErrorCode.PIN
    assert bad not in str(e.value) and t.pin not in str(e.value)
    with pytest.raises(OtaError) as e:
        generate_keypair(t.label, "b", "ed25519", pin=bad)
    assert _code(e) == ErrorCode.PIN
    with pytest.raises(OtaError) as e:
        Pkcs11Signer.open(t.uri("a"), pin="")
    assert _code(e) == ErrorCode.PIN


@softhsm
def test_missing_token_and_missing_object(softhsm_token: SoftHsmToken) -> None:
    t = softhsm_token
    generate_keypair(t.label, "a", "ed25519", pin=t.pin)
    with pytest.raises(OtaError) as e:
        Pkcs11Signer.open(str(Pkcs11Uri(token=t.label + "-nope", object="a")), pin=t.pin)
    assert _code(e) == ErrorCode.TOKEN_NOT_FOUND
    with pytest.raises(OtaError) as e:
        Pkcs11Signer.open(t.uri("nope"), pin=t.pin)
    assert _code(e) == ErrorCode.KEY_NOT_FOUND
    with pytest.raises(OtaError) as e:
        export_public_key(t.uri(id=b"\x00\x01"), pin=t.pin)
    assert _code(e) == ErrorCode.KEY_NOT_FOUND
    with pytest.raises(OtaError) as e:
        Pkcs11Signer.open(t.uri(), pin=t.pin)  # no object named
    assert _code(e) == ErrorCode.USAGE


@softhsm
def test_duplicate_label_refused(softhsm_token: SoftHsmToken) -> None:
    t = softhsm_token
    first = generate_keypair(t.label, "dup", "p256", pin=t.pin)
    with pytest.raises(OtaError) as e:
        generate_keypair(t.label, "dup", "ed25519", pin=t.pin)
    assert _code(e) == ErrorCode.EXISTS
    assert export_public_key(t.uri("dup"), pin=t.pin) == first  # untouched


@softhsm
def test_rsa_and_other_curves_refused(softhsm_token: SoftHsmToken) -> None:
    t = softhsm_token
    with pytest.raises(OtaError) as e:
        generate_keypair(t.label, "r", "rsa", pin=t.pin)  # type: ignore[arg-type]
    assert _code(e) == ErrorCode.ALGORITHM
    # keys made by other tools in the same token are refused when used for signing
    with token_session(t.label, pin=t.pin) as session:
        session.generate_keypair(KeyType.RSA, 2048, store=True, label="rsa")
        session.generate_keypair(
            KeyType.EC,
            mechanism=Mechanism.EC_KEY_PAIR_GEN,
            store=True,
            label="p384",
            public_template={
                Attribute.EC_PARAMS: p11.util.ec.encode_named_curve_parameters("secp384r1")
            },
        )
    for label in ("rsa", "p384"):
        with pytest.raises(OtaError) as e:
            Pkcs11Signer.open(t.uri(label), pin=t.pin)
        assert _code(e) == ErrorCode.ALGORITHM
    assert list_keys(t.label, pin=t.pin) == []  # neither is listed as a usable key


@softhsm
def test_pin_source_file(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    t = softhsm_token
    generate_keypair(t.label, "a", "ed25519", pin=t.pin)
    pin_file = tmp_path / "pin"
    pin_file.write_text(t.pin + "\n")
    uri = str(Pkcs11Uri(token=t.label, object="a", pin_source=f"file:{pin_file}"))
    with Pkcs11Signer.open(uri) as s:
        s.sign(b"x")
    pin_file.write_text("nope\n")
    with pytest.raises(OtaError) as e:
        Pkcs11Signer.open(uri)
    assert _code(e) == ErrorCode.PIN


@softhsm
def test_module_not_loadable(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    t = softhsm_token
    with pytest.raises(OtaError) as e:
        Pkcs11Signer.open(t.uri("a"), pin=t.pin, module="/nonexistent/libnothing.so")
    assert _code(e) == ErrorCode.HSM
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"\x7fELF not really")
    with pytest.raises(OtaError) as e:
        Pkcs11Signer.open(t.uri("a"), pin=t.pin, module=str(junk))
    assert _code(e) == ErrorCode.HSM


# --- RFC 7512 URIs -----------------------------------------------------------------------------


def test_uri_examples_from_rfc7512() -> None:
    u = parse_pkcs11_uri(
        "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;"
        "manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;"
        "id=%69%95%3E%5C%F4%BD%EC%91;serial="
    )
    assert u.token == "The Software PKCS#11 Softtoken"
    assert u.manufacturer == "Snake Oil, Inc."
    assert u.object == "my-certificate" and u.type == "cert" and u.serial == ""
    assert u.id == bytes.fromhex("69953e5cf4bdec91")
    u = parse_pkcs11_uri("pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-cert")
    assert u.token == "A name with a substring %;"
    u = parse_pkcs11_uri("pkcs11:object=my-sign-key;type=private?module-name=mypkcs11")
    assert u.module_name == "mypkcs11" and u.type == "private"
    u = parse_pkcs11_uri("pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1")
    assert u.module_path == "/mnt/libmypkcs11.so.1"
    u = parse_pkcs11_uri("pkcs11:slot-id=5;x-vendor=abc?pin-source=file:/etc/token_pin")
    assert u.slot_id == 5 and u.vendor == (("x-vendor", "abc"),)
    assert u.pin_source == "file:/etc/token_pin"
    assert parse_pkcs11_uri("pkcs11:") == Pkcs11Uri()
    v = parse_pkcs11_uri("pkcs11:token=t;x-a=1?module-path=/m.so&x-b=2")
    assert v.vendor == (("x-a", "1"),) and v.vendor_query == (("x-b", "2"),)
    assert parse_pkcs11_uri(str(v)) == v
    w = v.with_object("key", b"\x01")
    assert (w.token, w.object, w.id, w.module_path) == ("t", "key", b"\x01", "/m.so")
    assert parse_pkcs11_uri("PKCS11:token=a").token == "a"


def test_uri_pin_value_refused_without_echoing_it() -> None:
    with pytest.raises(OtaError) as e:
        parse_pkcs11_uri("pkcs11:token=a;object=b?pin-value=secret-1234")
    assert _code(e) == ErrorCode.USAGE
    assert "secret-1234" not in str(e.value)
    with pytest.raises(OtaError) as e:
        Pkcs11Signer.open("pkcs11:token=a;object=b?pin-value=secret-1234", pin="x")
    assert _code(e) == ErrorCode.USAGE


@pytest.mark.parametrize(
    ("uri", "code"),
    [
        ("http://token=a", ErrorCode.MALFORMED),
        ("pkcs11:token", ErrorCode.MALFORMED),
        ("pkcs11:=a", ErrorCode.MALFORMED),
        ("pkcs11:token=a;token=b", ErrorCode.MALFORMED),
        ("pkcs11:token=a;", ErrorCode.MALFORMED),
        ("pkcs11:token=a b", ErrorCode.MALFORMED),
        ("pkcs11:token=a/b", ErrorCode.MALFORMED),  # '/' only allowed in the query
        ("pkcs11:token=a%2", ErrorCode.MALFORMED),
        ("pkcs11:token=a%zz", ErrorCode.MALFORMED),
        ("pkcs11:token=%ff%fe", ErrorCode.MALFORMED),  # not UTF-8
        ("pkcs11:slot-id=abc", ErrorCode.MALFORMED),
        ("pkcs11:slot-id=%D9%A3", ErrorCode.MALFORMED),  # a non-ASCII digit
        ("pkcs11:type=secret", ErrorCode.MALFORMED),
        ("pkcs11:token=a?", ErrorCode.MALFORMED),
        ("pkcs11:token=a?module-path=/x&module-path=/y", ErrorCode.MALFORMED),
        ("pkcs11:colour=blue", ErrorCode.UNSUPPORTED),
        ("pkcs11:token=a?frobnicate=1", ErrorCode.UNSUPPORTED),
        ("pkcs11:token=" + "a" * 5000, ErrorCode.TOO_LARGE),
    ],
)
def test_uri_malformed(uri: str, code: ErrorCode) -> None:
    with pytest.raises(OtaError) as e:
        parse_pkcs11_uri(uri)
    assert _code(e) == code


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=24)


@settings(max_examples=200, deadline=None)
@given(
    token=st.none() | _text,
    obj=st.none() | _text,
    key_id=st.none() | st.binary(max_size=20),
    slot=st.none() | st.integers(min_value=0, max_value=2**32),
    module_path=st.none() | _text,
)
def test_uri_round_trip(
    token: str | None,
    obj: str | None,
    key_id: bytes | None,
    slot: int | None,
    module_path: str | None,
) -> None:
    u = Pkcs11Uri(token=token, object=obj, id=key_id, slot_id=slot, module_path=module_path)
    text = str(u)
    assert text.isascii() and " " not in text
    assert parse_pkcs11_uri(text) == u


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_uri_parser_only_raises_ota_errors(tail: str) -> None:
    try:
        parse_pkcs11_uri("pkcs11:" + tail)
    except OtaError as exc:
        assert exc.code in {
            ErrorCode.MALFORMED,
            ErrorCode.UNSUPPORTED,
            ErrorCode.USAGE,
            ErrorCode.TOO_LARGE,
        }
