"""The otaguard delta patch container (version 1): header, framed streams, trailer.

A patch carries the three bsdiff streams -- control triples, byte-wise diff, extra bytes -- each
compressed *separately* (separate statistics compress ~10% better than one interleaved stream),
yet the device applies it in one sequential pass: the compressed streams are cut into small
frames and the frames are interleaved in exactly the order the applier consumes them. The
applier therefore never buffers more than a few frames, and every size it will ever produce is
declared up front so limits are enforced before any work is done.

Layout (integers are unsigned LEB128 "uvarint" unless noted)::

    magic        4 bytes  b"OGDP"
    version      u8       1
    old_size     uvarint  size of the base image the patch applies to
    new_size     uvarint  size of the image the patch produces
    old_fp       8 bytes  SHA-256(old)[:8]  (base identity; the manifest carries the full digest)
    new_fp       8 bytes  SHA-256(new)[:8]
    3 x stream   ctrl, diff, extra:
        codec    u8       0 = stored, 1 = raw LZMA2
        [lzma2]  u8 props = (pb * 5 + lp) * 9 + lc;  u8 dict_log (dictionary = 2**dict_log)
        raw_size uvarint  decompressed size
        comp_size uvarint compressed size (== raw_size when stored)
    header_crc   u32le    CRC-32 of all header bytes before it
    frames       u16le head = stream_id << 14 | (payload_len - 1), then payload (1..16384 bytes)
    trailer      u32le    CRC-32 of every patch byte before it

Control stream: triples ``uvarint diff_len, uvarint extra_len, zigzag-uvarint seek``. For each
triple the applier writes ``diff_len`` bytes ``old[pos + i] + diff[i] (mod 256)``, advances
``pos`` by ``diff_len``, copies ``extra_len`` bytes of the extra stream, then adds ``seek`` to
``pos``. Only the first triple may be empty (it then only positions ``pos``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from ..errors import DeltaError, ErrorCode

MAGIC = b"OGDP"
FORMAT_VERSION = 1
FP_SIZE = 8

CODEC_STORED = 0
CODEC_LZMA2 = 1

STREAM_CTRL = 0
STREAM_DIFF = 1
STREAM_EXTRA = 2
STREAM_NAMES = ("ctrl", "diff", "extra")

MAX_FRAME = 1 << 14  # largest frame payload the format can express
FRAME_HEAD = 2
TRAILER_SIZE = 4
MIN_DICT_LOG = 12
MAX_DICT_LOG_FORMAT = 30
MAX_VARINT_BYTES = 10
MAX_SIZE = (1 << 48) - 1  # no image or stream is larger than 256 TiB
# magic + version + 2 sizes + 2 fps + 3 streams (codec, props, dict, 2 sizes) + crc
HEADER_MAX = 4 + 1 + 2 * MAX_VARINT_BYTES + 2 * FP_SIZE + 3 * (3 + 2 * MAX_VARINT_BYTES) + 4


@dataclass(frozen=True)
class StreamInfo:
    codec: int
    raw_size: int
    comp_size: int
    lc: int = 0
    lp: int = 0
    pb: int = 0
    dict_log: int = 0

    @property
    def dict_size(self) -> int:
        return 1 << self.dict_log if self.codec == CODEC_LZMA2 else 0


@dataclass(frozen=True)
class PatchHeader:
    old_size: int
    new_size: int
    old_fp: bytes
    new_fp: bytes
    streams: tuple[StreamInfo, StreamInfo, StreamInfo]
    header_size: int
    version: int = FORMAT_VERSION


class HeaderTruncated(DeltaError):
    """The prefix ends inside the header: more bytes are needed (E_DELTA_CORRUPT if none come)."""

    default_code = ErrorCode.DELTA_CORRUPT


def corrupt(detail: str) -> DeltaError:
    return DeltaError(ErrorCode.DELTA_CORRUPT, detail)


def put_uvarint(out: bytearray, value: int) -> None:
    if not 0 <= value < 1 << 64:
        raise ValueError("uvarint out of range")
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


def zigzag(value: int) -> int:
    return value * 2 if value >= 0 else -value * 2 - 1


def unzigzag(value: int) -> int:
    return value >> 1 if not value & 1 else -((value + 1) >> 1)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise HeaderTruncated(detail="patch header truncated")
        b = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return b

    def u8(self) -> int:
        return self.take(1)[0]

    def uvarint(self) -> int:
        value = shift = 0
        for _ in range(MAX_VARINT_BYTES):
            b = self.u8()
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                if b == 0 and shift > 7:
                    raise corrupt("non-minimal varint in patch header")
                if value > MAX_SIZE:
                    raise corrupt("size field out of range in patch header")
                return value
        raise corrupt("overlong varint in patch header")


def encode_header(
    old_size: int, new_size: int, old_fp: bytes, new_fp: bytes, streams: list[StreamInfo]
) -> bytes:
    out = bytearray(MAGIC)
    out.append(FORMAT_VERSION)
    put_uvarint(out, old_size)
    put_uvarint(out, new_size)
    out += old_fp[:FP_SIZE]
    out += new_fp[:FP_SIZE]
    for s in streams:
        out.append(s.codec)
        if s.codec == CODEC_LZMA2:
            out.append((s.pb * 5 + s.lp) * 9 + s.lc)
            out.append(s.dict_log)
        put_uvarint(out, s.raw_size)
        put_uvarint(out, s.comp_size)
    out += zlib.crc32(out).to_bytes(4, "little")
    return bytes(out)


def parse_header(prefix: bytes | bytearray | memoryview) -> PatchHeader:
    """Parse the header from the first bytes of a patch (``HEADER_MAX`` bytes always suffice).

    Raises E_DELTA_CORRUPT when the prefix is not a complete, intact version-1 header, so a
    device can learn ``new_size`` (and refuse a patch that cannot fit its slot) before fetching
    the rest.
    """
    r = _Reader(prefix)
    if r.take(4) != MAGIC:
        raise corrupt("not an otaguard delta patch (bad magic)")
    version = r.u8()
    if version != FORMAT_VERSION:
        raise DeltaError(ErrorCode.VERSION, f"delta patch format version {version} unsupported")
    old_size = r.uvarint()
    new_size = r.uvarint()
    old_fp = r.take(FP_SIZE)
    new_fp = r.take(FP_SIZE)
    streams: list[StreamInfo] = []
    for sid in range(3):
        codec = r.u8()
        if codec == CODEC_STORED:
            raw = r.uvarint()
            comp = r.uvarint()
            if raw != comp:
                raise corrupt(f"stored {STREAM_NAMES[sid]} stream with raw != compressed size")
            streams.append(StreamInfo(CODEC_STORED, raw, comp))
        elif codec == CODEC_LZMA2:
            props = r.u8()
            dict_log = r.u8()
            lc, rest = props % 9, props // 9
            lp, pb = rest % 5, rest // 5
            if pb > 4 or lc + lp > 4:
                raise corrupt(f"invalid LZMA2 properties for the {STREAM_NAMES[sid]} stream")
            if not MIN_DICT_LOG <= dict_log <= MAX_DICT_LOG_FORMAT:
                raise corrupt(f"invalid dictionary size for the {STREAM_NAMES[sid]} stream")
            raw = r.uvarint()
            comp = r.uvarint()
            if comp == 0:
                raise corrupt(f"empty compressed {STREAM_NAMES[sid]} stream")
            streams.append(StreamInfo(CODEC_LZMA2, raw, comp, lc, lp, pb, dict_log))
        else:
            raise corrupt(f"unknown codec {codec} for the {STREAM_NAMES[sid]} stream")
    body_end = r.pos
    crc = int.from_bytes(r.take(4), "little")
    if zlib.crc32(bytes(prefix[:body_end])) != crc:
        raise corrupt("patch header checksum mismatch")
    if streams[STREAM_DIFF].raw_size + streams[STREAM_EXTRA].raw_size != new_size:
        raise corrupt("diff + extra stream sizes do not add up to the new image size")
    return PatchHeader(
        old_size=old_size,
        new_size=new_size,
        old_fp=old_fp,
        new_fp=new_fp,
        streams=(streams[0], streams[1], streams[2]),
        header_size=r.pos,
        version=version,
    )


def patch_header(prefix: bytes | bytearray | memoryview) -> PatchHeader:
    """Public name of :func:`parse_header`."""
    return parse_header(prefix)
