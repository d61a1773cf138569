"""Streaming, bounded-memory patch applier (the device side).

The applier is push-driven: the caller feeds patch bytes as they arrive (any chunking), the
applier reads the base image through ``read_old(offset, length)`` (the active slot) and writes
the new image strictly sequentially through ``write_new(data)`` (the inactive slot). Memory is
bounded by constants -- never by image or patch size:

* LZMA2 dictionaries: at most ``2**max_dict_log`` per stream (checked against the header before
  any decoder is allocated; 256 KiB by default);
* buffered compressed frames: at most ``MAX_PENDING`` bytes, plus one partial frame;
* decoded data in flight: one ``CHUNK`` of diff or extra bytes and one of old-image bytes;
* output coalescing buffer: ``OUT_CHUNK`` bytes.

Restart, not resume: the applier holds decompressor state that cannot be checkpointed cheaply,
so an interrupted apply is restarted from patch byte 0 and new-image offset 0. That is always
safe because the base image is only ever read and the output is rewritten sequentially from
the start; the caller erases the inactive slot before restarting.
"""

from __future__ import annotations

import hashlib
import lzma
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

from ..crypto.algorithms import HashAlg, StreamingHasher
from ..errors import DeltaError, ErrorCode
from .format import (
    CODEC_LZMA2,
    FP_SIZE,
    FRAME_HEAD,
    HEADER_MAX,
    STREAM_CTRL,
    STREAM_DIFF,
    STREAM_EXTRA,
    STREAM_NAMES,
    TRAILER_SIZE,
    HeaderTruncated,
    PatchHeader,
    StreamInfo,
    corrupt,
    parse_header,
    unzigzag,
)

ReadOld = Callable[[int, int], bytes]
WriteNew = Callable[[bytes], None]

CHUNK = 16 * 1024  # diff/extra bytes decoded per step
OUT_CHUNK = 16 * 1024  # output is handed to write_new in pieces of about this size
MAX_PENDING = 64 * 1024  # compressed frame bytes buffered ahead of their stream's need
DEFAULT_MAX_DICT_LOG = 18  # 256 KiB LZMA2 dictionary per stream
_CTRL_LOOKAHEAD = 30  # one triple is at most three 10-byte varints

_M7 = int.from_bytes(b"\x7f" * CHUNK, "little")
_M8 = int.from_bytes(b"\x80" * CHUNK, "little")


def add_bytes(old: bytes, diff: bytes) -> bytes:
    """Byte-wise ``(old + diff) mod 256`` using big-int SWAR arithmetic (no per-byte loop)."""
    n = len(diff)
    if diff.count(0) == n:
        return old
    if n == CHUNK:
        m7, m8 = _M7, _M8
    else:
        m7 = int.from_bytes(b"\x7f" * n, "little")
        m8 = int.from_bytes(b"\x80" * n, "little")
    a = int.from_bytes(old, "little")
    b = int.from_bytes(diff, "little")
    return (((a & m7) + (b & m7)) ^ ((a ^ b) & m8)).to_bytes(n, "little")


@dataclass(frozen=True)
class ApplyResult:
    new_size: int
    sha256: bytes
    digest: bytes  # of the new image under the requested HashAlg
    digest_alg: HashAlg


