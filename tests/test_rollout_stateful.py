"""Random sequences of check-ins, reports, pause/resume, restarts and clock advances against
the campaign engine, with the invariants the server relies on checked after every step."""

from __future__ import annotations

import json
from dataclasses import replace

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from otaguard.clock import SimClock
from otaguard.errors import ErrorCode
from otaguard.rollout import (
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
    TargetSelector,
    admitted,
    apply_report,
    create_campaign,
    in_cohort,
    mark_offered,
)

T0 = 1_800_000_000.0
REL_A = ReleaseInfo("ra", "ctl", "b", "2.0.0", "1.0.0", 2)
REL_B = ReleaseInfo("rb", "ctl", "b", "2.1.0", "1.0.0", 2)
PHASE_PLANS = [
    (Phase(0.01), Phase(0.1), Phase(0.5), Phase(1.0)),
    (Phase(0.2), Phase(1.0)),
    (Phase(0.3, rate_per_hour=30, burst=2), Phase(1.0, rate_per_hour=120)),
    (Phase(1.0),),
]
EVENTS = [e for e in DeviceEvent if e is not DeviceEvent.OFFERED]
FINAL = [DeviceEvent.SUCCEEDED] * 4 + [DeviceEvent.FAILED, DeviceEvent.REVERTED]
ACTIVE = (CampaignStatus.RUNNING, CampaignStatus.PAUSED)


