"""The boot state: which slot is permanent, which is waiting for a test boot, and how often
it has been tried. Double-buffered (a :class:`~.records.Record` over two sectors), so a power
cut while it is rewritten leaves the previous decision in force. The record is authenticated
with an HMAC under a key derived from the device's hardware unique key (label ``bootstate``):
its ``refs`` pin the envelopes the bootloader runs without re-checking their signature, so a
copy written with a mere checksum is ignored like a torn one.

Pure transitions live here as methods returning new immutable states; the bootloader decides
when to apply them and writes them to flash.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .. import cbor
from ..errors import DeviceError, ErrorCode

if TYPE_CHECKING:
    from .hal import RecordMedia


@dataclass(frozen=True)
class BootState:
    active: int = 0  # confirmed slot (0 = A, 1 = B)
    pending: int | None = None  # slot waiting for / in test boot
    tries: int = 0  # test boots of ``pending`` so far
    refs: tuple[bytes | None, bytes | None] = (None, None)  # SHA-256 of each slot's envelope
    last_error: str | None = None  # why the last pending slot was rejected/reverted
    boots: int = 0

    def encode(self) -> bytes:
        return cbor.dumps(
            {
                1: self.active,
                2: self.pending,
                3: self.tries,
                4: list(self.refs),
                5: self.last_error,
                6: self.boots,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> BootState:
        m: Any = cbor.loads(data, cbor.Limits(max_size=512, max_depth=4, max_items=32))
        try:
            refs = m[4]
            st = cls(
                active=int(m[1]),
                pending=None if m[2] is None else int(m[2]),
                tries=int(m[3]),
                refs=(refs[0], refs[1]),
                last_error=m[5],
                boots=int(m[6]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DeviceError(ErrorCode.STORAGE, f"boot state malformed: {exc}") from None
        if st.active not in (0, 1) or st.pending not in (None, 0, 1) or st.pending == st.active:
            raise DeviceError(ErrorCode.STORAGE, "boot state names an impossible slot")
        return st

    # --- transitions -------------------------------------------------------------------------
    @property
    def inactive(self) -> int:
        return 1 - self.active

    def with_pending(self, slot: int, ref: bytes) -> BootState:
        if slot == self.active:
            raise DeviceError(ErrorCode.STATE, "cannot stage into the active slot")
        refs = list(self.refs)
        refs[slot] = ref
        return replace(self, pending=slot, tries=0, refs=(refs[0], refs[1]), last_error=None)

    def test_boot(self) -> BootState:
        return replace(self, tries=self.tries + 1, boots=self.boots + 1)

    def normal_boot(self) -> BootState:
        return replace(self, boots=self.boots + 1)

    def confirmed(self) -> BootState:
        if self.pending is None:
            raise DeviceError(ErrorCode.STATE, "nothing to confirm: no slot is in test mode")
        return replace(self, active=self.pending, pending=None, tries=0, last_error=None)

    def reverted(self, reason: ErrorCode) -> BootState:
        refs = list(self.refs)
        if self.pending is not None:
            refs[self.pending] = None
        return replace(
            self, pending=None, tries=0, refs=(refs[0], refs[1]), last_error=reason.value
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "active": "AB"[self.active],
            "pending": None if self.pending is None else "AB"[self.pending],
            "tries": self.tries,
            "refs": [r.hex() if r else None for r in self.refs],
            "last_error": self.last_error,
            "boots": self.boots,
        }


class BootStateStore:
    def __init__(self, record: RecordMedia) -> None:
        self.record = record

    def load(self) -> BootState:
        raw = self.record.read()
        if raw is None:
            raise DeviceError(ErrorCode.STORAGE, "boot state unreadable in both copies")
        return BootState.decode(raw)

    def save(self, st: BootState) -> None:
        self.record.write(st.encode())
