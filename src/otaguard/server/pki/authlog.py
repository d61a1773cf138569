"""Failed authentication: one log line per source and interval, a metric, and the gate that keeps
a flood of refusals from becoming a flood of database rows.

Every listener (device, admin, signing) refuses credentials it cannot accept; an operator has to
see that happening (who, from where, how often) without an attacker being able to fill the disk
with log lines or the database with probe rows. So a refusal is always counted (metric, by
listener and reason: both bounded sets, never the source address, which an attacker with an
IPv6 prefix could vary without end), logged at most once per ``interval`` per (listener, source
address) with the number of refusals suppressed since, and allowed a database record at most
once per ``interval`` per (listener, reason, source address). All state is in memory, bounded
(LRU) and driven by an injectable clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("otaguard.auth")


class _Counter(Protocol):
    def labels(self, *values: str) -> _Counter: ...

    def inc(self, amount: float = 1) -> None: ...


class _Window:
    """Keys seen within the last ``interval`` seconds, LRU-bounded, with a count of the hits
    that fell inside a key's current window."""

    def __init__(self, interval: float, max_keys: int, clock: Callable[[], float]) -> None:
        self.interval = interval
        self._max = max_keys
        self._clock = clock
        self._seen: OrderedDict[tuple[str, ...], tuple[float, int]] = OrderedDict()

    def hit(self, key: tuple[str, ...]) -> tuple[bool, int]:
        """(first hit of a new window, hits suppressed in the window that just ended)."""
        now = self._clock()
        start, suppressed = self._seen.get(key, (None, 0))
        if start is None or now - start >= self.interval:
            self._seen[key] = (now, 0)
            self._seen.move_to_end(key)
            if len(self._seen) > self._max:
                self._seen.popitem(last=False)
            return True, suppressed
        self._seen[key] = (start, suppressed + 1)
        return False, 0


class RateLimitedLog:
    """A WARNING at most once per ``interval`` per key; the next line says how many were
    suppressed. For events an attacker can cause at will (refused logins, deadline closes)."""

    def __init__(
        self,
        name: str,
        *,
        interval: float = 10.0,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logging.getLogger(name)
        self._lock = threading.Lock()
        self._window = _Window(interval, max_keys, clock)

    def warning(self, key: tuple[str, ...], msg: str, *args: object) -> bool:
        with self._lock:
            first, suppressed = self._window.hit(key)
        if first:
            if suppressed:
                msg += f" ({suppressed} more not logged)"
            self._log.warning(msg, *args)
        return first


class AuthFailures:
    """Shared by the listeners of one process (their handlers run on the loop and on worker
    threads, hence the lock)."""

    def __init__(
        self,
        counter: _Counter | None = None,
        *,
        interval: float = 10.0,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._counter = counter
        self._lock = threading.Lock()
        self._log = _Window(interval, max_keys, clock)
        self._record = _Window(interval, max_keys, clock)

    def note(self, listener: str, reason: str, ip: str | None, detail: str = "") -> bool:
        """Count, maybe log, and say whether this refusal may be written to the database."""
        source = ip or "?"
        if self._counter is not None:
            self._counter.labels(listener, reason).inc()
        with self._lock:
            first_log, suppressed = self._log.hit((listener, source))
            first_record, _ = self._record.hit((listener, reason, source))
        if first_log:
            more = f" ({suppressed} more from this source not logged)" if suppressed else ""
            log.warning(
                "authentication failed on the %s listener from %s: %s%s%s",
                listener,
                source,
                reason,
                f" ({detail})" if detail else "",
                more,
            )
        return first_record