class RolloutMachine(RuleBasedStateMachine):
    @initialize(
        n=st.integers(3, 40),
        plan=st.sampled_from(PHASE_PLANS),
        max_failed=st.one_of(st.none(), st.integers(1, 6)),
        frac=st.sampled_from([None, 0.1, 0.25, 0.5]),
        min_finished=st.integers(1, 8),
        eu=st.sets(st.integers(0, 39), max_size=20),
        soak=st.sampled_from([0.0, 600.0]),
    )
    def setup(
        self,
        n: int,
        plan: tuple[Phase, ...],
        max_failed: int | None,
        frac: float | None,
        min_finished: int,
        eu: set[int],
        soak: float,
    ) -> None:
        if max_failed is None and frac is None:
            frac = 0.2
        self.clock = SimClock(T0)
        self.fail = FailureThreshold(max_failed, frac, min_finished)
        self.devices = {
            f"D{i:03d}": DeviceView(
                f"D{i:03d}", "ctl", "b", frozenset({"eu"} if i in eu else ()), "1.5.0"
            )
            for i in range(n)
        }
        self.current: dict[str, str] = {}  # serial -> campaign it currently belongs to
        self.progress: dict[str, dict[str, DeviceProgress]] = {}
        self.runners: dict[str, CampaignRunner] = {}
        self.canary: dict[str, list[str]] = {}
        self.last_phase: dict[str, int] = {}
        self.baseline: dict[str, tuple[int, int]] = {}
        spec = CampaignSpec(
            release=REL_A,
            selector=TargetSelector(model="ctl"),
            phases=plan,
            failure=self.fail,
            min_soak_s=soak,
        )
        self._launch("a", spec, [])

    # --- helpers ---------------------------------------------------------------------------

    def _view(self, serial: str) -> DeviceView:
        cid = self.current.get(serial)
        state = self.progress[cid][serial].state if cid else None
        return replace(self.devices[serial], campaign_id=cid, campaign_state=state)

    def _views(self) -> list[DeviceView]:
        return [self._view(s) for s in sorted(self.devices)]

    def _counts(self, cid: str) -> Counts:
        return Counts.of(p.state for p in self.progress[cid].values())

    def _campaigns(self) -> list[Campaign]:
        return [r.campaign for r in self.runners.values()]

    def _launch(self, cid: str, spec: CampaignSpec, existing: list[Campaign]) -> None:
        c = create_campaign(
            cid, spec, now=self.clock.now(), existing=existing, devices=self._views()
        )
        runner = CampaignRunner(c, self.clock)
        started = runner.start(self._views(), existing)
        self.runners[cid] = runner
        self.progress[cid] = {s: DeviceProgress() for s in started.members}
        for s in started.members:
            self.current[s] = cid
        self.canary[cid] = admitted(replace(runner.campaign, phase=0), self._views())
        self.last_phase[cid] = 0
        self.baseline[cid] = (0, 0)

    def _expected_overlap(self, selector: TargetSelector) -> list[str]:
        out = []
        for s in self.devices:
            cid = self.current.get(s)
            if cid is None or self.runners[cid].campaign.status not in ACTIVE:
                continue
            if self.progress[cid][s].state.finished or not selector.matches(self._view(s)):
                continue
            out.append(s)
        return sorted(out)

    # --- rules -----------------------------------------------------------------------------

    @rule(data=st.data())
    def check_in(self, data: st.DataObject) -> None:
        self._check_in(data.draw(st.sampled_from(sorted(self.devices))))

    @rule()
    def whole_fleet_checks_in(self) -> None:
        for serial in sorted(self.devices):
            self._check_in(serial)

    def _check_in(self, serial: str) -> None:
        cid = self.current.get(serial)
        if cid is None:
            return
        runner = self.runners[cid]
        before = self.progress[cid][serial]
        c_before = runner.campaign
        offered = runner.offer(self._view(serial))
        if c_before.status is not CampaignStatus.RUNNING:
            assert not offered, "a paused/finished campaign offered something"
            assert runner.campaign == c_before
        event(f"check-in: offered={offered}")
        if offered:
            version = runner.campaign.spec.release.version
            after = mark_offered(before, version)
            if before.state is DeviceState.PENDING:
                assert after.state is DeviceState.OFFERED
                assert in_cohort(runner.campaign, serial)
            self.progress[cid][serial] = after

    @rule(data=st.data(), event=st.sampled_from(EVENTS) | st.sampled_from(FINAL), dup=st.booleans())
    def report(self, data: st.DataObject, event: DeviceEvent, dup: bool) -> None:
        """Mostly devices in flight report; sometimes any device (ignored unless admitted)."""
        busy = sorted(s for s, cid in self.current.items() if self.progress[cid][s].state.in_flight)
        pool = busy if busy and data.draw(st.integers(0, 9)) else sorted(self.devices)
        serial = data.draw(st.sampled_from(pool))
        cid = self.current.get(serial)
        if cid is None:
            return
        target = self.runners[cid].campaign.spec.release.version
        before = self.progress[cid][serial]
        after = apply_report(before, event, target_version=target, error="E_SELF_TEST")
        if before.state.finished or before.state is DeviceState.PENDING:
            assert after is before
        assert after.state.order >= before.state.order
        if dup:
            assert apply_report(after, event, target_version=target, error="E_SELF_TEST") is after
        self.progress[cid][serial] = after
        if data.draw(st.booleans()):
            self.evaluate(cid)

    @rule(data=st.data())
    def in_flight_devices_report(self, data: st.DataObject) -> None:
        limit = data.draw(st.integers(1, 40))
        for s, cid in sorted(self.current.items()):
            before = self.progress[cid][s]
            if before.state.in_flight and limit > 0:
                limit -= 1
                ev = data.draw(st.sampled_from(FINAL + EVENTS))
                target = self.runners[cid].campaign.spec.release.version
                after = apply_report(before, ev, target_version=target, error="E_IMAGE_DIGEST")
                assert after.state.order >= before.state.order
                self.progress[cid][s] = after

    @rule(data=st.data(), seconds=st.sampled_from([60.0, 3600.0]))
    def wave(self, data: st.DataObject, seconds: float) -> None:
        """A realistic round: time passes, everyone checks in, in-flight devices report,
        the server evaluates every campaign."""
        self.clock.advance(seconds)
        self.whole_fleet_checks_in()
        self.in_flight_devices_report(data)
        for cid in sorted(self.runners):
            self.evaluate(cid)

    @rule(seconds=st.sampled_from([1.0, 30.0, 300.0, 3600.0, 6 * 3600.0]))
    def tick(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(cid=st.sampled_from(["a", "b"]))
    def evaluate(self, cid: str) -> None:
        if cid not in self.runners:
            return
        runner = self.runners[cid]
        before = runner.campaign
        counts = self._counts(cid)
        b_fail, b_fin = self.baseline[cid]
        f = before.spec.failure
        failed, finished = counts.failures - b_fail, counts.finished - b_fin
        crossed = finished >= f.min_finished and (
            (f.max_failed is not None and failed >= f.max_failed)
            or (
                f.max_failed_fraction is not None
                and failed * 1000 >= round(f.max_failed_fraction * 1000) * finished
            )
        )
        d = runner.evaluate(counts)
        event(f"evaluate: {d.action.value}")
        if before.status is CampaignStatus.RUNNING:
            assert (d.action is Action.PAUSE) == crossed, (d, counts, self.baseline[cid])
            if crossed:
                assert d.campaign.paused_auto and d.reason.startswith("failure threshold: ")
        else:
            assert d.action is Action.NONE
            assert d.campaign.status is before.status
        if d.action is Action.COMPLETE:
            assert before.last_phase and counts.in_flight == 0
        if d.action is Action.ADVANCE:
            assert d.campaign.phase == before.phase + 1

    @rule(cid=st.sampled_from(["a", "b"]))
    def pause(self, cid: str) -> None:
        if cid not in self.runners:
            return
        runner = self.runners[cid]
        if runner.campaign.status is CampaignStatus.RUNNING:
            runner.pause("operator")
            assert runner.campaign.status is CampaignStatus.PAUSED
        else:
            try:
                runner.pause("operator")
            except CampaignError as e:
                assert e.code is ErrorCode.CAMPAIGN_STATE
            else:
                raise AssertionError("pause of a non-running campaign succeeded")

    @rule(cid=st.sampled_from(["a", "b"]))
    def resume(self, cid: str) -> None:
        if cid not in self.runners:
            return
        runner = self.runners[cid]
        c = runner.campaign
        counts = self._counts(cid)
        if c.status is CampaignStatus.PAUSED:
            runner.resume(counts)
            if c.paused_auto:
                self.baseline[cid] = (counts.failures, counts.finished)
            assert runner.campaign.status is CampaignStatus.RUNNING
        else:
            try:
                runner.resume(counts)
            except CampaignError as e:
                assert e.code is ErrorCode.CAMPAIGN_STATE
            else:
                raise AssertionError("resume of a non-paused campaign succeeded")

    @rule(cid=st.sampled_from(["a", "b"]), really=st.integers(0, 7))
    def abort(self, cid: str, really: int) -> None:
        if really == 0 and cid in self.runners and self.runners[cid].campaign.status in ACTIVE:
            self.runners[cid].abort()

    @rule(cid=st.sampled_from(["a", "b"]))
    def restart(self, cid: str) -> None:
        """The server dies and reloads the campaign from its JSON column."""
        if cid not in self.runners:
            return
        c = self.runners[cid].campaign
        back = Campaign.from_dict(json.loads(json.dumps(c.to_dict())))
        assert back == c
        self.runners[cid] = CampaignRunner(back, self.clock)

    @precondition(lambda self: "b" not in self.runners)
    @rule(exclude_overlap=st.booleans())
    def create_b(self, exclude_overlap: bool) -> None:
        sel = TargetSelector(model="ctl", groups=frozenset({"eu"}))
        spec = CampaignSpec(release=REL_B, selector=sel, phases=(Phase(0.5), Phase(1.0)))
        overlap = self._expected_overlap(replace(sel, max_version="2.1.0"))
        if exclude_overlap:
            spec = replace(spec, selector=replace(sel, exclude=frozenset(overlap)))
            overlap = []
        matching = [d for d in self._views() if spec.selector.matches(d)]
        try:
            self._launch("b", spec, self._campaigns())
        except ConflictError as e:
            assert e.serials == overlap and overlap
            event("create b: conflict")
            return
        except CampaignError as e:
            assert e.code is ErrorCode.CAMPAIGN and not matching  # empty target
            return
        assert not overlap
        event("create b: started")

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def never_in_two_active_campaigns(self) -> None:
        if not hasattr(self, "runners"):
            return
        for s in self.devices:
            live = [
                cid
                for cid, rows in self.progress.items()
                if s in rows
                and not rows[s].state.finished
                and self.runners[cid].campaign.status in ACTIVE
            ]
            assert len(live) <= 1, (s, live)

    @invariant()
    def admitted_within_quota_and_cohort(self) -> None:
        if not hasattr(self, "runners"):
            return
        for cid, runner in self.runners.items():
            c = runner.campaign
            counts = self._counts(cid)
            assert counts.total == c.target_size
            assert counts.admitted <= c.quota
            for s, p in self.progress[cid].items():
                if p.state is not DeviceState.PENDING:
                    assert in_cohort(c, s)

    @invariant()
    def phases_only_move_forward(self) -> None:
        if not hasattr(self, "runners"):
            return
        for cid, runner in self.runners.items():
            assert runner.campaign.phase >= self.last_phase[cid]
            self.last_phase[cid] = runner.campaign.phase

    @invariant()
    def canary_is_stable(self) -> None:
        if not hasattr(self, "runners"):
            return
        for cid, runner in self.runners.items():
            views = [v for v in self._views() if v.serial in self.progress[cid]]
            views = [replace(v, campaign_id=cid) for v in views]
            assert admitted(replace(runner.campaign, phase=0), views) == self.canary[cid]

    @invariant()
    def counts_are_consistent(self) -> None:
        if not hasattr(self, "runners"):
            return
        for cid in self.runners:
            rows = self.progress[cid].values()
            inc = Counts(pending=len(rows))
            for p in rows:
                inc = inc.moved(DeviceState.PENDING, p.state)
            assert inc == self._counts(cid)
            assert inc.finished + inc.in_flight + inc.pending == inc.total


RolloutMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRollout = RolloutMachine.TestCase
