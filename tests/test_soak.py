"""Long fuzzing runs (``make soak``), not part of ``make test``.

The same properties as the quick suites, with many more examples: every parser that reads
attacker-reachable bytes either refuses with an OtaError code or accepts exactly the signed
original. ``OTAGUARD_SOAK_EXAMPLES`` sets the examples per target (default 20,000).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otaguard import cbor
from otaguard.delta import apply_patch, create_patch
from otaguard.errors import OtaError
from otaguard.manifest import canonical
from otaguard.manifest.model import ManifestInfo
from otaguard.manifest.profile import encode_manifest
from otaguard.manifest.verify import decode_unverified, verify_envelope

from .test_manifest_canonical import infos
from .test_manifest_fuzz import INFO, KEYS, mutated
from .test_trust import _STORE, _UPDATE, T0

pytestmark = pytest.mark.soak

EXAMPLES = int(os.environ.get("OTAGUARD_SOAK_EXAMPLES", "20000"))
SOAK = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)

_rng = random.Random(7)
_OLD = bytes(_rng.getrandbits(8) for _ in range(20_000))
_NEW = bytearray(_OLD)
_NEW[5_000:5_000] = b"patched region" * 20
_NEW = bytes(_NEW)
_PATCH = create_patch(_OLD, _NEW)


def _mutate(data: bytes, draw: st.DrawFn) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        if not buf:
            break
        pos = draw(st.integers(0, len(buf) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "flip":
            buf[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del buf[pos : pos + draw(st.integers(1, 16))]
        else:
            del buf[pos:]
    return bytes(buf)


@SOAK
@given(mutated())
def test_soak_manifest(case: tuple[bytes, bytes]) -> None:
    original, data = case
    try:
        vm = verify_envelope(data, KEYS)
    except OtaError:
        pass
    else:
        assert data == original and vm.info == INFO
    with contextlib.suppress(OtaError):
        decode_unverified(data)


@SOAK
@given(st.data())
def test_soak_keylist_update(data: st.DataObject) -> None:
    mutated_update = _mutate(_UPDATE, data.draw)
    try:
        _STORE.apply_update(mutated_update, T0)
    except OtaError:
        return
    assert mutated_update == _UPDATE


@SOAK
@given(st.data())
def test_soak_delta_patch(data: st.DataObject) -> None:
    mutated_patch = _mutate(_PATCH, data.draw)
    out = bytearray()
    try:
        # As on the device: the final digest from the signed manifest is always checked.
        apply_patch(
            [mutated_patch],
            lambda off, n: _OLD[off : off + n],
            out.extend,
            old_size=len(_OLD),
            max_new=len(_NEW) * 2,
            expected_new_digest=hashlib.sha256(_NEW).digest(),
        )
    except OtaError:
        return
    assert bytes(out) == _NEW


@SOAK
@given(st.binary(max_size=2048))
def test_soak_cbor_random_bytes(data: bytes) -> None:
    with contextlib.suppress(OtaError):
        cbor.loads(data)


@SOAK
@given(infos(), st.data())
def test_soak_canonical_body_reader(info: ManifestInfo, data: st.DataObject) -> None:
    """The canonical route's in-place manifest reader (its input is authenticated, but a
    parser differential there would still let the device read other values than were
    signed): whatever it accepts from a mutated manifest is exactly the encoding of what it
    returned."""
    mutated_manifest = _mutate(encode_manifest(info), data.draw)
    read = canonical.manifest_info(mutated_manifest)
    if read is not None:
        assert encode_manifest(read) == mutated_manifest