class _Stream:
    """One compressed stream: queued frames in, decoded bytes out, never beyond the header."""

    __slots__ = ("dec", "frames", "info", "name", "pending", "produced", "received", "stored")

    def __init__(self, sid: int, info: StreamInfo) -> None:
        self.name = STREAM_NAMES[sid]
        self.info = info
        self.frames: deque[bytes] = deque()
        self.pending = 0
        self.received = 0
        self.produced = 0
        self.stored = memoryview(b"")
        self.dec: lzma.LZMADecompressor | None = None
        if info.codec == CODEC_LZMA2:
            filt = {
                "id": lzma.FILTER_LZMA2,
                "dict_size": info.dict_size,
                "lc": info.lc,
                "lp": info.lp,
                "pb": info.pb,
            }
            try:
                self.dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=[filt])
            except lzma.LZMAError as exc:
                raise corrupt(f"unusable LZMA2 parameters for the {self.name} stream") from exc

    @property
    def remaining(self) -> int:
        return self.info.raw_size - self.produced

    def take(self, n: int) -> bytes:
        """Up to ``n`` (>= 1, <= remaining) decoded bytes; b'' when more frames are needed."""
        out = self._take_lzma(n) if self.dec is not None else self._take_stored(n)
        self.produced += len(out)
        return out

    def _take_stored(self, n: int) -> bytes:
        if not self.stored:
            if not self.frames:
                return b""
            frame = self.frames.popleft()
            self.pending -= len(frame)
            self.stored = memoryview(frame)
        out = bytes(self.stored[:n])
        self.stored = self.stored[n:]
        return out

    def _take_lzma(self, n: int) -> bytes:
        dec = self.dec
        assert dec is not None
        force = False
        while True:
            if dec.eof:
                raise corrupt(f"{self.name} stream ends before its declared size")
            data = b""
            if dec.needs_input or force:
                if not self.frames:
                    return b""
                data = self.frames.popleft()
                self.pending -= len(data)
            try:
                out: bytes = dec.decompress(data, n)
            except lzma.LZMAError as exc:
                raise corrupt(f"{self.name} stream does not decompress") from exc
            if out:
                return out
            force = not data

    def close(self) -> None:
        """After the image is complete: the stream must be fully delivered and end exactly."""
        if self.received != self.info.comp_size:
            raise corrupt(f"{self.name} stream truncated")
        if self.remaining:
            raise corrupt(f"{self.name} stream has unused declared data")
        dec = self.dec
        if dec is None:
            return
        # Probe for output beyond the declared size one byte at a time: a bomb is detected
        # without ever materialising its expansion.
        force = False
        while not dec.eof:
            data = b""
            if dec.needs_input or force:
                if not self.frames:
                    raise corrupt(f"{self.name} stream truncated (no end marker)")
                data = self.frames.popleft()
            try:
                extra = dec.decompress(data, 1)
            except lzma.LZMAError as exc:
                raise corrupt(f"{self.name} stream does not decompress") from exc
            force = not data and not extra
            if extra:
                raise DeltaError(
                    ErrorCode.DELTA_BOMB,
                    f"{self.name} stream expands beyond its declared {self.info.raw_size} bytes",
                )
        if dec.unused_data or self.frames:
            raise corrupt(f"bytes after the end of the {self.name} stream")


_HEADER, _FRAMES, _TRAILER, _DONE, _FAILED = range(5)


