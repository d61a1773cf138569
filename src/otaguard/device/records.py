"""Power-cut-safe records: two copies, a sequence number and a digest each.

A write always goes to the copy that does *not* hold the newest valid value: erase it, then
program header + payload page by page. The header carries the sequence number, the payload
length and a truncated SHA-256 over both, so a torn or garbage-filled copy is simply invalid
and a reader falls back to the other one. A power cut at any operation of a write therefore
leaves either the old or the new value readable, never neither.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from ..errors import DeviceError, ErrorCode
from .flash import Flash
from .layout import Region

MAGIC = b"OGR1"
_HDR = struct.Struct(">4sII16s")  # magic, sequence, length, digest
HEADER_SIZE = _HDR.size


def _digest(seq: int, payload: bytes) -> bytes:
    return hashlib.sha256(MAGIC + struct.pack(">II", seq, len(payload)) + payload).digest()[:16]


@dataclass(frozen=True)
class Copy:
    index: int
    seq: int
    payload: bytes


class Record:
    """One named record occupying ``region`` (split into two equal copies)."""

    def __init__(self, flash: Flash, region: Region) -> None:
        ss = flash.geometry.sector_size
        if region.size % (2 * ss):
            raise DeviceError(ErrorCode.USAGE, f"{region.name}: size must be 2 x whole sectors")
        self.flash = flash
        self.region = region
        self.copy_size = region.size // 2

    @property
    def capacity(self) -> int:
        return self.copy_size - HEADER_SIZE

    def _read_copy(self, index: int) -> Copy | None:
        base = self.region.offset + index * self.copy_size
        magic, seq, length, digest = _HDR.unpack(self.flash.read(base, HEADER_SIZE))
        if magic != MAGIC or length > self.capacity:
            return None
        payload = self.flash.read(base + HEADER_SIZE, length)
        if _digest(seq, payload) != digest:
            return None
        return Copy(index, seq, payload)

    def copies(self) -> list[Copy]:
        return [c for c in (self._read_copy(0), self._read_copy(1)) if c is not None]

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
        cur = self.newest()
        target = 0 if cur is None else 1 - cur.index
        seq = 1 if cur is None else cur.seq + 1
        base = self.region.offset + target * self.copy_size
        data = _HDR.pack(MAGIC, seq, len(payload), _digest(seq, payload)) + payload
        ss = self.flash.geometry.sector_size
        # Only the sectors the new value occupies: stale bytes beyond ``length`` are ignored.
        self.flash.erase_range(base, -(-len(data) // ss) * ss)
        self.flash.program_bytes(base, data)
