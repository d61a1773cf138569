"""Read-only queries only the dashboard needs (fleet breakdowns, a device's history, progress
over time). Decisions and writes go through the admin API's own service functions."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, func, select

from ...rollout.model import Campaign
from ..storage import models as m

MAX_HISTORY = 50
MAX_SEARCH = 50


def fleet_breakdown(conn: Connection) -> dict[str, list[dict[str, Any]]]:
    """Device counts by model/hardware revision, by firmware version, by key-list version."""
    d = m.devices
    live = d.c.revoked.is_(False)

    def by(*cols: Any) -> list[dict[str, Any]]:
        rows = conn.execute(
            select(*cols, func.count().label("n")).where(live).group_by(*cols).order_by(*cols)
        ).all()
        return [{**{c.name: getattr(r, c.name) for c in cols}, "n": int(r.n)} for r in rows]

    revoked = conn.execute(select(func.count()).select_from(d).where(~live)).scalar_one()
    suspect = conn.execute(select(func.count()).select_from(d).where(d.c.suspect)).scalar_one()
    return {
        "models": by(d.c.model, d.c.hw_rev),
        "versions": by(d.c.current_version),
        "keylists": by(d.c.keylist_version),
        "flags": [{"revoked": int(revoked), "suspect": int(suspect)}],
    }


def search_serials(conn: Connection, text: str) -> list[str]:
    """Serials that start with ``text`` (LIKE wildcards in it are matched literally)."""
    esc = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    d = m.devices
    rows = conn.execute(
        select(d.c.serial)
        .where(d.c.serial.like(esc + "%", escape="\\"))
        .order_by(d.c.serial)
        .limit(MAX_SEARCH)
    ).all()
    return [r.serial for r in rows]


def device_reports(conn: Connection, device_id: int) -> list[dict[str, Any]]:
    s = m.status_reports
    rows = conn.execute(
        select(s).where(s.c.device_id == device_id).order_by(s.c.id.desc()).limit(MAX_HISTORY)
    ).all()
    return [
        {
            "state": r.state,
            "error_code": r.error_code,
            "version": r.version,
            "detail": r.detail,
            "release_id": r.release_id,
            "campaign_id": r.campaign_id,
            "received_at": r.received_at,
        }
        for r in rows
    ]


def device_cert(conn: Connection, device_id: int) -> dict[str, Any]:
    d = m.devices
    r = conn.execute(
        select(
            d.c.cert_fingerprint,
            d.c.cert_not_after,
            d.c.pending_cert_not_after,
            d.c.cert_renewed_at,
            d.c.enrolled_at,
        ).where(d.c.id == device_id)
    ).one()
    return {
        "fingerprint": r.cert_fingerprint,
        "not_after": r.cert_not_after,
        "pending_not_after": r.pending_cert_not_after,
        "renewed_at": r.cert_renewed_at,
        "enrolled_at": r.enrolled_at,
    }


def campaign_finishes(conn: Connection, name: str) -> list[tuple[int, str]]:
    """(time, state) of each member's last move to a final state, oldest first: the
    campaign's progress over time, from its progress rows."""
    c, cd = m.campaigns, m.campaign_devices
    rows = conn.execute(
        select(cd.c.updated_at, cd.c.state)
        .select_from(cd.join(c, c.c.id == cd.c.campaign_id))
        .where(c.c.name == name, cd.c.state.in_(("succeeded", "failed", "reverted")))
        .order_by(cd.c.updated_at)
    ).all()
    return [(int(r.updated_at), str(r.state)) for r in rows]


def keylist_spread(devices: Iterable[Any]) -> dict[int, int]:
    """A rotation's targeted devices (:func:`targeted`) per key-list version (0: never
    reported one)."""
    out: dict[int, int] = {}
    for r in devices:
        v = int(r.keylist_version or 0)
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def campaign_policy(conn: Connection, name: str) -> dict[str, Any]:
    """The campaign's failure threshold and success rule, and the failure count that would
    pause it now (failures before the last acknowledged auto-pause do not count)."""
    row = conn.execute(select(m.campaigns.c.state).where(m.campaigns.c.name == name)).first()
    if row is None:
        return {}
    camp = Campaign.from_dict(json.loads(row.state))
    f = camp.spec.failure
    return {
        "failure": f.to_dict(),
        "failure_limit": None if f.max_failed is None else camp.baseline_failures + f.max_failed,
        "success_threshold": camp.spec.success_threshold,
        "min_soak_s": camp.spec.min_soak_s,
        "deadline": camp.spec.deadline,
    }
