"""Phased campaigns end to end: real mTLS server, real simulated devices (Device + Updater over
HttpsTransport), on SQLite and PostgreSQL. Plus the admin API's refusals and its OpenAPI."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Mount

from otaguard.clock import SimClock
from otaguard.device.lab import Lab
from otaguard.server.context import TrustState
from otaguard.server.pki.ca import FleetCA
from otaguard.server.storage import models as m
from otaguard.trust.model import StaticKeys
from tests.campaign_fleet import Fleet, release, token
from tests.pg import Harness, db_url, fleet_ca, harness, pg_cluster, server_tls  # noqa: F401

T0 = 1_900_000_000.0


@pytest.fixture
def lab() -> Lab:
    return Lab()


@pytest.fixture
def hc(
    db_url: str, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path, lab: Lab
) -> Iterator[tuple[Harness, Fleet, SimClock]]:
    trust = TrustState(StaticKeys([lab.op.public_key]))
    with harness(db_url, fleet_ca, server_tls, tmp_path, trust=trust) as h:
        clock = SimClock(T0)
        h.srv.campaigns.clock = clock
        fleet = Fleet(
            lab, h.db, lambda s: h.enroll(s, model=lab.model, hw_rev=lab.hw_rev), h.url, tmp_path
        )
        try:
            yield h, fleet, clock
        finally:
            fleet.close()


def client(h: Harness, role: str) -> httpx.Client:
    return h.client(None, headers={"Authorization": f"Bearer {token(h.db, role)}"})


def status(op: httpx.Client, name: str) -> dict[str, Any]:
    r = op.get(f"/admin/v1/campaigns/{name}")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def counts_consistent(h: Harness) -> None:
    """The per-state count columns always equal the progress rows (GROUP BY)."""
    from sqlalchemy import func, select

    cd = m.campaign_devices
    with h.db.read() as conn:
        for c in conn.execute(m.campaigns.select()).all():
            rows = conn.execute(
                select(cd.c.state, func.count())
                .where(cd.c.campaign_id == c.id)
                .group_by(cd.c.state)
            ).all()
            actual = {state: int(n) for state, n in rows}
            stored = {s: getattr(c, f"n_{s}") for s in m.CAMPAIGN_STATES}
            assert stored == {s: actual.get(s, 0) for s in m.CAMPAIGN_STATES}, c.name


def test_phased_campaign_end_to_end(hc: tuple[Harness, Fleet, SimClock]) -> None:
    h, fleet, clock = hc
    for i in range(8):
        fleet.add(f"SN-{i:02d}")
    assert {r.outcome for r in fleet.poll_all().values()} == {"idle"}  # registered versions
    rm, op = client(h, "release-manager"), client(h, "operator")
    rid = release(rm, fleet.lab, "1.1.0", 2)
    spec = {
        "id": "spring-1",
        "release_id": rid,
        "selector": {"model": fleet.lab.model},
        "phases": [{"fraction": 0.25}, {"fraction": 1.0}],
        "success_threshold": 1.0,
        "min_soak_s": 3600,
        "failure": {"max_failed": 2, "min_finished": 1},
        "deadline": T0 + 86400,
    }
    r = op.post("/admin/v1/campaigns", json=spec)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "draft"
    r = op.post("/admin/v1/campaigns/spring-1/start")
    assert r.status_code == 200, r.text
    assert r.json()["target_size"] == 8 and r.json()["quota"] == 2

    # Phase 1 (25%): exactly the two canaries update, the others are told "nothing".
    results = fleet.poll_all()
    updated = sorted(s for s, r in results.items() if r.outcome == "confirmed")
    assert len(updated) == 2, results
    assert all(results[s].outcome == "idle" for s in results if s not in updated)
    st = status(op, "spring-1")
    assert st["phase"] == 1 and st["status"] == "running"
    assert st["counts"]["succeeded"] == 2 and st["counts"]["pending"] == 6
    assert st["sla"]["status"] in ("on_track", "at_risk")
    # Soak time not over: still phase 1, nobody else admitted.
    assert all(r.outcome == "idle" for r in fleet.poll_all().values())
    clock.advance(3601)
    st = status(op, "spring-1")  # evaluation advances the phase
    assert st["phase"] == 2 and st["quota"] == 8
    results = fleet.poll_all()
    assert sorted(s for s, r in results.items() if r.outcome == "confirmed") == sorted(
        set(fleet.devices) - set(updated)
    )
    assert set(fleet.versions().values()) == {"1.1.0"}
    st = status(op, "spring-1")
    assert st["status"] == "completed", st
    assert st["counts"]["succeeded"] == 8 and st["sla"]["status"] == "met"
    assert [e["event"] for e in st["history"]] == [
        "created",
        "started",
        "advanced",
        "completed",
    ]
    # Every device: installed + confirmed reported once each, progress rows final.
    with h.db.read() as conn:
        states = conn.execute(m.campaign_devices.select()).all()
        assert sorted(r.state for r in states) == ["succeeded"] * 8
    assert len(fleet.acked) == 16
    # Idle fleet afterwards: nothing offered any more.
    assert {r.outcome for r in fleet.poll_all().values()} == {"idle"}
    counts_consistent(h)
    listing = op.get("/admin/v1/campaigns").json()["campaigns"]
    assert [c["id"] for c in listing] == ["spring-1"] and listing[0]["status"] == "completed"
    r = op.get(f"/admin/v1/devices/{updated[0]}/campaigns")
    assert r.json()["campaigns"][0]["state"] == "succeeded"


def test_failing_self_test_pauses_campaign(hc: tuple[Harness, Fleet, SimClock]) -> None:
    h, fleet, _clock = hc
    for i in range(10):
        fleet.add(f"SN-F{i}", healthy=False)
    fleet.poll_all()
    rm, op = client(h, "release-manager"), client(h, "operator")
    rid = release(rm, fleet.lab, "1.1.0", 2)
    spec = {
        "id": "bad-1",
        "release_id": rid,
        "selector": {"model": fleet.lab.model},
        "phases": [{"fraction": 0.6}, {"fraction": 1.0}],
        "failure": {"max_failed": 2, "min_finished": 2},
    }
    assert op.post("/admin/v1/campaigns", json=spec).status_code == 201
    assert op.post("/admin/v1/campaigns/bad-1/start").status_code == 200
    results = fleet.poll_all()
    reverted = sorted(s for s, r in results.items() if r.outcome == "reverted")
    assert len(reverted) == 2, results  # 6 admissible, paused after the 2nd failure
    assert set(fleet.versions().values()) == {"1.0.0"}  # every device back on the old image
    st = status(op, "bad-1")
    assert st["status"] == "paused" and st["paused_auto"] is True
    assert st["pause_reason"].startswith("failure threshold: 2/2 failed")
    assert st["counts"]["reverted"] == 2 and st["counts"]["pending"] == 8
    # No further device is admitted while paused.
    assert {r.outcome for r in fleet.poll_all().values()} == {"idle"}
    assert status(op, "bad-1")["counts"]["pending"] == 8
    with h.db.read() as conn:
        n = conn.execute(m.assignments.select()).all()
        assert sorted(a.state for a in n) == ["failed", "failed"]
    # Resume acknowledges those failures; the next failures pause it again.
    r = op.post("/admin/v1/campaigns/bad-1/resume")
    assert r.status_code == 200 and r.json()["status"] == "running"
    results = fleet.poll_all()
    assert sum(r.outcome == "reverted" for r in results.values()) == 2
    st = status(op, "bad-1")
    assert st["status"] == "paused" and st["counts"]["reverted"] == 4
    counts_consistent(h)
    r = op.post("/admin/v1/campaigns/bad-1/abort", json={"reason": "bad build"})
    assert r.status_code == 200 and r.json()["status"] == "aborted"
    assert {r.outcome for r in fleet.poll_all().values()} == {"idle"}


def test_update_path_offers_intermediate_first(hc: tuple[Harness, Fleet, SimClock]) -> None:
    h, fleet, _clock = hc
    for i in range(3):
        fleet.add(f"SN-P{i}")
    fleet.poll_all()
    rm, op = client(h, "release-manager"), client(h, "operator")
    release(rm, fleet.lab, "1.1.0", 2)  # the migration step
    target = release(rm, fleet.lab, "2.0.0", 3, min_version="1.1.0")
    spec = {
        "id": "major-2",
        "release_id": target,
        "selector": {"model": fleet.lab.model},
        "phases": [{"fraction": 1.0}],
    }
    assert op.post("/admin/v1/campaigns", json=spec).status_code == 201
    assert op.post("/admin/v1/campaigns/major-2/start").status_code == 200
    first = fleet.poll_all()
    assert {(r.offered, r.outcome) for r in first.values()} == {("1.1.0", "confirmed")}
    st = status(op, "major-2")
    assert st["status"] == "running" and st["counts"]["offered"] == 3  # step done, next due
    second = fleet.poll_all()
    assert {(r.offered, r.outcome) for r in second.values()} == {("2.0.0", "confirmed")}
    assert set(fleet.versions().values()) == {"2.0.0"}
    st = status(op, "major-2")
    assert st["status"] == "completed" and st["counts"]["succeeded"] == 3
    counts_consistent(h)
    r = op.get("/admin/v1/devices/SN-P0/campaigns").json()["campaigns"][0]
    assert r == {
        "campaign": "major-2",
        "state": "succeeded",
        "version": "2.0.0",
        "steps": 1,
        "error": None,
    }


def _nothing_recorded(h: Harness, campaigns: int) -> None:
    with h.db.read() as conn:
        assert len(conn.execute(m.campaigns.select()).all()) == campaigns


def test_bad_input_refused_and_nothing_recorded(hc: tuple[Harness, Fleet, SimClock]) -> None:
    h, fleet, _clock = hc
    for i in range(4):
        fleet.add(f"SN-B{i}")
    fleet.poll_all()
    rm, op, viewer = client(h, "release-manager"), client(h, "operator"), client(h, "viewer")
    rid = release(rm, fleet.lab, "1.1.0", 2)
    base = {"release_id": rid, "selector": {"model": fleet.lab.model}}

    def create(body: dict[str, Any], who: httpx.Client = op) -> tuple[int, str]:
        r = who.post("/admin/v1/campaigns", json=body)
        return r.status_code, r.json().get("error", "")

    # A release the target model / hardware revision cannot take.
    assert create({**base, "id": "x1", "selector": {"model": "other"}}) == (422, "E_INCOMPATIBLE")
    sel = {"model": fleet.lab.model, "hw_rev": "rev-z"}
    assert create({**base, "id": "x2", "selector": sel}) == (422, "E_INCOMPATIBLE")
    sel = {"model": fleet.lab.model, "min_version": "1.1.0"}  # only devices already on it
    assert create({**base, "id": "x3", "selector": sel}) == (422, "E_INCOMPATIBLE")
    # Malformed specs.
    assert create({**base, "id": "x4", "phases": "fast"}) == (400, "E_MALFORMED")
    assert create({**base, "id": "x5", "surprise": 1}) == (400, "E_MALFORMED")
    assert create({"id": "x6", "selector": base["selector"]}) == (400, "E_MALFORMED")
    assert create({**base, "id": "bad id!"}) == (400, "E_MALFORMED")
    r = op.post("/admin/v1/campaigns", content=b"{not json")
    assert (r.status_code, r.json()["error"]) == (400, "E_MALFORMED")
    assert create({**base, "id": "x7", "phases": [{"fraction": 0.5}, {"fraction": 0.2}]}) == (
        422,
        "E_CAMPAIGN",
    )
    assert create({**base, "id": "x8", "release_id": 9999}) == (404, "E_NOT_FOUND")
    # Wrong roles / no token.
    assert create({**base, "id": "x9"}, viewer) == (403, "E_FORBIDDEN")
    assert create({**base, "id": "x9"}, rm) == (403, "E_FORBIDDEN")
    anon = h.client(None)
    assert anon.post("/admin/v1/campaigns", json={**base, "id": "x9"}).status_code == 401
    _nothing_recorded(h, 0)
    # A valid one; a second with the same id; an overlapping one once the first runs.
    assert create({**base, "id": "c1"})[0] == 201
    assert create({**base, "id": "c1"}) == (409, "E_EXISTS")
    assert viewer.post("/admin/v1/campaigns/c1/start").status_code == 403
    assert op.post("/admin/v1/campaigns/c1/start").status_code == 200
    r = op.post("/admin/v1/campaigns", json={**base, "id": "c2"})
    assert (r.status_code, r.json()["error"]) == (409, "E_CONFLICT")
    assert r.json()["overlap"] == "4"
    _nothing_recorded(h, 1)
    # Excluding the busy devices resolves the conflict (then nothing matches at start).
    excl = {"model": fleet.lab.model, "exclude": sorted(fleet.devices)}
    assert create({**base, "id": "c2", "selector": excl})[0] == 201
    r = op.post("/admin/v1/campaigns/c2/start")
    assert (r.status_code, r.json()["error"]) == (422, "E_CAMPAIGN")
    # Illegal transitions: nothing changes.
    for action, code in (("resume", 409), ("start", 409)):
        r = op.post(f"/admin/v1/campaigns/c1/{action}")
        assert (r.status_code, r.json()["error"]) == (code, "E_CAMPAIGN_STATE")
    assert op.post("/admin/v1/campaigns/c1/pause").status_code == 200
    r = op.post("/admin/v1/campaigns/c1/pause")
    assert (r.status_code, r.json()["error"]) == (409, "E_CAMPAIGN_STATE")
    assert op.post("/admin/v1/campaigns/c1/fly").status_code == 404
    assert op.get("/admin/v1/campaigns/nope").status_code == 404
    st = status(viewer, "c1")
    assert st["status"] == "paused" and st["counts"]["pending"] == 4
    assert [e["event"] for e in st["history"]] == ["created", "started", "paused"]
    # security-officer may do everything
    so = client(h, "security-officer")
    assert so.post("/admin/v1/campaigns/c1/abort").json()["status"] == "aborted"
    r = so.post("/admin/v1/campaigns/c1/resume")
    assert (r.status_code, r.json()["error"]) == (409, "E_CAMPAIGN_STATE")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_fleet_views_and_openapi(hc: tuple[Harness, Fleet, SimClock]) -> None:
    from openapi_spec_validator import validate

    h, fleet, _clock = hc
    for i in range(3):
        fleet.add(f"SN-V{i}")
    fleet.poll_all()
    rm, op, viewer = client(h, "release-manager"), client(h, "operator"), client(h, "viewer")
    release(rm, fleet.lab, "1.1.0", 2)
    r = viewer.get("/admin/v1/releases")
    assert [x["version"] for x in r.json()["releases"]] == ["1.1.0"]
    r = viewer.get("/admin/v1/devices", params={"model": fleet.lab.model, "limit": 2})
    assert r.json()["total"] == 3 and len(r.json()["devices"]) == 2
    assert viewer.put("/admin/v1/devices/SN-V1/groups", json={"groups": ["eu"]}).status_code == 403
    r = op.put("/admin/v1/devices/SN-V1/groups", json={"groups": ["eu", "canary"]})
    assert r.status_code == 200 and r.json()["groups"] == ["canary", "eu"]
    r = op.put("/admin/v1/devices/SN-V1/groups", json={"groups": ["no spaces"]})
    assert (r.status_code, r.json()["error"]) == (400, "E_MALFORMED")
    r = viewer.get("/admin/v1/devices", params={"group": "eu"})
    assert [d["serial"] for d in r.json()["devices"]] == ["SN-V1"]
    assert viewer.get("/admin/v1/devices", params={"limit": "x"}).status_code == 400
    groups = {g["name"]: g["devices"] for g in viewer.get("/admin/v1/groups").json()["groups"]}
    assert groups == {"canary": 1, "eu": 1, "lab": 2}
    # The OpenAPI document: valid, and it lists every admin route.
    doc = h.client(None).get("/admin/v1/openapi.json").json()
    validate(doc)
    for listener in ("admin", "device"):
        app: Any = h.srv.asgi(listener)
        while not hasattr(app, "routes"):  # through the middlewares to the Starlette app
            app = app.app
        app_routes = {
            (meth.lower(), r.path.replace(":int", "").replace(":path", ""))
            for r in app.routes
            if not isinstance(r, Mount)  # the /ui mount: the HTML dashboard, not API
            for meth in (r.methods or ()) - {"HEAD"}
        }
        documented = {
            (meth, p)
            for p, item in doc["paths"].items()
            for meth, op in item.items()
            if meth != "servers" and (listener in op["tags"] or p == "/healthz")
        }
        assert app_routes == documented, listener
    assert doc["paths"]["/v1/checkin"]["post"]["security"] == [{"deviceTls": []}]
    op_create = doc["paths"]["/admin/v1/campaigns"]["post"]
    assert "operator" in op_create["description"] and "viewer" not in op_create["description"]
    assert "422" in op_create["responses"] and "403" in op_create["responses"]
