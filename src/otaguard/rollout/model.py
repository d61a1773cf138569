"""Campaign data model: what a campaign targets, how it is phased, and its persisted state.

Everything here is a frozen dataclass with ``to_dict``/``from_dict`` so the server can keep a
campaign in one JSON column and rebuild the exact same object after a restart. ``from_dict``
validates as strictly as the constructors, because a spec may come straight from an admin API
request body. Pure logic: no clock, no database, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from fractions import Fraction
from functools import lru_cache
from itertools import pairwise
from typing import Any, Literal

from ..errors import ErrorCode, FormatError, ServerError
from ..manifest.version import compare_versions, parse_version

MAX_PHASES = 32
MAX_SERIALS = 200_000
MAX_GROUPS = 64
MAX_NAME = 64
MAX_REASON = 200
MAX_HISTORY = 200
MAX_SAMPLES = 64
ALL_FINISHED: Literal["all_finished"] = "all_finished"

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


# --- errors --------------------------------------------------------------------------------


_STATUS_FOR_CODE = {
    ErrorCode.CAMPAIGN_STATE: 409,
    ErrorCode.CONFLICT: 409,
    ErrorCode.INCOMPATIBLE: 422,
    ErrorCode.CAMPAIGN: 422,
    ErrorCode.NO_PATH: 422,
    ErrorCode.RATE_LIMIT: 429,
}


class CampaignError(ServerError):
    """A campaign operation was refused. ``status`` is the HTTP status the admin API should use."""

    default_code = ErrorCode.CAMPAIGN

    def __init__(
        self, code: ErrorCode | None = None, detail: str = "", status: int | None = None
    ) -> None:
        c = code if code is not None else self.default_code
        super().__init__(c, detail, status if status is not None else _STATUS_FOR_CODE.get(c, 400))


class ConflictError(CampaignError):
    """The new campaign's target overlaps devices still in flight in a running/paused campaign."""

    default_code = ErrorCode.CONFLICT

    def __init__(self, serials: list[str], campaigns: list[str]) -> None:
        self.serials = serials
        self.campaigns = campaigns
        shown = ", ".join(serials[:5]) + (", ..." if len(serials) > 5 else "")
        super().__init__(
            ErrorCode.CONFLICT,
            f"{len(serials)} device(s) are still in running/paused campaign(s) "
            f"{', '.join(campaigns)}: {shown}; exclude them or wait for those campaigns",
        )

    def to_dict(self) -> dict[str, str]:
        d = super().to_dict()
        d["overlap"] = str(len(self.serials))
        return d


# --- small validated helpers ---------------------------------------------------------------


def exact(x: float) -> Fraction:
    """The decimal the operator wrote (0.1 is 1/10), so ceil(0.1 * 30) is 3, not 4."""
    return Fraction(repr(float(x)))


def quota(fraction: float, n: int) -> int:
    """Devices admitted by a phase of ``fraction`` over a target of ``n``: ceil(f * n), ≥ 1."""
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(exact(fraction) * n)))


@lru_cache(maxsize=4096)
def version_key(version: str) -> tuple[int, ...]:
    """Comparable key of a version ("1.2" and "1.2.0" are equal); E_MALFORMED if invalid.
    Cached: a fleet runs few distinct versions and this is on the check-in path."""
    parts = parse_version(version)
    while len(parts) > 1 and parts[-1] == 0:
        parts = parts[:-1]
    return parts


def _bad(detail: str) -> FormatError:
    return FormatError(ErrorCode.MALFORMED, detail)


def _str(v: object, what: str, *, max_len: int = MAX_NAME) -> str:
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise _bad(f"{what} must be a non-empty string of at most {max_len} characters")
    return v


def _opt_str(v: object, what: str, *, max_len: int = MAX_NAME) -> str | None:
    return None if v is None else _str(v, what, max_len=max_len)


