"""Campaign / phased-rollout engine: the public API (pure logic; the server persists state).

The engine is a set of pure functions over frozen, JSON-serializable values:

- model (``model``): :class:`TargetSelector`, :class:`DeviceView`, :class:`Phase`,
  :class:`FailureThreshold`, :class:`ReleaseInfo`, :class:`CampaignSpec`, :class:`Campaign`
  (spec + persisted state), :class:`Counts`, :class:`DeviceState`, :class:`CampaignStatus`;
- device progress (``devices``): :func:`apply_report`, :func:`mark_offered`;
- admission (``admission``): :func:`should_offer`, :func:`record_offer`,
  :func:`admitted`, :func:`offers`, :func:`stragglers`;
- lifecycle (``lifecycle``): :func:`create_campaign`, :func:`start`, :func:`pause`,
  :func:`resume`, :func:`abort`, :func:`evaluate`, :func:`conflicts`;
- update paths (``paths``): :func:`next_release_for`, :func:`update_path`.

Time always comes from the caller (``now``), normally ``clock.now()`` of an
:class:`otaguard.clock.Clock`; :class:`CampaignRunner` does that for you and serializes the
mutations of one campaign in one process. See docs/campaigns.md for the semantics.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from ..clock import Clock
from .admission import (
    admitted,
    device_rank,
    in_cohort,
    offers,
    plan_thresholds,
    rank_key,
    record_offer,
    should_offer,
    stragglers,
    tokens_at,
)
from .devices import DeviceEvent, DeviceProgress, apply_report, mark_offered, no_path
from .lifecycle import (
    Action,
    Decision,
    SlaReport,
    SlaStatus,
    Started,
    abort,
    check_compatible,
    conflicts,
    create_campaign,
    effective_spec,
    evaluate,
    failure_crossed,
    pause,
    resume,
    sla_report,
    start,
)
from .model import (
    ALL_FINISHED,
    Campaign,
    CampaignError,
    CampaignSpec,
    CampaignStatus,
    ConflictError,
    Counts,
    DeviceState,
    DeviceView,
    FailureThreshold,
    HistoryEntry,
    Phase,
    RankKey,
    ReleaseInfo,
    TargetSelector,
    quota,
)
from .paths import is_up_to_date, next_release_for, update_path


class CampaignRunner:
    """One campaign held in memory, driven by a :class:`Clock`, thread-safe.

    A convenience for the server's cache and for the fleet simulator: every method calls the
    pure function with ``clock.now()`` and keeps the result. After a mutating call, persist
    ``runner.campaign.to_dict()`` if :attr:`dirty` (then call :meth:`saved`).
    """

    def __init__(self, campaign: Campaign, clock: Clock) -> None:
        self._campaign = campaign
        self._clock = clock
        self._lock = threading.Lock()
        self._dirty = False

    @property
    def campaign(self) -> Campaign:
        return self._campaign

    @property
    def dirty(self) -> bool:
        return self._dirty

    def saved(self) -> None:
        self._dirty = False

    def _set(self, c: Campaign) -> Campaign:
        if c != self._campaign:
            self._campaign = c
            self._dirty = True
        return c

    def should_offer(self, device: DeviceView) -> bool:
        return should_offer(self._campaign, device, self._clock.now())

    def offer(self, device: DeviceView) -> bool:
        """Like :func:`should_offer`, and if a PENDING device is admitted, spend its token.
        The caller must then move the device to OFFERED (:func:`mark_offered`)."""
        with self._lock:
            now = self._clock.now()
            if not should_offer(self._campaign, device, now):
                return False
            if device.campaign_state is DeviceState.PENDING:
                self._set(record_offer(self._campaign, now))
            return True

    def start(self, devices: Iterable[DeviceView], existing: Iterable[Campaign] = ()) -> Started:
        with self._lock:
            s = start(self._campaign, devices, now=self._clock.now(), existing=existing)
            self._set(s.campaign)
            return s

    def pause(self, reason: str = "paused by operator") -> Campaign:
        with self._lock:
            return self._set(pause(self._campaign, now=self._clock.now(), reason=reason))

    def resume(self, counts: Counts) -> Campaign:
        with self._lock:
            return self._set(resume(self._campaign, counts, now=self._clock.now()))

    def abort(self, reason: str = "aborted by operator") -> Campaign:
        with self._lock:
            return self._set(abort(self._campaign, now=self._clock.now(), reason=reason))

    def evaluate(self, counts: Counts) -> Decision:
        with self._lock:
            d = evaluate(self._campaign, counts, self._clock.now())
            self._set(d.campaign)
            return d


__all__ = [
    "ALL_FINISHED",
    "Action",
    "Campaign",
    "CampaignError",
    "CampaignRunner",
    "CampaignSpec",
    "CampaignStatus",
    "ConflictError",
    "Counts",
    "Decision",
    "DeviceEvent",
    "DeviceProgress",
    "DeviceState",
    "DeviceView",
    "FailureThreshold",
    "HistoryEntry",
    "Phase",
    "RankKey",
    "ReleaseInfo",
    "SlaReport",
    "SlaStatus",
    "Started",
    "TargetSelector",
    "abort",
    "admitted",
    "apply_report",
    "check_compatible",
    "conflicts",
    "create_campaign",
    "device_rank",
    "effective_spec",
    "evaluate",
    "failure_crossed",
    "in_cohort",
    "is_up_to_date",
    "mark_offered",
    "next_release_for",
    "no_path",
    "offers",
    "pause",
    "plan_thresholds",
    "quota",
    "rank_key",
    "record_offer",
    "resume",
    "should_offer",
    "sla_report",
    "start",
    "stragglers",
    "tokens_at",
    "update_path",
]
