"""Power-cut-safe records: two copies, a sequence number and a digest each.

A write always goes to the copy that does *not* hold the newest valid value: erase it, then
program header + payload page by page. The header carries the sequence number, the payload
length and a truncated SHA-256 over both, so a torn or garbage-filled copy is simply invalid
and a reader falls back to the other one. A power cut at any operation of a write therefore
leaves either the old or the new value readable, never neither.

A record built with a ``key`` (the boot state and the monotonic counters) is *authenticated*:
its header carries a full HMAC-SHA256 tag instead of the truncated hash, under a per-record
key derived from the device's hardware unique key (:mod:`.storage`). A copy written by someone
without the key (a raw flash programmer recomputing a checksum) fails exactly like a torn
copy, so the reader falls back to the other copy, and if neither authenticates the record is
unreadable (E_STORAGE); a forged value is never returned.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import DeviceError, ErrorCode
from .flash import Flash
from .layout import Region

MAGIC = b"OGR1"
_HDR = struct.Struct(">4sII16s")  # magic, sequence, length, digest
HEADER_SIZE = _HDR.size
MAC_MAGIC = b"OGM1"
_MAC_HDR = struct.Struct(">4sII32s")  # magic, sequence, length, HMAC-SHA256 tag
MAC_HEADER_SIZE = _MAC_HDR.size

KeySource = Callable[[], bytes]


def _digest(seq: int, payload: bytes) -> bytes:
    return hashlib.sha256(MAGIC + struct.pack(">II", seq, len(payload)) + payload).digest()[:16]


def _mac(key: bytes, seq: int, payload: bytes) -> bytes:
    msg = MAC_MAGIC + struct.pack(">II", seq, len(payload)) + payload
    return hmac.new(key, msg, hashlib.sha256).digest()


@dataclass(frozen=True)
class Copy:
    index: int
    seq: int
    payload: bytes


class Record:
    """One named record occupying ``region`` (split into two equal copies).

    ``key`` returns the record's MAC key; it is called on every access (not at construction)
    because the key comes from OTP, which is programmed after the storage object exists.
    """

    def __init__(self, flash: Flash, region: Region, *, key: KeySource | None = None) -> None:
        ss = flash.geometry.sector_size
        if region.size % (2 * ss):
            raise DeviceError(ErrorCode.USAGE, f"{region.name}: size must be 2 x whole sectors")
        self.flash = flash
        self.region = region
        self.copy_size = region.size // 2
        self.key = key
        self._hdr = _HDR if key is None else _MAC_HDR

    @property
    def authenticated(self) -> bool:
        return self.key is not None

    @property
    def capacity(self) -> int:
        return self.copy_size - self._hdr.size

    def _tag(self, key: bytes | None, seq: int, payload: bytes) -> bytes:
        return _digest(seq, payload) if key is None else _mac(key, seq, payload)

    def _read_copy(self, index: int, key: bytes | None) -> Copy | None:
        base = self.region.offset + index * self.copy_size
        hdr = self._hdr
        magic, seq, length, tag = hdr.unpack(self.flash.read(base, hdr.size))
        if magic != (MAGIC if key is None else MAC_MAGIC) or length > self.capacity:
            return None
        payload = self.flash.read(base + hdr.size, length)
        if not hmac.compare_digest(self._tag(key, seq, payload), tag):
            return None
        return Copy(index, seq, payload)

    def copies(self) -> list[Copy]:
        key = None if self.key is None else self.key()
        return [c for c in (self._read_copy(0, key), self._read_copy(1, key)) if c is not None]

    def newest(self) -> Copy | None:
        valid = self.copies()
        return max(valid, key=lambda c: c.seq) if valid else None

    def read(self) -> bytes | None:
        """The newest valid payload, or None if the record was never written."""
        c = self.newest()
        return c.payload if c is not None else None

    def written(self) -> bool:
        """True if any byte of the record was ever programmed (a record that is *lost*)."""
        return not self.flash.is_erased(self.region.offset, self.region.size)

    def write(self, payload: bytes) -> None:
        if len(payload) > self.capacity:
            raise DeviceError(
                ErrorCode.TOO_LARGE,
                f"{self.region.name}: {len(payload)} bytes do not fit ({self.capacity})",
            )
        key = None if self.key is None else self.key()
        valid = [c for c in (self._read_copy(0, key), self._read_copy(1, key)) if c is not None]
        cur = max(valid, key=lambda c: c.seq) if valid else None
        target = 0 if cur is None else 1 - cur.index
        seq = 1 if cur is None else cur.seq + 1
        base = self.region.offset + target * self.copy_size
        magic = MAGIC if key is None else MAC_MAGIC
        data = self._hdr.pack(magic, seq, len(payload), self._tag(key, seq, payload)) + payload
        ss = self.flash.geometry.sector_size
        # Only the sectors the new value occupies: stale bytes beyond ``length`` are ignored.
        self.flash.erase_range(base, -(-len(data) // ss) * ss)
        self.flash.program_bytes(base, data)
