"""Pure parts of the fleet simulator: options, connectivity profiles, the event queue.

No I/O here, so the scheduler and the connectivity model are unit-testable on their own.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ErrorCode, UsageError

HOUR = 3600.0
DAY = 86400.0
ATTACK_KINDS = ("tamper", "replay", "cross-model", "no-cert", "foreign-cert", "revoked-cert")
TRANSPORT_ATTACKS = ("tamper", "replay", "cross-model")  # served to a device as its update
CONNECT_ATTACKS = ("no-cert", "foreign-cert", "revoked-cert")  # attacker dials the server


def _bad(msg: str) -> UsageError:
    return UsageError(ErrorCode.USAGE, msg)


@dataclass(frozen=True)
class Profile:
    """How a class of devices reaches the server.

    ``online_by_hour``: probability that a poll at that local hour finds the link up (24
    values). ``outage_fraction`` of devices have one multi-hour outage (building network down,
    power off) of ``outage_hours`` (min, max) starting in the first ``outage_window_h`` hours;
    ``dead_fraction`` never come online during the run (unreachable). ``drop_rate`` is the
    probability that a download is cut mid-transfer (resumed at the next poll).
    """

    name: str
    poll_min_s: float
    poll_max_s: float
    online_by_hour: tuple[float, ...]
    bandwidth_bps: tuple[float, float]  # bytes/s, (min, max) per device
    drop_rate: float = 0.0
    outage_fraction: float = 0.0
    outage_hours: tuple[float, float] = (6.0, 48.0)
    outage_window_h: float = 72.0
    dead_fraction: float = 0.0

    def validate(self) -> None:
        if not (0 < self.poll_min_s <= self.poll_max_s):
            raise _bad(f"profile {self.name}: poll interval must satisfy 0 < min <= max")
        if len(self.online_by_hour) != 24:
            raise _bad(f"profile {self.name}: online_by_hour needs 24 values")
        for p in self.online_by_hour:
            if not 0 <= p <= 1:
                raise _bad(f"profile {self.name}: online probabilities must be in [0, 1]")
        lo, hi = self.bandwidth_bps
        if not (0 < lo <= hi):
            raise _bad(f"profile {self.name}: bandwidth must satisfy 0 < min <= max")
        for name in ("drop_rate", "outage_fraction", "dead_fraction"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 <= v <= 1) or math.isnan(v):
                raise _bad(f"profile {self.name}: {name} must be in [0, 1] (got {v})")
        if self.outage_fraction + self.dead_fraction > 1:
            raise _bad(f"profile {self.name}: outage + dead fractions exceed 1")
        a, b = self.outage_hours
        if not (0 <= a <= b) or self.outage_window_h < 0:
            raise _bad(f"profile {self.name}: outage hours must satisfy 0 <= min <= max")
        if max(self.online_by_hour) == 0:
            raise _bad(f"profile {self.name}: devices are never online")


_OFFICE = (0.85,) * 6 + (0.95,) * 12 + (0.9,) * 6  # building network: quieter at night
PROFILES: dict[str, Profile] = {
    # Commercial building networks: controllers poll every 1-6 h over a shared BACnet/IP
    # gateway; links are slow-ish and flaky; a few buildings are down for hours to days.
    "building": Profile(
        name="building",
        poll_min_s=1 * HOUR,
        poll_max_s=6 * HOUR,
        online_by_hour=_OFFICE,
        bandwidth_bps=(16_000.0, 250_000.0),
        drop_rate=0.05,
        outage_fraction=0.03,
        outage_hours=(6.0, 60.0),
        outage_window_h=72.0,
        dead_fraction=0.005,
    ),
    # Smart-HVAC controllers on building networks (the hvac-14k reference): each polls every
    # 1-4 h (+-10% jitter), links are up ~95% by day, less at night and much less in the
    # 02:00-04:00 IT maintenance window (gateway/firewall reboots); 3% of buildings lose their
    # network for 6-48 h in the first three days; 2% of controllers are unreachable for the
    # whole window (decommissioned, unplugged, firewalled).
    "hvac": Profile(
        name="hvac",
        poll_min_s=1 * HOUR,
        poll_max_s=4 * HOUR,
        online_by_hour=(0.85,) * 2 + (0.5,) * 2 + (0.85,) * 2 + (0.95,) * 12 + (0.9,) * 6,
        bandwidth_bps=(16_000.0, 250_000.0),
        drop_rate=0.05,
        outage_fraction=0.03,
        outage_hours=(6.0, 48.0),
        outage_window_h=72.0,
        dead_fraction=0.02,
    ),
    # A lab/LAN fleet: always on, fast.
    "lan": Profile(
        name="lan",
        poll_min_s=0.5 * HOUR,
        poll_max_s=1 * HOUR,
        online_by_hour=(1.0,) * 24,
        bandwidth_bps=(1e6, 1e7),
    ),
    # Cellular/remote sites: rarer polls, poorer links.
    "cellular": Profile(
        name="cellular",
        poll_min_s=2 * HOUR,
        poll_max_s=8 * HOUR,
        online_by_hour=(0.7,) * 24,
        bandwidth_bps=(4_000.0, 60_000.0),
        drop_rate=0.15,
        outage_fraction=0.05,
        outage_hours=(12.0, 96.0),
        dead_fraction=0.01,
    ),
}


@dataclass(frozen=True)
class PhaseSpec:
    fraction: float
    min_soak_s: float = 0.0


@dataclass(frozen=True)
class SimOptions:
    devices: int = 1000
    profile: Profile = PROFILES["building"]
    phases: tuple[PhaseSpec, ...] = (
        PhaseSpec(0.05, 2 * HOUR),
        PhaseSpec(0.3, 2 * HOUR),
        PhaseSpec(1.0),
    )
    success_threshold: float = 0.8
    duration_s: float = 14 * DAY
    sla_s: float = 14 * DAY
    powercut_rate: float = 0.02  # fraction of install attempts with a power cut
    selftest_fail_rate: float = 0.02  # fraction of devices whose first test boot fails
    attack_rate: float = 0.02  # fraction of devices served a malicious update once
    connect_attacks: int = 3  # attempts per connection-level attack kind
    rotation: bool = False  # publish a key-list update; the patch is signed by the new key
    image_size: int = 256 * 1024
    seed: int = 1
    workers: int = 8
    # update server processes sharing the device listener (sim/serverproc.py); the default
    # fills a 2-core machine with the simulator
    server_procs: int = 2
    # simulator processes running the devices (sim/shard.py): 1 runs them in this process
    sim_procs: int = 2
    quantum_s: float = 60.0
    # how far (in quanta) the clock may run ahead of the oldest poll still in progress;
    # 0: every quantum waits for all its polls (docs/simulator.md, "Time and processes")
    lookahead_quanta: int = 5
    stop_when_converged: bool = True
    # a device that is patched and on the target key list stops polling (its further polls
    # would all be "no update"); --full-window keeps every device polling
    retire_converged: bool = True
    retry_after_s: float = 12 * HOUR  # operator re-targets stragglers after this long
    hsm: str = "auto"  # auto | softhsm | software
    # devices pin the update server's public key (SPKI SHA-256 of the certificate the fleet CA
    # issued it) on top of the CA check; False: the CA alone (docs/simulator.md)
    pin_spki: bool = True
    scenario: str = "custom"

    def validate(self) -> SimOptions:
        if not isinstance(self.devices, int) or self.devices < 1:
            raise _bad(f"--devices must be at least 1 (got {self.devices})")
        if self.devices > 100_000:
            raise _bad("--devices is limited to 100000")
        self.profile.validate()
        for name in ("powercut_rate", "selftest_fail_rate", "attack_rate", "success_threshold"):
            v = getattr(self, name)
            if math.isnan(v) or not 0 <= v <= 1:
                raise _bad(f"--{name.replace('_', '-')} must be in [0, 1] (got {v})")
        if self.success_threshold == 0:
            raise _bad("--success-threshold must be > 0")
        if self.connect_attacks < 0:
            raise _bad("--connect-attacks must be >= 0")
        if not self.phases:
            raise _bad("at least one campaign phase is needed")
        last = 0.0
        for p in self.phases:
            if not (last < p.fraction <= 1) or p.min_soak_s < 0:
                raise _bad("phase fractions must increase strictly within (0, 1]")
            last = p.fraction
        if self.phases[-1].fraction != 1.0:
            raise _bad("the last phase must reach 100% of the fleet")
        if self.duration_s <= 0 or self.sla_s <= 0:
            raise _bad("--days and --sla-days must be > 0")
        if not 4096 <= self.image_size <= 4 * 1024 * 1024:
            raise _bad("--image-size must be between 4 KiB and 4 MiB")
        if self.workers < 1 or self.quantum_s <= 0:
            raise _bad("--workers must be >= 1")
        if not 1 <= self.server_procs <= 16:
            raise _bad(f"server processes must be 1-16 (got {self.server_procs})")
        if not 1 <= self.sim_procs <= 16:
            raise _bad(f"simulator processes must be 1-16 (got {self.sim_procs})")
        if self.lookahead_quanta < 0:
            raise _bad("--lookahead must be >= 0")
        if self.hsm not in ("auto", "softhsm", "software"):
            raise _bad("--keys must be auto, softhsm or software")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "profile": self.profile.name,
            "phases": [p.fraction for p in self.phases],
            "success_threshold": self.success_threshold,
            "duration_h": self.duration_s / HOUR,
            "sla_h": self.sla_s / HOUR,
            "powercut_rate": self.powercut_rate,
            "selftest_fail_rate": self.selftest_fail_rate,
            "attack_rate": self.attack_rate,
            "connect_attacks": self.connect_attacks,
            "rotation": self.rotation,
            "image_size": self.image_size,
            "seed": self.seed,
            "scenario": self.scenario,
            "retire_converged": self.retire_converged,
        }


def parse_phases(text: str) -> tuple[PhaseSpec, ...]:
    """``"5,30,100"`` (percent) or ``"5:2h,30:2h,100"`` (with soak time per phase)."""
    out: list[PhaseSpec] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        pct, _, soak = part.partition(":")
        try:
            frac = float(pct.rstrip("%")) / 100.0
            soak_s = 0.0
            if soak:
                unit = {"h": HOUR, "m": 60.0, "s": 1.0, "d": DAY}.get(soak[-1])
                soak_s = float(soak[:-1]) * unit if unit else float(soak)
        except ValueError:
            raise _bad(f"bad phase {part!r}: use percent[:soak], e.g. 5:2h,30,100") from None
        out.append(PhaseSpec(frac, soak_s))
    if not out:
        raise _bad("--phases is empty")
    return tuple(out)


SCENARIOS: dict[str, SimOptions] = {
    "demo": SimOptions(
        devices=1000,
        profile=replace(
            PROFILES["building"],
            outage_hours=(4.0, 24.0),
            outage_window_h=24.0,
            dead_fraction=0.005,
        ),
        duration_s=7 * DAY,
        image_size=256 * 1024,
        scenario="demo",
    ),
    "hvac-14k": SimOptions(
        devices=14_000,
        profile=PROFILES["hvac"],
        phases=(
            PhaseSpec(0.01, 2 * HOUR),
            PhaseSpec(0.1, 2 * HOUR),
            PhaseSpec(0.5, 1 * HOUR),
            PhaseSpec(1.0),
        ),
        success_threshold=0.9,
        rotation=True,
        image_size=128 * 1024,
        attack_rate=0.005,
        duration_s=14 * DAY,
        # ~90 polls due per quantum; 8 device threads in each of the 2 shard processes (at
        # 3,000 devices 24-32 threads were ~10% faster, at 14,000 32 threads were slower:
        # 541 s against 515-520 s; docs/benchmarks.md "Fleet")
        workers=16,
        scenario="hvac-14k",
    ),
}


# --- per-device connectivity -------------------------------------------------------------------
@dataclass
class Link:
    """One device's connectivity, drawn once from its profile."""

    poll_s: float
    bandwidth: float
    dead: bool
    outage: tuple[float, float] | None  # [start, end) simulated seconds since t0
    tz_offset_h: int

    @classmethod
    def draw(cls, profile: Profile, rng: random.Random) -> Link:
        u = rng.random()
        dead = u < profile.dead_fraction
        outage = None
        if not dead and u < profile.dead_fraction + profile.outage_fraction:
            start = rng.uniform(0, profile.outage_window_h) * HOUR
            outage = (start, start + rng.uniform(*profile.outage_hours) * HOUR)
        lo, hi = profile.bandwidth_bps
        # log-uniform bandwidth: most links are slow, a few are fast
        bw = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        return cls(
            poll_s=rng.uniform(profile.poll_min_s, profile.poll_max_s),
            bandwidth=bw,
            dead=dead,
            outage=outage,
            tz_offset_h=rng.randrange(-1, 2),
        )

    def online(self, profile: Profile, t_rel: float, t_abs: float, rng: random.Random) -> bool:
        if self.dead:
            return False
        if self.outage is not None and self.outage[0] <= t_rel < self.outage[1]:
            return False
        hour = int((t_abs / HOUR + self.tz_offset_h) % 24)
        return rng.random() < profile.online_by_hour[hour]

    def next_poll(self, t: float, rng: random.Random) -> float:
        """Next poll time: the interval with +-10% jitter (devices are not synchronized)."""
        return t + self.poll_s * rng.uniform(0.9, 1.1)