class PatchApplier:
    """Apply one patch, fed incrementally; see the module docstring for the memory bound.

    ``old_size`` is the size of the running image, ``max_new`` the capacity of the target slot.
    With ``verify_base`` (default) the base image is hashed through ``read_old`` before the first
    write and must match the patch header's fingerprint and, when given, ``expected_base_digest``
    (``digest_alg``), else E_DELTA_BASE. ``expected_new_digest`` makes :meth:`finish` raise
    E_IMAGE_DIGEST on a mismatch; the header's own fingerprint of the new image is always checked.
    Any error leaves the applier failed: the caller erases the slot and may restart.
    """

    def __init__(
        self,
        read_old: ReadOld,
        write_new: WriteNew,
        *,
        old_size: int,
        max_new: int,
        expected_base_digest: bytes | None = None,
        expected_new_digest: bytes | None = None,
        digest_alg: HashAlg = HashAlg.SHA256,
        verify_base: bool = True,
        max_dict_log: int = DEFAULT_MAX_DICT_LOG,
    ) -> None:
        if old_size < 0 or max_new < 0:
            raise DeltaError(ErrorCode.USAGE, "sizes must be non-negative")
        if expected_base_digest is not None and not verify_base:
            raise DeltaError(ErrorCode.USAGE, "expected_base_digest needs verify_base")
        self._read_old = read_old
        self._write_new = write_new
        self._old_size = old_size
        self._max_new = max_new
        self._expected_base = expected_base_digest
        self._expected_new = expected_new_digest
        self._digest_alg = digest_alg
        self._verify_base = verify_base
        self._max_dict_log = max_dict_log

        self._state = _HEADER
        self._buf = bytearray()  # partial header / frame head / frame payload / trailer
        self._frame_sid = -1
        self._frame_len = 0
        self._crc = 0
        self.header: PatchHeader | None = None
        self._streams: list[_Stream] = []
        self._pending_total = 0

        self._sha = hashlib.sha256()
        self._hasher = StreamingHasher(digest_alg) if digest_alg != HashAlg.SHA256 else None
        self._out = bytearray()
        self._out_pos = 0
        self._old_pos = 0
        self._diff_left = 0
        self._extra_left = 0
        self._seek = 0
        self._in_triple = False
        self._triples = 0
        self._ctrl = bytearray()
        self._image_done = False
        self.wanted: int | None = None  # stream the applier is waiting on (encoder uses it)

    # ---------------------------------------------------------------- input side
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._state in (_DONE, _FAILED):
            raise DeltaError(ErrorCode.STATE, "patch applier already finished or failed")
        try:
            self._feed(memoryview(data).cast("B"))
        except BaseException:
            self._state = _FAILED
            raise

    def _feed(self, mv: memoryview) -> None:
        while mv:
            if self._state == _HEADER:
                mv = self._feed_header(mv)
            elif self._state == _FRAMES:
                mv = self._feed_frame(mv)
            elif self._state == _TRAILER:
                need = TRAILER_SIZE - len(self._buf)
                if len(mv) > need:
                    raise corrupt("bytes after the end of the patch")
                self._buf += mv
                mv = mv[len(mv) :]
            else:  # pragma: no cover - feed() refuses these states
                raise DeltaError(ErrorCode.STATE, "patch applier not accepting input")

    def _feed_header(self, mv: memoryview) -> memoryview:
        room = HEADER_MAX - len(self._buf)
        self._buf += mv[:room]
        try:
            header = parse_header(self._buf)
        except HeaderTruncated:
            if len(self._buf) >= HEADER_MAX:
                raise corrupt("patch header malformed") from None
            return mv[room:]
        used = header.header_size - (len(self._buf) - min(room, len(mv)))
        self._crc = zlib.crc32(self._buf[: header.header_size])
        del self._buf[:]
        self._start(header)
        return mv[used:]

    def _feed_frame(self, mv: memoryview) -> memoryview:
        if self._frame_sid < 0:
            need = FRAME_HEAD - len(self._buf)
            self._buf += mv[:need]
            mv = mv[need:]
            if len(self._buf) < FRAME_HEAD:
                return mv
            head = int.from_bytes(self._buf, "little")
            self._crc = zlib.crc32(self._buf, self._crc)
            del self._buf[:]
            sid, length = head >> 14, (head & 0x3FFF) + 1
            if sid > STREAM_EXTRA:
                raise corrupt(f"frame for unknown stream {sid}")
            s = self._streams[sid]
            if s.received + length > s.info.comp_size:
                raise corrupt(f"{s.name} frames exceed the declared compressed size")
            self._frame_sid, self._frame_len = sid, length
        need = self._frame_len - len(self._buf)
        self._buf += mv[:need]
        mv = mv[need:]
        if len(self._buf) < self._frame_len:
            return mv
        payload = bytes(self._buf)
        del self._buf[:]
        self._crc = zlib.crc32(payload, self._crc)
        s = self._streams[self._frame_sid]
        self._frame_sid = -1
        s.frames.append(payload)
        s.received += len(payload)
        s.pending += len(payload)
        self._run()
        if sum(x.pending for x in self._streams) > MAX_PENDING:
            raise corrupt("patch frames arrive too far ahead of their use (buffer limit)")
        if all(x.received == x.info.comp_size for x in self._streams):
            self._state = _TRAILER
        return mv

    def _start(self, h: PatchHeader) -> None:
        if h.new_size > self._max_new:
            raise DeltaError(
                ErrorCode.DELTA_BOUNDS,
                f"patch produces {h.new_size} bytes, the slot holds {self._max_new}",
            )
        if h.old_size != self._old_size:
            raise DeltaError(
                ErrorCode.DELTA_BASE,
                f"patch is for a {h.old_size}-byte base image, the running one has "
                f"{self._old_size} bytes",
            )
        for s in h.streams:
            if s.codec == CODEC_LZMA2 and s.dict_log > self._max_dict_log:
                raise DeltaError(
                    ErrorCode.DELTA_BOMB,
                    f"patch needs a {s.dict_size}-byte decoder window, limit is "
                    f"{1 << self._max_dict_log}",
                )
        if h.streams[STREAM_CTRL].raw_size > 3 * 10 * (h.new_size + 1):
            raise corrupt("control stream larger than any valid patch needs")
        if self._verify_base:
            self._check_base(h)
        self.header = h
        self._streams = [_Stream(i, s) for i, s in enumerate(h.streams)]
        self._state = _FRAMES
        self._run()
        if all(x.info.comp_size == 0 for x in self._streams):
            self._state = _TRAILER

    def _check_base(self, h: PatchHeader) -> None:
        sha = hashlib.sha256()
        other = StreamingHasher(self._digest_alg) if self._expected_base is not None else None
        pos = 0
        while pos < self._old_size:
            n = min(CHUNK, self._old_size - pos)
            data = self._read_old(pos, n)
            if len(data) != n:
                raise DeltaError(ErrorCode.DELTA_BOUNDS, "read_old returned a short read")
            sha.update(data)
            if other is not None:
                other.update(data)
            pos += n
        if sha.digest()[:FP_SIZE] != h.old_fp:
            raise DeltaError(ErrorCode.DELTA_BASE, "patch is for another base image")
        if other is not None and other.digest() != self._expected_base:
            raise DeltaError(ErrorCode.DELTA_BASE, "running image is not the expected base")

    # ---------------------------------------------------------------- the patch program
    def _emit(self, data: bytes) -> None:
        self._sha.update(data)
        if self._hasher is not None:
            self._hasher.update(data)
        self._out_pos += len(data)
        self._out += data
        if len(self._out) >= OUT_CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._out:
            self._write_new(bytes(self._out))
            del self._out[:]

    def _run(self) -> None:
        """Produce output until a stream runs dry (``wanted`` says which) or the image is done."""
        h = self.header
        assert h is not None
        diff, extra = self._streams[STREAM_DIFF], self._streams[STREAM_EXTRA]
        while True:
            if self._diff_left:
                d = diff.take(min(self._diff_left, CHUNK))
                if not d:
                    self.wanted = STREAM_DIFF
                    return
                old = self._read_old(self._old_pos, len(d))
                if len(old) != len(d):
                    raise DeltaError(ErrorCode.DELTA_BOUNDS, "read_old returned a short read")
                self._emit(add_bytes(old, d))
                self._diff_left -= len(d)
                self._old_pos += len(d)
                continue
            if self._extra_left:
                e = extra.take(min(self._extra_left, CHUNK))
                if not e:
                    self.wanted = STREAM_EXTRA
                    return
                self._emit(e)
                self._extra_left -= len(e)
                continue
            if self._in_triple:
                self._old_pos += self._seek
                self._in_triple = False
            if self._out_pos == h.new_size:
                if self._ctrl or self._streams[STREAM_CTRL].remaining:
                    raise corrupt("control data after the end of the image")
                self._image_done = True
                self.wanted = None
                self._flush()
                return
            if not self._next_triple():
                self.wanted = STREAM_CTRL
                return

    def _next_triple(self) -> bool:
        ctrl = self._streams[STREAM_CTRL]
        while len(self._ctrl) < _CTRL_LOOKAHEAD and ctrl.remaining:
            got = ctrl.take(min(ctrl.remaining, 256))
            if not got:
                if self._complete_triple_buffered():
                    break
                return False
            self._ctrl += got
        x, pos = self._uvarint(0)
        y, pos = self._uvarint(pos)
        z, pos = self._uvarint(pos)
        del self._ctrl[:pos]
        seek = unzigzag(z)
        h = self.header
        assert h is not None
        if x + y == 0 and self._triples:
            raise corrupt("empty control triple")
        if self._out_pos + x + y > h.new_size:
            raise DeltaError(ErrorCode.DELTA_BOUNDS, "patch writes past the end of the new image")
        if x and (self._old_pos < 0 or self._old_pos + x > self._old_size):
            raise DeltaError(ErrorCode.DELTA_BOUNDS, "patch reads outside the base image")
        if x > self._streams[STREAM_DIFF].remaining or y > self._streams[STREAM_EXTRA].remaining:
            raise corrupt("control triple needs more data than the streams declare")
        self._triples += 1
        self._diff_left, self._extra_left, self._seek = x, y, seek
        self._in_triple = True
        return True

    def _complete_triple_buffered(self) -> bool:
        ends = 0
        for b in self._ctrl:
            if not b & 0x80:
                ends += 1
                if ends == 3:
                    return True
        return False

    def _uvarint(self, pos: int) -> tuple[int, int]:
        value = shift = 0
        for i in range(10):
            if pos + i >= len(self._ctrl):
                raise corrupt("control stream ends inside a triple")
            b = self._ctrl[pos + i]
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value, pos + i + 1
        raise corrupt("overlong varint in control stream")

    # ---------------------------------------------------------------- completion
    def finish(self) -> ApplyResult:
        """Check the patch ended exactly and the output is the image it promised."""
        if self._state == _FAILED:
            raise DeltaError(ErrorCode.STATE, "patch applier already failed")
        try:
            return self._finish()
        except BaseException:
            self._state = _FAILED
            raise

    def _finish(self) -> ApplyResult:
        h = self.header
        if h is None or self._state != _TRAILER or len(self._buf) != TRAILER_SIZE:
            raise corrupt("patch truncated")
        if not self._image_done:
            raise corrupt("patch ends before the new image is complete")
        for s in self._streams:
            s.close()
        if int.from_bytes(self._buf, "little") != self._crc:
            raise corrupt("patch checksum mismatch")
        self._flush()
        self._state = _DONE
        sha = self._sha.digest()
        if sha[:FP_SIZE] != h.new_fp:
            raise DeltaError(ErrorCode.IMAGE_DIGEST, "patched image does not match the patch")
        digest = self._hasher.digest() if self._hasher is not None else sha
        if self._expected_new is not None and digest != self._expected_new:
            raise DeltaError(ErrorCode.IMAGE_DIGEST, "patched image does not match the manifest")
        return ApplyResult(h.new_size, sha, digest, self._digest_alg)


