"""Delta installs on the simulated device: the happy path, fallback to the full image, and every
hostile patch of issue 6 refused with its own code, the inactive slot erased and the running
firmware untouched (it still boots)."""

from __future__ import annotations

import hashlib
import logging
import lzma
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otaguard.delta import create_patch
from otaguard.delta.format import CODEC_LZMA2, CODEC_STORED, StreamInfo, put_uvarint
from otaguard.device.device import Device
from otaguard.device.lab import Lab, MemoryTransport, image_bytes
from otaguard.device.layout import LayoutConfig
from otaguard.device.slots import read_envelope
from otaguard.device.transport import LocalFileTransport
from otaguard.errors import ErrorCode, OtaError
from tests.test_delta import craft

CFG = LayoutConfig(sector_size=4096, page_size=256, slot_size=8 * 4096, manifest_size=4096)
V1 = image_bytes(24_000, 1)


def _evolve(old: bytes) -> bytes:
    rng = random.Random(7)
    b = bytearray(old)
    for _ in range(40):
        i = rng.randrange(len(b) - 8)
        b[i : i + 4] = rng.randbytes(4)
    return bytes(b[:5000] + rng.randbytes(300) + b[5000:])


V2 = _evolve(V1)
PATCH = create_patch(V1, V2)
OTHER = image_bytes(24_000, 99)  # an unrelated base image
KW = {"version": "1.1.0", "seq": 6, "counter": 3}


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="otaguard.keys")


LAB = Lab()


@pytest.fixture(scope="module")
def lab() -> Lab:
    logging.getLogger("otaguard.keys").setLevel(logging.ERROR)
    return LAB


