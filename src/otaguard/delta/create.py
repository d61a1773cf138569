"""Release-side patch creation: bsdiff matching, per-stream LZMA2, frames in consumption order.

Why this combination (numbers in docs/delta.md): bsdiff's approximate matching is what makes
compiled-code deltas small (relocated pointers become sparse, highly compressible diff bytes);
compressing its three streams separately with LZMA2 beats bsdiff4's bzip2, detools' single
interleaved stream, xdelta3 and zstd --patch-from on every pair of the corpus; and bounding each
LZMA2 dictionary (256 KiB by default) costs under 1% while keeping device memory constant.

The release machine may use RAM freely. Every patch is applied once with the real streaming
applier before it is returned, which both orders the frames (the applier reports which stream
it is waiting on) and proves the patch reproduces ``new`` exactly.
"""

from __future__ import annotations

import hashlib
import lzma
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from ..errors import DeltaError, ErrorCode
from .apply import DEFAULT_MAX_DICT_LOG, PatchApplier
from .format import (
    CODEC_LZMA2,
    CODEC_STORED,
    FP_SIZE,
    MAX_FRAME,
    MAX_SIZE,
    MIN_DICT_LOG,
    StreamInfo,
    encode_header,
    put_uvarint,
    zigzag,
)

FRAME_SIZE = 4096  # frame payload the encoder emits; the format allows up to MAX_FRAME

# (lc, lp, pb) candidates tried per stream; the best observed on firmware diff/extra/control
# streams lie in this set (lc 0-3 with lp=pb=0 for diff bytes, the LZMA default for code).
_PARAMS_FULL: tuple[tuple[int, int, int], ...] = (
    (3, 0, 2),
    (3, 0, 0),
    (2, 0, 0),
    (1, 0, 0),
    (0, 0, 0),
    (1, 0, 1),
    (0, 0, 1),
)
_PARAMS_FAST: tuple[tuple[int, int, int], ...] = ((3, 0, 2), (1, 0, 0))

Triple = tuple[int, int, int]


def bsdiff_triples(old: bytes, new: bytes) -> tuple[list[Triple], bytes, bytes]:
    """bsdiff's (diff_len, extra_len, seek) program plus diff and extra bytes, via bsdiff4."""
    import bsdiff4.core as core  # release-side only; devices never import it

    if not new:
        return [], b"", b""
    ctrl, diff, extra = core.diff(bytes(old), bytes(new))
    dec = core.decode_int64
    raw = [
        (dec(ctrl[i : i + 8]), dec(ctrl[i + 8 : i + 16]), dec(ctrl[i + 16 : i + 24]))
        for i in range(0, len(ctrl), 24)
    ]
    return normalize(raw, len(new)), diff, extra


# Images above this size are matched in segments (see segmented_triples); below it, one
# bsdiff run over the whole pair, as the firmware corpus was measured with.
SEGMENT_THRESHOLD = 8 * 1024 * 1024
SEGMENT_CHUNK = 64 * 1024
SEGMENT_WINDOW = 1024 * 1024


