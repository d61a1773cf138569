"""Simulator pure parts: event queue, connectivity model, option validation, CLI bad input."""

from __future__ import annotations

import dataclasses
import random

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from otaguard.cli.main import main
from otaguard.errors import ErrorCode, UsageError
from otaguard.sim.model import (
    HOUR,
    PROFILES,
    SCENARIOS,
    EventQueue,
    Link,
    SimOptions,
    parse_phases,
    quantize,
    time_to_fraction,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e6), st.integers(0, 50)), max_size=60), st.floats(0, 1e6))
def test_queue_pops_exactly_the_due_events_in_order(
    evs: list[tuple[float, int]], cut: float
) -> None:
    q = EventQueue()
    for t, k in evs:
        q.push(t, k)
    due = q.pop_due(cut)
    assert [t for t, _ in due] == sorted(t for t, _ in evs if t <= cut)
    assert len(q) == sum(1 for t, _ in evs if t > cut)
    nxt = q.peek()
    assert nxt is None or nxt > cut


def test_quantize_and_time_to_fraction() -> None:
    assert quantize(100.0, 0.0, 60.0) == 120.0
    assert quantize(120.0, 0.0, 60.0) == 120.0
    times: list[float | None] = [1.0, 3.0, None, 2.0]
    assert time_to_fraction(times, 0.5, 4) == 2.0
    assert time_to_fraction(times, 0.75, 4) == 3.0
    assert time_to_fraction(times, 1.0, 4) is None
    assert time_to_fraction([], 0.99, 0) is None


def test_link_model_dead_outage_and_hours() -> None:
    prof = dataclasses.replace(
        PROFILES["building"], dead_fraction=0.2, outage_fraction=0.3, drop_rate=0.0
    )
    rng = random.Random(5)
    links = [Link.draw(prof, rng) for _ in range(2000)]
    dead = sum(link.dead for link in links) / len(links)
    outage = sum(link.outage is not None for link in links) / len(links)
    assert 0.16 < dead < 0.24 and 0.26 < outage < 0.34
    for link in links:
        assert prof.poll_min_s <= link.poll_s <= prof.poll_max_s
        lo, hi = prof.bandwidth_bps
        assert lo <= link.bandwidth <= hi
        if link.dead:
            assert not link.online(prof, 0, 0, rng)
        if link.outage is not None:
            mid = (link.outage[0] + link.outage[1]) / 2
            assert not link.online(prof, mid, mid, rng)
    night_off = dataclasses.replace(prof, online_by_hour=(0.0,) * 6 + (1.0,) * 18)
    live = Link(3600, 1e5, False, None, 0)
    assert not live.online(night_off, 0, 3 * HOUR, rng)
    assert live.online(night_off, 0, 12 * HOUR, rng)


@pytest.mark.parametrize(
    "change",
    [
        {"devices": 0},
        {"devices": -5},
        {"powercut_rate": -0.1},
        {"attack_rate": 1.5},
        {"selftest_fail_rate": float("nan")},
        {"phases": ()},
        {"image_size": 10},
        {"profile": dataclasses.replace(PROFILES["lan"], drop_rate=-1.0)},
        {"profile": dataclasses.replace(PROFILES["lan"], poll_min_s=0)},
        {"profile": dataclasses.replace(PROFILES["lan"], online_by_hour=(0.0,) * 24)},
        {"profile": dataclasses.replace(PROFILES["lan"], outage_fraction=0.7, dead_fraction=0.5)},
    ],
)
def test_impossible_options_refused(change: dict[str, object]) -> None:
    with pytest.raises(UsageError) as ei:
        dataclasses.replace(SimOptions(), **change).validate()  # type: ignore[arg-type]
    assert ei.value.code == ErrorCode.USAGE


def test_scenarios_valid_and_phases_parse() -> None:
    for opts in SCENARIOS.values():
        opts.validate()
    assert SCENARIOS["hvac-14k"].devices == 14_000 and SCENARIOS["hvac-14k"].rotation
    ph = parse_phases("5:2h,30:90m,100")
    assert [p.fraction for p in ph] == [0.05, 0.3, 1.0]
    assert [p.min_soak_s for p in ph] == [7200.0, 5400.0, 0.0]
    with pytest.raises(UsageError):
        parse_phases("five,100")
    with pytest.raises(UsageError):
        dataclasses.replace(SimOptions(), phases=parse_phases("50,30,100")).validate()
    with pytest.raises(UsageError):
        dataclasses.replace(SimOptions(), phases=parse_phases("5,50")).validate()


@pytest.mark.parametrize(
    "args",
    [
        ["simulate", "--devices", "0"],
        ["simulate", "--attack-rate", "-1"],
        ["simulate", "--phases", "x"],
        ["simulate", "--days", "0"],
        ["demo", "--devices", "-3"],
    ],
)
def test_cli_bad_input_one_line_usage_error(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("otaguard: error E_USAGE:"), err


def test_cli_unknown_scenario() -> None:
    res = CliRunner().invoke(main_cli(), ["simulate", "--scenario", "nope"])
    assert res.exit_code == 2


def main_cli():  # type: ignore[no-untyped-def]
    from otaguard.cli.main import cli

    return cli
