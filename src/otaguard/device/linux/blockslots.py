"""A/B slots on block devices (:class:`~..hal.SlotMedia`).

The image is the partition's raw contents from byte 0, so the bootloader can read the root
file system in it directly; the signed envelope that goes with each slot lives on the data
partition (``slot-A.suit``), written atomically. A slot without its envelope never verifies,
and :meth:`BlockSlots.invalidate` also takes it out of the bootloader's rotation *before*
the envelope goes, so a half-written slot can never be started by GRUB either.

Writes stream with bounded memory: at most ``sync_every`` bytes are buffered, then written
and fsync'ed; ``committed`` only counts bytes that reached the device, which is where a
resume after a reboot restarts (the bytes before it are re-hashed from the device). The
slot the system runs from is never written (E_STATE): the running slot is protected by
:meth:`protect` from the kernel command line before anything is installed.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...crypto.algorithms import HashAlg, StreamingHasher
from ...errors import DeviceError, ErrorCode
from ...manifest.verify import MAX_ENVELOPE_SIZE
from ..hal import Slot
from ..imagehash import SignedSizeHash
from .filestore import _read, _write

READ_CHUNK = 1024 * 1024
DEFAULT_UNIT = 4096
DEFAULT_SYNC_EVERY = 1024 * 1024


def resolve_device(spec: str, *, sysfs: Path = Path("/sys/class/block")) -> Path:
    """A slot named by path, or by ``PARTLABEL=<name>`` found in sysfs (no udev needed)."""
    if spec.startswith("PARTLABEL="):
        label = spec.removeprefix("PARTLABEL=")
        found: list[Path] = []
        with contextlib.suppress(OSError):
            for entry in sorted(sysfs.iterdir()):
                try:
                    uevent = (entry / "uevent").read_text()
                except OSError:
                    continue
                fields = dict(line.split("=", 1) for line in uevent.splitlines() if "=" in line)
                if fields.get("PARTNAME") == label and "DEVNAME" in fields:
                    found.append(Path("/dev") / fields["DEVNAME"])
        if len(found) != 1:
            what = "no partition" if not found else f"{len(found)} partitions"
            raise DeviceError(ErrorCode.SLOT_DEVICE, f"{what} labelled {label!r}")
        return found[0]
    path = Path(spec)
    if not path.exists():
        raise DeviceError(ErrorCode.SLOT_DEVICE, f"slot device {spec} does not exist")
    return path


def device_size(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise DeviceError(ErrorCode.SLOT_DEVICE, f"cannot open {path}: {exc.strerror}") from None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class BlockSlot:
    index: int
    device: Path
    image_capacity: int

    @property
    def name(self) -> str:
        return "AB"[self.index]


def _drop_cache(fd: int, offset: int, length: int) -> None:
    """Written or hashed bytes need not stay in the page cache of a small device."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class BlockWriter:
    """:class:`~..hal.ImageWriter` over a block device (or a file standing in for one)."""

    def __init__(
        self, slot: BlockSlot, size: int, alg: HashAlg, *, start: int, unit: int, sync_every: int
    ) -> None:
        self.image = SignedSizeHash(size, alg, slot=slot, start=start, unit=unit)
        self.slot = slot
        self.size = size
        self.sync_every = sync_every
        try:
            self.fd = os.open(slot.device, os.O_RDWR)
        except OSError as exc:
            raise DeviceError(
                ErrorCode.SLOT_DEVICE, f"cannot open slot {slot.name}: {exc.strerror}"
            ) from None
        for off in range(0, start, READ_CHUNK):
            self.image.resume(os.pread(self.fd, min(READ_CHUNK, start - off), off))
        self._synced = start
        self._buf = bytearray()

    @property
    def committed(self) -> int:
        return self._synced

    @property
    def position(self) -> int:
        return self.image.position

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self.image.update(chunk)
        self._buf += chunk
        if len(self._buf) >= self.sync_every:
            self._flush()

    def _flush(self) -> None:
        data = bytes(self._buf)
        self._buf.clear()
        off = self._synced
        try:
            view = memoryview(data)
            while view:
                done = os.pwrite(self.fd, view, off)
                view = view[done:]
                off += done
            os.fsync(self.fd)
        except OSError as exc:
            raise DeviceError(
                ErrorCode.SLOT_DEVICE, f"write to slot {self.slot.name} failed: {exc.strerror}"
            ) from None
        _drop_cache(self.fd, self._synced, len(data))
        self._synced = off

    def finish(self) -> bytes:
        try:
            if self.position == self.size and self._buf:
                self._flush()
            return self.image.digest()
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


