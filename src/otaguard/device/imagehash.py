"""The size bound every slot writer applies to an incoming image, whatever the medium.

One class so that the check exists once: a byte past the size the manifest signed is refused
as it arrives (the writer stops reading the transport there), and an image that ends short is
refused before its digest is even compared (E_IMAGE_SIZE either way).
"""

from __future__ import annotations

from ..crypto.algorithms import HashAlg, StreamingHasher
from ..errors import DeviceError, ErrorCode
from .hal import Slot


class SignedSizeHash:
    def __init__(
        self, size: int, alg: HashAlg, *, slot: Slot, start: int = 0, unit: int = 1
    ) -> None:
        """For an image of ``size`` bytes going into ``slot`` from ``start`` (a resume point,
        a multiple of the medium's ``unit``): E_SLOT_FULL / E_STATE before anything is done."""
        if size > slot.image_capacity:
            raise DeviceError(
                ErrorCode.SLOT_FULL,
                f"image of {size} bytes does not fit slot {slot.name} ({slot.image_capacity})",
            )
        if start % unit or start < 0 or start > size:
            raise DeviceError(ErrorCode.STATE, f"cannot resume at {start}")
        self.size = size
        self.position = 0  # bytes accepted (hashed)
        self._hasher = StreamingHasher(alg)

    def resume(self, prefix: bytes) -> None:
        """Bytes already on the medium before a resume point (re-read, never re-fetched)."""
        self.update(prefix)

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        n = len(chunk)
        if self.position + n > self.size:
            raise DeviceError(
                ErrorCode.IMAGE_SIZE,
                f"image is longer than the {self.size} bytes the manifest declares",
            )
        self._hasher.update(chunk)
        self.position += n

    def digest(self) -> bytes:
        if self.position != self.size:
            raise DeviceError(
                ErrorCode.IMAGE_SIZE,
                f"image ended after {self.position} of {self.size} declared bytes",
            )
        return self._hasher.digest()