def _int(v: object, what: str, *, minimum: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise _bad(f"{what} must be an integer ≥ {minimum}")
    return v


def _num(v: object, what: str) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise _bad(f"{what} must be a finite number")
    return float(v)


def _opt_num(v: object, what: str) -> float | None:
    return None if v is None else _num(v, what)


def _version(v: object, what: str) -> str:
    s = _str(v, what, max_len=32)
    parse_version(s)
    return s


def _opt_version(v: object, what: str) -> str | None:
    return None if v is None else _version(v, what)


def _bool(v: object, what: str) -> bool:
    if not isinstance(v, bool):
        raise _bad(f"{what} must be a boolean")
    return v


def _names(v: object, what: str, limit: int) -> frozenset[str]:
    if not isinstance(v, list | tuple | set | frozenset) or len(v) > limit:
        raise _bad(f"{what} must be a list of at most {limit} strings")
    return frozenset(_str(x, what) for x in v)


def _map(d: object, what: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise _bad(f"{what} must be an object")
    return d


def _known(d: Mapping[str, Any], what: str, allowed: set[str]) -> None:
    extra = set(d) - allowed
    if extra:
        raise _bad(f"{what}: unknown field(s) {sorted(extra)}")


def check_id(campaign_id: str) -> str:
    if not isinstance(campaign_id, str) or not _ID_RE.match(campaign_id):
        raise _bad("campaign id must be 1-64 characters [A-Za-z0-9._:-], starting alphanumeric")
    return campaign_id


# --- device states --------------------------------------------------------------------------


class DeviceState(StrEnum):
    PENDING = "pending"  # in the target, not admitted yet
    OFFERED = "offered"  # told about a manifest (target or migration step)
    DOWNLOADING = "downloading"
    INSTALLED = "installed"  # staged and marked pending, waiting for reboot/confirm
    SUCCEEDED = "succeeded"  # confirmed on the target version (or newer)
    FAILED = "failed"  # refused or failed, with an error code
    REVERTED = "reverted"  # test boot failed, bootloader went back to the old slot

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def failure(self) -> bool:
        return self is DeviceState.FAILED or self is DeviceState.REVERTED

    @property
    def in_flight(self) -> bool:
        return self in _IN_FLIGHT

    @property
    def order(self) -> int:
        """Progress rank: reports only ever move a device to a higher rank."""
        return _ORDER[self]


_FINISHED = frozenset({DeviceState.SUCCEEDED, DeviceState.FAILED, DeviceState.REVERTED})
_IN_FLIGHT = frozenset({DeviceState.OFFERED, DeviceState.DOWNLOADING, DeviceState.INSTALLED})
_ORDER = {
    DeviceState.PENDING: 0,
    DeviceState.OFFERED: 1,
    DeviceState.DOWNLOADING: 2,
    DeviceState.INSTALLED: 3,
    DeviceState.SUCCEEDED: 4,
    DeviceState.FAILED: 4,
    DeviceState.REVERTED: 4,
}


class CampaignStatus(StrEnum):
    DRAFT = "draft"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"

    @property
    def active(self) -> bool:
        """Running or paused: its unfinished devices belong to it and to no other campaign."""
        return self is CampaignStatus.RUNNING or self is CampaignStatus.PAUSED


# --- device view ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceView:
    """What the engine needs to know about one device (the server builds it from its rows).

    ``campaign_id``/``campaign_state`` are the device's current campaign membership (the
    server's one assignment row per device): the campaign it belongs to and its state there.
    """

    serial: str
    model: str
    hw_rev: str
    groups: frozenset[str] = frozenset()
    running_version: str | None = None
    last_seen: float | None = None
    campaign_id: str | None = None
    campaign_state: DeviceState | None = None


# --- target selector ------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetSelector:
    """All given criteria must hold: model (required), hw_rev, version range, any-of groups,
    explicit serials; devices in ``exclude`` never match."""

    model: str
    hw_rev: str | None = None
    min_version: str | None = None
    min_inclusive: bool = True
    max_version: str | None = None
    max_inclusive: bool = False
    groups: frozenset[str] = frozenset()
    serials: frozenset[str] = frozenset()
    exclude: frozenset[str] = frozenset()
    _lo: tuple[int, ...] | None = field(default=None, init=False, repr=False, compare=False)
    _hi: tuple[int, ...] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _str(self.model, "selector.model")
        _opt_str(self.hw_rev, "selector.hw_rev")
        _opt_version(self.min_version, "selector.min_version")
        _opt_version(self.max_version, "selector.max_version")
        _bool(self.min_inclusive, "selector.min_inclusive")
        _bool(self.max_inclusive, "selector.max_inclusive")
        for name, limit in (("groups", MAX_GROUPS), ("serials", MAX_SERIALS)):
            object.__setattr__(self, name, _names(getattr(self, name), f"selector.{name}", limit))
        object.__setattr__(self, "exclude", _names(self.exclude, "selector.exclude", MAX_SERIALS))
        lo = None if self.min_version is None else version_key(self.min_version)
        hi = None if self.max_version is None else version_key(self.max_version)
        object.__setattr__(self, "_lo", lo)
        object.__setattr__(self, "_hi", hi)
        if self.min_version is not None and self.max_version is not None:
            c = compare_versions(self.min_version, self.max_version)
            if c > 0 or (c == 0 and not (self.min_inclusive and self.max_inclusive)):
                raise CampaignError(ErrorCode.CAMPAIGN, "selector version range is empty")

    def matches(self, device: DeviceView) -> bool:
        if device.model != self.model:
            return False
        if self.hw_rev is not None and device.hw_rev != self.hw_rev:
            return False
        if device.serial in self.exclude:
            return False
        if self.serials and device.serial not in self.serials:
            return False
        if self.groups and self.groups.isdisjoint(device.groups):
            return False
        lo, hi = self._lo, self._hi
        if lo is None and hi is None:
            return True
        if device.running_version is None:
            return False
        try:
            v = version_key(device.running_version)
        except FormatError:
            return False  # a device reporting garbage as its version is not targeted
        if lo is not None and (v < lo or (v == lo and not self.min_inclusive)):
            return False
        return hi is None or v < hi or (v == hi and self.max_inclusive)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "hw_rev": self.hw_rev,
            "min_version": self.min_version,
            "min_inclusive": self.min_inclusive,
            "max_version": self.max_version,
            "max_inclusive": self.max_inclusive,
            "groups": sorted(self.groups),
            "serials": sorted(self.serials),
            "exclude": sorted(self.exclude),
        }

    @classmethod
    def from_dict(cls, d: object) -> TargetSelector:
        m = _map(d, "selector")
        _known(m, "selector", {f for f in cls.__dataclass_fields__ if not f.startswith("_")})
        return cls(
            model=_str(m.get("model"), "selector.model"),
            hw_rev=_opt_str(m.get("hw_rev"), "selector.hw_rev"),
            min_version=m.get("min_version"),
            min_inclusive=m.get("min_inclusive", True),
            max_version=m.get("max_version"),
            max_inclusive=m.get("max_inclusive", False),
            groups=m.get("groups", ()),
            serials=m.get("serials", ()),
            exclude=m.get("exclude", ()),
        )


# --- releases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseInfo:
    """The facts about a release the engine needs (the server has them in its releases table)."""

    release_id: str
    model: str
    hw_rev: str
    version: str
    min_version: str | None = None
    security_counter: int = 0

    def __post_init__(self) -> None:
        _str(self.release_id, "release.release_id")
        _str(self.model, "release.model")
        _str(self.hw_rev, "release.hw_rev")
        _version(self.version, "release.version")
        _opt_version(self.min_version, "release.min_version")
        _int(self.security_counter, "release.security_counter")

    def to_dict(self) -> dict[str, Any]:
        return {
            "release_id": self.release_id,
            "model": self.model,
            "hw_rev": self.hw_rev,
            "version": self.version,
            "min_version": self.min_version,
            "security_counter": self.security_counter,
        }

    @classmethod
    def from_dict(cls, d: object) -> ReleaseInfo:
        m = _map(d, "release")
        _known(m, "release", set(cls.__dataclass_fields__))
        return cls(
            release_id=m.get("release_id"),  # type: ignore[arg-type]  # validated in __post_init__
            model=m.get("model"),  # type: ignore[arg-type]
            hw_rev=m.get("hw_rev"),  # type: ignore[arg-type]
            version=m.get("version"),  # type: ignore[arg-type]
            min_version=m.get("min_version"),
            security_counter=m.get("security_counter", 0),
        )


# --- phases and thresholds ------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """Phase k admits the ceil(fraction × N) lowest-ranked target devices in total (cumulative);
    with ``rate_per_hour`` it admits them at most that fast (token bucket of ``burst``)."""

    fraction: float = 1.0
    rate_per_hour: float | None = None
    burst: int | None = None
    min_soak_s: float | None = None  # overrides the campaign's min_soak_s for this phase

    def __post_init__(self) -> None:
        f = _num(self.fraction, "phase.fraction")
        if not 0 < f <= 1:
            raise CampaignError(ErrorCode.CAMPAIGN, f"phase fraction {f} not in (0, 1]")
        if self.rate_per_hour is not None:
            r = _num(self.rate_per_hour, "phase.rate_per_hour")
            if not 0 < r <= 1e9:
                raise CampaignError(ErrorCode.CAMPAIGN, "phase rate_per_hour must be > 0")
        if self.burst is not None:
            _int(self.burst, "phase.burst", minimum=1)
            if self.rate_per_hour is None:
                raise CampaignError(ErrorCode.CAMPAIGN, "phase burst needs rate_per_hour")
        if self.min_soak_s is not None and _num(self.min_soak_s, "phase.min_soak_s") < 0:
            raise CampaignError(ErrorCode.CAMPAIGN, "phase min_soak_s must be ≥ 0")

    @property
    def capacity(self) -> float:
        """Token-bucket size: ``burst`` or one minute's worth of the rate (at least 1)."""
        if self.burst is not None:
            return float(self.burst)
        return float(max(1, math.ceil((self.rate_per_hour or 0) / 60)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "rate_per_hour": self.rate_per_hour,
            "burst": self.burst,
            "min_soak_s": self.min_soak_s,
        }

    @classmethod
    def from_dict(cls, d: object) -> Phase:
        m = _map(d, "phase")
        _known(m, "phase", set(cls.__dataclass_fields__))
        return cls(
            fraction=_num(m.get("fraction", 1.0), "phase.fraction"),
            rate_per_hour=_opt_num(m.get("rate_per_hour"), "phase.rate_per_hour"),
            burst=m.get("burst"),
            min_soak_s=_opt_num(m.get("min_soak_s"), "phase.min_soak_s"),
        )


@dataclass(frozen=True)
class FailureThreshold:
    """Pause when, among devices finished since the last acknowledged auto-pause, at least
    ``min_finished`` finished and failures reach ``max_failed`` or ``max_failed_fraction``."""

    max_failed: int | None = None
    max_failed_fraction: float | None = 0.1
    min_finished: int = 10

    def __post_init__(self) -> None:
        if self.max_failed is not None:
            _int(self.max_failed, "failure.max_failed", minimum=1)
        if self.max_failed_fraction is not None:
            f = _num(self.max_failed_fraction, "failure.max_failed_fraction")
            if not 0 < f <= 1:
                raise CampaignError(ErrorCode.CAMPAIGN, "max_failed_fraction not in (0, 1]")
        _int(self.min_finished, "failure.min_finished", minimum=1)

    def crossed(self, failed: int, finished: int) -> bool:
        if finished < self.min_finished:
            return False
        if self.max_failed is not None and failed >= self.max_failed:
            return True
        f = self.max_failed_fraction
        return f is not None and failed * exact(f).denominator >= exact(f).numerator * finished

    def describe(self, failed: int, finished: int) -> str:
        pct = _pct(Fraction(failed, finished)) if finished else "0%"
        if self.max_failed is not None and failed >= self.max_failed:
            return f"failure threshold: {failed}/{finished} failed ({pct}) ≥ {self.max_failed}"
        limit = _pct(exact(self.max_failed_fraction or 0))
        return f"failure threshold: {failed}/{finished} failed ({pct}) ≥ {limit}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_failed": self.max_failed,
            "max_failed_fraction": self.max_failed_fraction,
            "min_finished": self.min_finished,
        }

    @classmethod
    def from_dict(cls, d: object) -> FailureThreshold:
        m = _map(d, "failure")
        _known(m, "failure", set(cls.__dataclass_fields__))
        return cls(
            max_failed=m.get("max_failed"),
            max_failed_fraction=_opt_num(m.get("max_failed_fraction"), "max_failed_fraction"),
            min_finished=m.get("min_finished", 10),
        )


def _pct(f: Fraction) -> str:
    s = f"{float(f * 100):.1f}".rstrip("0").rstrip(".")
    return f"{s}%"


# --- campaign spec --------------------------------------------------------------------------


@dataclass(frozen=True)
class CampaignSpec:
    """What the operator asked for. Immutable once the campaign is created."""

    release: ReleaseInfo
    selector: TargetSelector
    phases: tuple[Phase, ...] = (Phase(0.01), Phase(0.1), Phase(0.5), Phase(1.0))
    success_threshold: float | Literal["all_finished"] = 0.95
    min_soak_s: float = 0.0
    failure: FailureThreshold = field(default_factory=FailureThreshold)
    deadline: float | None = None
    sla_window_s: float = 6 * 3600.0
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.release, ReleaseInfo):
            raise _bad("spec.release must be a ReleaseInfo")
        if not isinstance(self.selector, TargetSelector):
            raise _bad("spec.selector must be a TargetSelector")
        if not isinstance(self.failure, FailureThreshold):
            raise _bad("spec.failure must be a FailureThreshold")
        phases = tuple(self.phases)
        object.__setattr__(self, "phases", phases)
        if not phases or len(phases) > MAX_PHASES:
            raise CampaignError(ErrorCode.CAMPAIGN, f"a campaign needs 1..{MAX_PHASES} phases")
        if not all(isinstance(p, Phase) for p in phases):
            raise _bad("spec.phases must be Phase objects")
        for a, b in pairwise(phases):
            if exact(b.fraction) <= exact(a.fraction):
                raise CampaignError(
                    ErrorCode.CAMPAIGN,
                    f"phase fractions must strictly increase ({a.fraction} then {b.fraction})",
                )
        st = self.success_threshold
        if st != ALL_FINISHED:
            v = _num(st, "spec.success_threshold")
            if not 0 < v <= 1:
                raise CampaignError(ErrorCode.CAMPAIGN, "success_threshold not in (0, 1]")
        if _num(self.min_soak_s, "spec.min_soak_s") < 0:
            raise CampaignError(ErrorCode.CAMPAIGN, "min_soak_s must be ≥ 0")
        _opt_num(self.deadline, "spec.deadline")
        if _num(self.sla_window_s, "spec.sla_window_s") <= 0:
            raise CampaignError(ErrorCode.CAMPAIGN, "sla_window_s must be > 0")
        _opt_str(self.name, "spec.name", max_len=MAX_REASON)

    def soak_for(self, phase: int) -> float:
        p = self.phases[phase].min_soak_s
        return self.min_soak_s if p is None else p

    def to_dict(self) -> dict[str, Any]:
        return {
            "release": self.release.to_dict(),
            "selector": self.selector.to_dict(),
            "phases": [p.to_dict() for p in self.phases],
            "success_threshold": self.success_threshold,
            "min_soak_s": self.min_soak_s,
            "failure": self.failure.to_dict(),
            "deadline": self.deadline,
            "sla_window_s": self.sla_window_s,
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, d: object) -> CampaignSpec:
        m = _map(d, "spec")
        _known(m, "spec", set(cls.__dataclass_fields__))
        phases = m.get("phases")
        if phases is not None and (not isinstance(phases, list) or len(phases) > MAX_PHASES):
            raise _bad(f"spec.phases must be a list of at most {MAX_PHASES} phases")
        kw: dict[str, Any] = {}
        if phases is not None:
            kw["phases"] = tuple(Phase.from_dict(p) for p in phases)
        if "failure" in m:
            kw["failure"] = FailureThreshold.from_dict(m["failure"])
        st = m.get("success_threshold", 0.95)
        return cls(
            release=ReleaseInfo.from_dict(m.get("release")),
            selector=TargetSelector.from_dict(m.get("selector")),
            success_threshold=ALL_FINISHED if st == ALL_FINISHED else _num(st, "threshold"),
            min_soak_s=_num(m.get("min_soak_s", 0.0), "spec.min_soak_s"),
            deadline=_opt_num(m.get("deadline"), "spec.deadline"),
            sla_window_s=_num(m.get("sla_window_s", 6 * 3600.0), "spec.sla_window_s"),
            name=_opt_str(m.get("name"), "spec.name", max_len=MAX_REASON),
            **kw,
        )