# --- discrete-event queue ----------------------------------------------------------------------
@dataclass(order=True)
class _Ev:
    t: float
    seq: int
    key: int = field(compare=False)


class EventQueue:
    """Next event per key on a simulated timeline; batches everything due within a quantum."""

    def __init__(self) -> None:
        self._h: list[_Ev] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._h)

    def push(self, t: float, key: int) -> None:
        self._seq += 1
        heapq.heappush(self._h, _Ev(t, self._seq, key))

    def peek(self) -> float | None:
        return self._h[0].t if self._h else None

    def pop_due(self, until: float) -> list[tuple[float, int]]:
        """All events with time <= ``until``, in time order."""
        out: list[tuple[float, int]] = []
        while self._h and self._h[0].t <= until:
            ev = heapq.heappop(self._h)
            out.append((ev.t, ev.key))
        return out


def quantize(t: float, t0: float, quantum: float) -> float:
    """The end of the quantum containing ``t`` (events in one quantum run at the same instant)."""
    return t0 + math.ceil((t - t0) / quantum) * quantum


def time_to_fraction(times: list[float | None], fraction: float, total: int) -> float | None:
    """Seconds until ``fraction`` of ``total`` entries had a time (None: never reached)."""
    if total <= 0:
        return None
    need = math.ceil(fraction * total - 1e-9)
    done = sorted(t for t in times if t is not None)
    if need == 0:
        return 0.0
    if len(done) < need:
        return None
    return done[need - 1]
