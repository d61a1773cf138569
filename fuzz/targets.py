"""Atheris fuzz targets for the parsers that read attacker-controlled bytes.

Each target takes one input and must either accept it or raise an ``OtaError`` (a typed
refusal); any other exception is a crash and a libFuzzer timeout is a hang. Acceptance is not
enough: every target also has an *oracle* for what it accepted, so a mutation that makes a
parser accept garbage is a finding too:

- ``cbor``: what decoding accepts is one well-formed item, the fast and the strict decoding
  routes agree on it, and it survives a re-encoding.
- ``manifest``: an envelope accepted by the verifier carries exactly a manifest we signed (the
  fuzzing key signs nothing else), and the strict route agrees with the fast route.
- ``keylist``: an accepted key list is exactly a payload we signed.
- ``delta``: an accepted patch produced exactly the declared size and the declared fingerprint.
  The target repairs both CRC-32s first (when the header parses), so the fuzzer gets past the
  checksums into the streams and the applier (standard practice for checksummed formats).

The signing keys are derived from fixed, published seeds: they sign only fuzzing inputs and are
trusted by nothing but these targets.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from otaguard import cbor
from otaguard.crypto.algorithms import CoseAlg, HashAlg
from otaguard.crypto.software import SoftwareSigner
from otaguard.delta.apply import apply_patch_bytes
from otaguard.delta.create import create_patch
from otaguard.delta.format import FP_SIZE, TRAILER_SIZE, parse_header
from otaguard.errors import OtaError
from otaguard.manifest.build import build_envelope
from otaguard.manifest.ids import class_id, vendor_id
from otaguard.manifest.model import DeltaInfo, ManifestInfo
from otaguard.manifest.verify import verify_envelope, verify_strict
from otaguard.trust.documents import decode_keylist_unverified, parse_keylist, sign_keylist
from otaguard.trust.model import StaticKeys

NOW = 1_800_000_000


def fuzz_signer(name: str) -> SoftwareSigner:
    seed = hashlib.sha256(b"otaguard public fuzzing key: " + name.encode()).digest()
    return SoftwareSigner(Ed25519PrivateKey.from_private_bytes(seed), CoseAlg.ED25519)


class OracleViolation(AssertionError):
    """The parser accepted something it must not have (a finding, like a crash)."""


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]


# --- cbor ---------------------------------------------------------------------------------------
def _cbor(data: bytes) -> None:
    try:
        value = cbor.loads(data)
    except OtaError:
        return
    cbor.check_well_formed(data)  # a FormatError here escapes: accepted but not well formed
    encoded = cbor.dumps(value)
    if cbor.dumps(cbor.strict_loads(data)) != encoded:
        raise OracleViolation("the fast and strict decoding routes disagree")
    if cbor.dumps(cbor.loads(encoded)) != encoded:
        raise OracleViolation("accepted value does not survive a re-encoding")


def _cbor_seeds() -> list[bytes]:
    return [
        cbor.dumps(v)
        for v in (
            0,
            -1,
            2**64 - 1,
            b"\x00\x01",
            "text",
            [1, [2, [3]]],
            {1: "a", -2: b"b", "k": [True, False, None]},
            1.5,
        )
    ] + [bytes([0xD8, 0x18, 0x43, 0x01, 0x02, 0x03])]


# --- manifest -----------------------------------------------------------------------------------
_VENDOR = vendor_id("fuzz.example")


def _infos() -> list[ManifestInfo]:
    base = ManifestInfo(
        sequence_number=7,
        vendor_id=_VENDOR,
        class_id=class_id(_VENDOR, "ctl", "r1"),
        digest_alg=HashAlg.SHA256,
        image_digest=hashlib.sha256(b"image").digest(),
        image_size=4096,
        version="2.4.1",
        min_version="2.0.0",
        security_counter=3,
        expires=NOW + 86400,
        uri="https://updates.fuzz.example/fw.bin",
        text={"model": "ctl", "hw_rev": "r1"},
        delta=None,
    )
    delta = ManifestInfo(
        **{
            **base.__dict__,
            "sequence_number": 8,
            "delta": DeltaInfo(b"\x11" * 32, b"\x22" * 32, 777, None),
        }
    )
    return [base, delta]


_M_SIGNERS = [fuzz_signer("manifest-a"), fuzz_signer("manifest-b")]
_M_KEYS = StaticKeys([s.public_key for s in _M_SIGNERS])
_M_ENVELOPES: list[bytes] = []
_M_SIGNED: set[bytes] = set()


def _manifest_seeds() -> list[bytes]:
    if not _M_ENVELOPES:
        for info in _infos():
            for signers in ([_M_SIGNERS[0]], [_M_SIGNERS[1]], _M_SIGNERS):
                env = build_envelope(info, signers)
                _M_ENVELOPES.append(env)
                _M_SIGNED.add(verify_envelope(env, _M_KEYS, now=NOW).manifest_digest)
    return list(_M_ENVELOPES)


def _manifest(data: bytes) -> None:
    _manifest_seeds()
    try:
        fast = verify_envelope(data, _M_KEYS, now=NOW)
    except OtaError:
        return
    if fast.manifest_digest not in _M_SIGNED:
        raise OracleViolation("accepted an envelope whose manifest we never signed")
    strict = verify_strict(data, _M_KEYS, now=NOW)
    if strict.info != fast.info or strict.manifest_digest != fast.manifest_digest:
        raise OracleViolation("the fast and strict verification routes disagree")


# --- key list -----------------------------------------------------------------------------------
_K_SIGNER = fuzz_signer("keylist")
_K_PAYLOADS: set[bytes] = set()


def _keylist_seeds() -> list[bytes]:
    docs = [
        sign_keylist(_K_SIGNER, version=v, authorizations=[], threshold=1, issued_at=NOW)
        for v in (1, 2)
    ]
    for d in docs:
        _K_PAYLOADS.add(decode_keylist_unverified(d)[0].payload)
    return docs


def _keylist(data: bytes) -> None:
    if not _K_PAYLOADS:
        _keylist_seeds()
    try:
        parse_keylist(data, _K_SIGNER.public_key, {})
    except OtaError:
        return
    if decode_keylist_unverified(data)[0].payload not in _K_PAYLOADS:
        raise OracleViolation("accepted a key list whose payload we never signed")


# --- delta --------------------------------------------------------------------------------------
_OLD = bytes(range(256)) * 16
_MAX_NEW = 1 << 16


def _fix_crcs(data: bytes) -> bytes:
    try:
        h = parse_header(data)
    except OtaError:
        return data
    if len(data) < h.header_size + TRAILER_SIZE:
        return data
    body = bytearray(data[: len(data) - TRAILER_SIZE])
    hs = h.header_size
    body[hs - 4 : hs] = struct.pack("<I", zlib.crc32(bytes(body[: hs - 4])))
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


def _delta_seeds() -> list[bytes]:
    new1 = _OLD[:1000] + b"patched!" * 40 + _OLD[1320:]
    new2 = bytes(reversed(_OLD))
    return [create_patch(_OLD, new1, level=1), create_patch(_OLD, new2, level=1)]


def _delta(data: bytes) -> None:
    data = _fix_crcs(data)
    try:
        out = apply_patch_bytes(_OLD, data, max_new=_MAX_NEW)
    except OtaError:
        return
    h = parse_header(data)
    if len(out) != h.new_size or hashlib.sha256(out).digest()[:FP_SIZE] != h.new_fp:
        raise OracleViolation("accepted a patch whose output is not the declared image")


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("cbor", _cbor, _cbor_seeds),
        Target("manifest", _manifest, _manifest_seeds),
        Target("keylist", _keylist, _keylist_seeds),
        Target("delta", _delta, _delta_seeds),
    )
}
