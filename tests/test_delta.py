"""Delta codec: round trips, streaming behaviour, bounded memory, and every refusal's code."""

from __future__ import annotations

import functools
import hashlib
import lzma
import os
import random
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otaguard.crypto.algorithms import HashAlg
from otaguard.delta import (
    HEADER_MAX,
    PatchApplier,
    apply_patch,
    apply_patch_bytes,
    create_patch,
    patch_header,
)
from otaguard.delta import create as create_mod
from otaguard.delta.apply import OUT_CHUNK, add_bytes
from otaguard.delta.format import (
    CODEC_LZMA2,
    CODEC_STORED,
    StreamInfo,
    encode_header,
    put_uvarint,
    zigzag,
)
from otaguard.errors import DeltaError, ErrorCode

DELTA_CODES = {
    ErrorCode.DELTA_BASE,
    ErrorCode.DELTA_CORRUPT,
    ErrorCode.DELTA_BOUNDS,
    ErrorCode.DELTA_BOMB,
    ErrorCode.IMAGE_DIGEST,
    ErrorCode.VERSION,
}


def firmware_like(rng: random.Random, size: int) -> bytes:
    """Code-ish bytes: repeated 'instructions' with varying operands, some constant tables."""
    words = [rng.getrandbits(32).to_bytes(4, "little") for _ in range(64)]
    out = bytearray()
    while len(out) < size:
        w = bytearray(rng.choice(words))
        w[0] = rng.getrandbits(8)
        out += w
    return bytes(out[:size])


def evolve(rng: random.Random, old: bytes, edits: int) -> bytes:
    """A plausible new release: inserted/deleted code and shifted pointers."""
    new = bytearray(old)
    for _ in range(edits):
        pos = rng.randrange(max(1, len(new)))
        kind = rng.randrange(3)
        if kind == 0:
            new[pos:pos] = rng.randbytes(rng.randrange(1, 64))
        elif kind == 1:
            del new[pos : pos + rng.randrange(1, 64)]
        else:
            for i in range(pos, min(len(new), pos + 256), 4):
                new[i] = (new[i] + 4) & 0xFF
    return bytes(new)


def apply_mem(old: bytes, patch: bytes, **kw: object) -> bytes:
    out = bytearray()
    kw.setdefault("max_new", 1 << 30)
    apply_patch(
        [patch],
        lambda o, n: old[o : o + n],
        out.extend,
        old_size=len(old),
        **kw,  # type: ignore[arg-type]
    )
    return bytes(out)


@pytest.fixture(scope="module")
def pair() -> tuple[bytes, bytes, bytes]:
    rng = random.Random(7)
    old = firmware_like(rng, 200_000)
    new = evolve(rng, old, 40)
    return old, new, create_patch(old, new, level=4)


# ----------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"", b""),
        (b"", b"abc"),
        (b"abc", b""),
        (b"x" * 1000, b"x" * 999 + b"y"),
        (bytes(range(256)) * 40, bytes(range(256)) * 40),
        (os.urandom(3000), os.urandom(5000)),
    ],
)
def test_round_trip_edge_cases(old: bytes, new: bytes) -> None:
    patch = create_patch(old, new, level=1)
    assert apply_mem(old, patch) == new
    assert apply_patch_bytes(old, patch) == new


def test_realistic_round_trip_is_small(pair: tuple[bytes, bytes, bytes]) -> None:
    old, new, patch = pair
    assert apply_mem(old, patch) == new
    assert len(patch) < len(lzma.compress(new, preset=9)) // 4


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    old=st.binary(max_size=600),
    edits=st.lists(
        st.tuples(st.integers(0, 700), st.integers(0, 40), st.binary(max_size=40)), max_size=6
    ),
)
def test_property_round_trip(old: bytes, edits: list[tuple[int, int, bytes]]) -> None:
    new = bytearray(old)
    for pos, cut, ins in edits:
        p = min(pos, len(new))
        new[p : p + cut] = ins
    patch = create_patch(old, bytes(new), level=1)
    assert apply_mem(old, patch) == bytes(new)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    old=st.binary(min_size=64, max_size=2000),
    blocks=st.lists(
        st.tuples(st.sampled_from(["same", "zero", "edit", "moved"]), st.integers(0, 2000)),
        min_size=2,
        max_size=12,
    ),
    data=st.data(),
)
def test_property_segmented_round_trip(
    old: bytes,
    blocks: list[tuple[str, int]],
    data: st.DataObject,
) -> None:
    """Large images are matched in segments (same-offset copies, zero blocks, windowed
    bsdiff); with tiny chunks and windows every joint between them is exercised, and the
    patch must still turn ``old`` into exactly ``new``."""
    chunk, window = data.draw(st.integers(1, 64)), data.draw(st.integers(0, 128))
    new = bytearray()
    for kind, pos in blocks:
        n = data.draw(st.integers(1, 200))
        if kind == "same":
            new += old[len(new) : len(new) + n]
        elif kind == "zero":
            new += bytes(n)
        elif kind == "edit":
            new += data.draw(st.binary(min_size=1, max_size=n))
        else:
            new += old[pos : pos + n]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(create_mod, "SEGMENT_CHUNK", chunk)
        mp.setattr(create_mod, "SEGMENT_WINDOW", window)
        patch = create_patch(old, bytes(new), level=1, segment_threshold=0)
    assert apply_mem(old, patch) == bytes(new)


