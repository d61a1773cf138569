"""Which devices are offered the update right now.

Each device gets a rank in the campaign: the first 63 bits of SHA-256(campaign id, serial),
ties broken by serial. Ranks depend on nothing but the campaign id and the serial, so the 1%
canary cohort is the same across restarts, processes and repeated calls, and differs between
campaigns (the same unlucky devices are not always first). At start the engine sorts the
target's rank keys once and stores, per phase, the key of the last admitted device; afterwards a
check-in costs one hash and one tuple comparison. Rate-limited phases add a token bucket whose
state lives in the campaign (so it survives restarts) and is advanced by the caller's clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import replace

from ..errors import ErrorCode
from .model import (
    Campaign,
    CampaignError,
    CampaignStatus,
    DeviceState,
    DeviceView,
    Phase,
    RankKey,
    quota,
)

_OFFER_AGAIN = frozenset({DeviceState.OFFERED, DeviceState.DOWNLOADING})


def device_rank(campaign_id: str, serial: str) -> int:
    """63-bit rank (fits a signed BIGINT column if the server wants to index it)."""
    h = hashlib.sha256(f"otaguard-rollout\x00{campaign_id}\x00{serial}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def rank_key(campaign_id: str, serial: str) -> RankKey:
    return (device_rank(campaign_id, serial), serial)


def plan_thresholds(
    campaign_id: str, serials: Iterable[str], phases: Sequence[Phase]
) -> tuple[tuple[int, ...], tuple[RankKey, ...]]:
    """(quota per phase, rank key of the last device each phase admits) for this target."""
    keys = sorted({rank_key(campaign_id, s) for s in serials})
    n = len(keys)
    if n == 0:
        raise CampaignError(ErrorCode.CAMPAIGN, "the target is empty")
    quotas = tuple(quota(p.fraction, n) for p in phases)
    return quotas, tuple(keys[q - 1] for q in quotas)


def tokens_at(campaign: Campaign, now: float) -> float:
    """Tokens in the current phase's bucket at ``now`` (wall time; a clock step back adds 0)."""
    phase = campaign.current_phase
    if phase.rate_per_hour is None:
        return float("inf")
    dt = max(0.0, now - campaign.bucket_at)
    return min(phase.capacity, campaign.bucket_tokens + dt * phase.rate_per_hour / 3600.0)


def in_cohort(campaign: Campaign, serial: str, phase: int | None = None) -> bool:
    """Whether ``serial``'s rank is within phase ``phase``'s quota (default: current phase)."""
    if not campaign.thresholds:
        return False
    k = campaign.phase if phase is None else phase
    return rank_key(campaign.id, serial) <= campaign.thresholds[k]


def should_offer(campaign: Campaign, device: DeviceView, now: float) -> bool:
    """Whether this check-in gets a manifest reference from ``campaign``. No side effects.

    Only a RUNNING campaign offers anything. A device already offered or downloading is offered
    again (its agent may have restarted); INSTALLED and finished devices are not. A PENDING
    device is admitted if its rank is in the current phase's cohort and, in a rate-limited
    phase, a token is available; call :func:`record_offer` when you actually admit it.
    """
    if campaign.status is not CampaignStatus.RUNNING or device.campaign_id != campaign.id:
        return False
    st = device.campaign_state
    if st in _OFFER_AGAIN:
        return True
    if st is not DeviceState.PENDING:
        return False
    if rank_key(campaign.id, device.serial) > campaign.thresholds[campaign.phase]:
        return False
    return campaign.current_phase.rate_per_hour is None or tokens_at(campaign, now) >= 1.0


def record_offer(campaign: Campaign, now: float) -> Campaign:
    """The campaign after one PENDING device was admitted at ``now`` (spends a token in a
    rate-limited phase; unchanged otherwise). Persist it in the same transaction as the
    device's move to OFFERED. Raises E_RATE_LIMIT if the bucket is empty."""
    if campaign.current_phase.rate_per_hour is None:
        return campaign
    tokens = tokens_at(campaign, now)
    if tokens < 1.0:
        raise CampaignError(ErrorCode.RATE_LIMIT, "phase admission rate reached")
    return replace(campaign, bucket_tokens=tokens - 1.0, bucket_at=max(now, campaign.bucket_at))


def admitted(campaign: Campaign, devices: Iterable[DeviceView]) -> list[str]:
    """Serials of the member devices in the current phase's cohort, in rank order: those
    already admitted plus those admissible once they check in (before rate limiting).
    Empty for a campaign that never started."""
    if not campaign.thresholds:
        return []  # never started
    thr = campaign.thresholds[campaign.phase]
    keys = [
        k
        for d in devices
        if d.campaign_id == campaign.id and (k := rank_key(campaign.id, d.serial)) <= thr
    ]
    return [s for _, s in sorted(keys)]


def offers(campaign: Campaign, devices: Iterable[DeviceView], now: float) -> list[str]:
    """Bulk :func:`should_offer` that also honours the token bucket across the batch: the
    serials that would be offered if all of ``devices`` checked in at ``now`` (pending ones in
    rank order, at most floor(tokens) of them in a rate-limited phase)."""
    again: list[str] = []
    pending: list[RankKey] = []
    for d in devices:
        if not should_offer(campaign, d, now):
            continue
        if d.campaign_state is DeviceState.PENDING:
            pending.append(rank_key(campaign.id, d.serial))
        else:
            again.append(d.serial)
    pending.sort()
    if campaign.current_phase.rate_per_hour is not None:
        pending = pending[: int(tokens_at(campaign, now))]
    return again + [s for _, s in pending]


def stragglers(
    campaign: Campaign, devices: Iterable[DeviceView], now: float, stale_after: float
) -> list[str]:
    """Unfinished devices of the current cohort not seen for ``stale_after`` seconds (or
    never): what blocks an "all finished" phase or the SLA; sorted by serial."""
    out = []
    for d in devices:
        if d.campaign_id != campaign.id or d.campaign_state is None:
            continue
        if d.campaign_state.finished or not in_cohort(campaign, d.serial):
            continue
        if d.last_seen is None or now - d.last_seen >= stale_after:
            out.append(d.serial)
    return sorted(out)
