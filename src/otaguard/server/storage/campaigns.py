"""Campaigns in the server: persistence, the campaign side of check-in and status reports.

The rollout engine (:mod:`.rollout`) is pure; this module is its I/O edge. The database is the
source of truth: ``campaigns.state`` holds ``Campaign.to_dict()`` (one JSON column),
``campaign_devices`` one :class:`~.rollout.DeviceProgress` per member, and the per-state counts
are columns of the campaign row moved with atomic increments in the same transaction as the
member's row, so :func:`~.rollout.evaluate` is O(1) and a report acknowledged to a device is
counted exactly once, also across a crash.

Check-in stays cheap: the active (running/paused) campaigns are cached in-process as
:class:`~.rollout.CampaignRunner` objects (refreshed from the database every
``refresh_s`` and after every change this process makes). With no active campaign a check-in
costs nothing extra; with one, it costs one indexed query on the device's membership rows.
Every decision that writes re-reads the campaign row under the write lock (``FOR UPDATE`` on
PostgreSQL; SQLite's writer lock) and reloads the cached copy if another process changed it.

The engine decides *what* to offer; delivery stays the device API's assignment mechanism: an
admitted member gets an ``assignments`` row (``campaign_id`` set) for the release it may take
now — the target, or the migration step towards it (:func:`~.rollout.next_release_for`), so
a device is never offered a manifest it must refuse on minimum version.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from sqlalchemy import Connection, bindparam, func, insert, select, update

from ...clock import SYSTEM_CLOCK, Clock
from ...errors import ErrorCode, FormatError, ServerError
from ...rollout import (
    Campaign,
    CampaignRunner,
    CampaignSpec,
    CampaignStatus,
    Counts,
    Decision,
    DeviceEvent,
    DeviceProgress,
    DeviceState,
    DeviceView,
    ReleaseInfo,
    abort,
    apply_report,
    create_campaign,
    evaluate,
    in_cohort,
    is_up_to_date,
    mark_offered,
    next_release_for,
    no_path,
    pause,
    resume,
    sla_report,
    start,
    stragglers,
)
from ...rollout.model import version_key
from . import models as m
from . import store
from .notify import CAMPAIGNS, announce
from .prepared import Prepared, Record, in_consts

log = logging.getLogger("otaguard.server.campaigns")

ACTIVE = ("running", "paused")
UNFINISHED = ("pending", "offered", "downloading", "installed")
OPEN_ASSIGNMENT = ("assigned", "offered", "installing")
MAX_LIST = 1000
MAX_STRAGGLERS = 1000

# Device report states (app.py vocabulary, device agent/updater events) → engine events.
REPORT_EVENTS: dict[str, DeviceEvent] = {
    "downloading": DeviceEvent.DOWNLOADING,
    "downloaded": DeviceEvent.DOWNLOADING,
    "installing": DeviceEvent.DOWNLOADING,
    "installed": DeviceEvent.INSTALLED,
    "rebooting": DeviceEvent.INSTALLED,
    "confirmed": DeviceEvent.SUCCEEDED,
    "success": DeviceEvent.SUCCEEDED,
    "succeeded": DeviceEvent.SUCCEEDED,
    "installed_confirmed": DeviceEvent.SUCCEEDED,
    "reverted": DeviceEvent.REVERTED,
    "failed": DeviceEvent.FAILED,
    "rejected": DeviceEvent.FAILED,
    "aborted": DeviceEvent.FAILED,
}
# Failures the device retries by itself (a dropped download resumes): not final for a campaign.
TRANSIENT_ERRORS = frozenset(
    {
        ErrorCode.TRANSPORT.value,
        ErrorCode.POWER_CUT.value,
        ErrorCode.RATE_LIMIT.value,
        ErrorCode.DATABASE.value,
        ErrorCode.STATE.value,
    }
)


class Plan(Enum):
    """What the device API should do with the device's assignment on this check-in."""

    PROCEED = "proceed"  # offer the open assignment as usual (if any)
    HOLD = "hold"  # the assignment belongs to a campaign that offers nothing now


@dataclass
class _Entry:
    db_id: int
    release_id: int
    runner: CampaignRunner
    revision: int


