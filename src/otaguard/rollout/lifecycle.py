"""Campaign lifecycle: create, start, pause, resume, abort, and the periodic evaluation that
advances phases, pauses on failures, completes, and tracks the deadline.

State machine (anything else raises E_CAMPAIGN_STATE)::

    draft --start--> running --pause / failure threshold--> paused --resume--> running
    running --evaluate: last phase finished--> completed
    draft | running | paused --abort--> aborted

Evaluation works on per-state counts the server already keeps, so the engine never needs the
device rows; it is O(1) and can run after every report or on a timer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from fractions import Fraction

from ..errors import ErrorCode
from ..manifest.version import compare_versions
from .admission import plan_thresholds
from .model import (
    ALL_FINISHED,
    MAX_SAMPLES,
    Campaign,
    CampaignError,
    CampaignSpec,
    CampaignStatus,
    ConflictError,
    Counts,
    DeviceView,
    _pct,
    check_id,
    exact,
)

S = CampaignStatus


# --- compatibility and conflicts -------------------------------------------------------------


def check_compatible(spec: CampaignSpec) -> None:
    """Refuse (E_INCOMPATIBLE) a campaign whose selector targets devices the release cannot
    be installed on: another model or hardware revision (another SUIT class), or only devices
    already at or above the release version."""
    sel, rel = spec.selector, spec.release
    if sel.model != rel.model or (sel.hw_rev is not None and sel.hw_rev != rel.hw_rev):
        raise CampaignError(
            ErrorCode.INCOMPATIBLE,
            f"release {rel.release_id} is for {rel.model}:{rel.hw_rev}; the selector targets "
            f"{sel.model}:{sel.hw_rev or '*'}",
        )
    if sel.min_version is not None:
        c = compare_versions(sel.min_version, rel.version)
        if c > 0 or (c == 0 and sel.min_inclusive):
            raise CampaignError(
                ErrorCode.INCOMPATIBLE,
                f"the selector only targets devices at or above {rel.version}: a downgrade",
            )


def effective_spec(spec: CampaignSpec) -> CampaignSpec:
    """The spec as the campaign runs it: hw_rev pinned to the release's, and the version range
    capped below the release version (devices already on it are not part of the rollout)."""
    sel, rel = spec.selector, spec.release
    changes: dict[str, object] = {}
    if sel.hw_rev is None:
        changes["hw_rev"] = rel.hw_rev
    if (
        sel.max_version is None
        or compare_versions(sel.max_version, rel.version) > 0
        or (compare_versions(sel.max_version, rel.version) == 0 and sel.max_inclusive)
    ):
        changes["max_version"] = rel.version
        changes["max_inclusive"] = False
    if not changes:
        return spec
    return replace(spec, selector=replace(sel, **changes))  # type: ignore[arg-type]


def conflicts(
    new_spec: CampaignSpec,
    existing_campaigns: Iterable[Campaign],
    devices: Iterable[DeviceView],
    *,
    campaign_id: str | None = None,
) -> list[str]:
    """Serials that ``new_spec`` would target but that are still unfinished members of another
    running or paused campaign (sorted). A device that finished (succeeded, failed, reverted)
    in a campaign is free. Devices listed in the selector's ``exclude`` never conflict."""
    active = {c.id for c in existing_campaigns if c.status.active and c.id != campaign_id}
    sel = new_spec.selector
    out = []
    for d in devices:
        if d.campaign_id is None or d.campaign_id not in active:
            continue
        if d.campaign_state is not None and d.campaign_state.finished:
            continue
        if sel.matches(d):
            out.append(d.serial)
    return sorted(out)


def _raise_conflicts(
    spec: CampaignSpec,
    existing: list[Campaign],
    devices: list[DeviceView],
    campaign_id: str | None,
) -> None:
    overlap = conflicts(spec, existing, devices, campaign_id=campaign_id)
    if overlap:
        ids = set(overlap)
        involved = sorted({d.campaign_id for d in devices if d.serial in ids and d.campaign_id})
        raise ConflictError(overlap, involved)


# --- transitions -----------------------------------------------------------------------------


def _require(campaign: Campaign, action: str, *allowed: CampaignStatus) -> None:
    if campaign.status not in allowed:
        raise CampaignError(
            ErrorCode.CAMPAIGN_STATE,
            f"cannot {action} campaign {campaign.id}: it is {campaign.status.value}",
        )


def create_campaign(
    campaign_id: str,
    spec: CampaignSpec,
    *,
    now: float,
    existing: Iterable[Campaign] = (),
    devices: Iterable[DeviceView] = (),
) -> Campaign:
    """A new DRAFT campaign. Raises E_INCOMPATIBLE (release/selector mismatch) or E_CONFLICT
    (``devices`` it would target are unfinished in a running/paused campaign of ``existing``)."""
    check_id(campaign_id)
    check_compatible(spec)
    spec = effective_spec(spec)
    _raise_conflicts(spec, list(existing), list(devices), campaign_id)
    c = Campaign(id=campaign_id, spec=spec, created_at=now)
    return c.with_history(now, "created", f"release {spec.release.release_id}")