# --- counts ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Counts:
    """Number of target devices in each state (the server keeps these, e.g. GROUP BY state)."""

    pending: int = 0
    offered: int = 0
    downloading: int = 0
    installed: int = 0
    succeeded: int = 0
    failed: int = 0
    reverted: int = 0

    def __post_init__(self) -> None:
        for s in DeviceState:
            _int(getattr(self, s.value), f"counts.{s.value}")

    def get(self, state: DeviceState) -> int:
        n: int = getattr(self, state.value)
        return n

    @property
    def total(self) -> int:
        return sum(self.get(s) for s in DeviceState)

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.reverted

    @property
    def failures(self) -> int:
        return self.failed + self.reverted

    @property
    def in_flight(self) -> int:
        return self.offered + self.downloading + self.installed

    @property
    def admitted(self) -> int:
        return self.total - self.pending

    def moved(self, old: DeviceState | None, new: DeviceState | None) -> Counts:
        """Counts after one device went from ``old`` to ``new`` (None = not in the target)."""
        if old == new:
            return self
        delta: dict[str, int] = {}
        if old is not None:
            delta[old.value] = self.get(old) - 1
        if new is not None:
            delta[new.value] = self.get(new) + 1
        return replace(self, **delta)

    @classmethod
    def of(cls, states: Iterable[DeviceState]) -> Counts:
        tally = dict.fromkeys((s.value for s in DeviceState), 0)
        for s in states:
            tally[s.value] += 1
        return cls(**tally)

    def to_dict(self) -> dict[str, int]:
        return {s.value: self.get(s) for s in DeviceState}

    @classmethod
    def from_dict(cls, d: Mapping[str, int] | Mapping[DeviceState, int]) -> Counts:
        m = {str(k): v for k, v in _map(d, "counts").items()}
        _known(m, "counts", {s.value for s in DeviceState})
        return cls(**m)