def segmented_triples(
    old: bytes,
    new: bytes,
    *,
    chunk: int | None = None,
    window: int | None = None,
) -> tuple[list[Triple], bytes, bytes]:
    """The bsdiff program for a large image (a root file system) without one bsdiff run over it.

    Why: bsdiff's match search is quadratic on long runs of equal bytes, and a file-system
    image is mostly such runs (free space, zeroed metadata): two 16 MiB ext4 images did not
    finish in minutes. Here ``new`` is cut into ``chunk``-sized blocks: a block equal to ``old``
    at the same offset is a copy (zero diff bytes), an all-zero block is extra bytes (both
    compress to almost nothing), and each run of other blocks is matched by bsdiff against the
    window of ``old`` around it (``window`` bytes either side catches data that moved a little).
    The pieces are joined by adjusting the old-file cursor between them, so the result is an
    ordinary program for the same applier.
    """
    chunk = SEGMENT_CHUNK if chunk is None else chunk
    window = SEGMENT_WINDOW if window is None else window
    triples: list[Triple] = []
    diff = bytearray()
    extra = bytearray()
    oldpos = 0

    def seek_to(target: int) -> None:
        nonlocal oldpos
        delta = target - oldpos
        if delta:
            if triples:
                x, y, z = triples[-1]
                triples[-1] = (x, y, z + delta)
            else:
                triples.append((0, 0, delta))
            oldpos = target

    spans: list[tuple[str, int, int]] = []
    for start in range(0, len(new), chunk):
        end = min(len(new), start + chunk)
        block = new[start:end]
        if old[start:end] == block:
            kind = "same"
        elif block.count(0) == len(block):
            kind = "zero"
        else:
            kind = "other"
        if spans and spans[-1][0] == kind:
            spans[-1] = (kind, spans[-1][1], end)
        else:
            spans.append((kind, start, end))
    for kind, start, end in spans:
        n = end - start
        if kind == "same":
            seek_to(start)
            triples.append((n, 0, 0))
            diff += bytes(n)
            oldpos += n
        elif kind == "zero":
            triples.append((0, n, 0))
            extra += bytes(n)
        else:
            lo, hi = max(0, start - window), min(len(old), end + window)
            part, pdiff, pextra = bsdiff_triples(old[lo:hi], new[start:end])
            seek_to(lo)
            for x, y, z in part:
                if x == 0 and y == 0:
                    seek_to(oldpos + z)
                    continue
                triples.append((x, y, z))
                oldpos += x + z
            diff += pdiff
            extra += pextra
    return normalize(triples, len(new)), bytes(diff), bytes(extra)


def normalize(triples: list[Triple], new_size: int) -> list[Triple]:
    """Fold empty triples into their predecessor (the format allows only a leading empty one)."""
    out: list[Triple] = []
    for x, y, z in triples:
        if x < 0 or y < 0:
            raise DeltaError(ErrorCode.INTERNAL, "bsdiff produced a negative length")
        if x == 0 and y == 0 and out:
            px, py, pz = out[-1]
            out[-1] = (px, py, pz + z)
        else:
            out.append((x, y, z))
    if new_size == 0:
        return []
    if out:
        x, y, _ = out[-1]
        out[-1] = (x, y, 0)  # the last seek is never used
    return out


def encode_ctrl(triples: list[Triple]) -> bytes:
    out = bytearray()
    for x, y, z in triples:
        put_uvarint(out, x)
        put_uvarint(out, y)
        put_uvarint(out, zigzag(z))
    return bytes(out)


def _dict_log(size: int, max_dict_log: int) -> int:
    return max(MIN_DICT_LOG, min(max_dict_log, max(size - 1, 1).bit_length()))


def _lzma2(data: bytes, lc: int, lp: int, pb: int, dict_log: int, preset: int) -> bytes:
    filt = {
        "id": lzma.FILTER_LZMA2,
        "preset": preset,
        "dict_size": 1 << dict_log,
        "lc": lc,
        "lp": lp,
        "pb": pb,
    }
    if preset & lzma.PRESET_EXTREME:
        filt["nice_len"] = 273
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=[filt])


def compress_stream(data: bytes, *, level: int, max_dict_log: int) -> tuple[StreamInfo, bytes]:
    """Smallest encoding of one stream among stored and the LZMA2 candidates for ``level``."""
    best = (StreamInfo(CODEC_STORED, len(data), len(data)), data)
    if not data:
        return best
    dict_log = _dict_log(len(data), max_dict_log)
    if level >= 7:
        params, preset = _PARAMS_FULL, 9 | lzma.PRESET_EXTREME
    elif level >= 4:
        params, preset = _PARAMS_FAST, 9 | lzma.PRESET_EXTREME
    else:
        params, preset = _PARAMS_FAST[:1], 6
    with ThreadPoolExecutor(max_workers=2) as pool:  # liblzma releases the GIL
        results = list(
            pool.map(lambda p: (p, _lzma2(data, p[0], p[1], p[2], dict_log, preset)), params)
        )
    for (lc, lp, pb), comp in results:
        if len(comp) < best[0].comp_size:
            best = (StreamInfo(CODEC_LZMA2, len(data), len(comp), lc, lp, pb, dict_log), comp)
    return best