def test_segmented_matching_of_a_file_system_like_image_is_fast_and_small() -> None:
    """Mostly zeros and unchanged blocks (what a root file system image is): one bsdiff run
    over this takes minutes (quadratic on long equal runs); segmented it takes seconds."""
    rng = random.Random(3)
    old = bytearray(12 * 1024 * 1024)
    for off in range(0, len(old), 1024 * 1024):
        old[off : off + 300_000] = rng.randbytes(300_000)
    new = bytearray(old)
    new[5_000_000:5_000_100] = rng.randbytes(100)
    new[9_437_184 : 9_437_184 + 4096] = bytes(4096)
    patch = create_patch(bytes(old), bytes(new), level=1)
    assert apply_mem(bytes(old), patch) == bytes(new)
    assert len(patch) < 8 * 1024


def test_add_bytes_matches_bytewise_sum() -> None:
    rng = random.Random(1)
    for n in (1, 7, 16 * 1024, 5000):
        a, b = rng.randbytes(n), rng.randbytes(n)
        assert add_bytes(a, b) == bytes((x + y) & 0xFF for x, y in zip(a, b, strict=True))
    assert add_bytes(b"\xff\x01", b"\x00\x00") == b"\xff\x01"


# ----------------------------------------------------------------- streaming behaviour
def test_any_chunking_gives_the_same_image(pair: tuple[bytes, bytes, bytes]) -> None:
    old, new, patch = pair
    rng = random.Random(3)
    for _ in range(3):
        out = bytearray()
        app = PatchApplier(
            lambda o, n: old[o : o + n], out.extend, old_size=len(old), max_new=len(new)
        )
        pos = 0
        while pos < len(patch):
            step = rng.choice((1, 2, 3, 17, 4096, 70_000))
            app.feed(patch[pos : pos + step])
            pos += step
        res = app.finish()
        assert bytes(out) == new
        assert res.sha256 == hashlib.sha256(new).digest()


def test_writes_are_sequential_and_bounded(pair: tuple[bytes, bytes, bytes]) -> None:
    old, new, patch = pair
    sizes: list[int] = []
    reads: list[tuple[int, int]] = []

    def read_old(o: int, n: int) -> bytes:
        reads.append((o, n))
        return old[o : o + n]

    out = bytearray()

    def write_new(d: bytes) -> None:
        sizes.append(len(d))
        out.extend(d)

    apply_patch([patch], read_old, write_new, old_size=len(old), max_new=len(new))
    assert bytes(out) == new
    assert max(sizes) <= 2 * OUT_CHUNK
    assert all(o >= 0 and o + n <= len(old) and n <= 16 * 1024 for o, n in reads)


def test_patch_header_before_apply(pair: tuple[bytes, bytes, bytes]) -> None:
    old, new, patch = pair
    h = patch_header(patch[:HEADER_MAX])
    assert (h.old_size, h.new_size) == (len(old), len(new))
    assert h.old_fp == hashlib.sha256(old).digest()[:8]
    assert sum(s.comp_size for s in h.streams) < len(patch)
    with pytest.raises(DeltaError) as ei:
        patch_header(patch[:10])
    assert ei.value.code == ErrorCode.DELTA_CORRUPT
    with pytest.raises(DeltaError) as ei:
        patch_header(b"BSDIFF40" + bytes(40))
    assert ei.value.code == ErrorCode.DELTA_CORRUPT


def test_expected_digests_with_sha384(pair: tuple[bytes, bytes, bytes]) -> None:
    old, new, patch = pair
    out = apply_mem(
        old,
        patch,
        expected_base_digest=hashlib.sha384(old).digest(),
        expected_new_digest=hashlib.sha384(new).digest(),
        digest_alg=HashAlg.SHA384,
    )
    assert out == new