# --- campaign (spec + persisted runtime state) ----------------------------------------------

RankKey = tuple[int, str]
"""(rank, serial): a device's place in a campaign's admission order (ties broken by serial)."""


@dataclass(frozen=True)
class HistoryEntry:
    at: float
    event: str  # created, started, paused, resumed, advanced, completed, aborted
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "event": self.event, "detail": self.detail}

    @classmethod
    def from_dict(cls, d: object) -> HistoryEntry:
        m = _map(d, "history entry")
        return cls(
            at=_num(m.get("at"), "history.at"),
            event=_str(m.get("event"), "history.event"),
            detail=str(m.get("detail", ""))[:MAX_REASON],
        )


@dataclass(frozen=True)
class Campaign:
    """One campaign: the operator's spec plus everything the engine must remember.

    Every transition returns a new object; the server persists ``to_dict()`` whenever the
    returned campaign differs from the one it had (``!=``).
    ``quotas``/``thresholds`` are fixed at start from the target snapshot: phase k admits the
    devices whose rank key is ≤ ``thresholds[k]``, exactly ``quotas[k]`` of them.
    """

    id: str
    spec: CampaignSpec
    created_at: float
    status: CampaignStatus = CampaignStatus.DRAFT
    started_at: float | None = None
    ended_at: float | None = None
    phase: int = 0
    phase_started_at: float | None = None
    target_size: int = 0
    quotas: tuple[int, ...] = ()
    thresholds: tuple[RankKey, ...] = ()
    paused_at: float | None = None
    pause_reason: str | None = None
    paused_auto: bool = False
    baseline_failures: int = 0
    baseline_finished: int = 0
    bucket_tokens: float = 0.0
    bucket_at: float = 0.0
    samples: tuple[tuple[float, int], ...] = ()
    history: tuple[HistoryEntry, ...] = ()

    def __post_init__(self) -> None:
        check_id(self.id)
        object.__setattr__(self, "status", CampaignStatus(self.status))
        n = len(self.spec.phases)
        if not 0 <= self.phase < n:
            raise _bad(f"campaign phase {self.phase} out of range")
        started = self.status.active or self.status is CampaignStatus.COMPLETED
        if (started or self.started_at is not None) and (
            len(self.quotas) != n or len(self.thresholds) != n or self.target_size < 1
        ):
            raise _bad("a started campaign needs a target and one threshold per phase")

    @property
    def current_phase(self) -> Phase:
        return self.spec.phases[self.phase]

    @property
    def last_phase(self) -> bool:
        return self.phase == len(self.spec.phases) - 1

    @property
    def quota(self) -> int:
        """Devices the current phase admits in total (0 before start)."""
        return self.quotas[self.phase] if self.quotas else 0

    def with_history(self, at: float, event: str, detail: str = "") -> Campaign:
        h = (*self.history, HistoryEntry(at, event, detail[:MAX_REASON]))
        return replace(self, history=h[-MAX_HISTORY:])

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "spec": self.spec.to_dict(),
            "created_at": self.created_at,
            "status": self.status.value,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "phase": self.phase,
            "phase_started_at": self.phase_started_at,
            "target_size": self.target_size,
            "quotas": list(self.quotas),
            "thresholds": [[r, s] for r, s in self.thresholds],
            "paused_at": self.paused_at,
            "pause_reason": self.pause_reason,
            "paused_auto": self.paused_auto,
            "baseline_failures": self.baseline_failures,
            "baseline_finished": self.baseline_finished,
            "bucket_tokens": self.bucket_tokens,
            "bucket_at": self.bucket_at,
            "samples": [[t, n] for t, n in self.samples],
            "history": [h.to_dict() for h in self.history],
        }

    @classmethod
    def from_dict(cls, d: object) -> Campaign:
        m = _map(d, "campaign")
        _known(m, "campaign", set(cls.__dataclass_fields__))
        try:
            status = CampaignStatus(m.get("status", "draft"))
        except ValueError:
            raise _bad(f"unknown campaign status {m.get('status')!r}") from None
        thresholds = []
        for t in m.get("thresholds", ()):
            if not isinstance(t, list | tuple) or len(t) != 2:
                raise _bad("campaign.thresholds must be [rank, serial] pairs")
            thresholds.append((_int(t[0], "threshold rank"), _str(t[1], "threshold serial")))
        samples = []
        for s in m.get("samples", ())[:MAX_SAMPLES]:
            if not isinstance(s, list | tuple) or len(s) != 2:
                raise _bad("campaign.samples must be [time, finished] pairs")
            samples.append((_num(s[0], "sample time"), _int(s[1], "sample count")))
        return cls(
            id=_str(m.get("id"), "campaign.id"),
            spec=CampaignSpec.from_dict(m.get("spec")),
            created_at=_num(m.get("created_at"), "campaign.created_at"),
            status=status,
            started_at=_opt_num(m.get("started_at"), "campaign.started_at"),
            ended_at=_opt_num(m.get("ended_at"), "campaign.ended_at"),
            phase=_int(m.get("phase", 0), "campaign.phase"),
            phase_started_at=_opt_num(m.get("phase_started_at"), "campaign.phase_started_at"),
            target_size=_int(m.get("target_size", 0), "campaign.target_size"),
            quotas=tuple(_int(q, "campaign.quotas", minimum=1) for q in m.get("quotas", ())),
            thresholds=tuple(thresholds),
            paused_at=_opt_num(m.get("paused_at"), "campaign.paused_at"),
            pause_reason=_opt_str(m.get("pause_reason"), "pause_reason", max_len=MAX_REASON),
            paused_auto=_bool(m.get("paused_auto", False), "campaign.paused_auto"),
            baseline_failures=_int(m.get("baseline_failures", 0), "baseline_failures"),
            baseline_finished=_int(m.get("baseline_finished", 0), "baseline_finished"),
            bucket_tokens=_num(m.get("bucket_tokens", 0.0), "campaign.bucket_tokens"),
            bucket_at=_num(m.get("bucket_at", 0.0), "campaign.bucket_at"),
            samples=tuple(samples),
            history=tuple(HistoryEntry.from_dict(h) for h in m.get("history", ())[-MAX_HISTORY:]),
        )
