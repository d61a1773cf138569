"""Prometheus metrics of one server process (``GET /metrics`` on the admin listener).

One :class:`~prometheus_client.CollectorRegistry` per :class:`~.app.UpdateServer`, never the
library's global one: tests (and the simulator) run many servers in one process, and each must
count only its own traffic. Counters are moved by the request path; campaign and rotation
progress are read from the database at scrape time (:class:`_FleetCollector`), so they are
right whichever server process moved them. Every label has a bounded set of values: route
templates (never raw paths), error codes from :class:`~otaguard.errors.ErrorCode`, report states
the server knows, campaign names (created by operators, only the active ones are exported).

The endpoint needs a bearer token of any role (``viewer`` is enough): the numbers describe the
fleet and its attackers, and Prometheus sends a token natively (``authorization:
credentials_file``). One token lookup per scrape is cheap.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ErrorCode, OtaError
from .storage import models as m
from .storage.admin_queries import rotation_targets
from .storage.db import Database
from .workers import PeerMetrics

if TYPE_CHECKING:
    pass

log = logging.getLogger("otaguard.server")

_CODES = frozenset(c.value for c in ErrorCode)
_ERROR_BODY = re.compile(rb'"error"\s*:\s*"(E_[A-Z0-9_]{1,30})"')
INSTALL_OUTCOMES = frozenset(
    {"confirmed", "success", "installed_confirmed", "failed", "rejected", "reverted", "aborted"}
)
_ACTIVE = ("draft", "running", "paused")


class ServerMetrics:
    def __init__(self, db: Database) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.checkins = Counter("otaguard_checkins", "Device check-ins answered (200).", registry=r)
        self.reports = Counter(
            "otaguard_reports",
            "Status reports stored (first delivery only), by install outcome: final states "
            "only (success/failure kinds), 'progress' for the others.",
            ["outcome"],
            registry=r,
        )
        self.refusals = Counter(
            "otaguard_refusals",
            "Requests answered with an error, by listener and error code.",
            ["listener", "code"],
            registry=r,
        )
        self.probes = Counter(
            "otaguard_probe_events",
            "Probe events recorded in the database (rate limit, refused certificate, "
            "forged forwarded certificate, fetch not offered), by kind.",
            ["kind"],
            registry=r,
        )
        self.auth_failures = Counter(
            "otaguard_auth_failures",
            "Failed authentications, by listener and reason (the source address is logged).",
            ["listener", "reason"],
            registry=r,
        )
        self.deadlines = Counter(
            "otaguard_listener_deadlines",
            "Connections closed because a header or body deadline passed.",
            ["listener", "phase"],
            registry=r,
        )
        self.latency = Histogram(
            "otaguard_request_duration_seconds",
            "Time from request start to the end of the response, by route template.",
            ["listener", "method", "route"],
            registry=r,
        )
        # This process's own counters (what a device worker sends to the first process).
        self.own = [
            self.checkins,
            self.reports,
            self.refusals,
            self.probes,
            self.auth_failures,
            self.deadlines,
            self.latency,
        ]
        # Set in the first process of a node with several workers (server/workers.py).
        self.peers: PeerMetrics | None = None
        r.register(_FleetCollector(db))

    def on_report(self, state: str) -> None:
        self.reports.labels(state if state in INSTALL_OUTCOMES else "progress").inc()

    def probe(self, kind: str) -> None:
        self.probes.labels(kind if kind in _PROBE_KINDS or kind in _CODES else "other").inc()

    def render(self) -> bytes:
        if self.peers is None:
            return generate_latest(self.registry)
        peers = self.peers
        return generate_latest(_Families(lambda: peers.merged(self.registry.collect())))


_PROBE_KINDS = frozenset({"rate_limit", "forged_header", "not_offered"})


class _Families:
    """What ``generate_latest`` renders: anything with ``collect()``."""

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families()


class _FleetCollector(Collector):
    """Campaign and rotation progress, read from the database at scrape time."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def describe(self) -> list[Metric]:
        return []  # families depend on the database; no up-front description

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "otaguard_metrics_database_up", "1 if the scrape-time database reads succeeded."
        )
        try:
            with self.db.read() as conn:
                families = list(_campaign_families(conn)) + list(_keylist_families(conn))
        except OtaError as err:
            log.warning("metrics: database read failed: %s", err.detail)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families