@pytest.fixture(scope="module")
def base(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("delta") / "base"
    with lab.provision(d, V1, cfg=CFG, version="1.0.0", seq=5, counter=3) as dev:
        assert dev.boot().version == "1.0.0"
    return d


@pytest.fixture
def dev_dir(base: Path, tmp_path: Path) -> Path:
    d = tmp_path / "dev"
    shutil.copytree(base, d)
    return d


def open_dev(lab: Lab, d: Path) -> Device:
    return Device(d, clock=lambda: lab.now)


def boots_into(lab: Lab, d: Path, image: bytes, version: str) -> None:
    with open_dev(lab, d) as dev:
        r = dev.boot()
        assert r.version == version
        if r.mode == "test":
            dev.confirm()
        region = dev.layout.slots[r.slot]
        assert dev.flash.read(region.image_offset, len(image)) == image
    with open_dev(lab, d) as dev:
        assert (dev.boot().mode, dev.boot().version) == ("normal", version)


def test_delta_install_boots_and_confirms(lab: Lab, dev_dir: Path) -> None:
    assert len(PATCH) < len(V2) // 4
    t = MemoryTransport(lab.delta_release(V1, V2, PATCH, **KW), b"", patch=PATCH)
    with open_dev(lab, dev_dir) as dev:
        res = dev.install(t)
    assert (res.method, res.bytes_received, res.version) == ("delta", len(PATCH), "1.1.0")
    assert t.offsets == []  # not a byte of the full image
    assert t.events[-1] == {"event": "installed", "version": "1.1.0"}
    boots_into(lab, dev_dir, V2, "1.1.0")


def test_delta_preferred_over_full_when_both_offered(lab: Lab, dev_dir: Path) -> None:
    t = MemoryTransport(
        lab.release(V2, **KW),
        V2,
        patch=PATCH,
        delta_manifest=lab.delta_release(V1, V2, PATCH, **KW),
        chunk=100,
        patch_drop_at=300,  # the patch download drops once: resumed with a Range, in RAM
    )
    with open_dev(lab, dev_dir) as dev:
        res = dev.install(t)
    assert res.method == "delta" and res.delta_error is None
    assert t.patch_offsets == [0, 300] and t.offsets == []
    boots_into(lab, dev_dir, V2, "1.1.0")


def test_next_delta_uses_the_delta_installed_image_as_base(lab: Lab, dev_dir: Path) -> None:
    t = MemoryTransport(lab.delta_release(V1, V2, PATCH, **KW), b"", patch=PATCH)
    with open_dev(lab, dev_dir) as dev:
        dev.install(t)
    boots_into(lab, dev_dir, V2, "1.1.0")
    v3 = _evolve(V2)
    p3 = create_patch(V2, v3)
    t3 = MemoryTransport(
        lab.delta_release(V2, v3, p3, version="1.2.0", seq=7, counter=3), b"", patch=p3
    )
    with open_dev(lab, dev_dir) as dev:
        assert dev.install(t3).method == "delta"
    boots_into(lab, dev_dir, v3, "1.2.0")


# --- hostile patches ---------------------------------------------------------------------------
def _bomb() -> bytes:
    comp = lzma.compress(
        bytes(4 << 20),
        format=lzma.FORMAT_RAW,
        filters=[{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 16}],
    )
    ctrl = bytearray()
    for v in (1000, 0, 0):
        put_uvarint(ctrl, v)
    infos = [
        StreamInfo(CODEC_STORED, len(ctrl), len(ctrl)),
        StreamInfo(CODEC_LZMA2, 1000, len(comp), 3, 0, 2, 16),
        StreamInfo(CODEC_STORED, 0, 0),
    ]
    return craft(old=V1, new_size=1000, infos=infos, comps=[bytes(ctrl), comp, b""])


def _past_slot() -> bytes:
    big = CFG.slot_size * 2  # the patch declares an image twice the slot
    return craft(old=V1, new_size=big, triples=[(0, big, 0)], extra=bytes(big))


def _case(lab: Lab, name: str) -> tuple[bytes, bytes, ErrorCode]:
    """(delta manifest, patch as served, expected code) for one attack."""
    corrupt = bytearray(PATCH)
    corrupt[len(corrupt) // 2] ^= 0x40
    if name == "other-base":  # signed for another base: refused on the manifest alone
        p = create_patch(OTHER, V2)
        return lab.delta_release(OTHER, V2, p, **KW), p, ErrorCode.DELTA_BASE
    if name == "other-base-lying":  # manifest claims our base, patch header says otherwise
        p = create_patch(OTHER, V2)
        return lab.delta_release(V1, V2, p, **KW), p, ErrorCode.DELTA_BASE
    if name == "corrupted":  # signed over the corrupt bytes: the decoder must catch it
        return (
            lab.delta_release(V1, V2, bytes(corrupt), **KW),
            bytes(corrupt),
            ErrorCode.DELTA_CORRUPT,
        )
    if name == "tampered-in-transit":  # signed patch, modified on the wire
        return lab.delta_release(V1, V2, PATCH, **KW), bytes(corrupt), ErrorCode.DELTA_CORRUPT
    if name == "truncated":
        return lab.delta_release(V1, V2, PATCH, **KW), PATCH[:-7], ErrorCode.DELTA_CORRUPT
    if name == "past-slot":
        p = _past_slot()
        return lab.delta_release(V1, V2, p, **KW), p, ErrorCode.DELTA_BOUNDS
    if name == "wrong-final":  # the patch is fine, its output is not the signed image
        v2b = bytearray(V2)
        v2b[100] ^= 1
        m = lab.delta_release(V1, bytes(v2b), PATCH, **KW)
        return m, PATCH, ErrorCode.IMAGE_DIGEST
    if name == "bomb":
        p = _bomb()
        return lab.delta_release(V1, bytes(1000), p, **KW), p, ErrorCode.DELTA_BOMB
    raise AssertionError(name)


ATTACKS = [
    "other-base",
    "other-base-lying",
    "corrupted",
    "tampered-in-transit",
    "truncated",
    "past-slot",
    "wrong-final",
    "bomb",
]


@pytest.mark.parametrize("name", ATTACKS)
def test_hostile_patch_refused(lab: Lab, dev_dir: Path, name: str) -> None:
    manifest, patch, code = _case(lab, name)
    t = MemoryTransport(manifest, b"", patch=patch)
    with open_dev(lab, dev_dir) as dev:
        running = dev.flash.read(dev.layout.slots[0].image_offset, len(V1))
        with pytest.raises(OtaError) as ei:
            dev.install(t)
        assert ei.value.code == code, ei.value
        st = dev.bootloader.bootstate.load()
        assert st.pending is None
        inactive = dev.layout.slots[st.inactive]
        assert read_envelope(dev.flash, inactive) is None
        if code != ErrorCode.DELTA_BASE or name == "other-base-lying":
            # the slot was written (or at least invalidated) and is erased again
            assert dev.flash.is_erased(inactive.image_offset, inactive.image_capacity)
            assert dev.storage.staging() is None
        assert dev.flash.read(dev.layout.slots[0].image_offset, len(V1)) == running
        assert dev.storage.agent_state().last_error == code.value
        assert {"event": "error", "error": code.value}.items() <= t.events[-1].items()
    if name == "other-base":
        assert t.patch_offsets == []  # refused before a single patch byte
    with open_dev(lab, dev_dir) as dev:
        r = dev.boot()
        assert (r.mode, r.version, r.slot) == ("normal", "1.0.0", 0)


@pytest.mark.parametrize("name", ["other-base", "corrupted", "truncated", "wrong-final", "bomb"])
def test_failed_delta_falls_back_to_full_image(lab: Lab, dev_dir: Path, name: str) -> None:
    manifest, patch, code = _case(lab, name)
    t = MemoryTransport(lab.release(V2, **KW), V2, patch=patch, delta_manifest=manifest)
    with open_dev(lab, dev_dir) as dev:
        res = dev.install(t)
        assert dev.storage.agent_state().last_error is None
    assert (res.method, res.delta_error, res.bytes_received) == ("full", code.value, len(V2))
    failed = [e for e in t.events if e.get("event") == "delta-failed"]
    assert len(failed) == 1 and failed[0]["error"] == code.value
    assert t.events[-1] == {"event": "installed", "version": "1.1.0"}
    boots_into(lab, dev_dir, V2, "1.1.0")


def test_delta_manifest_with_bad_signature_falls_back(lab: Lab, dev_dir: Path) -> None:
    forged = bytearray(lab.delta_release(V1, V2, PATCH, **KW))
    forged[-5] ^= 1  # inside the manifest: signature no longer matches
    t = MemoryTransport(lab.release(V2, **KW), V2, patch=PATCH, delta_manifest=bytes(forged))
    with open_dev(lab, dev_dir) as dev:
        res = dev.install(t)
    assert res.method == "full" and res.delta_error is not None
    # recorded as suspect, reported once the full manifest verified
    assert any(e.get("event") == "suspect-sources" for e in t.events)
    boots_into(lab, dev_dir, V2, "1.1.0")


def test_interrupted_delta_restarts_from_zero(lab: Lab, dev_dir: Path) -> None:
    t = MemoryTransport(lab.delta_release(V1, V2, PATCH, **KW), b"", patch=PATCH, chunk=256)
    with open_dev(lab, dev_dir) as dev:
        gen = iter(t.open_patch(0))
        half = b"".join(next(gen) for _ in range(len(PATCH) // 512 + 1))

        class Dropping(MemoryTransport):
            def open_patch(self, offset: int):  # type: ignore[no-untyped-def, override]
                yield half
                raise OtaError(ErrorCode.POWER_CUT, "simulated power loss mid-apply")

        with pytest.raises(OtaError):
            dev.install(Dropping(t.manifest, b"", patch=PATCH))
        stg = dev.storage.staging()
        assert stg is not None and stg.committed == 0  # never a resume point inside a delta
    with open_dev(lab, dev_dir) as dev:
        assert dev.boot().version == "1.0.0"
        t2 = MemoryTransport(t.manifest, b"", patch=PATCH)
        res = dev.install(t2)
        assert res.method == "delta" and res.resumed_from == 0 and t2.patch_offsets == [0]
    boots_into(lab, dev_dir, V2, "1.1.0")


def test_local_file_transport_patch_only(lab: Lab, dev_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "m.suit").write_bytes(lab.delta_release(V1, V2, PATCH, **KW))
    (tmp_path / "p.ogdp").write_bytes(PATCH)
    t = LocalFileTransport(tmp_path / "m.suit", patch=tmp_path / "p.ogdp", chunk=1000)
    with open_dev(lab, dev_dir) as dev:
        res = dev.install(t)
    assert res.method == "delta" and t.bytes_read == len(PATCH)
    boots_into(lab, dev_dir, V2, "1.1.0")
    assert hashlib.sha256(V2).digest() != hashlib.sha256(V1).digest()


@settings(max_examples=25, deadline=None)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(PATCH) - 1), st.integers(1, 255)), min_size=0, max_size=3
    ),
    cut=st.integers(0, 40),
    signed=st.booleans(),
)
def test_property_mutated_delta_installs_exactly_or_is_refused_cleanly(
    base: Path, edits: list[tuple[int, int]], cut: int, signed: bool
) -> None:
    """Whatever happens to the patch, the device ends with V2 exactly, or with a refusal that
    erased the inactive slot and left 1.0.0 booting. ``signed``: the manifest covers the
    mutated patch (a hostile release pipeline), else only the wire bytes changed."""
    lab = LAB
    bad = bytearray(PATCH)
    for i, x in edits:
        bad[i] ^= x
    served = bytes(bad[: len(bad) - cut])
    manifest = lab.delta_release(V1, V2, served if signed else PATCH, **KW)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "dev"
        shutil.copytree(base, d)
        t = MemoryTransport(manifest, b"", patch=served, chunk=97)
        with open_dev(lab, d) as dev:
            try:
                res = dev.install(t)
            except OtaError as err:
                assert err.code in {
                    ErrorCode.DELTA_CORRUPT, ErrorCode.DELTA_BASE, ErrorCode.DELTA_BOUNDS,
                    ErrorCode.DELTA_BOMB, ErrorCode.IMAGE_DIGEST, ErrorCode.IMAGE_SIZE,
                    ErrorCode.VERSION,
                }, err  # fmt: skip
                inactive = dev.layout.slots[1]
                assert read_envelope(dev.flash, inactive) is None
                assert dev.flash.is_erased(inactive.image_offset, inactive.image_capacity)
                assert dev.boot().version == "1.0.0"
                return
        assert res.method == "delta" and served == PATCH
        boots_into(lab, d, V2, "1.1.0")
