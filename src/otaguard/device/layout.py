"""Where everything lives on the simulated flash part.

```
bootloader (RO) | OTP (1 sector) | boot state (2 sectors) | secure storage records | slot A | slot B
```
Each slot starts with a *manifest area* holding the signed SUIT envelope of the image that
follows it, so the bootloader can re-verify signature, digest and size from flash alone.
Secure-storage records each get two copies of ``sectors`` sectors (see :mod:`.records`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ErrorCode, FlashError
from .flash import Geometry, Protection

# record name -> sectors per copy (two copies each)
DEFAULT_RECORDS: dict[str, int] = {
    "counters": 1,
    "trust": 4,
    "identity": 2,
    "staging": 1,
    "agent": 1,
}


@dataclass(frozen=True)
class Region:
    name: str
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class SlotRegion:
    index: int  # 0 = A, 1 = B
    region: Region
    manifest_size: int  # bytes reserved at the start for the envelope (whole sectors)

    @property
    def name(self) -> str:
        return "AB"[self.index]

    @property
    def manifest_offset(self) -> int:
        return self.region.offset

    @property
    def image_offset(self) -> int:
        return self.region.offset + self.manifest_size

    @property
    def image_capacity(self) -> int:
        return self.region.size - self.manifest_size


@dataclass(frozen=True)
class LayoutConfig:
    """The few numbers that define a device's flash; persisted as ``device.json``."""

    sector_size: int = 4096
    page_size: int = 256
    slot_size: int = 128 * 1024
    manifest_size: int = 8192
    bootloader_size: int = 4096
    records: tuple[tuple[str, int], ...] = tuple(DEFAULT_RECORDS.items())

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["records"] = dict(self.records)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayoutConfig:
        try:
            return cls(
                sector_size=int(d["sector_size"]),
                page_size=int(d["page_size"]),
                slot_size=int(d["slot_size"]),
                manifest_size=int(d["manifest_size"]),
                bootloader_size=int(d["bootloader_size"]),
                records=tuple((str(k), int(v)) for k, v in dict(d["records"]).items()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FlashError(ErrorCode.MALFORMED, f"bad device layout: {exc}") from None


class Layout:
    def __init__(self, cfg: LayoutConfig) -> None:
        self.cfg = cfg
        self.geometry = Geometry(cfg.sector_size, cfg.page_size)
        ss = cfg.sector_size
        for what, v in (
            ("slot_size", cfg.slot_size),
            ("manifest_size", cfg.manifest_size),
            ("bootloader_size", cfg.bootloader_size),
        ):
            if v <= 0 or v % ss:
                raise FlashError(ErrorCode.USAGE, f"{what} must be a positive multiple of {ss}")
        if cfg.manifest_size >= cfg.slot_size:
            raise FlashError(ErrorCode.USAGE, "manifest area must be smaller than the slot")
        off = 0

        def take(name: str, size: int) -> Region:
            nonlocal off
            r = Region(name, off, size)
            off += size
            return r

        self.bootloader = take("bootloader", cfg.bootloader_size)
        self.otp = take("otp", ss)
        self.bootstate = take("bootstate", 2 * ss)
        self.records: dict[str, Region] = {}
        for name, sectors in cfg.records:
            if sectors <= 0:
                raise FlashError(ErrorCode.USAGE, f"record {name} needs at least one sector")
            self.records[name] = take(f"record:{name}", 2 * sectors * ss)
        self.slots = (
            SlotRegion(0, take("slot-a", cfg.slot_size), cfg.manifest_size),
            SlotRegion(1, take("slot-b", cfg.slot_size), cfg.manifest_size),
        )
        self.size = off

    @property
    def protected(self) -> tuple[tuple[int, int, Protection], ...]:
        return (
            (self.bootloader.offset, self.bootloader.end, "ro"),
            (self.otp.offset, self.otp.end, "otp"),
        )

    def regions(self) -> list[Region]:
        return [
            self.bootloader,
            self.otp,
            self.bootstate,
            *self.records.values(),
            *(s.region for s in self.slots),
        ]