def _campaign_families(conn: Any) -> Iterator[Metric]:
    c = m.campaigns
    members = GaugeMetricFamily(
        "otaguard_campaign_members",
        "Members of each draft, running or paused campaign, by member state.",
        labels=["campaign", "status", "state"],
    )
    statuses = GaugeMetricFamily("otaguard_campaigns", "Campaigns by status.", labels=["status"])
    for status, n in conn.execute(select(c.c.status, func.count()).group_by(c.c.status)):
        statuses.add_metric([status], n)
    cols = [c.c[f"n_{s}"] for s in m.CAMPAIGN_STATES]
    q = select(c.c.name, c.c.status, *cols).where(c.c.status.in_(_ACTIVE)).order_by(c.c.id)
    for row in conn.execute(q):
        for state, n in zip(m.CAMPAIGN_STATES, row[2:], strict=True):
            members.add_metric([row.name, row.status, state], n or 0)
    yield statuses
    yield members


def _keylist_families(conn: Any) -> Iterator[Metric]:
    d = m.devices
    by_version = GaugeMetricFamily(
        "otaguard_devices_by_keylist_version",
        "Enrolled, unrevoked devices by the key-list version they last reported ('none': "
        "never reported one).",
        labels=["version"],
    )
    q = (
        select(d.c.keylist_version, func.count())
        .where(d.c.revoked.is_(False))
        .group_by(d.c.keylist_version)
    )
    for version, n in conn.execute(q):
        by_version.add_metric(["none" if version is None else str(version)], n)
    yield by_version
    r = m.rotations
    rot = conn.execute(
        select(r).where(r.c.state.in_(("started", "advanced"))).order_by(r.c.id.desc()).limit(1)
    ).first()
    if rot is None:
        return
    target = rot.final_version or rot.start_version
    q2 = select(
        func.count(),
        func.coalesce(func.sum(case((d.c.keylist_version >= rot.start_version, 1), else_=0)), 0),
        func.coalesce(func.sum(case((d.c.keylist_version >= target, 1), else_=0)), 0),
    )
    q2 = rotation_targets(q2, rot)
    total, on_new, on_target = conn.execute(q2).one()
    labels = ["rotation", "state"]
    key = [str(rot.id), rot.state]
    for name, help_, value in (
        ("otaguard_rotation_targeted_devices", "Devices the current key rotation targets.", total),
        (
            "otaguard_rotation_on_new_list_fraction",
            "Fraction of the targeted devices on the rotation's first key list or newer.",
            on_new / total if total else 1.0,
        ),
        (
            "otaguard_rotation_on_target_list_fraction",
            "Fraction of the targeted devices on the list the rotation waits for now (the "
            "final list once it advanced).",
            on_target / total if total else 1.0,
        ),
        (
            "otaguard_rotation_threshold_fraction",
            "The fraction the rotation needs before it may advance.",
            rot.threshold / 1000,
        ),
    ):
        fam = GaugeMetricFamily(name, help_, labels=labels)
        fam.add_metric(key, float(value))
        yield fam


# --- ASGI side -----------------------------------------------------------------------------------
class MetricsMiddleware:
    """Latency by route template, refusals by error code, for one listener's app.

    Outermost, so the per-IP limiter's 429s are counted too. The route template is what
    Starlette's router put into the scope (``scope["route"]``); a request no route matched is
    ``<unmatched>``. An error's code is read from the JSON body every error response carries.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, listener: str) -> None:
        self.app = app
        self.metrics = metrics
        self.listener = listener

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0
        code: str | None = None

        async def wrapped(message: Message) -> None:
            nonlocal status, code
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 and code is None:
                found = _ERROR_BODY.search(message.get("body", b"")[:1024])
                code = found.group(1).decode() if found else "other"
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "<unmatched>"
            self.metrics.latency.labels(self.listener, scope.get("method", "?"), path).observe(
                time.perf_counter() - start
            )
            if status >= 400:
                label = code if code in _CODES else "other"
                self.metrics.refusals.labels(self.listener, label).inc()


def parse_samples(text: str) -> dict[str, float]:
    """``{"name{label=\"v\",...}": value}`` of an exposition (tests and the docs' examples)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
