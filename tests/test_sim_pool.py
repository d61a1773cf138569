"""The simulator's per-device connection pool (LRU cap on open connections) and fd limit."""

from __future__ import annotations

import resource
from typing import Any

from otaguard.sim.model import PROFILES, SCENARIOS
from otaguard.sim.runner import ConnectionPool, raise_fd_limit


class FakeClient:
    """Stands in for HttpsTransport: no `_client`, so eviction falls back to close()."""

    def __init__(self, idx: int) -> None:
        self.idx = idx
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def _pool(cap: int) -> tuple[ConnectionPool, list[FakeClient]]:
    made: list[FakeClient] = []

    def make(i: int) -> Any:
        made.append(FakeClient(i))
        return made[-1]

    return ConnectionPool(cap, make), made


def _poll(pool: ConnectionPool, i: int) -> Any:
    pool.acquire(i)
    try:
        return pool.get(i)
    finally:
        pool.release(i)


def test_pool_keeps_one_client_per_device_and_closes_the_one_just_used() -> None:
    pool, made = _pool(2)
    a = _poll(pool, 0)
    assert _poll(pool, 0) is a  # the same client (and TLS context) every poll
    _poll(pool, 1)
    _poll(pool, 2)  # over the cap: device 2 just polled, its next poll is furthest away
    by = {c.idx: c for c in made}
    assert by[2].closed == 1 and by[0].closed == 0 and by[1].closed == 0
    assert pool.evicted == 1
    assert len(made) == 3
    pool.acquire(2)  # 2 polls again; meanwhile 1 finishes a poll and is closed
    pool.get(2)
    _poll(pool, 1)
    assert by[0].closed == 0 and by[1].closed == 1


def test_pool_never_evicts_a_device_in_the_middle_of_a_poll() -> None:
    pool, made = _pool(1)
    pool.acquire(0)
    pool.get(0)
    _poll(pool, 1)  # over the cap, but device 0 is busy: device 1 goes instead
    by = {c.idx: c for c in made}
    assert by[0].closed == 0 and by[1].closed == 1
    pool.release(0)
    pool.close_all()
    assert by[0].closed == 1


def test_fd_limit_is_never_lowered() -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert raise_fd_limit(64) >= min(soft, 64)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= soft


def test_hvac_profile_is_the_reference_scenario() -> None:
    p = PROFILES["hvac"]
    p.validate()
    assert (p.poll_min_s, p.poll_max_s) == (3600.0, 4 * 3600.0)
    assert min(p.online_by_hour) == p.online_by_hour[2] == p.online_by_hour[3]
    s = SCENARIOS["hvac-14k"]
    assert s.profile is p and s.rotation and s.retire_converged
    assert [ph.fraction for ph in s.phases] == [0.01, 0.1, 0.5, 1.0]
