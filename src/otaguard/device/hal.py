"""The device's hardware interface: what the one update state machine needs from a device.

The verification sequence (manifest signature → applicability → streamed image hash →
pending → first-boot verification → self-test → confirm, or fall back) lives once, in
:mod:`.agent` and :mod:`.bootloader`. They reach storage and boot hardware only through
these small interfaces, each with its implementations:

| interface | simulated NOR flash (simulator, power-cut proofs) | Linux (``linux/``) |
|---|---|---|
| :class:`SlotMedia` | ``slots.FlashSlots`` | ``blockslots.BlockSlots`` |
| :class:`RecordMedia` | ``records.Record`` | ``filestore.FileRecord`` |
| :class:`OtpMedia` | ``storage.FlashOtp`` | ``filestore.FileOtp``, or ``tpm.TpmStore`` (NV index) |
| :class:`BootControl` | ``bootloader.SelfBootControl`` | ``grub.GrubBootControl`` (GRUB, U-Boot) |
| :class:`CounterFloor` | none | none, or ``tpm.TpmStore`` (TPM NV counters) |

A backend decides *where* bytes go and how a write survives a power cut; it never decides
whether something is trusted. That is why nothing here returns a verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..crypto.algorithms import HashAlg
from .bootstate import BootState


class Slot(Protocol):
    """One of the two A/B slots."""

    @property
    def index(self) -> int: ...  # 0 = A, 1 = B

    @property
    def name(self) -> str: ...

    @property
    def image_capacity(self) -> int: ...


class ImageWriter(Protocol):
    """Streams one image into a slot with a running hash; resumable at ``committed``."""

    @property
    def position(self) -> int: ...  # bytes accepted (hashed) so far

    @property
    def committed(self) -> int: ...  # bytes durably written: where a resume may restart

    def write(self, chunk: bytes | bytearray | memoryview) -> None: ...

    def finish(self) -> bytes: ...  # flush; the digest; E_IMAGE_SIZE when cut short


class SlotMedia(Protocol):
    """The two slots: image bytes, plus the signed envelope stored with each image.

    A slot whose envelope is gone (:meth:`invalidate`) can never verify, so it never runs:
    every backend must make that hold for its boot firmware too (the Linux one also takes
    the slot out of the bootloader's rotation).
    """

    slots: tuple[Slot, Slot]
    unit: int  # resume granularity in bytes (a flash sector; a block-device block)

    def manifest_capacity(self, slot: Slot) -> int: ...

    def read_envelope(self, slot: Slot) -> bytes | None: ...

    def write_envelope(self, slot: Slot, envelope: bytes) -> None: ...

    def invalidate(self, slot: Slot) -> None: ...

    def discard(self, slot: Slot, size: int) -> None:
        """Invalidate and wipe the first ``size`` image bytes (an aborted install)."""
        ...

    def writer(self, slot: Slot, size: int, alg: HashAlg, *, start: int = 0) -> ImageWriter: ...

    def hash_image(self, slot: Slot, size: int, alg: HashAlg) -> bytes: ...

    def reader(self, slot: Slot) -> Callable[[int, int], bytes]:
        """``read(offset, n)`` over a slot's image, for a streaming delta decoder."""
        ...


class RecordMedia(Protocol):
    """One named, power-cut-safe record: a read sees the old or the new value, never neither."""

    @property
    def capacity(self) -> int: ...

    def read(self) -> bytes | None: ...  # None: never written

    def written(self) -> bool: ...  # anything ever written (a lost record is not a fresh one)

    def write(self, payload: bytes) -> None: ...


class OtpMedia(Protocol):
    """Write-once storage for the device's identity facts and hardware unique key."""

    def read_otp(self) -> bytes | None: ...  # None: blank; E_STORAGE when corrupt

    def program_otp(self, body: bytes) -> None: ...  # E_OTP_WRITTEN on a second write


class CounterFloor(Protocol):
    """Counters that hardware keeps monotonic (TPM NV counters): a floor under the counter record.

    The counter record stays the one place counters are read and written
    (:meth:`~.storage.SecureStorage.counters`); a floor only makes sure that what it returns
    can never be lower than what the hardware counted, even if the record's storage was
    rewritten with an older copy. It is raised *before* the record is written, so a power cut
    between the two leaves the floor ahead, never behind.
    """

    def floor(self) -> tuple[int, int]: ...  # (security counter, key-list version)

    def raise_to(self, security: int, keylist_version: int) -> None: ...


class BootControl(Protocol):
    """How the boot firmware learns the boot state's decisions, and what it chose.

    The boot state record (authenticated, :mod:`.bootstate`) is the truth; a backend only
    mirrors it into what its firmware reads (GRUB's environment) and reports which slot the
    firmware actually started.
    """

    def chosen(self, st: BootState) -> int:
        """The slot the firmware started on this power-on."""
        ...

    def pending(self, slot: int, active: int) -> None:
        """Next boots try ``slot`` (a bounded number of times), else ``active``."""
        ...

    def confirmed(self, slot: int) -> None:
        """``slot`` is permanent; the other stays the fallback."""
        ...

    def reverted(self, slot: int, active: int) -> None:
        """``slot`` must never boot again until re-installed; ``active`` boots."""
        ...

    def sync(self, st: BootState) -> None:
        """Make the firmware's view agree with ``st`` (repairs a cut between two writes)."""
        ...
