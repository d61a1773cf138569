"""Campaign engine: model, admission, device progress, lifecycle, evaluation, SLA, paths."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otaguard.clock import SimClock
from otaguard.errors import ErrorCode, FormatError, OtaError
from otaguard.rollout import (
    ALL_FINISHED,
    Action,
    Campaign,
    CampaignError,
    CampaignRunner,
    CampaignSpec,
    CampaignStatus,
    ConflictError,
    Counts,
    DeviceEvent,
    DeviceProgress,
    DeviceState,
    DeviceView,
    FailureThreshold,
    Phase,
    ReleaseInfo,
    SlaStatus,
    TargetSelector,
    abort,
    admitted,
    apply_report,
    conflicts,
    create_campaign,
    device_rank,
    evaluate,
    mark_offered,
    next_release_for,
    no_path,
    offers,
    pause,
    quota,
    record_offer,
    resume,
    should_offer,
    start,
    stragglers,
    update_path,
)

T0 = 1_800_000_000.0
HOUR = 3600.0
DS = DeviceState
REL = ReleaseInfo("r20", "ctl", "b", "2.0.0", "1.0.0", 5)


def fleet(n: int, *, version: str = "1.5.0", model: str = "ctl", hw: str = "b") -> list[DeviceView]:
    return [DeviceView(f"SN{i:05d}", model, hw, running_version=version) for i in range(n)]


def member(d: DeviceView, cid: str, state: DeviceState = DS.PENDING) -> DeviceView:
    return replace(d, campaign_id=cid, campaign_state=state)


def spec(**kw: object) -> CampaignSpec:
    base: dict[str, object] = {
        "release": REL,
        "selector": TargetSelector(model="ctl"),
        "failure": FailureThreshold(max_failed_fraction=0.1, min_finished=10),
    }
    base.update(kw)
    return CampaignSpec(**base)  # type: ignore[arg-type]


def running(n: int = 100, cid: str = "c1", **kw: object) -> Campaign:
    devs = fleet(n)
    c = create_campaign(cid, spec(**kw), now=T0, devices=devs)
    return start(c, devs, now=T0).campaign


def roundtrip(c: Campaign) -> Campaign:
    return Campaign.from_dict(json.loads(json.dumps(c.to_dict())))


# --- model ---------------------------------------------------------------------------------


def test_selector_matching() -> None:
    d = DeviceView("A1", "ctl", "b", frozenset({"eu", "beta"}), "1.5.0")
    assert TargetSelector(model="ctl").matches(d)
    assert not TargetSelector(model="other").matches(d)
    assert TargetSelector(model="ctl", hw_rev="b").matches(d)
    assert not TargetSelector(model="ctl", hw_rev="a").matches(d)
    assert TargetSelector(model="ctl", groups=frozenset({"us", "beta"})).matches(d)
    assert not TargetSelector(model="ctl", groups=frozenset({"us"})).matches(d)
    assert TargetSelector(model="ctl", serials=frozenset({"A1"})).matches(d)
    assert not TargetSelector(model="ctl", serials=frozenset({"A2"})).matches(d)
    assert not TargetSelector(model="ctl", exclude=frozenset({"A1"})).matches(d)
    # version range: min inclusive / max exclusive by default, "1.5" == "1.5.0"
    assert TargetSelector(model="ctl", min_version="1.5").matches(d)
    assert not TargetSelector(model="ctl", min_version="1.5", min_inclusive=False).matches(d)
    assert not TargetSelector(model="ctl", max_version="1.5.0").matches(d)
    assert TargetSelector(model="ctl", max_version="1.5.0", max_inclusive=True).matches(d)
    assert TargetSelector(model="ctl", min_version="1.0", max_version="1.10").matches(d)
    assert not TargetSelector(model="ctl", min_version="1.6").matches(d)
    # unknown or garbage running version never matches a range
    assert not TargetSelector(model="ctl", min_version="1.0").matches(
        replace(d, running_version=None)
    )
    assert not TargetSelector(model="ctl", max_version="9").matches(replace(d, running_version="x"))
    assert TargetSelector(model="ctl").matches(replace(d, running_version=None))


def test_selector_rejects_bad_input() -> None:
    with pytest.raises(FormatError) as e:
        TargetSelector(model="ctl", min_version="1.2-rc1")
    assert e.value.code is ErrorCode.MALFORMED
    with pytest.raises(CampaignError) as e2:
        TargetSelector(model="ctl", min_version="2.0", max_version="1.0")
    assert e2.value.code is ErrorCode.CAMPAIGN
    with pytest.raises(CampaignError):
        TargetSelector(model="ctl", min_version="2.0", max_version="2.0")  # [2.0, 2.0) is empty
    TargetSelector(model="ctl", min_version="2.0", max_version="2.0", max_inclusive=True)
    with pytest.raises(FormatError):
        TargetSelector(model="")
    with pytest.raises(FormatError):
        TargetSelector.from_dict({"model": "ctl", "bogus": 1})
    with pytest.raises(FormatError):
        TargetSelector.from_dict({"model": "ctl", "_lo": [1]})
    with pytest.raises(FormatError):
        TargetSelector.from_dict({"model": "ctl", "groups": "eu"})


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        ({"phases": ()}, ErrorCode.CAMPAIGN),
        ({"phases": (Phase(0.5), Phase(0.5))}, ErrorCode.CAMPAIGN),
        ({"phases": (Phase(0.5), Phase(0.1))}, ErrorCode.CAMPAIGN),
        ({"success_threshold": 0.0}, ErrorCode.CAMPAIGN),
        ({"success_threshold": 1.5}, ErrorCode.CAMPAIGN),
        ({"success_threshold": "most"}, ErrorCode.MALFORMED),
        ({"min_soak_s": -1}, ErrorCode.CAMPAIGN),
        ({"sla_window_s": 0}, ErrorCode.CAMPAIGN),
    ],
)
def test_spec_validation(kw: dict[str, object], code: ErrorCode) -> None:
    with pytest.raises(OtaError) as e:
        spec(**kw)
    assert e.value.code is code


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: Phase(0.0), ErrorCode.CAMPAIGN),
        (lambda: Phase(1.01), ErrorCode.CAMPAIGN),
        (lambda: Phase(0.5, rate_per_hour=0), ErrorCode.CAMPAIGN),
        (lambda: Phase(0.5, burst=3), ErrorCode.CAMPAIGN),
        (lambda: Phase(float("nan")), ErrorCode.MALFORMED),
        (lambda: FailureThreshold(max_failed=0), ErrorCode.MALFORMED),
        (lambda: FailureThreshold(max_failed_fraction=0), ErrorCode.CAMPAIGN),
        (lambda: FailureThreshold(min_finished=0), ErrorCode.MALFORMED),
        (lambda: ReleaseInfo("r", "m", "h", "1.0", min_version="x"), ErrorCode.MALFORMED),
    ],
)
def test_parts_validation(make: object, code: ErrorCode) -> None:
    with pytest.raises(OtaError) as e:
        make()  # type: ignore[operator]
    assert e.value.code is code


def test_spec_and_campaign_json_roundtrip() -> None:
    s = spec(
        phases=(Phase(0.01), Phase(0.2, rate_per_hour=120, burst=5, min_soak_s=60), Phase(1.0)),
        success_threshold=ALL_FINISHED,
        deadline=T0 + 86400,
        selector=TargetSelector(
            model="ctl", groups=frozenset({"eu"}), min_version="1.0", exclude=frozenset({"X"})
        ),
        name="spring fix",
    )
    assert CampaignSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    devs = [replace(d, groups=frozenset({"eu"})) for d in fleet(30)]
    c = create_campaign("c-1", s, now=T0, devices=devs)
    assert roundtrip(c) == c
    c = start(c, devs, now=T0).campaign
    c = pause(c, now=T0 + 5)
    assert roundtrip(c) == c
    with pytest.raises(FormatError):
        Campaign.from_dict({**c.to_dict(), "status": "exploded"})
    with pytest.raises(FormatError):
        Campaign.from_dict({**c.to_dict(), "phase": 7})
    with pytest.raises(FormatError):
        Campaign.from_dict({**c.to_dict(), "thresholds": []})
    with pytest.raises(FormatError):
        Campaign.from_dict({**c.to_dict(), "id": "../etc"})


def test_counts() -> None:
    c = Counts.of([DS.PENDING, DS.PENDING, DS.OFFERED, DS.SUCCEEDED, DS.FAILED, DS.REVERTED])
    assert (c.total, c.finished, c.failures, c.in_flight, c.admitted) == (6, 3, 2, 1, 4)
    m = c.moved(DS.PENDING, DS.OFFERED)
    assert (m.pending, m.offered, m.total) == (1, 2, 6)
    assert c.moved(DS.OFFERED, DS.OFFERED) is c
    assert Counts.from_dict(c.to_dict()) == c
    assert Counts.from_dict({DS.SUCCEEDED: 2}) == Counts(succeeded=2)
    with pytest.raises(FormatError):
        Counts.from_dict({"lost": 1})
    with pytest.raises(FormatError):
        Counts(pending=-1)


def test_quota_uses_exact_decimals() -> None:
    assert quota(0.1, 30) == 3  # 0.1 * 30 in binary floating point is 3.0000000000000004
    assert quota(0.01, 20) == 1
    assert quota(0.01, 100_000) == 1000
    assert quota(1.0, 7) == 7
    assert quota(0.5, 0) == 0


# --- admission -----------------------------------------------------------------------------


def test_ranks_are_stable_and_campaign_specific() -> None:
    assert device_rank("c1", "SN1") == device_rank("c1", "SN1")
    assert device_rank("c1", "SN1") != device_rank("c2", "SN1")
    assert 0 <= device_rank("c1", "SN1") < 2**63


def test_phase_cohorts_are_exact_nested_and_stable() -> None:
    c = running(200, phases=(Phase(0.01), Phase(0.1), Phase(0.5), Phase(1.0)))
    assert c.quotas == (2, 20, 100, 200)
    members = [member(d, "c1") for d in fleet(200)]
    cohorts = []
    for k in range(4):
        ck = replace(c, phase=k)
        cohort = admitted(ck, members)
        assert len(cohort) == c.quotas[k]
        assert sorted(cohort) == sorted(d.serial for d in members if should_offer(ck, d, T0))
        cohorts.append(set(cohort))
    assert cohorts[0] < cohorts[1] < cohorts[2] < cohorts[3]
    # restart: the campaign rebuilt from JSON admits exactly the same devices
    assert admitted(roundtrip(c), list(reversed(members))) == admitted(c, members)
    # another campaign over the same fleet picks another canary
    other = running(200, cid="c2")
    assert set(admitted(other, [member(d, "c2") for d in fleet(200)])) != cohorts[0]


def test_should_offer_by_state_and_status() -> None:
    c = running(100)
    inside = admitted(c, [member(d, "c1") for d in fleet(100)])[0]
    d = DeviceView(inside, "ctl", "b", running_version="1.5.0", campaign_id="c1")
    for state, expected in [
        (DS.PENDING, True),
        (DS.OFFERED, True),
        (DS.DOWNLOADING, True),
        (DS.INSTALLED, False),
        (DS.SUCCEEDED, False),
        (DS.FAILED, False),
        (DS.REVERTED, False),
    ]:
        assert should_offer(c, replace(d, campaign_state=state), T0) is expected, state
    assert not should_offer(c, replace(d, campaign_state=None), T0)
    assert not should_offer(c, replace(d, campaign_id="other", campaign_state=DS.PENDING), T0)
    p = pause(c, now=T0)
    for state in DS:
        assert not should_offer(p, replace(d, campaign_state=state), T0)
    a = abort(c, now=T0)
    assert not should_offer(a, replace(d, campaign_state=DS.OFFERED), T0)
    outside = [s for s in (f"SN{i:05d}" for i in range(100)) if s not in admitted(c, [])]
    assert outside


def test_rate_limited_phase_token_bucket() -> None:
    clock = SimClock(T0)
    devs = fleet(50)
    s = spec(phases=(Phase(1.0, rate_per_hour=60, burst=2),))
    r = CampaignRunner(create_campaign("c1", s, now=clock.now(), devices=devs), clock)
    r.start(devs)
    pend = [member(d, "c1") for d in devs]
    assert len(offers(r.campaign, pend, clock.now())) == 2  # the burst
    got = [d.serial for d in pend if r.offer(d)]
    assert len(got) == 2 and r.dirty
    assert not r.offer(pend[-1])
    with pytest.raises(CampaignError) as e:
        record_offer(r.campaign, clock.now())
    assert e.value.code is ErrorCode.RATE_LIMIT
    # an offered device keeps being offered without spending tokens
    again = replace(pend[0], campaign_state=DS.OFFERED)
    assert r.offer(again)
    clock.advance(59)
    assert not any(r.should_offer(d) for d in pend)
    clock.advance(1)  # 60 s at 60/h = one token
    assert sum(r.offer(d) for d in pend) == 1
    clock.advance(10 * HOUR)  # the bucket caps at its burst, not 600 tokens
    assert sum(r.offer(d) for d in pend) == 2
    # the bucket state survives a restart
    r2 = CampaignRunner(roundtrip(r.campaign), clock)
    assert not any(r2.should_offer(d) for d in pend)


def test_stragglers() -> None:
    c = running(100, phases=(Phase(0.1), Phase(1.0)))
    cohort = set(admitted(c, [member(d, "c1") for d in fleet(100)]))
    devs = []
    for i, d in enumerate(fleet(100)):
        state = DS.SUCCEEDED if i % 3 == 0 else DS.OFFERED
        seen = T0 - (10 * HOUR if i % 2 else 60)
        devs.append(replace(member(d, "c1", state), last_seen=seen))
    out = stragglers(c, devs, T0, stale_after=HOUR)
    expect = sorted(
        d.serial for i, d in enumerate(devs) if d.serial in cohort and i % 3 != 0 and i % 2 == 1
    )
    assert out == expect


# --- device progress -----------------------------------------------------------------------


def test_reports_move_forward_idempotently() -> None:
    p = mark_offered(DeviceProgress(), "2.0.0")
    assert p.state is DS.OFFERED and p.version == "2.0.0"
    assert mark_offered(p, "2.0.0") is p
    seq = [DeviceEvent.DOWNLOADING, DeviceEvent.INSTALLED, DeviceEvent.SUCCEEDED]
    for ev in seq:
        p2 = apply_report(p, ev, target_version="2.0.0")
        assert p2.state is ev.state
        assert apply_report(p2, ev, target_version="2.0.0") is p2  # duplicate: no change
        p = p2
    # late reports never regress; finished is final
    for ev in DeviceEvent:
        assert apply_report(p, ev, target_version="2.0.0") is p
    assert mark_offered(p, "2.0.0") is p


def test_out_of_order_reports() -> None:
    p = mark_offered(DeviceProgress(), "2.0.0")
    p = apply_report(p, DeviceEvent.INSTALLED, target_version="2.0.0")
    assert apply_report(p, DeviceEvent.DOWNLOADING, target_version="2.0.0") is p
    p = apply_report(p, DeviceEvent.REVERTED, target_version="2.0.0", error="E_SELF_TEST")
    assert (p.state, p.error) == (DS.REVERTED, "E_SELF_TEST")
    f = apply_report(
        mark_offered(DeviceProgress(), "2.0.0"),
        DeviceEvent.FAILED,
        target_version="2.0.0",
        error="E_IMAGE_DIGEST",
    )
    assert (f.state, f.error) == (DS.FAILED, "E_IMAGE_DIGEST")
    assert apply_report(f, DeviceEvent.SUCCEEDED, target_version="2.0.0") is f
    # a failure without a code still records one
    g = apply_report(mark_offered(DeviceProgress(), "2.0.0"), "failed", target_version="2.0.0")  # type: ignore[arg-type]
    assert g.error == "E_INTERNAL"
    with pytest.raises(FormatError):
        apply_report(
            p0 := mark_offered(DeviceProgress(), "2.0"),
            "failed",
            target_version="2.0",
            error="x" * 65,
        )  # type: ignore[arg-type]
    assert p0.state is DS.OFFERED


def test_reports_from_a_device_never_offered_are_ignored() -> None:
    p = DeviceProgress()
    for ev in (DeviceEvent.DOWNLOADING, DeviceEvent.SUCCEEDED, DeviceEvent.FAILED):
        assert apply_report(p, ev, target_version="2.0.0") is p


def test_migration_step_progress() -> None:
    target = "2.0.0"
    p = mark_offered(DeviceProgress(), "1.5.0")  # intermediate step
    p = apply_report(p, DeviceEvent.DOWNLOADING, target_version=target)
    p = apply_report(p, DeviceEvent.SUCCEEDED, target_version=target)
    assert (p.state, p.version, p.step_done, p.steps) == (DS.OFFERED, "1.5.0", True, 1)
    # late or repeated reports about the finished step change nothing
    for ev in DeviceEvent:
        assert apply_report(p, ev, target_version=target, version="1.5.0") is p
    # the next offer (the target) starts a new attempt
    p = mark_offered(p, "2.0.0")
    assert (p.state, p.version, p.step_done) == (DS.OFFERED, "2.0.0", False)
    assert apply_report(p, DeviceEvent.SUCCEEDED, target_version=target, version="1.5.0") is p
    p = apply_report(p, DeviceEvent.SUCCEEDED, target_version=target)
    assert (p.state, p.steps) == (DS.SUCCEEDED, 1)
    assert DeviceProgress.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    # a failed step is a campaign failure
    q = mark_offered(DeviceProgress(), "1.5.0")
    q = apply_report(q, DeviceEvent.REVERTED, target_version=target, error="E_SELF_TEST")
    assert q.state is DS.REVERTED
    n = no_path(DeviceProgress())
    assert (n.state, n.error) == (DS.FAILED, "E_NO_PATH")


# --- lifecycle -----------------------------------------------------------------------------


def test_transitions_and_illegal_ones() -> None:
    devs = fleet(20)
    c = create_campaign("c1", spec(), now=T0, devices=devs)
    assert c.status is CampaignStatus.DRAFT
    z = Counts(pending=20)

    def illegal(fn: object) -> None:
        with pytest.raises(CampaignError) as e:
            fn()  # type: ignore[operator]
        assert e.value.code is ErrorCode.CAMPAIGN_STATE
        assert e.value.status == 409

    illegal(lambda: pause(c, now=T0))
    illegal(lambda: resume(c, z, now=T0))
    r = start(c, devs, now=T0)
    assert len(r.members) == 20
    run = r.campaign
    assert run.status is CampaignStatus.RUNNING
    illegal(lambda: start(run, devs, now=T0))
    illegal(lambda: resume(run, z, now=T0))
    p = pause(run, now=T0 + 1, reason="checking logs")
    assert (p.status, p.pause_reason, p.paused_auto) == (
        CampaignStatus.PAUSED,
        "checking logs",
        False,
    )
    illegal(lambda: pause(p, now=T0))
    illegal(lambda: start(p, devs, now=T0))
    back = resume(p, z, now=T0 + 2)
    assert back.status is CampaignStatus.RUNNING and back.pause_reason is None
    a = abort(back, now=T0 + 3)
    assert a.status is CampaignStatus.ABORTED and a.ended_at == T0 + 3
    for fn in (
        lambda: pause(a, now=T0),
        lambda: resume(a, z, now=T0),
        lambda: abort(a, now=T0),
        lambda: start(a, devs, now=T0),
    ):
        illegal(fn)
    assert abort(c, now=T0).status is CampaignStatus.ABORTED  # a draft can be aborted
    assert abort(p, now=T0).status is CampaignStatus.ABORTED
    assert [h.event for h in a.history] == ["created", "started", "paused", "resumed", "aborted"]


def test_start_refuses_empty_target() -> None:
    c = create_campaign("c1", spec(), now=T0)
    with pytest.raises(CampaignError) as e:
        start(c, fleet(5, model="other"), now=T0)
    assert e.value.code is ErrorCode.CAMPAIGN


def test_target_snapshot_excludes_up_to_date_and_other_classes() -> None:
    devs = fleet(5) + fleet(3, version="2.0.0") + fleet(2, hw="a") + fleet(1, version="3.0")
    devs = [replace(d, serial=f"D{i}") for i, d in enumerate(devs)]
    c = create_campaign("c1", spec(), now=T0, devices=devs)
    assert (c.spec.selector.hw_rev, c.spec.selector.max_version) == ("b", "2.0.0")
    assert start(c, devs, now=T0).members == tuple(f"D{i}" for i in range(5))


def test_incompatible_release() -> None:
    for sel in (
        TargetSelector(model="other"),
        TargetSelector(model="ctl", hw_rev="a"),
        TargetSelector(model="ctl", min_version="2.0.0"),
        TargetSelector(model="ctl", min_version="3.0"),
    ):
        with pytest.raises(CampaignError) as e:
            create_campaign("c1", spec(selector=sel), now=T0)
        assert e.value.code is ErrorCode.INCOMPATIBLE
        assert e.value.status == 422
    create_campaign("c1", spec(selector=TargetSelector(model="ctl", hw_rev="b")), now=T0)


def test_conflicts() -> None:
    devs = fleet(30)
    a = start(create_campaign("a", spec(), now=T0, devices=devs), devs, now=T0).campaign
    states = [DS.PENDING, DS.OFFERED, DS.DOWNLOADING, DS.INSTALLED, DS.SUCCEEDED, DS.FAILED]
    tracked = [member(d, "a", states[i % 6]) for i, d in enumerate(devs)]
    unfinished = sorted(d.serial for d in tracked if not d.campaign_state.finished)  # type: ignore[union-attr]
    s2 = spec(release=replace(REL, release_id="r21", version="2.1.0"))
    assert conflicts(s2, [a], tracked) == unfinished
    with pytest.raises(ConflictError) as e:
        create_campaign("b", s2, now=T0, existing=[a], devices=tracked)
    assert e.value.code is ErrorCode.CONFLICT and e.value.status == 409
    assert e.value.serials == unfinished and e.value.campaigns == ["a"]
    assert f"{len(unfinished)} device(s)" in e.value.detail
    assert e.value.to_dict()["overlap"] == str(len(unfinished))
    # explicit exclusion resolves it; so does the other campaign ending
    ex = replace(s2, selector=replace(s2.selector, exclude=frozenset(unfinished)))
    b = create_campaign("b", ex, now=T0, existing=[a], devices=tracked)
    started = start(b, tracked, now=T0, existing=[a])
    assert set(started.members).isdisjoint(unfinished)
    assert conflicts(s2, [pause(a, now=T0)], tracked) == unfinished
    assert conflicts(s2, [abort(a, now=T0)], tracked) == []
    # start re-checks: a conflict that appeared after the draft was created is refused
    draft = create_campaign("d", s2, now=T0, existing=[], devices=devs)
    with pytest.raises(ConflictError):
        start(draft, tracked, now=T0, existing=[a])


# --- evaluation ----------------------------------------------------------------------------


def test_advance_needs_success_threshold_and_soak() -> None:
    c = running(100, phases=(Phase(0.1), Phase(0.5), Phase(1.0)), min_soak_s=HOUR)
    assert c.quotas == (10, 50, 100)
    nine = Counts(pending=90, succeeded=9, offered=1)
    assert evaluate(c, nine, T0 + 2 * HOUR).action is Action.NONE  # 9/10 < 95%
    ten = Counts(pending=90, succeeded=10)
    d = evaluate(c, ten, T0 + HOUR - 1)
    assert d.action is Action.NONE  # not soaked yet
    d = evaluate(c, ten, T0 + HOUR)
    assert d.action is Action.ADVANCE and d.campaign.phase == 1 and d.changed
    assert d.reason == "phase 1 → 2 (50%): 10/10 succeeded ≥ 95%"
    assert d.campaign.phase_started_at == T0 + HOUR
    # the next phase needs its own soak and cohort
    d2 = evaluate(d.campaign, ten, T0 + 5 * HOUR)
    assert d2.action is Action.NONE and d2.campaign.phase == 1


def test_all_finished_threshold_and_completion() -> None:
    c = running(
        20,
        phases=(Phase(0.25), Phase(1.0)),
        success_threshold=ALL_FINISHED,
        failure=FailureThreshold(max_failed_fraction=0.5, min_finished=10),
    )
    assert c.quotas == (5, 20)
    assert evaluate(c, Counts(pending=15, succeeded=4, downloading=1), T0).action is Action.NONE
    d = evaluate(c, Counts(pending=15, succeeded=4, failed=1), T0)
    assert d.action is Action.ADVANCE and d.reason.endswith("5/5 finished")
    c = d.campaign
    assert evaluate(c, Counts(succeeded=18, failed=1, installed=1), T0).action is Action.NONE
    d = evaluate(c, Counts(succeeded=18, failed=1, reverted=1), T0 + 10)
    assert d.action is Action.COMPLETE and d.campaign.status is CampaignStatus.COMPLETED
    assert d.campaign.ended_at == T0 + 10
    assert evaluate(d.campaign, Counts(succeeded=18, failed=2), T0 + 20).action is Action.NONE


def test_failure_threshold_auto_pause_and_acknowledge() -> None:
    c = running(
        100,
        phases=(Phase(1.0),),
        failure=FailureThreshold(max_failed_fraction=0.1, min_finished=20),
    )
    # below min_finished nothing happens however bad it looks
    d = evaluate(c, Counts(pending=81, failed=10, succeeded=9), T0)
    assert d.action is Action.NONE
    d = evaluate(c, Counts(pending=80, failed=3, succeeded=17), T0)
    assert d.action is Action.PAUSE
    assert d.reason == "failure threshold: 3/20 failed (15%) ≥ 10%"
    p = d.campaign
    assert (p.status, p.paused_auto, p.pause_reason) == (CampaignStatus.PAUSED, True, d.reason)
    # resuming acknowledges those failures: only new ones count, again after min_finished
    r = resume(p, Counts(pending=80, failed=3, succeeded=17), now=T0 + 1)
    assert (r.baseline_failures, r.baseline_finished) == (3, 20)
    assert evaluate(r, Counts(pending=70, failed=5, succeeded=25), T0 + 2).action is Action.NONE
    d = evaluate(r, Counts(pending=60, failed=6, succeeded=34), T0 + 3)
    assert d.action is Action.PAUSE and d.reason == "failure threshold: 3/20 failed (15%) ≥ 10%"


def test_failure_threshold_exact_boundary_and_count() -> None:
    c = running(100, failure=FailureThreshold(max_failed_fraction=0.1, min_finished=20))
    # 2/20 is exactly 10%: ≥ means it pauses
    assert evaluate(c, Counts(pending=80, failed=2, succeeded=18), T0).action is Action.PAUSE
    c = running(
        100, failure=FailureThreshold(max_failed=3, max_failed_fraction=None, min_finished=1)
    )
    assert evaluate(c, Counts(pending=98, failed=2), T0).action is Action.NONE
    d = evaluate(c, Counts(pending=97, failed=2, reverted=1), T0)
    assert d.action is Action.PAUSE and d.reason == "failure threshold: 3/3 failed (100%) ≥ 3"


def test_manual_pause_keeps_failure_baseline() -> None:
    c = running(100, failure=FailureThreshold(max_failed_fraction=0.1, min_finished=10))
    p = pause(c, now=T0)
    assert evaluate(p, Counts(pending=80, failed=5, succeeded=15), T0).action is Action.NONE
    r = resume(p, Counts(pending=80, failed=5, succeeded=15), now=T0)
    assert r.baseline_failures == 0
    assert evaluate(r, Counts(pending=80, failed=5, succeeded=15), T0).action is Action.PAUSE


def test_evaluate_checks_counts_and_ignores_drafts() -> None:
    c = running(10)
    with pytest.raises(CampaignError) as e:
        evaluate(c, Counts(pending=11), T0)
    assert e.value.code is ErrorCode.CAMPAIGN
    draft = create_campaign("c9", spec(), now=T0)
    d = evaluate(draft, Counts(), T0)
    assert d.action is Action.NONE and not d.changed and d.sla.status is SlaStatus.NONE


def test_sla_tracking() -> None:
    day = 86400.0
    c = running(100, phases=(Phase(1.0),), deadline=T0 + day, sla_window_s=6 * HOUR)
    d = evaluate(c, Counts(pending=100), T0 + 60)
    assert d.sla.status is SlaStatus.ON_TRACK and d.sla.projected_completion is None
    # 10 devices/hour: 90 remaining need 9 h more, well inside the day
    d = evaluate(d.campaign, Counts(pending=90, succeeded=10), T0 + HOUR)
    assert d.sla.status is SlaStatus.ON_TRACK
    assert d.sla.rate_per_hour == pytest.approx(10.0)
    assert d.sla.projected_completion == pytest.approx(T0 + 10 * HOUR)
    assert d.sla.remaining == 90
    # 1 device/hour over the window: 89 remaining will not fit
    c2 = evaluate(d.campaign, Counts(pending=89, succeeded=11), T0 + 11 * HOUR).campaign
    s = evaluate(c2, Counts(pending=89, succeeded=11), T0 + 12 * HOUR).sla
    assert s.status is SlaStatus.AT_RISK and s.projected_completion > T0 + day  # type: ignore[operator]
    # stalled: no progress over the window
    s = evaluate(c2, Counts(pending=89, succeeded=11), T0 + 18 * HOUR).sla
    assert s.status is SlaStatus.AT_RISK
    s = evaluate(c2, Counts(pending=89, succeeded=11), T0 + day + 1).sla
    assert s.status is SlaStatus.MISSED
    done = evaluate(c2, Counts(succeeded=100), T0 + 20 * HOUR)
    assert done.action is Action.COMPLETE and done.sla.status is SlaStatus.MET
    late = evaluate(c2, Counts(succeeded=100), T0 + 2 * day)
    assert late.sla.status is SlaStatus.MISSED
    assert len(late.campaign.samples) <= 64
    nodl = running(10)
    assert evaluate(nodl, Counts(pending=10), T0).sla.status is SlaStatus.NONE


def test_samples_are_bounded() -> None:
    clock = SimClock(T0)
    devs = fleet(3000)
    s = spec(phases=(Phase(1.0),), sla_window_s=HOUR, deadline=T0 + 30 * 86400)
    r = CampaignRunner(create_campaign("c1", s, now=T0, devices=devs), clock)
    r.start(devs)
    for done in range(1, 2001):
        clock.advance(60)
        r.evaluate(Counts(pending=3000 - done, succeeded=done))
    c = r.campaign
    assert len(c.samples) <= 26
    assert c.samples[0][0] <= clock.now() - HOUR < c.samples[1][0]


def test_runner_full_rollout_on_sim_clock() -> None:
    clock = SimClock(T0)
    devs = fleet(400)
    s = spec(
        phases=(Phase(0.01), Phase(0.1), Phase(0.5), Phase(1.0)),
        min_soak_s=HOUR,
        failure=FailureThreshold(max_failed_fraction=0.1, min_finished=10),
        deadline=T0 + 3 * 86400,
    )
    r = CampaignRunner(create_campaign("c1", s, now=T0, devices=devs), clock)
    started = r.start(devs)
    prog = {sn: DeviceProgress() for sn in started.members}
    by_serial = {d.serial: d for d in devs}
    phases_seen = [0]
    for _ in range(24 * 14):  # 14 days, hourly: every device checks in and installs
        clock.advance(HOUR)
        for sn, p in prog.items():
            view = member(by_serial[sn], "c1", p.state)
            if r.offer(view):
                p = mark_offered(p, REL.version)
                for ev in (DeviceEvent.DOWNLOADING, DeviceEvent.INSTALLED, DeviceEvent.SUCCEEDED):
                    p = apply_report(p, ev, target_version=REL.version)
                prog[sn] = p
        d = r.evaluate(Counts.of(p.state for p in prog.values()))
        phases_seen.append(r.campaign.phase)
        if r.campaign.status is CampaignStatus.COMPLETED:
            break
    assert r.campaign.status is CampaignStatus.COMPLETED
    assert d.sla.status is SlaStatus.MET
    assert phases_seen == sorted(phases_seen) and set(phases_seen) == {0, 1, 2, 3}
    assert [h.event for h in r.campaign.history].count("advanced") == 3


# --- update paths --------------------------------------------------------------------------


def rel(v: str, mn: str | None = None, sc: int = 0, hw: str = "b") -> ReleaseInfo:
    return ReleaseInfo(f"r{v}", "ctl", hw, v, mn, sc)


def test_update_path_direct_and_migration() -> None:
    target = rel("3.0", "2.0", 3)
    rels = [rel("1.5", None, 1), rel("2.0", "1.0", 2), rel("2.5", "1.8", 2), target]
    assert next_release_for("2.1", target, rels) == target
    assert next_release_for("3.0", target, rels) is None  # up to date
    assert next_release_for("3.1", target, rels) is None
    # 1.2 cannot take 3.0 (min 2.0) nor 2.5 (min 1.8): step to 2.0, the newest it can take
    assert next_release_for("1.2", target, rels) == rels[1]
    assert update_path("1.2", target, rels) == [rels[1], target]
    # 0.9 must go 1.5 → 2.0 → 3.0
    assert [r.version for r in update_path("0.9", target, rels)] == ["1.5", "2.0", "3.0"]


def test_update_path_prefers_newest_reachable_step() -> None:
    target = rel("4.0", "3.0", 3)
    dead_end = rel("2.9", "1.0", 3)  # newest step from 1.0, but then the bridge's counter is lower
    via = rel("2.0", "1.0", 1)
    bridge = rel("3.0", "2.0", 2)
    assert update_path("1.0", target, [via, dead_end, bridge, target]) == [via, bridge, target]
    # without the counter trap the newest step wins (fewest steps)
    easy = replace(dead_end, security_counter=2)
    assert update_path("1.0", target, [via, easy, bridge, target]) == [easy, bridge, target]


def test_update_path_respects_security_counters_and_class() -> None:
    target = rel("3.0", "2.0", 3)
    too_high = rel("2.5", "1.0", 4)  # would raise the device's counter above the target's
    other_hw = rel("2.2", "1.0", 2, hw="a")
    with pytest.raises(CampaignError) as e:
        update_path("1.0", target, [too_high, other_hw, target])
    assert e.value.code is ErrorCode.NO_PATH
    assert next_release_for("1.0", target, [too_high, other_hw, target]) is None
    ok = rel("2.1", "1.0", 3)
    assert next_release_for("1.0", target, [too_high, ok, target]) == ok
    # a device whose counter is already above a step's cannot take that step
    assert (
        next_release_for("1.0", target, [rel("2.1", "1.0", 1), target], security_counter=2) is None
    )
    assert next_release_for("2.0", target, [target], security_counter=4) is None
    assert next_release_for("2.0", target, [target], security_counter=3) == target
    with pytest.raises(CampaignError) as e2:
        update_path("not-a-version", target, [target])
    assert e2.value.code is ErrorCode.NO_PATH


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 30), st.integers(0, 30), st.integers(0, 4)), max_size=12),
    st.integers(0, 30),
    st.integers(0, 3),
)
def test_update_path_property(raw: list[tuple[int, int, int]], running: int, counter: int) -> None:
    """Every step is installable where it is offered, versions rise, the path ends at the
    target; and a path exists exactly when a brute-force search finds one."""
    target = ReleaseInfo("t", "ctl", "b", "31", "20", 4)
    rels = [
        ReleaseInfo(f"r{i}", "ctl", "b", str(v), str(min(m, v)), c)
        for i, (v, m, c) in enumerate(raw)
    ]
    rels.append(target)
    uniq = {int(r.version): r for r in reversed(rels)}  # first release of a version wins

    def reachable(at: int, ctr: int) -> bool:
        if at >= 31:
            return True
        return any(
            int(r.version) > at
            and int(r.min_version or 0) <= at
            and ctr <= r.security_counter <= 4
            and reachable(int(r.version), r.security_counter)
            for r in uniq.values()
        )

    try:
        path = update_path(str(running), target, rels, security_counter=counter)
    except CampaignError as e:
        assert e.code is ErrorCode.NO_PATH
        assert not reachable(running, counter)
        return
    assert reachable(running, counter)
    at, ctr = running, counter
    for r in path:
        assert int(r.version) > at and int(r.min_version or 0) <= at and r.security_counter >= ctr
        at, ctr = int(r.version), r.security_counter
    assert path[-1] == target or running >= 31