@dataclass(frozen=True)
class Member:
    """A device's unfinished row in an active campaign (plus its assignment)."""

    campaign_db_id: int
    progress: DeviceProgress
    a_release: int | None
    a_campaign: int | None
    a_state: str | None

    @property
    def assignment_is_ours(self) -> bool:
        return self.a_campaign == self.campaign_db_id and self.a_release is not None


_cd, _c, _a = m.campaign_devices, m.campaigns, m.assignments
_MEMBER_Q = (
    select(
        _cd.c.campaign_id,
        _cd.c.state,
        _cd.c.version,
        _cd.c.step_done,
        _cd.c.steps,
        _cd.c.error,
        _a.c.release_id.label("a_release"),
        _a.c.campaign_id.label("a_campaign"),
        _a.c.state.label("a_state"),
    )
    .select_from(_cd.outerjoin(_a, _a.c.device_id == _cd.c.device_id))
    .where(_cd.c.device_id == bindparam("device_id"), in_consts(_cd.c.state, UNFINISHED))
)
_COUNT_COLS = [_c.c[f"n_{s.value}"] for s in DeviceState]
# Statements of the device request path, built once (building and cache-keying a statement
# per report cost more than executing it): values come in the parameters, the row in b_*.
_LOAD = select(_c).where(_c.c.id == bindparam("b_id"))
_LOAD_Q = Prepared(_LOAD)
_LOAD_Q_LOCKED = Prepared(_LOAD.with_for_update())
_REPORT_MEMBER_Q = Prepared(
    _MEMBER_Q.where(_cd.c.campaign_id.in_(select(_c.c.id).where(in_consts(_c.c.status, ACTIVE))))
)
_MEMBER_P = Prepared(_MEMBER_Q)
_MOVE_MEMBER = Prepared(
    update(_cd).where(
        _cd.c.campaign_id == bindparam("b_campaign_id"),
        _cd.c.device_id == bindparam("b_device_id"),
    )
)
_MOVE_COUNTS: dict[tuple[str, str], Prepared] = {}


def _move_counts(old: DeviceState, new: DeviceState) -> Prepared:
    """``n_<old> - 1, n_<new> + 1`` on one campaign row (built once per pair of states)."""
    key = (old.value, new.value)
    q = _MOVE_COUNTS.get(key)
    if q is None:
        a, b = _c.c[f"n_{old.value}"], _c.c[f"n_{new.value}"]
        q = Prepared(update(_c).where(_c.c.id == bindparam("b_id")).values({a: a - 1, b: b + 1}))
        _MOVE_COUNTS[key] = q
    return q


def _progress(row: Any) -> DeviceProgress:
    return DeviceProgress(
        DeviceState(row.state), row.version, bool(row.step_done), int(row.steps), row.error
    )


def _member(row: Any) -> Member:
    return Member(int(row.campaign_id), _progress(row), row.a_release, row.a_campaign, row.a_state)


def _runs_attempt(p: DeviceProgress, running: str, facts: dict[str, Any]) -> bool:
    """Whether a device in flight already runs its attempt's version in normal mode."""
    if not p.state.in_flight or p.step_done or p.version is None or not running:
        return False
    try:
        if version_key(running) < version_key(p.version):
            return False
        slot = json.loads(facts["slot_state"]) if "slot_state" in facts else None
    except (FormatError, ValueError):
        return False
    return not (isinstance(slot, dict) and slot.get("pending") is not None)


def counts_of(row: Any) -> Counts:
    return Counts(**{s.value: int(getattr(row, f"n_{s.value}")) for s in DeviceState})


def release_info(row: Any) -> ReleaseInfo:
    return ReleaseInfo(
        release_id=str(row.id),
        model=row.model,
        hw_rev=row.hw_rev,
        version=row.version,
        min_version=row.min_version,
        security_counter=int(row.security_counter),
    )