def apply_patch(
    patch: BinaryIO | Iterable[bytes],
    read_old: ReadOld,
    write_new: WriteNew,
    *,
    old_size: int,
    max_new: int,
    expected_base_digest: bytes | None = None,
    expected_new_digest: bytes | None = None,
    digest_alg: HashAlg = HashAlg.SHA256,
    verify_base: bool = True,
    max_dict_log: int = DEFAULT_MAX_DICT_LOG,
    read_size: int = 4096,
) -> ApplyResult:
    """Apply a whole patch from a binary stream or an iterable of chunks (see PatchApplier)."""
    applier = PatchApplier(
        read_old,
        write_new,
        old_size=old_size,
        max_new=max_new,
        expected_base_digest=expected_base_digest,
        expected_new_digest=expected_new_digest,
        digest_alg=digest_alg,
        verify_base=verify_base,
        max_dict_log=max_dict_log,
    )
    read = getattr(patch, "read", None)
    if read is not None:
        while chunk := read(read_size):
            applier.feed(chunk)
    else:
        for chunk in patch:
            applier.feed(chunk)
    return applier.finish()


def apply_patch_bytes(old: bytes, patch: bytes, *, max_new: int | None = None) -> bytes:
    """In-memory convenience for release-side checks and tests (not for devices)."""
    out = bytearray()
    mv = memoryview(old)

    def read_old(offset: int, length: int) -> bytes:
        return bytes(mv[offset : offset + length])

    apply_patch(
        [patch],
        read_old,
        out.extend,
        old_size=len(old),
        max_new=max_new if max_new is not None else (1 << 48),
        max_dict_log=30,
    )
    return bytes(out)