def create_patch(
    old: bytes,
    new: bytes,
    *,
    level: int = 9,
    max_dict_log: int = DEFAULT_MAX_DICT_LOG,
    frame_size: int = FRAME_SIZE,
    segment_threshold: int = SEGMENT_THRESHOLD,
) -> bytes:
    """Patch turning ``old`` into ``new`` (both plain, uncompressed images).

    Images larger than ``segment_threshold`` are matched in segments (:func:`segmented_triples`).

    ``level`` 1-9 trades creation time for size (9: LZMA2 extreme with a per-stream parameter
    search). ``max_dict_log`` bounds the device's decoder window per stream (2**18 = 256 KiB);
    an applier configured with a smaller limit refuses the patch with E_DELTA_BOMB.
    """
    if not 1 <= level <= 9:
        raise DeltaError(ErrorCode.USAGE, "level must be 1..9")
    if not MIN_DICT_LOG <= max_dict_log <= 30:
        raise DeltaError(ErrorCode.USAGE, "max_dict_log must be 12..30")
    if not 1 <= frame_size <= MAX_FRAME:
        raise DeltaError(ErrorCode.USAGE, f"frame_size must be 1..{MAX_FRAME}")
    if len(old) > MAX_SIZE or len(new) > MAX_SIZE:
        raise DeltaError(ErrorCode.TOO_LARGE, "image too large")
    old, new = bytes(old), bytes(new)
    if len(new) > segment_threshold:
        triples, diff, extra = segmented_triples(old, new)
    else:
        triples, diff, extra = bsdiff_triples(old, new)
    packed = [
        compress_stream(s, level=level, max_dict_log=max_dict_log)
        for s in (encode_ctrl(triples), diff, extra)
    ]
    new_sha = hashlib.sha256(new).digest()
    header = encode_header(
        len(old),
        len(new),
        hashlib.sha256(old).digest()[:FP_SIZE],
        new_sha[:FP_SIZE],
        [info for info, _ in packed],
    )
    return _interleave(old, new_sha, header, [comp for _, comp in packed], max_dict_log, frame_size)


def _interleave(
    old: bytes,
    new_sha: bytes,
    header: bytes,
    streams: list[bytes],
    max_dict_log: int,
    frame_size: int,
) -> bytes:
    """Emit frames in the order the applier asks for them, applying the patch as we go."""
    import zlib

    frames = [deque(s[i : i + frame_size] for i in range(0, len(s), frame_size)) for s in streams]
    mv = memoryview(old)
    applier = PatchApplier(
        lambda off, n: bytes(mv[off : off + n]),
        lambda _data: None,
        old_size=len(old),
        max_new=MAX_SIZE,
        expected_new_digest=new_sha,
        max_dict_log=max_dict_log,
    )
    out = bytearray(header)
    applier.feed(header)

    def emit(sid: int) -> None:
        payload = frames[sid].popleft()
        frame = ((sid << 14) | (len(payload) - 1)).to_bytes(2, "little") + payload
        out.extend(frame)
        applier.feed(frame)

    while (sid := applier.wanted) is not None:
        if not frames[sid]:
            raise DeltaError(ErrorCode.INTERNAL, "patch stream exhausted while still needed")
        emit(sid)
    for sid in range(3):
        while frames[sid]:
            emit(sid)
    trailer = zlib.crc32(out).to_bytes(4, "little")
    out += trailer
    applier.feed(trailer)
    applier.finish()
    return bytes(out)
