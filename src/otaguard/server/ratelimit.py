"""Token buckets per key (device identity or client IP) and the "possible probe" detector.

Pure in-memory state per server process, driven by an injectable clock so tests are exact.
With N app processes behind a balancer each device sees at most N times its limit, which is
fine for a guard against floods; campaigns and accounting never depend on it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .storage.prepared import Fetched, Prefetch

T = TypeVar("T")


@dataclass(frozen=True)
class RateLimit:
    rate: float  # tokens per second
    burst: int  # bucket size

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")


class TokenBuckets:
    """Buckets keyed by string, LRU-bounded so a spray of new keys cannot exhaust memory."""

    def __init__(
        self,
        limit: RateLimit,
        *,
        max_keys: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self._clock = clock
        self._max = max_keys
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Consume one token; return 0.0 if allowed, else seconds until one is available."""
        now = self._clock()
        tokens, last = self._state.get(key, (float(self.limit.burst), now))
        tokens = min(float(self.limit.burst), tokens + (now - last) * self.limit.rate)
        if tokens >= 1.0:
            self._state[key] = (tokens - 1.0, now)
            self._state.move_to_end(key)
            if len(self._state) > self._max:
                self._state.popitem(last=False)
            return 0.0
        self._state[key] = (tokens, now)
        self._state.move_to_end(key)
        return (1.0 - tokens) / self.limit.rate

    def take_with(
        self, key: str, prefetch: Callable[[], Prefetch[T]]
    ) -> tuple[float, Fetched[T] | None]:
        """:meth:`take`, and where the limit's state is in a database, ``prefetch``'s read in
        the same round trip (None here: the caller reads as usual)."""
        return self.take(key), None


def retry_after_header(wait: float) -> str:
    return str(max(1, math.ceil(wait)))


class ProbeDetector:
    """Flags a key that keeps hitting its limit: ``threshold`` refusals within ``window`` s.

    ``hit`` returns True exactly once per key when it crosses the threshold (the caller then
    records the flag), so a persistent prober does not turn into a database write flood.
    """

    def __init__(
        self, threshold: int = 20, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.window = window
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._flagged: set[str] = set()

    def hit(self, key: str) -> bool:
        now = self._clock()
        q = self._hits.setdefault(key, deque())
        q.append(now)
        while q and q[0] < now - self.window:
            q.popleft()
        if len(q) > self.threshold:
            q.popleft()
        if len(q) >= self.threshold and key not in self._flagged:
            self._flagged.add(key)
            return True
        return False

    def flagged(self, key: str) -> bool:
        return key in self._flagged