def test_interrupted_apply_restarts_from_zero(pair: tuple[bytes, bytes, bytes]) -> None:
    """Power cut mid-apply: a fresh applier over the same patch rewrites the slot from 0."""
    old, new, patch = pair
    slot = bytearray(b"\xff" * len(new))
    pos = 0
    cut_at = len(new) // 2

    class Cut(Exception):
        pass

    def write(d: bytes) -> None:
        nonlocal pos
        if pos > cut_at:
            raise Cut
        slot[pos : pos + len(d)] = d
        pos += len(d)

    def read_old(o: int, n: int) -> bytes:
        return old[o : o + n]

    with pytest.raises(Cut):
        apply_patch([patch], read_old, write, old_size=len(old), max_new=len(new))
    assert slot != new
    slot[:] = b"\xff" * len(new)  # the device erases the inactive slot, then restarts
    pos, cut_at = 0, len(new)
    apply_patch([patch], read_old, write, old_size=len(old), max_new=len(new) * 2)
    assert slot == new


# ----------------------------------------------------------------- memory
def _peak_apply(old: bytes, patch: bytes, new_size: int) -> int:
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        apply_patch(
            (patch[i : i + 4096] for i in range(0, len(patch), 4096)),
            lambda o, n: old[o : o + n],
            digest.update,
            old_size=len(old),
            max_new=new_size,
        )
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_apply_memory_bounded_and_flat_in_image_size() -> None:
    rng = random.Random(11)
    peaks = []
    for size in (300_000, 3_000_000):
        old = firmware_like(rng, size)
        new = evolve(rng, old, size // 20_000)
        patch = create_patch(old, new, level=1)
        peaks.append(_peak_apply(old, patch, len(new)))
    assert all(p < 2 * 1024 * 1024 for p in peaks), peaks
    assert peaks[1] < peaks[0] + 128 * 1024, peaks  # 10x the image, same memory


# ----------------------------------------------------------------- refusals
def test_wrong_base_same_size(pair: tuple[bytes, bytes, bytes]) -> None:
    old, _new, patch = pair
    other = bytearray(old)
    other[12345] ^= 0x40
    with pytest.raises(DeltaError) as ei:
        apply_mem(bytes(other), patch)
    assert ei.value.code == ErrorCode.DELTA_BASE


def test_wrong_base_size_and_expected_digest(pair: tuple[bytes, bytes, bytes]) -> None:
    old, _new, patch = pair
    with pytest.raises(DeltaError) as ei:
        apply_mem(old + b"\0", patch)
    assert ei.value.code == ErrorCode.DELTA_BASE
    with pytest.raises(DeltaError) as ei:
        apply_mem(old, patch, expected_base_digest=hashlib.sha256(b"other").digest())
    assert ei.value.code == ErrorCode.DELTA_BASE


def test_nothing_written_before_base_check(pair: tuple[bytes, bytes, bytes]) -> None:
    old, _new, patch = pair
    other = bytearray(old)
    other[-1] ^= 1
    writes: list[bytes] = []
    with pytest.raises(DeltaError):
        apply_patch(
            [patch],
            lambda o, n: bytes(other[o : o + n]),
            writes.append,
            old_size=len(old),
            max_new=1 << 30,
        )
    assert writes == []


def test_every_truncation_is_corrupt() -> None:
    old = bytes(range(256)) * 8
    new = old[:1000] + b"new code here" + old[1000:]
    patch = create_patch(old, new)
    for cut in range(len(patch)):
        with pytest.raises(DeltaError) as ei:
            apply_mem(old, patch[:cut])
        assert ei.value.code == ErrorCode.DELTA_CORRUPT, cut
    with pytest.raises(DeltaError) as ei:
        apply_mem(old, patch + b"\0")
    assert ei.value.code == ErrorCode.DELTA_CORRUPT


def test_single_byte_corruption_is_detected(pair: tuple[bytes, bytes, bytes]) -> None:
    old, _new, patch = pair
    for pos in (0, 5, 30, len(patch) // 2, len(patch) - 5, len(patch) - 1):
        bad = bytearray(patch)
        bad[pos] ^= 0x10
        with pytest.raises(DeltaError) as ei:
            apply_mem(old, bytes(bad))
        assert ei.value.code in DELTA_CODES, pos


def test_slot_too_small(pair: tuple[bytes, bytes, bytes]) -> None:
    old, new, patch = pair
    writes: list[bytes] = []
    with pytest.raises(DeltaError) as ei:
        apply_patch(
            [patch],
            lambda o, n: old[o : o + n],
            writes.append,
            old_size=len(old),
            max_new=len(new) - 1,
        )
    assert ei.value.code == ErrorCode.DELTA_BOUNDS
    assert writes == []


def test_wrong_final_digest(pair: tuple[bytes, bytes, bytes]) -> None:
    old, _new, patch = pair
    with pytest.raises(DeltaError) as ei:
        apply_mem(old, patch, expected_new_digest=hashlib.sha256(b"x").digest())
    assert ei.value.code == ErrorCode.IMAGE_DIGEST


def test_feed_after_failure_is_refused() -> None:
    app = PatchApplier(lambda o, n: b"", lambda d: None, old_size=0, max_new=10)
    with pytest.raises(DeltaError):
        app.feed(b"NOPE" + bytes(100))
    with pytest.raises(DeltaError) as ei:
        app.feed(b"more")
    assert ei.value.code == ErrorCode.STATE


# ----------------------------------------------------------------- hand-crafted hostile patches
def craft(
    *,
    old: bytes,
    new_size: int,
    triples: list[tuple[int, int, int]] | None = None,
    ctrl: bytes | None = None,
    diff: bytes = b"",
    extra: bytes = b"",
    new_fp: bytes = bytes(8),
    infos: list[StreamInfo] | None = None,
    comps: list[bytes] | None = None,
    order: list[int] | None = None,
    frame: int = 4096,
) -> bytes:
    """A patch with valid checksums but arbitrary (possibly hostile) contents."""
    if ctrl is None:
        buf = bytearray()
        for x, y, z in triples or []:
            put_uvarint(buf, x)
            put_uvarint(buf, y)
            put_uvarint(buf, zigzag(z))
        ctrl = bytes(buf)
    comps = comps or [ctrl, diff, extra]
    infos = infos or [StreamInfo(CODEC_STORED, len(c), len(c)) for c in comps]
    head = encode_header(len(old), new_size, hashlib.sha256(old).digest()[:8], new_fp, infos)
    frames = [[c[i : i + frame] for i in range(0, len(c), frame)] for c in comps]
    body = bytearray(head)
    for sid in order if order is not None else [0, 1, 2]:
        for f in frames[sid]:
            body += ((sid << 14) | (len(f) - 1)).to_bytes(2, "little") + f
    body += zlib.crc32(body).to_bytes(4, "little")
    return bytes(body)


def refused(old: bytes, patch: bytes, **kw: object) -> ErrorCode:
    with pytest.raises(DeltaError) as ei:
        apply_mem(old, patch, **kw)
    return ei.value.code


def test_crafted_valid_patch_applies() -> None:
    old = b"0123456789"
    new = b"0123XYZ456789"
    patch = craft(
        old=old,
        new_size=len(new),
        triples=[(4, 3, 0), (6, 0, 0)],
        diff=bytes(10),
        extra=b"XYZ",
        new_fp=hashlib.sha256(new).digest()[:8],
    )
    assert apply_mem(old, patch) == new


def test_read_outside_old_is_bounds() -> None:
    old = b"0123456789"
    assert refused(old, craft(old=old, new_size=11, triples=[(11, 0, 0)], diff=bytes(11))) == (
        ErrorCode.DELTA_BOUNDS
    )
    negative = craft(old=old, new_size=4, triples=[(0, 0, -5), (4, 0, 0)], diff=bytes(4))
    assert refused(old, negative) == ErrorCode.DELTA_BOUNDS
    past = craft(old=old, new_size=4, triples=[(2, 0, 8), (2, 0, 0)], diff=bytes(4))
    assert refused(old, past) == ErrorCode.DELTA_BOUNDS


def test_write_past_new_size_is_bounds() -> None:
    old = b"0123456789"
    # Streams sum to new_size, but one triple claims more output than the image has.
    patch = craft(old=old, new_size=4, triples=[(2, 3, 0)], diff=bytes(2), extra=b"ab")
    assert refused(old, patch) == ErrorCode.DELTA_BOUNDS


def test_wrong_new_fingerprint_is_image_digest() -> None:
    old = b"0123456789"
    patch = craft(old=old, new_size=10, triples=[(10, 0, 0)], diff=bytes(10), new_fp=b"\1" * 8)
    assert refused(old, patch) == ErrorCode.IMAGE_DIGEST


def test_structural_corruption_codes() -> None:
    old = b"0123456789"
    fp = hashlib.sha256(old).digest()[:8]
    ok = {"old": old, "new_size": 10, "triples": [(10, 0, 0)], "diff": bytes(10), "new_fp": fp}
    assert apply_mem(old, craft(**ok)) == old  # type: ignore[arg-type]
    # empty triple after the first one
    bad = craft(**{**ok, "triples": [(5, 0, 0), (0, 0, 0), (5, 0, 0)]})  # type: ignore[arg-type]
    assert refused(old, bad) == ErrorCode.DELTA_CORRUPT
    # control bytes left over after the image is complete
    bad = craft(**{**ok, "triples": [(10, 0, 0), (1, 0, 0)]})  # type: ignore[arg-type]
    assert refused(old, bad) == ErrorCode.DELTA_CORRUPT
    # control stream ending inside a varint
    bad = craft(**{**ok, "ctrl": b"\x8a"})  # type: ignore[arg-type]
    assert refused(old, bad) == ErrorCode.DELTA_CORRUPT
    # a triple needing more diff bytes than declared (sizes still sum to new_size)
    bad = craft(**{**ok, "triples": [(10, 0, 0)], "diff": bytes(6), "extra": b"abcd"})  # type: ignore[arg-type]
    assert refused(old, bad) == ErrorCode.DELTA_CORRUPT
    # frame for an unknown stream id 3
    p = bytearray(craft(**ok))  # type: ignore[arg-type]
    h = patch_header(p).header_size
    p[h + 1] |= 0xC0
    p[-4:] = zlib.crc32(p[:-4]).to_bytes(4, "little")
    assert refused(old, bytes(p)) == ErrorCode.DELTA_CORRUPT


def test_frames_far_ahead_of_use_are_refused() -> None:
    """A patch that front-loads 200 KiB of extra frames cannot make the device buffer them."""
    old = bytes(10)
    extra = os.urandom(200_000)
    n = len(extra) + 1
    patch = craft(
        old=old, new_size=n, triples=[(1, len(extra), 0)], diff=b"\0", extra=extra, order=[2, 0, 1]
    )
    assert refused(old, patch) == ErrorCode.DELTA_CORRUPT


def test_decompression_bomb_detected_without_expansion() -> None:
    """20 MiB of zeros compress to ~3 KiB; the header declares 1000 bytes."""
    old = bytes(1000)
    comp = lzma.compress(
        bytes(20 << 20),
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
    patch = craft(
        old=old,
        new_size=1000,
        infos=infos,
        comps=[bytes(ctrl), comp, b""],
        new_fp=hashlib.sha256(bytes(1000)).digest()[:8],
    )
    tracemalloc.start()
    try:
        code = refused(old, patch)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == ErrorCode.DELTA_BOMB
    assert peak < 2 * 1024 * 1024


def test_oversized_decoder_window_is_refused(pair: tuple[bytes, bytes, bytes]) -> None:
    old, _new, patch = pair
    assert refused(old, patch, max_dict_log=12) == ErrorCode.DELTA_BOMB


# ----------------------------------------------------------------- fuzzing
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_mutated_patch_never_escapes(data: st.DataObject) -> None:
    old = bytes(range(256)) * 16
    new = old[:2000] + b"\x01\x02 new function body" + old[2100:] + b"tail"
    patch = bytearray(_small_patch(old, new))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not patch:
            kind = "insert"
        pos = data.draw(st.integers(0, max(0, len(patch) - 1)))
        if kind == "flip":
            patch[pos] ^= data.draw(st.integers(1, 255))
        elif kind == "set":
            patch[pos] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            patch[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del patch[pos : pos + data.draw(st.integers(1, 8))]
        else:
            del patch[pos:]
    try:
        out = apply_mem(old, bytes(patch), max_new=len(new) + 64)
    except DeltaError as exc:
        assert exc.code in DELTA_CODES
    else:
        assert out == new  # only possible if the mutations cancelled out


@functools.lru_cache(maxsize=1)
def _small_patch(old: bytes, new: bytes) -> bytes:
    return create_patch(old, new, level=1)


@settings(max_examples=200, deadline=None)
@given(
    old=st.binary(max_size=64),
    ctrl=st.binary(max_size=40),
    diff=st.binary(max_size=64),
    extra=st.binary(max_size=64),
    slack=st.integers(-3, 3),
)
def test_property_hostile_programs_are_contained(
    old: bytes, ctrl: bytes, diff: bytes, extra: bytes, slack: int
) -> None:
    """Valid checksums, arbitrary control program: only typed refusals or a checked image."""
    new_size = max(0, len(diff) + len(extra) + slack)
    patch = craft(old=old, new_size=new_size, ctrl=ctrl, diff=diff, extra=extra)
    try:
        out = apply_mem(old, patch, max_new=1 << 12)
    except DeltaError as exc:
        assert exc.code in DELTA_CODES
    else:
        assert len(out) == new_size and hashlib.sha256(out).digest()[:8] == bytes(8)
