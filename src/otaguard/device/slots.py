"""Reading and writing one A/B slot on the simulated flash: its manifest area and its image,
in bounded chunks. :class:`FlashSlots` is the flash backend of :class:`~.hal.SlotMedia`.

This module knows nothing about where bytes come from (a file, HTTPS, a delta decoder): the
:class:`SlotWriter` accepts chunks and keeps a running hash, and :func:`hash_slot` re-reads an
image from flash page by page. RAM use is one page plus the hasher state whatever the image
size.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

from ..crypto.algorithms import HashAlg, StreamingHasher
from ..errors import DeviceError, ErrorCode, OtaError
from .flash import Flash
from .hal import Slot
from .imagehash import SignedSizeHash
from .layout import Layout, SlotRegion

MANIFEST_MAGIC = b"OGMF"
_MHDR = struct.Struct(">4sI")
READ_CHUNK = 64 * 1024


def manifest_capacity(slot: SlotRegion) -> int:
    return slot.manifest_size - _MHDR.size


def read_envelope(flash: Flash, slot: SlotRegion) -> bytes | None:
    """The envelope stored in the slot's manifest area, or None if there is none."""
    magic, length = _MHDR.unpack(flash.read(slot.manifest_offset, _MHDR.size))
    if magic != MANIFEST_MAGIC or length == 0 or length > manifest_capacity(slot):
        return None
    return flash.read(slot.manifest_offset + _MHDR.size, length)


def write_envelope(flash: Flash, slot: SlotRegion, envelope: bytes) -> None:
    if len(envelope) > manifest_capacity(slot):
        raise DeviceError(ErrorCode.TOO_LARGE, "manifest does not fit the slot's manifest area")
    invalidate(flash, slot)
    flash.program_bytes(slot.manifest_offset, _MHDR.pack(MANIFEST_MAGIC, len(envelope)) + envelope)


def invalidate(flash: Flash, slot: SlotRegion) -> None:
    """Erase the manifest area: without it the slot can never verify, so it never boots."""
    ss = flash.geometry.sector_size
    for a in range(slot.manifest_offset, slot.manifest_offset + slot.manifest_size, ss):
        if not flash.is_erased(a, ss):
            flash.erase_sector(a)


def envelope_ref(envelope: bytes) -> bytes:
    return hashlib.sha256(envelope).digest()


def hash_slot(flash: Flash, slot: SlotRegion, size: int, alg: HashAlg) -> bytes:
    """Digest of the first ``size`` image bytes of ``slot``, read from flash in chunks."""
    if size > slot.image_capacity:
        raise DeviceError(ErrorCode.SLOT_FULL, f"{size} bytes exceed slot {slot.name}")
    h = StreamingHasher(alg)
    base = slot.image_offset
    for off in range(0, size, READ_CHUNK):
        h.update(flash.read(base + off, min(READ_CHUNK, size - off)))
    return h.digest()


def erase_image(flash: Flash, slot: SlotRegion, size: int) -> None:
    """Erase the sectors an image of ``size`` bytes occupies (skipping already-erased ones)."""
    ss = flash.geometry.sector_size
    end = slot.image_offset + min(-(-size // ss) * ss, slot.image_capacity)
    for a in range(slot.image_offset, end, ss):
        if not flash.is_erased(a, ss):
            flash.erase_sector(a)


class SlotWriter:
    """Streams an image into a slot with a running hash; resumable at sector boundaries.

    ``start`` > 0 resumes: bytes [0, start) already on flash are re-hashed from flash (the
    hasher state cannot be persisted), and sectors from ``start`` on are erased before they
    are programmed, because a cut may have left them half-written.
    """

    def __init__(
        self, flash: Flash, slot: SlotRegion, size: int, alg: HashAlg, *, start: int = 0
    ) -> None:
        ss = flash.geometry.sector_size
        self.image = SignedSizeHash(size, alg, slot=slot, start=start, unit=ss)
        self.flash = flash
        self.slot = slot
        self.size = size
        self.page = flash.geometry.page_size
        self.sector = ss
        base = slot.image_offset
        for off in range(0, start, READ_CHUNK):
            self.image.resume(flash.read(base + off, min(READ_CHUNK, start - off)))
        self.flushed = start  # bytes programmed
        self._buf = bytearray()

    @property
    def committed(self) -> int:
        """Bytes safely on flash in whole sectors: the point a resume may restart from."""
        return self.flushed - self.flushed % self.sector

    @property
    def position(self) -> int:
        return self.image.position

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self.image.update(chunk)
        self._buf += chunk
        while len(self._buf) >= self.page:
            self._program(bytes(self._buf[: self.page]))
            del self._buf[: self.page]

    def _program(self, page: bytes) -> None:
        addr = self.slot.image_offset + self.flushed
        if self.flushed % self.sector == 0:
            self.flash.erase_sector(addr)
        self.flash.program(addr, page)
        self.flushed += len(page)

    def finish(self) -> bytes:
        """Flush the tail and return the digest; E_IMAGE_SIZE if the image was cut short."""
        if self.position == self.size and self._buf:
            self._program(bytes(self._buf))
            self._buf.clear()
        return self.image.digest()


def slot_reader(flash: Flash, slot: SlotRegion) -> Callable[[int, int], bytes]:
    """``read_old(offset, n)`` over a slot's image area, for a streaming delta decoder."""

    def read(offset: int, n: int) -> bytes:
        if offset < 0 or n < 0 or offset + n > slot.image_capacity:
            raise DeviceError(ErrorCode.DELTA_BOUNDS, f"read {offset}+{n} outside the slot")
        return flash.read(slot.image_offset + offset, n)

    return read


class FlashSlots:
    """The two slots of a simulated flash part (:class:`~.hal.SlotMedia`)."""

    def __init__(self, flash: Flash, layout: Layout) -> None:
        self.flash = flash
        self.layout = layout
        self.slots: tuple[Slot, Slot] = layout.slots
        self.unit = layout.geometry.sector_size

    def _region(self, slot: Slot) -> SlotRegion:
        return self.layout.slots[slot.index]

    def manifest_capacity(self, slot: Slot) -> int:
        return manifest_capacity(self._region(slot))

    def read_envelope(self, slot: Slot) -> bytes | None:
        return read_envelope(self.flash, self._region(slot))

    def write_envelope(self, slot: Slot, envelope: bytes) -> None:
        write_envelope(self.flash, self._region(slot), envelope)

    def invalidate(self, slot: Slot) -> None:
        invalidate(self.flash, self._region(slot))

    def discard(self, slot: Slot, size: int) -> None:
        region = self._region(slot)
        try:
            invalidate(self.flash, region)
            erase_image(self.flash, region, min(size, region.image_capacity))
        except OtaError as err:
            if err.code == ErrorCode.POWER_CUT:
                raise
            # A read error while cleaning up: the manifest area is what matters; it is erased
            # unconditionally so the slot can never verify.
            self.flash.erase_range(region.manifest_offset, region.manifest_size)

    def writer(self, slot: Slot, size: int, alg: HashAlg, *, start: int = 0) -> SlotWriter:
        return SlotWriter(self.flash, self._region(slot), size, alg, start=start)

    def hash_image(self, slot: Slot, size: int, alg: HashAlg) -> bytes:
        return hash_slot(self.flash, self._region(slot), size, alg)

    def reader(self, slot: Slot) -> Callable[[int, int], bytes]:
        return slot_reader(self.flash, self._region(slot))
