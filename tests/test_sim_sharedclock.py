"""The simulator's cross-process clock: one writer, readers in other processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from otaguard.sim.sharedclock import SharedClock

READER = textwrap.dedent(
    """
    import sys
    from otaguard.sim.sharedclock import SharedClock
    clk = SharedClock.attach(sys.argv[1])
    print(clk.now(), clk.monotonic(), flush=True)
    try:
        clk.set(clk.now() + 1)
    except PermissionError:
        print("read-only", flush=True)
    seen = set()
    while True:
        t = clk.now()
        # every value the writer stores is a whole number of seconds in [1000, 1000 + N]: a
        # torn read (half old, half new bytes) would not be
        if t != int(t) or not 1000 <= t <= 1000 + int(sys.argv[2]):
            print("torn", repr(t), flush=True)
            break
        seen.add(t)
        if t == 1000 + int(sys.argv[2]):
            break
    print("distinct", len(seen), flush=True)
    clk.close()
    """
)


def test_clock_is_shared_with_another_process() -> None:
    clk = SharedClock.create(1000.0)
    n = 20_000
    try:
        p = subprocess.Popen(
            [sys.executable, "-c", READER, clk.name, str(n)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None
        first = p.stdout.readline().split()
        assert [float(x) for x in first] == [1000.0, 0.0]
        assert p.stdout.readline().strip() == "read-only"  # only the owner sets the time
        for i in range(1, n + 1):
            clk.set(1000.0 + i)  # the reader sees every write whole, never torn
        rest = p.stdout.read()
        assert p.wait(30) == 0
        assert "torn" not in rest, rest
        assert rest.startswith("distinct "), rest
        assert int(rest.split()[1]) >= 1
        assert clk.now() == 1000.0 + n
        assert clk.monotonic() == float(n)
    finally:
        clk.close()


def test_clock_never_goes_backwards_and_keeps_time_after_close() -> None:
    clk = SharedClock.create(50.0)
    assert clk.advance(10) == 60.0
    with pytest.raises(ValueError):
        clk.set(59.0)
    with pytest.raises(ValueError):
        clk.advance(-1)
    other = SharedClock.attach(clk.name)
    assert other.now() == 60.0
    with pytest.raises(PermissionError):
        other.advance(1)
    other.close()
    clk.close()
    assert clk.now() == 60.0 and clk.monotonic() == 10.0  # the last time, read-only
    with pytest.raises(PermissionError):
        clk.set(70.0)
    with pytest.raises(FileNotFoundError):
        SharedClock.attach(clk.name)  # the owner removed the block
