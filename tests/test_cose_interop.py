"""COSE_Sign1 interoperability with pycose, an independent implementation.

Notes on pycose 1.1.0 (checked here so a change shows up as a test failure):
* it does not know the fully-specified algorithm ids Ed25519 (-19) and ESP256 (-9), so interop
  uses EdDSA (-8) and ES256 (-7), which otaguard accepts; a -19 message is checked by
  registering -19 in pycose as an alias of EdDSA (the signature bytes are identical);
* ``CoseMessage.decode`` fails with cbor2 >= 6 (tag contents decode as tuples), so we decode
  the tag with cbor2 and hand the array to ``Sign1Message.from_cose_obj``.
"""

from __future__ import annotations

import cbor2
import pytest
from pycose.algorithms import CoseAlgorithm, EdDSA, Es256
from pycose.exceptions import CoseException
from pycose.headers import KID, Algorithm
from pycose.keys import EC2Key, OKPKey
from pycose.keys.curves import P256, Ed25519
from pycose.messages import Sign1Message

from otaguard.crypto import cose
from otaguard.crypto.algorithms import CoseAlg, KeyKind
from otaguard.crypto.keys import PublicKey
from otaguard.crypto.pkcs11 import Pkcs11Signer, generate_keypair
from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.errors import ErrorCode, OtaError

from .conftest import SoftHsmToken

PAYLOAD = b"\x82\x2f\x58\x20" + bytes(range(32))  # a SUIT_Digest-shaped payload


def _pycose_decode(data: bytes) -> Sign1Message:
    tag = cbor2.loads(data)
    assert tag.tag == 18
    arr = [dict(x) if isinstance(x, cbor2.frozendict) else x for x in tag.value]
    msg = Sign1Message.from_cose_obj(arr, True)
    assert isinstance(msg, Sign1Message)
    return msg


def _pycose_key(pub: PublicKey) -> OKPKey | EC2Key:
    ck = pub.to_cose_key()
    if pub.kind == "ed25519":
        return OKPKey(crv=Ed25519, x=ck[-2])
    return EC2Key(crv=P256, x=ck[-2], y=ck[-3])


def _pycose_alg(kind: KeyKind) -> type[CoseAlgorithm]:
    return EdDSA if kind == "ed25519" else Es256  # type: ignore[no-any-return]


def test_pycose_does_not_know_fully_specified_ids() -> None:
    for ident in (-19, -9):
        with pytest.raises(CoseException):
            CoseAlgorithm.from_id(ident)


@pytest.mark.parametrize("kind", ["ed25519", "p256"])
@pytest.mark.parametrize("detached", [True, False])
def test_otaguard_signature_verifies_with_pycose(kind: KeyKind, detached: bool) -> None:
    alg = CoseAlg.EDDSA if kind == "ed25519" else CoseAlg.ES256
    signer = SoftwareSigner(generate_private_key(kind), alg)
    data = cose.sign1(signer, PAYLOAD, detached=detached).encode()
    msg = _pycose_decode(data)
    msg.key = _pycose_key(signer.public_key)
    assert msg.get_attr(KID) == signer.public_key.key_id
    assert msg.verify_signature(detached_payload=PAYLOAD if detached else None)
    # and pycose rejects our message if the payload it is given differs
    if detached:
        assert not msg.verify_signature(detached_payload=PAYLOAD + b"!")


@pytest.mark.parametrize("kind", ["ed25519", "p256"])
@pytest.mark.parametrize("detached", [True, False])
def test_pycose_signature_verifies_with_otaguard(kind: KeyKind, detached: bool) -> None:
    key = OKPKey.generate_key(crv=Ed25519) if kind == "ed25519" else EC2Key.generate_key(crv=P256)
    msg = Sign1Message(
        phdr={Algorithm: _pycose_alg(kind)},
        uhdr={KID: b"pycose-key"},
        payload=None if detached else PAYLOAD,
    )
    msg.key = key
    data = msg.encode(detached_payload=PAYLOAD) if detached else msg.encode()
    if kind == "ed25519":
        pub = PublicKey.from_cose_key({1: 1, -1: 6, -2: key.x})
    else:
        pub = PublicKey.from_cose_key({1: 2, -1: 1, -2: key.x, -3: key.y})
    s1 = cose.decode_sign1(data, tag_required=True)
    assert s1.alg == (CoseAlg.EDDSA if kind == "ed25519" else CoseAlg.ES256)
    assert s1.kid == b"pycose-key"
    assert (s1.payload is None) == detached
    s1.verify(pub, PAYLOAD)
    with pytest.raises(OtaError) as e:
        s1.verify(pub, PAYLOAD[:-1] + b"\x00")
    assert e.value.code in (ErrorCode.SIGNATURE, ErrorCode.DIGEST)


def test_fully_specified_ed25519_signature_is_plain_ed25519() -> None:
    """-19 differs from -8 only in the header: pycose's EdDSA primitive verifies the bytes."""
    signer = SoftwareSigner(generate_private_key("ed25519"))
    assert signer.alg == CoseAlg.ED25519
    data = cose.sign1(signer, PAYLOAD).encode()
    protected, _, payload, signature = cbor2.loads(data).value
    assert payload is None and cbor2.loads(protected) == {1: -19}
    key = _pycose_key(signer.public_key)
    sig_structure = cbor2.dumps(["Signature1", protected, b"", PAYLOAD])
    assert EdDSA.verify(key, sig_structure, signature)
    # the header is bound: the same signature is not valid under a -8 header
    other = cbor2.dumps(["Signature1", cbor2.dumps({1: -8}), b"", PAYLOAD])
    assert not EdDSA.verify(key, other, signature)


@pytest.mark.softhsm
@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_token_signature_verifies_with_pycose(softhsm_token: SoftHsmToken, kind: KeyKind) -> None:
    t = softhsm_token
    pub = generate_keypair(t.label, "interop", kind, pin=t.pin)
    alg = CoseAlg.EDDSA if kind == "ed25519" else CoseAlg.ES256
    with Pkcs11Signer.open(t.uri("interop"), pin=t.pin, alg=alg) as signer:
        data = cose.sign1(signer, PAYLOAD).encode()
    msg = _pycose_decode(data)
    msg.key = _pycose_key(pub)
    assert msg.verify_signature(detached_payload=PAYLOAD)
