"""Read/write queries of the fleet views of the admin API (devices, groups, releases).

Kept apart from :mod:`.store` (the device API's hot-path queries) so the admin listing code can
grow without touching the check-in path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Select, delete, func, insert, select

from ...errors import ErrorCode, ServerError
from . import models as m

MAX_PAGE = 1000
MAX_GROUPS_PER_DEVICE = 64
GROUP_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,63}\Z")


def rotation_targets(q: Select[Any], rot: Any) -> Select[Any]:
    """``q`` over ``devices`` narrowed to a key rotation's selection (model, hardware
    revision, group; revoked devices left out): the one definition the rotation's progress,
    the dashboard and /metrics count against."""
    d = m.devices
    q = q.where(d.c.revoked.is_(False))
    if rot.target_model:
        q = q.where(d.c.model == rot.target_model)
    if rot.target_hw_rev:
        q = q.where(d.c.hw_rev == rot.target_hw_rev)
    if rot.target_group:
        g = m.device_groups
        q = q.where(d.c.id.in_(select(g.c.device_id).where(g.c.name == rot.target_group)))
    return q


def list_devices(
    conn: Connection,
    *,
    model: str | None = None,
    hw_rev: str | None = None,
    group: str | None = None,
    version: str | None = None,
    suspect: bool | None = None,
    limit: int = 100,
    offset: int = 0,
) -> dict[str, Any]:
    d, g = m.devices, m.device_groups
    cond = []
    if model is not None:
        cond.append(d.c.model == model)
    if hw_rev is not None:
        cond.append(d.c.hw_rev == hw_rev)
    if version is not None:
        cond.append(d.c.current_version == version)
    if suspect is not None:
        cond.append(d.c.suspect.is_(suspect))
    if group is not None:
        cond.append(d.c.id.in_(select(g.c.device_id).where(g.c.name == group)))
    total = conn.execute(select(func.count()).select_from(d).where(*cond)).scalar_one()
    rows = conn.execute(
        select(d).where(*cond).order_by(d.c.serial).limit(min(limit, MAX_PAGE)).offset(offset)
    ).all()
    groups: dict[int, list[str]] = {}
    if rows:
        for r in conn.execute(
            select(g.c.device_id, g.c.name)
            .where(g.c.device_id.in_([r.id for r in rows]))
            .order_by(g.c.name)
        ):
            groups.setdefault(r.device_id, []).append(r.name)
    return {
        "total": int(total),
        "devices": [
            {
                "serial": r.serial,
                "model": r.model,
                "hw_rev": r.hw_rev,
                "groups": groups.get(r.id, []),
                "revoked": bool(r.revoked),
                "current_version": r.current_version,
                "security_counter": r.security_counter,
                "keylist_version": r.keylist_version,
                "last_seen": r.last_seen,
                "last_error": r.last_error,
                "suspect": bool(r.suspect),
            }
            for r in rows
        ],
    }


def check_groups(value: object) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_GROUPS_PER_DEVICE:
        raise ServerError(
            ErrorCode.MALFORMED, f"groups must be a list of ≤ {MAX_GROUPS_PER_DEVICE} names", 400
        )
    for v in value:
        if not isinstance(v, str) or not GROUP_RE.match(v):
            raise ServerError(ErrorCode.MALFORMED, "group names are 1-64 [A-Za-z0-9._:-]", 400)
    return sorted(set(value))


def set_groups(conn: Connection, serial: str, groups: Sequence[str]) -> list[str]:
    """Replace a device's groups. Campaigns snapshot their target at start, so this changes
    only campaigns started later."""
    dev = conn.execute(select(m.devices.c.id).where(m.devices.c.serial == serial)).first()
    if dev is None:
        raise ServerError(ErrorCode.NOT_FOUND, f"no device {serial}", 404)
    g = m.device_groups
    conn.execute(delete(g).where(g.c.device_id == dev.id))
    for name in sorted(set(groups)):
        conn.execute(insert(g).values(device_id=dev.id, name=name))
    return sorted(set(groups))


def list_groups(conn: Connection) -> list[dict[str, Any]]:
    g = m.device_groups
    rows = conn.execute(
        select(g.c.name, func.count().label("n")).group_by(g.c.name).order_by(g.c.name)
    ).all()
    return [{"name": r.name, "devices": int(r.n)} for r in rows]


def release_detail(conn: Connection, release_id: int) -> dict[str, Any]:
    """One release as :func:`list_releases` shows it, with its deltas."""
    r, d = m.releases, m.release_deltas
    rows = _release_rows(conn.execute(select(r).where(r.c.id == release_id)).all())
    if not rows:
        raise ServerError(ErrorCode.NOT_FOUND, f"no release {release_id}", 404)
    deltas = conn.execute(select(d).where(d.c.release_id == release_id).order_by(d.c.id)).all()
    return {
        **rows[0],
        "deltas": [
            {
                "id": x.id,
                "base_digest": x.base_digest,
                "base_version": x.base_version,
                "manifest_digest": x.manifest_digest,
                "patch_digest": x.patch_digest,
                "patch_size": x.patch_size,
                "created_at": x.created_at,
            }
            for x in deltas
        ],
    }


def last_report(conn: Connection, device_id: int) -> dict[str, Any] | None:
    """The device's newest status report (what ``fleet device`` shows next to its check-in
    facts: the last install outcome and its error code)."""
    s = m.status_reports
    x = conn.execute(
        select(s).where(s.c.device_id == device_id).order_by(s.c.id.desc()).limit(1)
    ).first()
    if x is None:
        return None
    return {
        "report_id": x.report_id,
        "state": x.state,
        "error_code": x.error_code,
        "version": x.version,
        "detail": x.detail,
        "release_id": x.release_id,
        "received_at": x.received_at,
    }


def assignment(conn: Connection, device_id: int) -> dict[str, Any] | None:
    """The device's current assignment (direct or a campaign's), if any."""
    a = m.assignments
    x = conn.execute(select(a).where(a.c.device_id == device_id)).first()
    if x is None:
        return None
    return {
        "release_id": x.release_id,
        "campaign_id": x.campaign_id,
        "state": x.state,
        "assigned_at": x.assigned_at,
        "updated_at": x.updated_at,
    }


def list_releases(
    conn: Connection, *, model: str | None = None, hw_rev: str | None = None
) -> list[dict[str, Any]]:
    r = m.releases
    cond = []
    if model is not None:
        cond.append(r.c.model == model)
    if hw_rev is not None:
        cond.append(r.c.hw_rev == hw_rev)
    return _release_rows(
        conn.execute(select(r).where(*cond).order_by(r.c.id).limit(MAX_PAGE)).all()
    )


def _release_rows(rows: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {
            "id": x.id,
            "model": x.model,
            "hw_rev": x.hw_rev,
            "version": x.version,
            "min_version": x.min_version,
            "security_counter": x.security_counter,
            "sequence_number": x.sequence_number,
            "expires": x.expires,
            "manifest_digest": x.manifest_digest,
            "image_size": x.image_size,
            "signers": json.loads(x.signers),
            "description": x.description,
            "uploaded_by": x.uploaded_by,
            "created_at": x.created_at,
        }
        for x in rows
    ]
