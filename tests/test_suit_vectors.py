"""Conformance: every published SUIT example decodes, verifies (or is refused) as index.json says.

Driven by ../shared/suit-vectors/index.json so a new vector is picked up without code changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from otaguard import cbor
from otaguard.crypto.keys import PublicKey
from otaguard.errors import ErrorCode, OtaError
from otaguard.manifest import suit
from otaguard.manifest.envelope import parse_envelope
from otaguard.manifest.verify import authenticate_envelope, decode_unverified, verify_envelope
from otaguard.trust.model import StaticKeys

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "suit-vectors"
if not VECTORS.is_dir():  # pragma: no cover - layout fallback
    VECTORS = Path("/work/shared/suit-vectors")
INDEX: dict[str, Any] = (
    json.loads((VECTORS / "index.json").read_text()) if (VECTORS / "index.json").exists() else {}
)

pytestmark = pytest.mark.skipif(not INDEX, reason="SUIT vectors not available")


def load_hex(name: str) -> bytes:
    return bytes.fromhex("".join((VECTORS / name).read_text().split()))


def load_key(rel: str) -> PublicKey:
    data = (VECTORS / rel).read_bytes()
    if b"PRIVATE KEY" in data:  # fe-dependent key is published only as a private key
        priv = serialization.load_pem_private_key(data, None)
        return PublicKey(priv.public_key())
    return PublicKey.from_pem(data)


ALL = sorted(INDEX)
SIGNED = [n for n in ALL if any("COSE_Sign1" in b["type"] for b in INDEX[n]["auth_blocks"])]
UNSIGNED = [n for n in ALL if not INDEX[n]["auth_blocks"]]
MAC = [n for n in ALL if any("COSE_Mac0" in b["type"] for b in INDEX[n]["auth_blocks"])]
SEVERED_PRESENT = [
    n for n in ALL if any(m["in_envelope"] for m in INDEX[n].get("severed_members", {}).values())
]


def test_index_covers_every_envelope_file() -> None:
    on_disk = {
        str(p.relative_to(VECTORS))
        for p in VECTORS.rglob("*.hex")
        if "encryption-info" not in p.name and "encrypted-payload" not in p.name
    }
    assert on_disk == set(INDEX)
    assert len(SIGNED) >= 25 and len(UNSIGNED) == 6 and len(MAC) == 3


@pytest.mark.parametrize("name", ALL)
def test_every_envelope_decodes(name: str) -> None:
    entry = INDEX[name]
    data = load_hex(name)
    assert len(data) == entry["size"]
    raw = parse_envelope(data, require_tag=False)
    assert raw.tagged == entry["tag107"]
    assert [k for k in raw.members] == entry["envelope_keys"]
    shown = decode_unverified(data)
    json.dumps(shown)  # printable
    assert shown["UNVERIFIED"].startswith("UNVERIFIED")
    assert shown["authentication"]["digest_matches_manifest"] is entry["manifest_digest_ok"]
    assert shown["authentication"]["digest"]["value"] == entry["manifest_digest"]
    assert shown["manifest"]["manifest-sequence-number"] == entry["sequence_number"]
    manifest = cbor.loads(raw.members[suit.ENV_MANIFEST], cbor.Limits(max_size=len(data)))
    assert sorted(manifest) == entry["manifest_keys"]
    for key, sev in entry.get("severed_members", {}).items():
        name_ = suit.MANIFEST_KEYS[int(key)]
        if sev["in_envelope"]:
            assert shown["severed"][name_]["digest_ok"] is sev["digest_ok"]
        else:
            assert name_ not in shown["severed"]
    for iname, sub in entry.get("integrated", {}).items():
        assert shown["integrated"][iname]["size"] == sub["size"]
        if "manifest_digest" in sub:
            nested = shown["integrated"][iname]["envelope"]
            assert nested["authentication"]["digest"]["value"] == sub["manifest_digest"]


@pytest.mark.parametrize("name", SIGNED)
def test_signed_examples_verify(name: str) -> None:
    entry = INDEX[name]
    (block,) = entry["auth_blocks"]
    (keyfile,) = block["verifies_with"]
    result = authenticate_envelope(load_hex(name), StaticKeys([load_key(keyfile)]))
    assert result.manifest_digest.hex() == entry["manifest_digest"]
    assert result.manifest[suit.MAN_SEQUENCE] == entry["sequence_number"]
    assert len(result.signers) == 1
    assert result.tagged == entry["tag107"]
    # integrated dependencies are envelopes of their own and verify too
    for iname, sub in entry.get("integrated", {}).items():
        if sub.get("auth_blocks"):
            (subkey,) = sub["auth_blocks"][0]["verifies_with"]
            inner = authenticate_envelope(result.integrated[iname], StaticKeys([load_key(subkey)]))
            assert inner.manifest_digest.hex() == sub["manifest_digest"]


def test_both_cose_algorithms_are_exercised() -> None:
    algs = {b["alg"] for n in SIGNED for b in INDEX[n]["auth_blocks"]}
    assert {-7, -9} <= algs


@pytest.mark.parametrize("name", SIGNED)
def test_signed_examples_fail_with_another_key(name: str) -> None:
    other = load_key("keys/fe-dependent-p256-private.pem")
    (keyfile,) = INDEX[name]["auth_blocks"][0]["verifies_with"]
    if load_key(keyfile) == other:
        other = load_key("keys/example-p256-public.pem")
    with pytest.raises(OtaError) as exc:
        authenticate_envelope(load_hex(name), StaticKeys([other]))
    assert exc.value.code == ErrorCode.SIGNATURE


@pytest.mark.parametrize("name", UNSIGNED)
def test_unsigned_examples_are_refused(name: str) -> None:
    keys = StaticKeys([load_key("keys/example-p256-public.pem")])
    with pytest.raises(OtaError) as exc:
        authenticate_envelope(load_hex(name), keys)
    assert exc.value.code == ErrorCode.NO_AUTH


@pytest.mark.parametrize("name", UNSIGNED)
def test_unsigned_examples_reencode_byte_identical(name: str) -> None:
    data = load_hex(name)
    obj = cbor.loads(data)
    assert cbor.dumps(obj) == data
    # and every nested bstr-wrapped element as well
    inner = obj.value
    for value in inner.values():
        assert cbor.dumps(cbor.loads(value)) == value


@pytest.mark.parametrize("name", MAC)
def test_mac_authenticated_examples_are_refused(name: str) -> None:
    keys = StaticKeys([load_key("keys/example-p256-public.pem")])
    with pytest.raises(OtaError) as exc:
        authenticate_envelope(load_hex(name), keys)
    assert exc.value.code == ErrorCode.UNSUPPORTED


@pytest.mark.parametrize("name", SEVERED_PRESENT)
def test_severed_elements_checked_and_tamper_detected(name: str) -> None:
    data = load_hex(name)
    key = load_key(INDEX[name]["auth_blocks"][0]["verifies_with"][0])
    ok = authenticate_envelope(data, StaticKeys([key]))
    present = [int(k) for k, m in INDEX[name]["severed_members"].items() if m["in_envelope"]]
    assert sorted(ok.severed) == sorted(present)
    raw = parse_envelope(data)
    for member in present:
        span = raw.spans[member]
        # flip the last content byte of the severed element, keeping every length intact
        start = data.index(span)
        pos = start + len(span) - 1
        tampered = data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :]
        with pytest.raises(OtaError) as exc:
            authenticate_envelope(tampered, StaticKeys([key]))
        assert exc.value.code == ErrorCode.DIGEST


def test_severed_form_without_elements_verifies() -> None:
    key = load_key("keys/example-p256-public.pem")
    res = authenticate_envelope(load_hex("manifest/example2.severed-signed.hex"), StaticKeys([key]))
    assert res.severed == {}
    assert isinstance(res.manifest[suit.MAN_INSTALL], list)  # only its digest


def test_draft_examples_are_refused_by_the_otaguard_profile() -> None:
    """Signatures verify, but the profile extractor names why the manifest is foreign."""
    keys = StaticKeys([load_key("keys/example-p256-public.pem")])
    with pytest.raises(OtaError) as exc:
        verify_envelope(load_hex("manifest/example5.signed.hex"), keys)
    assert exc.value.code == ErrorCode.UNSUPPORTED  # two components
    with pytest.raises(OtaError) as exc:
        verify_envelope(load_hex("manifest/example0.signed.hex"), keys)
    assert exc.value.code == ErrorCode.UNSUPPORTED  # invoke is outside the profile
    with pytest.raises(OtaError) as exc:
        verify_envelope(load_hex("libcsuit/suit_manifest_expU.hex"), keys)
    assert exc.value.code == ErrorCode.MALFORMED  # untagged: our profile requires tag 107
    shown = decode_unverified(load_hex("manifest/example5.signed.hex"))
    assert shown["otaguard_profile"]["error"] == "E_UNSUPPORTED"
