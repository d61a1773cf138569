"""A NOR-flash model in a file: sector erase, page program, protected regions, fault hooks.

Semantics follow NOR flash as MCUboot's simulator models it: erase sets a whole sector to
0xFF; a program writes at most one page and only into bytes that are still erased (programming
a non-erased byte is refused with E_FLASH rather than silently AND-ing bits, so a missing erase
is a bug the tests see). The bootloader region is read-only; the OTP region can be programmed
once and never erased.

The file stores the bitwise complement of the flash contents so that erased flash (0xFF) is
0x00 on disk: a fresh device is a sparse file and a 512 MiB simulated part costs no disk until
it is written.

The file is accessed through a shared memory mapping, not read/write calls: a flash operation
is a memory copy that keeps the GIL, where each file read or write released it. With thousands
of simulated parts on a few threads (the fleet simulator) every release was a thread switch;
the contents on disk are the same either way (a shared mapping writes through the page cache,
as an unbuffered write did).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ErrorCode, FlashError
from .faults import FaultInjector

_INVERT = bytes(255 - i for i in range(256))
Protection = Literal["ro", "otp"]


@dataclass(frozen=True)
class Geometry:
    sector_size: int = 4096
    page_size: int = 256

    def __post_init__(self) -> None:
        for v in (self.sector_size, self.page_size):
            if v <= 0 or v & (v - 1):
                raise FlashError(ErrorCode.USAGE, "sector and page sizes must be powers of two")
        if self.sector_size % self.page_size:
            raise FlashError(ErrorCode.USAGE, "sector size must be a multiple of the page size")


class Flash:
    """One simulated flash part backed by ``path`` (created erased if missing)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: int,
        geometry: Geometry,
        *,
        faults: FaultInjector | None = None,
        protected: tuple[tuple[int, int, Protection], ...] = (),
    ) -> None:
        if size <= 0 or size % geometry.sector_size:
            raise FlashError(ErrorCode.USAGE, "flash size must be a multiple of the sector size")
        self.path = Path(path)
        self.size = size
        self.geometry = geometry
        self.faults = faults if faults is not None else FaultInjector()
        self.protected = protected
        if not self.path.exists():
            with self.path.open("wb") as f:
                f.truncate(size)
        elif self.path.stat().st_size != size:
            raise FlashError(ErrorCode.FLASH, f"{self.path} is not a {size}-byte flash image")
        self._map: mmap.mmap | None = self._open()
        self._parked = False
        self.reads = 0
        self.bytes_read = 0

    def _open(self) -> mmap.mmap:
        with self.path.open("r+b", buffering=0) as f:
            return mmap.mmap(f.fileno(), self.size)  # holds its own descriptor until closed

    # --- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        self._parked = False
        if self._map is not None:
            self._map.close()
            self._map = None

    def park(self) -> None:
        """Release the backing file's descriptor until the next access reopens it.

        For a host running thousands of simulated parts (the fleet simulator): the flash
        contents are unchanged, only the open-files budget is given back. Unlike
        :meth:`close`, the part stays usable."""
        if self._map is not None:
            self._map.close()
            self._map = None
            self._parked = True

    def _mem(self) -> mmap.mmap:
        if self._map is None:
            if not self._parked:
                raise ValueError(f"flash {self.path} is closed")
            self._map = self._open()
            self._parked = False
        return self._map

    def __enter__(self) -> Flash:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sync(self) -> None:
        self._mem().flush()

    # --- raw file access ---------------------------------------------------------------------
    def _raw_read(self, addr: int, n: int) -> bytes:
        return self._mem()[addr : addr + n].translate(_INVERT)

    def _raw_write(self, addr: int, data: bytes) -> None:
        self._mem()[addr : addr + len(data)] = data.translate(_INVERT)

    def _raw_erased(self, addr: int, n: int) -> bool:
        """Whether ``n`` bytes at ``addr`` are all 0xFF (0x00 in the file: no translation)."""
        return self._mem()[addr : addr + n].count(0) == n

    def _bounds(self, addr: int, n: int) -> None:
        if addr < 0 or n < 0 or addr + n > self.size:
            raise FlashError(ErrorCode.FLASH, f"access 0x{addr:x}+{n} outside the flash part")

    def _protection(self, addr: int, n: int) -> Protection | None:
        for start, end, kind in self.protected:
            if addr < end and start < addr + n:
                return kind
        return None

    # --- the three flash operations ----------------------------------------------------------
    def read(self, addr: int, n: int) -> bytes:
        self._bounds(addr, n)
        self.faults.check_read(addr, n)
        self.reads += 1
        self.bytes_read += n
        return self._raw_read(addr, n)

    def erase_sector(self, addr: int) -> None:
        ss = self.geometry.sector_size
        if addr % ss:
            raise FlashError(ErrorCode.FLASH, f"erase address 0x{addr:x} not sector-aligned")
        self._bounds(addr, ss)
        if self._protection(addr, ss) is not None:
            raise FlashError(ErrorCode.FLASH, f"sector 0x{addr:x} is write-protected")
        mode = self.faults.next_op()
        if mode == "before":
            raise self.faults.cut("before erase")
        if mode == "torn":
            half = ss // 2
            self._raw_write(addr, b"\xff" * half)
            if self.faults.plan is not None and self.faults.plan.torn_fill == "garbage":
                self._raw_write(addr + half, self.faults.garbage(ss - half))
            raise self.faults.cut("torn erase")
        self._raw_write(addr, b"\xff" * ss)
        if mode == "after":
            raise self.faults.cut("after erase")

    def program(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Program ``data`` (at most one page, not crossing a page boundary) into erased flash."""
        ps = self.geometry.page_size
        n = len(data)
        if n == 0:
            return
        if n > ps or addr // ps != (addr + n - 1) // ps:
            raise FlashError(ErrorCode.FLASH, f"program 0x{addr:x}+{n} crosses a page boundary")
        self._bounds(addr, n)
        prot = self._protection(addr, n)
        if prot == "ro":
            raise FlashError(ErrorCode.FLASH, f"page 0x{addr:x} is read-only")
        if not self._raw_erased(addr, n):
            raise FlashError(ErrorCode.FLASH, f"program of non-erased flash at 0x{addr:x}")
        payload = bytes(data)
        mode = self.faults.next_op()
        if mode == "before":
            raise self.faults.cut("before program")
        if mode == "torn":
            half = n // 2
            self._raw_write(addr, payload[:half])
            if self.faults.plan is not None and self.faults.plan.torn_fill == "garbage":
                self._raw_write(addr + half, self.faults.garbage(n - half))
            raise self.faults.cut("torn program")
        self._raw_write(addr, payload)
        if mode == "after":
            raise self.faults.cut("after program")

    # --- helpers built on the primitives -----------------------------------------------------
    def is_erased(self, addr: int, n: int) -> bool:
        return self.read(addr, n).count(0xFF) == n

    def program_bytes(self, addr: int, data: bytes) -> None:
        """Program a page-aligned run of bytes page by page (each page one operation)."""
        ps = self.geometry.page_size
        if addr % ps:
            raise FlashError(ErrorCode.FLASH, f"program address 0x{addr:x} not page-aligned")
        view = memoryview(data)
        for off in range(0, len(data), ps):
            self.program(addr + off, view[off : off + ps])

    def erase_range(self, addr: int, n: int) -> None:
        ss = self.geometry.sector_size
        for a in range(addr, addr + n, ss):
            self.erase_sector(a)
