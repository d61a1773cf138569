"""Fault injection for the flash simulator: power cuts at a chosen operation, read errors.

Every erase and every page program is one *operation* with a global index. A
:class:`FaultInjector` is shared by all flash objects constructed during one simulated run (a
reboot constructs a new device on the same file but keeps counting), so "cut at operation k"
means the k-th operation of the whole scenario, however many reboots it contains.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ErrorCode, FlashError, PowerCut

CutMode = Literal["before", "torn", "after"]
TornFill = Literal["erased", "garbage"]


@dataclass(frozen=True)
class FaultPlan:
    """Cut power at operation ``cut_at_op`` (0-based).

    ``before``: the operation does nothing. ``torn``: a prefix of the page/sector is written
    or erased and the rest is left as it was (``erased`` fill for a program: still 0xFF) or
    filled with garbage. ``after``: the operation completes, then power is lost.
    """

    cut_at_op: int
    mode: CutMode = "before"
    torn_fill: TornFill = "erased"

    def __post_init__(self) -> None:
        if self.cut_at_op < 0:
            raise ValueError("cut_at_op must be >= 0")
        if self.mode not in ("before", "torn", "after"):
            raise ValueError(f"unknown cut mode {self.mode!r}")
        if self.torn_fill not in ("erased", "garbage"):
            raise ValueError(f"unknown torn fill {self.torn_fill!r}")


@dataclass
class FaultInjector:
    """Counts operations across reboots and decides when the lights go out."""

    plan: FaultPlan | None = None
    ops: int = 0
    fired: bool = False
    read_errors: list[tuple[int, int]] = field(default_factory=list)  # [start, end) addresses

    def next_op(self) -> CutMode | None:
        """Account one operation; return how it is interrupted, or None to run it normally."""
        index = self.ops
        self.ops += 1
        if self.plan is not None and not self.fired and index == self.plan.cut_at_op:
            self.fired = True
            return self.plan.mode
        return None

    def garbage(self, n: int) -> bytes:
        seed = self.plan.cut_at_op if self.plan is not None else 0
        return random.Random(seed * 7919 + n).randbytes(n)

    def cut(self, what: str) -> PowerCut:
        return PowerCut(ErrorCode.POWER_CUT, f"power cut at operation {self.ops - 1} ({what})")

    def add_read_error(self, start: int, end: int) -> None:
        """Make every read that touches [start, end) fail with E_FLASH (a dying flash cell)."""
        self.read_errors.append((start, end))

    def check_read(self, addr: int, n: int) -> None:
        for start, end in self.read_errors:
            if addr < end and start < addr + n:
                raise FlashError(ErrorCode.FLASH, f"uncorrectable read error at 0x{addr:x}")
