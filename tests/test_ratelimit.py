"""The token bucket under the device, IP and signing rate limits, on an injected clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from otaguard.server.ratelimit import RateLimit, TokenBuckets


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_idle_bucket_refills_to_its_burst_and_no_further() -> None:
    """Regression guard: a bucket that refills past its burst cap after idling passed every
    test before this one (a long quiet period must not bank an unlimited burst)."""
    clock = Clock()
    b = TokenBuckets(RateLimit(rate=2.0, burst=5), clock=clock)
    assert all(b.take("d") == 0.0 for _ in range(5))
    assert b.take("d") > 0  # the burst is spent
    clock.t += 3600.0  # an hour idle would be 7,200 tokens without the cap
    allowed = 0
    while b.take("d") == 0.0:
        allowed += 1
        assert allowed <= 5
    assert allowed == 5


def test_wait_is_exact_and_keys_are_independent() -> None:
    clock = Clock()
    b = TokenBuckets(RateLimit(rate=4.0, burst=1), clock=clock)
    assert b.take("a") == 0.0
    assert b.take("a") == 0.25  # one token takes a quarter second at 4/s
    assert b.take("b") == 0.0  # another key has its own bucket
    clock.t += 0.25
    assert b.take("a") == 0.0


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.1, 100.0),
    burst=st.integers(1, 50),
    steps=st.lists(st.tuples(st.floats(0.0, 1000.0), st.integers(1, 60)), max_size=20),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    clock = Clock()
    b = TokenBuckets(RateLimit(rate=rate, burst=burst), clock=clock)
    start = clock.t
    allowed = 0
    for idle, tries in steps:
        clock.t += idle
        window_allowed = 0
        for _ in range(tries):
            if b.take("k") == 0.0:
                allowed += 1
                window_allowed += 1
        assert window_allowed <= burst  # no instant exceeds the bucket
        assert allowed <= burst + rate * (clock.t - start) + 1e-6
