"""Time as a dependency, so 14 days of fleet life can run in minutes with the same code paths.

Server, campaign engine, rate limiter and devices take a :class:`Clock` instead of calling
``time.time()``. Production uses :class:`SystemClock`; the fleet simulator shares one
:class:`SimClock` among all of them and advances it explicitly.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (wall time, for expiry and reports)."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never go backwards (for rates/timeouts)."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class SimClock:
    """A manually advanced clock. Thread-safe; never goes backwards."""

    def __init__(self, start: float) -> None:
        self._t = float(start)
        self._origin = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._t

    def monotonic(self) -> float:
        with self._lock:
            return self._t - self._origin

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a simulated clock cannot go backwards")
        with self._lock:
            self._t += seconds
            return self._t

    def set(self, t: float) -> None:
        with self._lock:
            if t < self._t:
                raise ValueError("a simulated clock cannot go backwards")
            self._t = float(t)


SYSTEM_CLOCK = SystemClock()