@dataclass(frozen=True)
class Started:
    campaign: Campaign
    members: tuple[str, ...]  # the target snapshot: give each a PENDING row in this campaign


def start(
    campaign: Campaign,
    devices: Iterable[DeviceView],
    *,
    now: float,
    existing: Iterable[Campaign] = (),
) -> Started:
    """DRAFT → RUNNING. Snapshots the target (devices matching the selector now), fixes the
    per-phase cohorts, and re-checks conflicts (E_CONFLICT) since the draft was created.
    An empty target is refused (E_CAMPAIGN)."""
    _require(campaign, "start", S.DRAFT)
    devs = list(devices)
    _raise_conflicts(campaign.spec, list(existing), devs, campaign.id)
    members = tuple(sorted({d.serial for d in devs if campaign.spec.selector.matches(d)}))
    if not members:
        raise CampaignError(ErrorCode.CAMPAIGN, f"campaign {campaign.id}: no device matches")
    quotas, thresholds = plan_thresholds(campaign.id, members, campaign.spec.phases)
    c = replace(
        campaign,
        status=S.RUNNING,
        started_at=now,
        phase=0,
        phase_started_at=now,
        target_size=len(members),
        quotas=quotas,
        thresholds=thresholds,
        bucket_tokens=campaign.spec.phases[0].capacity,
        bucket_at=now,
        samples=((now, 0),),
    )
    return Started(c.with_history(now, "started", f"{len(members)} devices"), members)


def pause(campaign: Campaign, *, now: float, reason: str = "paused by operator") -> Campaign:
    """RUNNING → PAUSED (manual). A paused campaign offers nothing, not even re-offers."""
    _require(campaign, "pause", S.RUNNING)
    c = replace(campaign, status=S.PAUSED, paused_at=now, pause_reason=reason, paused_auto=False)
    return c.with_history(now, "paused", reason)


def resume(campaign: Campaign, counts: Counts, *, now: float) -> Campaign:
    """PAUSED → RUNNING. Resuming from an automatic pause acknowledges the failures so far:
    the failure threshold then counts only devices finishing after this moment."""
    _require(campaign, "resume", S.PAUSED)
    c = replace(campaign, status=S.RUNNING, paused_at=None, pause_reason=None, paused_auto=False)
    detail = ""
    if campaign.paused_auto:
        c = replace(c, baseline_failures=counts.failures, baseline_finished=counts.finished)
        detail = f"acknowledged {counts.failures}/{counts.finished} failed"
    return c.with_history(now, "resumed", detail)


def abort(campaign: Campaign, *, now: float, reason: str = "aborted by operator") -> Campaign:
    """DRAFT/RUNNING/PAUSED → ABORTED (final). Devices keep their rows; none is offered again."""
    _require(campaign, "abort", S.DRAFT, S.RUNNING, S.PAUSED)
    c = replace(campaign, status=S.ABORTED, ended_at=now, pause_reason=None, paused_auto=False)
    return c.with_history(now, "aborted", reason)


# --- evaluation ------------------------------------------------------------------------------


class Action(StrEnum):
    NONE = "none"
    ADVANCE = "advance"
    PAUSE = "pause"
    COMPLETE = "complete"


class SlaStatus(StrEnum):
    NONE = "none"  # no deadline (or campaign not running)
    ON_TRACK = "on_track"
    AT_RISK = "at_risk"  # projected completion after the deadline, or no progress
    MISSED = "missed"  # deadline passed before completion
    MET = "met"  # completed before the deadline


@dataclass(frozen=True)
class SlaReport:
    status: SlaStatus
    deadline: float | None
    projected_completion: float | None  # from the recent finish rate; None if unknown
    rate_per_hour: float | None  # devices finished per hour over the recent window
    remaining: int  # target devices not finished yet

    def to_dict(self) -> dict[str, object]:
        return {
            "status": self.status.value,
            "deadline": self.deadline,
            "projected_completion": self.projected_completion,
            "rate_per_hour": self.rate_per_hour,
            "remaining": self.remaining,
        }


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    campaign: Campaign  # persist it when ``changed``
    sla: SlaReport
    changed: bool


def _check_counts(campaign: Campaign, counts: Counts) -> None:
    if campaign.status is not S.DRAFT and counts.total > campaign.target_size:
        raise CampaignError(
            ErrorCode.CAMPAIGN,
            f"counts total {counts.total} exceeds the target size {campaign.target_size}",
        )


def _phase_quota(campaign: Campaign, counts: Counts) -> int:
    # Devices deleted from the registry after start can never finish; do not wait for them.
    return min(campaign.quota, counts.total)


def _all_finished(campaign: Campaign, counts: Counts) -> bool:
    return counts.finished >= _phase_quota(campaign, counts) and counts.in_flight == 0


def _success_met(campaign: Campaign, counts: Counts) -> tuple[bool, str]:
    st = campaign.spec.success_threshold
    q = _phase_quota(campaign, counts)
    if st == ALL_FINISHED:
        return _all_finished(campaign, counts), f"{counts.finished}/{q} finished"
    f = exact(st)
    ok = counts.succeeded * f.denominator >= f.numerator * q
    return ok, f"{counts.succeeded}/{q} succeeded ≥ {_pct(f)}"