class BlockSlots:
    """The two slot partitions plus their envelopes in ``envelope_dir``."""

    def __init__(
        self,
        a: BlockSlot,
        b: BlockSlot,
        envelope_dir: Path,
        *,
        on_invalidate: Callable[[int], None] | None = None,
        unit: int = DEFAULT_UNIT,
        sync_every: int = DEFAULT_SYNC_EVERY,
    ) -> None:
        if a.device.resolve() == b.device.resolve():
            raise DeviceError(ErrorCode.CONFIG, "slots A and B name the same device")
        self.slots: tuple[Slot, Slot] = (a, b)
        self._block = (a, b)
        self.envelope_dir = envelope_dir
        self.on_invalidate = on_invalidate
        self.unit = unit
        self.sync_every = max(unit, sync_every - sync_every % unit)
        self.protected: int | None = None

    @classmethod
    def from_specs(cls, spec_a: str, spec_b: str, envelope_dir: Path, **kw: object) -> BlockSlots:
        devs = [resolve_device(s) for s in (spec_a, spec_b)]
        a, b = (BlockSlot(i, d, device_size(d)) for i, d in enumerate(devs))
        return cls(a, b, envelope_dir, **kw)  # type: ignore[arg-type]

    def protect(self, index: int) -> None:
        """The slot the system runs from: its device is never opened for writing."""
        self.protected = index

    def _writable(self, slot: Slot) -> BlockSlot:
        if slot.index == self.protected:
            raise DeviceError(ErrorCode.STATE, f"refusing to write slot {slot.name}: it is running")
        return self._block[slot.index]

    def _envelope_path(self, slot: Slot) -> Path:
        return self.envelope_dir / f"slot-{slot.name}.suit"

    def manifest_capacity(self, slot: Slot) -> int:
        return MAX_ENVELOPE_SIZE

    def read_envelope(self, slot: Slot) -> bytes | None:
        raw = _read(self._envelope_path(slot), MAX_ENVELOPE_SIZE)
        if raw is None or not raw or len(raw) > MAX_ENVELOPE_SIZE:
            return None
        return raw

    def write_envelope(self, slot: Slot, envelope: bytes) -> None:
        if len(envelope) > MAX_ENVELOPE_SIZE:
            raise DeviceError(ErrorCode.TOO_LARGE, "manifest too large for the slot record")
        _write(self._envelope_path(slot), envelope, mode=0o644)

    def invalidate(self, slot: Slot) -> None:
        if self.on_invalidate is not None:
            self.on_invalidate(slot.index)  # out of the bootloader's rotation first
        path = self._envelope_path(slot)
        try:
            path.unlink(missing_ok=True)
            dfd = os.open(self.envelope_dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise DeviceError(ErrorCode.STORAGE, f"cannot remove {path}: {exc.strerror}") from None

    def discard(self, slot: Slot, size: int) -> None:
        self.invalidate(slot)
        block = self._writable(slot)
        wipe = min(size, block.image_capacity, READ_CHUNK)
        with contextlib.suppress(OSError):
            fd = os.open(block.device, os.O_WRONLY)
            try:
                os.pwrite(fd, bytes(wipe), 0)  # no file system header: nothing mounts it
                os.fsync(fd)
            finally:
                os.close(fd)

    def writer(self, slot: Slot, size: int, alg: HashAlg, *, start: int = 0) -> BlockWriter:
        return BlockWriter(
            self._writable(slot), size, alg, start=start, unit=self.unit, sync_every=self.sync_every
        )

    def hash_image(self, slot: Slot, size: int, alg: HashAlg) -> bytes:
        block = self._block[slot.index]
        if size > block.image_capacity:
            raise DeviceError(ErrorCode.SLOT_FULL, f"{size} bytes exceed slot {slot.name}")
        h = StreamingHasher(alg)
        try:
            fd = os.open(block.device, os.O_RDONLY)
        except OSError as exc:
            raise DeviceError(
                ErrorCode.SLOT_DEVICE, f"cannot open slot {slot.name}: {exc.strerror}"
            ) from None
        try:
            for off in range(0, size, READ_CHUNK):
                data = os.pread(fd, min(READ_CHUNK, size - off), off)
                if not data:
                    raise DeviceError(ErrorCode.SLOT_DEVICE, f"slot {slot.name} ended early")
                h.update(data)
            _drop_cache(fd, 0, size)
        except OSError as exc:
            raise DeviceError(
                ErrorCode.SLOT_DEVICE, f"read of slot {slot.name} failed: {exc.strerror}"
            ) from None
        finally:
            os.close(fd)
        return h.digest()

    def reader(self, slot: Slot) -> Callable[[int, int], bytes]:
        block = self._block[slot.index]
        fd = os.open(block.device, os.O_RDONLY)

        def read(offset: int, n: int) -> bytes:
            if offset < 0 or n < 0 or offset + n > block.image_capacity:
                raise DeviceError(ErrorCode.DELTA_BOUNDS, f"read {offset}+{n} outside the slot")
            return os.pread(fd, n, offset)

        weakref.finalize(read, os.close, fd)
        return read