class CampaignService:
    """The campaign side of one server process (thread-safe)."""

    def __init__(self, db: Any, *, clock: Clock = SYSTEM_CLOCK, refresh_s: float = 5.0) -> None:
        self.db = db
        self.clock = clock
        self.refresh_s = refresh_s
        self._cache: dict[int, _Entry] = {}
        self._lock = threading.RLock()
        self._next_tick = float("-inf")
        self._releases: dict[tuple[str, str], list[tuple[ReleaseInfo, int | None]]] = {}
        self._releases_mark: int | None = None

    # --- cache -------------------------------------------------------------------------------
    @property
    def active_ids(self) -> list[int]:
        return sorted(self._cache)

    def runner(self, db_id: int) -> CampaignRunner | None:
        e = self._cache.get(db_id)
        return e.runner if e is not None else None

    def tick_due(self) -> bool:
        """Whether this caller should run :meth:`tick` now. The first caller to find it due
        claims it: requests that arrive while that tick is still on its way to a worker
        thread do not queue ticks of their own (at thousands of check-ins per second each
        due moment otherwise started one tick, one database refresh, per request in flight)."""
        now = self.clock.monotonic()
        if now < self._next_tick:
            return False
        with self._lock:
            if now < self._next_tick:
                return False
            self._next_tick = now + self.refresh_s
            return True

    def tick(self) -> None:
        """Refresh the cache from the database and evaluate every running campaign (phase
        advance after a soak time, SLA samples) — what reports alone would not trigger."""
        with self._lock:
            self._next_tick = self.clock.monotonic() + self.refresh_s
        with self.db.read() as conn:
            self._refresh(conn)
        for db_id, e in list(self._cache.items()):
            if e.runner.campaign.status is CampaignStatus.RUNNING:
                with self.db.write() as conn:
                    self._evaluate(conn, db_id)

    def _refresh(self, conn: Connection) -> None:
        rows = conn.execute(
            select(_c.c.id, _c.c.revision, _c.c.release_id).where(_c.c.status.in_(ACTIVE))
        ).all()
        mark = conn.execute(select(func.max(m.releases.c.id))).scalar()
        with self._lock:
            if mark != self._releases_mark:
                self._releases.clear()
                self._releases_mark = mark
            seen = set()
            for r in rows:
                seen.add(r.id)
                e = self._cache.get(r.id)
                if e is None or e.revision != r.revision:
                    self._load(conn, r.id)
            for gone in set(self._cache) - seen:
                del self._cache[gone]

    def _load(self, conn: Connection, db_id: int, *, lock: bool = False) -> tuple[Any, _Entry]:
        q = _LOAD_Q_LOCKED if lock and conn.dialect.name == "postgresql" else _LOAD_Q
        row = q.execute(conn, {"b_id": db_id}).first()
        if row is None:
            raise ServerError(ErrorCode.NOT_FOUND, f"no campaign {db_id}", 404)
        with self._lock:
            e = self._cache.get(db_id)
            if e is None or e.revision != row.revision:
                camp = Campaign.from_dict(json.loads(row.state))
                e = _Entry(row.id, row.release_id, CampaignRunner(camp, self.clock), row.revision)
            if row.status in ACTIVE:
                self._cache[db_id] = e
            else:
                self._cache.pop(db_id, None)
        return row, e

    def _save(self, conn: Connection, e: _Entry, campaign: Campaign) -> None:
        """Write ``campaign`` as the new state (caller holds the row lock)."""
        rev = secrets.randbits(31)
        conn.execute(
            update(_c)
            .where(_c.c.id == e.db_id)
            .values(
                state=json.dumps(campaign.to_dict(), separators=(",", ":")),
                status=campaign.status.value,
                revision=rev,
                updated_at=store.now_s(),
            )
        )
        with self._lock:
            e.runner = CampaignRunner(campaign, self.clock)
            e.revision = rev
            if campaign.status.active:
                self._cache[e.db_id] = e
            else:
                self._cache.pop(e.db_id, None)

    def wake(self) -> None:
        """Another node changed a campaign: refresh from the database at the next request."""
        with self._lock:
            self._next_tick = float("-inf")

    def forget(self, db_id: int) -> None:
        """Drop a cached campaign (after a failed transaction: reload it next time)."""
        with self._lock:
            self._cache.pop(db_id, None)
            self._next_tick = float("-inf")

    # --- releases (for update paths) ---------------------------------------------------------
    def _class_releases(
        self, conn: Connection, model: str, hw_rev: str
    ) -> list[tuple[ReleaseInfo, int | None]]:
        key = (model, hw_rev)
        got = self._releases.get(key)
        if got is None:
            rows = conn.execute(
                select(m.releases).where(m.releases.c.model == model, m.releases.c.hw_rev == hw_rev)
            ).all()
            got = [(release_info(r), r.expires) for r in rows]
            with self._lock:
                self._releases[key] = got
        return got

    def _next_release(
        self, conn: Connection, campaign: Campaign, running: str, counter: int | None
    ) -> ReleaseInfo | None:
        target = campaign.spec.release
        now = self.clock.now()
        infos = [
            r
            for r, expires in self._class_releases(conn, target.model, target.hw_rev)
            if expires is None or expires >= now or r.release_id == target.release_id
        ]
        return next_release_for(running, target, infos, security_counter=counter)

    # --- check-in ----------------------------------------------------------------------------
    def member(self, conn: Connection, device_id: int) -> Member | None:
        """The device's unfinished row in an active campaign (at most one by construction)."""
        rows = _MEMBER_P.execute(conn, {"device_id": device_id}).all()
        for r in rows:
            if r.campaign_id in self._cache:
                return _member(r)
        return None

    def checkin(
        self, conn: Connection, dev: Record, facts: dict[str, Any], *, dry: bool
    ) -> Plan | None:
        """The campaign side of one check-in. ``dry`` (read-only transaction): returns None as
        soon as something must be written; the caller repeats in a write transaction."""
        if not self._cache:
            return Plan.PROCEED
        mem = self.member(conn, dev.id)
        if mem is None:
            return Plan.PROCEED
        e = self._cache.get(mem.campaign_db_id)
        if e is None:
            return Plan.PROCEED
        hold = Plan.HOLD if mem.assignment_is_ours else Plan.PROCEED
        if not dry:
            _row, e = self._load(conn, mem.campaign_db_id, lock=True)
        campaign = e.runner.campaign
        running = str(facts.get("current_version") or dev.current_version or "")
        counter = facts.get("security_counter", dev.security_counter)
        view = DeviceView(
            serial=dev.serial,
            model=dev.model,
            hw_rev=dev.hw_rev,
            running_version=running or None,
            campaign_id=campaign.id,
            campaign_state=mem.progress.state,
        )
        p = mem.progress
        if _runs_attempt(p, running, facts):
            # The device already runs the version it was offered, confirmed (no pending
            # slot): its "confirmed" report was lost (e.g. the server died before it came).
            done = apply_report(
                p, DeviceEvent.SUCCEEDED, target_version=campaign.spec.release.version
            )
            if done != p:
                if dry:
                    return None
                self._move(conn, e.db_id, dev.id, p, done)
                self._evaluate(conn, e.db_id)
                if done.state.finished:
                    return hold
                p = done
                view = replace(view, campaign_state=done.state)
        if not running or not e.runner.should_offer(view):
            return hold
        want = self._next_release(conn, campaign, running, counter)
        if want is None:
            # Nothing to offer: already on the target (its confirmation may be on the way),
            # or no chain of releases gets there (recorded as a failure, E_NO_PATH).
            if is_up_to_date(running, campaign.spec.release):
                new = apply_report(
                    mark_offered(p, campaign.spec.release.version),
                    DeviceEvent.SUCCEEDED,
                    target_version=campaign.spec.release.version,
                )
            else:
                new = no_path(p)
            if dry:
                return None
            self._move(conn, e.db_id, dev.id, p, new)
            self._evaluate(conn, e.db_id)
            return hold
        want_id = int(want.release_id)
        new = mark_offered(p, want.version)
        need_assign = (
            mem.a_release != want_id
            or mem.a_campaign != e.db_id
            or mem.a_state not in OPEN_ASSIGNMENT
        )
        if new == p and not need_assign:
            return Plan.PROCEED
        if dry:
            return None
        if p.state is DeviceState.PENDING:
            if not e.runner.offer(view):  # spends a token in a rate-limited phase
                return hold
            if e.runner.dirty:
                self._save(conn, e, e.runner.campaign)
        self._move(conn, e.db_id, dev.id, p, new)
        if need_assign:
            store.assign(conn, dev.id, want_id, e.db_id)
        return Plan.PROCEED

    def _move(
        self, conn: Connection, db_id: int, device_id: int, old: DeviceProgress, new: DeviceProgress
    ) -> None:
        if new == old:
            return
        _MOVE_MEMBER.execute(
            conn,
            {
                "state": new.state.value,
                "version": new.version,
                "step_done": new.step_done,
                "steps": new.steps,
                "error": new.error,
                "updated_at": store.now_s(),
                "b_campaign_id": db_id,
                "b_device_id": device_id,
            },
        )
        if new.state is not old.state:
            _move_counts(old.state, new.state).execute(conn, {"b_id": db_id})

    # --- reports -----------------------------------------------------------------------------
    def report_member(self, conn: Connection, device_id: int) -> Member | None:
        """The membership a report is about (queried, not cached: a report must count even if
        this process has not seen the campaign yet)."""
        rows = _REPORT_MEMBER_Q.execute(conn, {"device_id": device_id}).all()
        return _member(rows[0]) if rows else None

    def on_report(
        self,
        conn: Connection,
        device_id: int,
        mem: Member,
        report: dict[str, Any],
        release: Record | None,
    ) -> None:
        """Feed one fresh (first-delivery) report into the member's progress, then evaluate."""
        event = REPORT_EVENTS.get(str(report.get("state")))
        if event is None:
            return
        err = report.get("error_code")
        if event.state.failure and err in TRANSIENT_ERRORS:
            return  # the device resumes by itself; the attempt is still in flight
        version = report.get("version")
        if "release_id" in report and release is not None:
            # about the device's current assignment: count it only if it is ours
            if not (mem.assignment_is_ours and mem.a_release == release.id):
                return
            version = release.version
        elif report.get("manifest_digest") is not None and version is None:
            return  # about a manifest that is not the current offer, and no version: stale
        _row, e = self._load(conn, mem.campaign_db_id, lock=True)
        target = e.runner.campaign.spec.release.version
        try:
            new = apply_report(
                mem.progress, event, target_version=target, version=version, error=err
            )
        except FormatError:
            return
        if new is mem.progress:
            return
        self._move(conn, mem.campaign_db_id, device_id, mem.progress, new)
        if new.state.finished or new.step_done:
            self._evaluate(conn, mem.campaign_db_id)

    # --- evaluation --------------------------------------------------------------------------
    def _evaluate(self, conn: Connection, db_id: int) -> Decision:
        row, e = self._load(conn, db_id, lock=True)
        d = evaluate(e.runner.campaign, counts_of(row), self.clock.now())
        if d.changed:
            self._save(conn, e, d.campaign)
            if d.action.value != "none":
                log.warning("campaign %s: %s %s", d.campaign.id, d.action.value, d.reason)
                announce(conn, CAMPAIGNS)  # other nodes refresh their cache now
        return d

    # --- admin operations --------------------------------------------------------------------
    def _row_by_name(self, conn: Connection, name: str, *, lock: bool = False) -> Any:
        q = select(_c).where(_c.c.name == name)
        if lock and conn.dialect.name == "postgresql":
            q = q.with_for_update()
        row = conn.execute(q).first()
        if row is None:
            raise ServerError(ErrorCode.NOT_FOUND, f"no campaign {name}", 404)
        return row

    def _active_campaigns(self, conn: Connection, exclude: int | None = None) -> list[Campaign]:
        rows = conn.execute(select(_c.c.id, _c.c.state).where(_c.c.status.in_(ACTIVE))).all()
        return [Campaign.from_dict(json.loads(r.state)) for r in rows if r.id != exclude]

    def _target_views(
        self, conn: Connection, spec: CampaignSpec, exclude: int | None = None
    ) -> tuple[list[DeviceView], dict[str, int]]:
        """Views of the non-revoked devices of the spec's model (and hw_rev), with their
        unfinished membership in other active campaigns, and serial → device id."""
        d = m.devices
        sel = spec.selector
        cond = [d.c.model == sel.model, d.c.revoked.is_(False)]
        if sel.hw_rev is not None:
            cond.append(d.c.hw_rev == sel.hw_rev)
        rows = conn.execute(
            select(
                d.c.id, d.c.serial, d.c.model, d.c.hw_rev, d.c.current_version, d.c.last_seen
            ).where(*cond)
        ).all()
        groups: dict[int, set[str]] = {}
        g = m.device_groups
        for gr in conn.execute(
            select(g.c.device_id, g.c.name).where(g.c.device_id.in_(select(d.c.id).where(*cond)))
        ):
            groups.setdefault(gr.device_id, set()).add(gr.name)
        busy: dict[int, tuple[str, str]] = {}
        q = (
            select(_cd.c.device_id, _c.c.name, _cd.c.state)
            .select_from(_cd.join(_c, _c.c.id == _cd.c.campaign_id))
            .where(_c.c.status.in_(ACTIVE), _cd.c.state.in_(UNFINISHED))
        )
        if exclude is not None:
            q = q.where(_c.c.id != exclude)
        for b in conn.execute(q):
            busy[b.device_id] = (b.name, b.state)
        views = []
        ids = {}
        for r in rows:
            cid, cst = busy.get(r.id, (None, None))
            views.append(
                DeviceView(
                    serial=r.serial,
                    model=r.model,
                    hw_rev=r.hw_rev,
                    groups=frozenset(groups.get(r.id, ())),
                    running_version=r.current_version,
                    last_seen=r.last_seen,
                    campaign_id=cid,
                    campaign_state=DeviceState(cst) if cst else None,
                )
            )
            ids[r.serial] = r.id
        return views, ids

    def create(self, body: dict[str, Any], who: str | None) -> dict[str, Any]:
        """Create a DRAFT campaign from ``{"id", "release_id", ...CampaignSpec fields but
        "release"}``; the release facts come from the server's own releases table."""
        name = body.get("id")
        release_id = body.get("release_id")
        if (
            not isinstance(name, str)
            or not isinstance(release_id, int)
            or isinstance(release_id, bool)
        ):
            raise ServerError(ErrorCode.MALFORMED, "need id (str) and release_id (int)", 400)
        if "release" in body:
            raise ServerError(
                ErrorCode.MALFORMED, "give release_id; the server fills in the release", 400
            )
        spec_body = {k: v for k, v in body.items() if k not in ("id", "release_id")}
        with self.db.write() as conn:
            rel = store.release_by_id(conn, release_id)
            if rel is None:
                raise ServerError(ErrorCode.NOT_FOUND, f"no release {release_id}", 404)
            spec = CampaignSpec.from_dict({**spec_body, "release": release_info(rel).to_dict()})
            if conn.execute(select(_c.c.id).where(_c.c.name == name)).first() is not None:
                raise ServerError(ErrorCode.EXISTS, f"campaign {name} exists", 409)
            views, _ids = self._target_views(conn, spec)
            camp = create_campaign(
                name,
                spec,
                now=self.clock.now(),
                existing=self._active_campaigns(conn),
                devices=views,
            )
            t = store.now_s()
            conn.execute(
                insert(_c).values(
                    name=name,
                    release_id=release_id,
                    status=camp.status.value,
                    state=json.dumps(camp.to_dict(), separators=(",", ":")),
                    revision=secrets.randbits(31),
                    created_by=who,
                    created_at=t,
                    updated_at=t,
                    **{f"n_{s.value}": 0 for s in DeviceState},
                )
            )
        return self.describe(camp, Counts(), None)

    def transition(self, name: str, action: str, reason: str | None = None) -> dict[str, Any]:
        """start / pause / resume / abort (E_CAMPAIGN_STATE for an illegal transition)."""
        with self.db.write() as conn:
            row = self._row_by_name(conn, name, lock=True)
            camp = Campaign.from_dict(json.loads(row.state))
            now = self.clock.now()
            counts = counts_of(row)
            e = _Entry(row.id, row.release_id, CampaignRunner(camp, self.clock), row.revision)
            if action == "start":
                views, ids = self._target_views(conn, camp.spec, exclude=row.id)
                started = start(camp, views, now=now, existing=self._active_campaigns(conn, row.id))
                new = started.campaign
                t = store.now_s()
                conn.execute(
                    insert(_cd),
                    [
                        {
                            "campaign_id": row.id,
                            "device_id": ids[s],
                            "state": DeviceState.PENDING.value,
                            "step_done": False,
                            "steps": 0,
                            "updated_at": t,
                        }
                        for s in started.members
                    ],
                )
                conn.execute(
                    update(_c).where(_c.c.id == row.id).values(n_pending=len(started.members))
                )
                counts = Counts(pending=len(started.members))
            elif action == "pause":
                new = pause(camp, now=now, reason=reason or "paused by operator")
            elif action == "resume":
                new = resume(camp, counts, now=now)
            elif action == "abort":
                new = abort(camp, now=now, reason=reason or "aborted by operator")
                # Nothing of an aborted campaign is offered again.
                conn.execute(
                    update(_a)
                    .where(_a.c.campaign_id == row.id, _a.c.state.in_(OPEN_ASSIGNMENT))
                    .values(state="cancelled", updated_at=store.now_s())
                )
            else:
                raise ServerError(ErrorCode.USAGE, f"unknown action {action}", 400)
            self._save(conn, e, new)
            announce(conn, CAMPAIGNS)  # other nodes refresh their cache (server/trustsync.py)
        return self.describe(new, counts, None)

    def status(self, name: str, *, stale_after: float) -> dict[str, Any]:
        """Evaluate now (persisting any change), then the campaign with counts, SLA, stragglers."""
        with self.db.write() as conn:
            row = self._row_by_name(conn, name)
            if row.status == "running":
                self._evaluate(conn, row.id)
                row = self._row_by_name(conn, name)
        camp = Campaign.from_dict(json.loads(row.state))
        counts = counts_of(row)
        with self.db.read() as conn:
            lagging = self._stragglers(conn, row.id, camp, stale_after)
        return self.describe(camp, counts, lagging, history=50)

    def _stragglers(
        self, conn: Connection, db_id: int, camp: Campaign, stale_after: float
    ) -> list[str]:
        if not camp.thresholds:
            return []
        d = m.devices
        rows = conn.execute(
            select(d.c.serial, d.c.model, d.c.hw_rev, d.c.last_seen, _cd.c.state)
            .select_from(_cd.join(d, d.c.id == _cd.c.device_id))
            .where(_cd.c.campaign_id == db_id, _cd.c.state.in_(UNFINISHED))
        ).all()
        views = (
            DeviceView(
                serial=r.serial,
                model=r.model,
                hw_rev=r.hw_rev,
                last_seen=r.last_seen,
                campaign_id=camp.id,
                campaign_state=DeviceState(r.state),
            )
            for r in rows
            if in_cohort(camp, r.serial)
        )
        return stragglers(camp, views, self.clock.now(), stale_after)[:MAX_STRAGGLERS]

    def describe(
        self,
        camp: Campaign,
        counts: Counts,
        lagging: list[str] | None,
        *,
        history: int = 10,
    ) -> dict[str, Any]:
        now = self.clock.now()
        out: dict[str, Any] = {
            "id": camp.id,
            "name": camp.spec.name,
            "status": camp.status.value,
            "release": camp.spec.release.to_dict(),
            "selector": camp.spec.selector.to_dict(),
            "phase": camp.phase + 1,
            "phases": [p.to_dict() for p in camp.spec.phases],
            "quota": camp.quota,
            "target_size": camp.target_size,
            "counts": counts.to_dict(),
            "pause_reason": camp.pause_reason,
            "paused_auto": camp.paused_auto,
            "created_at": camp.created_at,
            "started_at": camp.started_at,
            "ended_at": camp.ended_at,
            "sla": sla_report(camp, counts, now).to_dict(),
            "history": [h.to_dict() for h in camp.history[-history:]],
        }
        if lagging is not None:
            out["stragglers"] = lagging
        return out

    def list_campaigns(self, status: str | None = None) -> list[dict[str, Any]]:
        q = select(_c).order_by(_c.c.id.desc()).limit(MAX_LIST)
        if status is not None:
            q = q.where(_c.c.status == status)
        with self.db.read() as conn:
            rows = conn.execute(q).all()
        out = []
        for r in rows:
            camp = Campaign.from_dict(json.loads(r.state))
            out.append(
                {
                    "id": camp.id,
                    "name": camp.spec.name,
                    "status": camp.status.value,
                    "release": camp.spec.release.to_dict(),
                    "phase": camp.phase + 1,
                    "phases": len(camp.spec.phases),
                    "target_size": camp.target_size,
                    "counts": counts_of(r).to_dict(),
                    "pause_reason": camp.pause_reason,
                    "created_at": camp.created_at,
                }
            )
        return out

    def device_progress(self, conn: Connection, device_id: int) -> list[dict[str, Any]]:
        rows = conn.execute(
            select(_c.c.name, _cd.c.state, _cd.c.version, _cd.c.steps, _cd.c.error)
            .select_from(_cd.join(_c, _c.c.id == _cd.c.campaign_id))
            .where(_cd.c.device_id == device_id)
            .order_by(_c.c.id)
        ).all()
        return [
            {
                "campaign": r.name,
                "state": r.state,
                "version": r.version,
                "steps": r.steps,
                "error": r.error,
            }
            for r in rows
        ]