def _failure_window(campaign: Campaign, counts: Counts) -> tuple[int, int]:
    failed = max(0, counts.failures - campaign.baseline_failures)
    finished = max(0, counts.finished - campaign.baseline_finished)
    return failed, finished


def failure_crossed(campaign: Campaign, counts: Counts) -> bool:
    """The failure threshold over devices finished since the last acknowledged auto-pause."""
    return campaign.spec.failure.crossed(*_failure_window(campaign, counts))


def _sampled(campaign: Campaign, counts: Counts, now: float) -> Campaign:
    window = campaign.spec.sla_window_s
    samples = list(campaign.samples)
    if not samples or now - samples[-1][0] >= window / 24:
        samples.append((now, counts.finished))
    while len(samples) >= 2 and samples[1][0] <= now - window:
        samples.pop(0)  # keep exactly one anchor at or before the window start
    samples = samples[-MAX_SAMPLES:]
    t = tuple(samples)
    return campaign if t == campaign.samples else replace(campaign, samples=t)


def sla_report(campaign: Campaign, counts: Counts, now: float) -> SlaReport:
    deadline = campaign.spec.deadline
    if not campaign.quotas:  # never started
        return SlaReport(SlaStatus.NONE, deadline, None, None, counts.total)
    target = min(campaign.quotas[-1], counts.total)
    remaining = max(0, target - counts.finished)
    rate: float | None = None
    span = 0.0
    if campaign.samples:
        t0, n0 = campaign.samples[0]
        span = now - t0
        if span > 0:
            rate = max(0, counts.finished - n0) / span
    if remaining == 0:
        projected: float | None = now if campaign.ended_at is None else campaign.ended_at
    elif rate:
        projected = now + remaining / rate
    else:
        projected = None
    per_hour = None if rate is None else rate * 3600.0
    if campaign.status is S.COMPLETED:
        projected = campaign.ended_at
    if deadline is None or campaign.status is S.ABORTED:
        return SlaReport(SlaStatus.NONE, deadline, projected, per_hour, remaining)
    if campaign.status is S.COMPLETED:
        done = campaign.ended_at if campaign.ended_at is not None else now
        met = SlaStatus.MET if done <= deadline else SlaStatus.MISSED
        return SlaReport(met, deadline, projected, per_hour, remaining)
    if now > deadline:
        status = SlaStatus.MISSED
    elif remaining == 0:
        status = SlaStatus.ON_TRACK
    elif projected is None:
        enough = span >= campaign.spec.sla_window_s / 24
        status = SlaStatus.AT_RISK if enough else SlaStatus.ON_TRACK
    else:
        status = SlaStatus.AT_RISK if projected > deadline else SlaStatus.ON_TRACK
    return SlaReport(status, deadline, projected, per_hour, remaining)


def evaluate(campaign: Campaign, counts: Counts, now: float) -> Decision:
    """Decide what happens to ``campaign`` given the server's per-state ``counts`` at ``now``.

    For a RUNNING campaign, in this order: auto-pause if the failure threshold is crossed
    (counting only devices finished since the last acknowledged auto-pause, and only once at
    least ``min_finished`` of them finished); complete if this is the last phase and its whole
    cohort finished; advance one phase if the success threshold is met for the current cohort
    and the phase has soaked long enough. Paused campaigns only get SLA bookkeeping.
    """
    _check_counts(campaign, counts)
    c = campaign
    action, reason = Action.NONE, ""
    if c.status.active:
        c = _sampled(c, counts, now)
    if c.status is S.RUNNING:
        failed, finished = _failure_window(c, counts)
        if c.spec.failure.crossed(failed, finished):
            action, reason = Action.PAUSE, c.spec.failure.describe(failed, finished)
            c = replace(c, status=S.PAUSED, paused_at=now, pause_reason=reason, paused_auto=True)
            c = c.with_history(now, "paused", reason)
        elif c.last_phase and _all_finished(c, counts):
            action = Action.COMPLETE
            reason = (
                f"all {_phase_quota(c, counts)} devices finished: {counts.succeeded} succeeded, "
                f"{counts.failures} failed"
            )
            c = replace(c, status=S.COMPLETED, ended_at=now).with_history(now, "completed", reason)
        elif not c.last_phase:
            ok, why = _success_met(c, counts)
            soaked = now - (c.phase_started_at or now) >= c.spec.soak_for(c.phase)
            if ok and soaked:
                nxt = c.phase + 1
                frac = Fraction(exact(c.spec.phases[nxt].fraction))
                action = Action.ADVANCE
                reason = f"phase {c.phase + 1} → {nxt + 1} ({_pct(frac)}): {why}"
                c = replace(
                    c,
                    phase=nxt,
                    phase_started_at=now,
                    bucket_tokens=c.spec.phases[nxt].capacity,
                    bucket_at=now,
                )
                c = c.with_history(now, "advanced", reason)
    return Decision(action, reason, c, sla_report(c, counts, now), c != campaign)
