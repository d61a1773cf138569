"""Property: a mutated envelope is rejected with an OtaError, or it is the original bytes.

Nothing else may happen: no other exception type escapes, and no envelope that differs from
what was signed is ever accepted (the unsigned parts of SUIT/COSE are pinned down for that).
"""

from __future__ import annotations

import contextlib
import hashlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otaguard.crypto.algorithms import CoseAlg, HashAlg
from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.errors import OtaError
from otaguard.manifest.build import build_envelope
from otaguard.manifest.ids import class_id, vendor_id
from otaguard.manifest.model import DeltaInfo, ManifestInfo
from otaguard.manifest.verify import authenticate_envelope, decode_unverified, verify_envelope
from otaguard.trust.model import StaticKeys

VENDOR = vendor_id("acme.example")
INFO = ManifestInfo(
    sequence_number=42,
    vendor_id=VENDOR,
    class_id=class_id(VENDOR, "sensor", "r2"),
    digest_alg=HashAlg.SHA256,
    image_digest=hashlib.sha256(b"image").digest(),
    image_size=65536,
    version="3.1.0",
    min_version="3.0.0",
    security_counter=9,
    expires=1_900_000_000,
    uri="https://updates.acme.example/fw/3.1.0.bin",
    text={"model": "sensor", "hw_rev": "r2"},
    delta=DeltaInfo(b"\x11" * 32, b"\x22" * 32, 777, None),
)
SIGNERS = [
    SoftwareSigner(generate_private_key("ed25519"), CoseAlg.ED25519),
    SoftwareSigner(generate_private_key("p256"), CoseAlg.ESP256),
]
ENVELOPES = [build_envelope(INFO, [s]) for s in SIGNERS]
KEYS = StaticKeys([s.public_key for s in SIGNERS])


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bytes]:
    original = draw(st.sampled_from(ENVELOPES))
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            del data[pos:]
    return original, bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_rejected_or_identical(case: tuple[bytes, bytes]) -> None:
    original, data = case
    try:
        vm = verify_envelope(data, KEYS)
    except OtaError:
        pass
    else:
        assert data == original
        assert vm.envelope == original and vm.info == INFO
    try:
        # our envelopes are tagged; the generic layer accepts untagged ones only on request
        res = authenticate_envelope(data, KEYS, require_tag=True)
    except OtaError:
        pass
    else:
        assert data == original
        assert res.envelope == original
    with contextlib.suppress(OtaError):
        decode_unverified(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_ota_errors(data: bytes) -> None:
    try:
        vm = verify_envelope(data, KEYS)
    except OtaError:
        pass
    else:  # the oracle: only a signed envelope, byte for byte, ever verifies
        assert data in ENVELOPES and vm.info == INFO
    with contextlib.suppress(OtaError):
        decode_unverified(data)  # unauthenticated by design: only "typed error or a value"
