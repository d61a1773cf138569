"""Queries: every statement the server runs, as functions over an open transaction.

Handlers open one transaction (``Database.read()`` / ``write()``) and call these; keeping the
SQL here means the campaign engine can later reuse the same device/assignment primitives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections import namedtuple
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect

from ...clock import SYSTEM_CLOCK, Clock
from ...errors import ErrorCode, OtaError, ServerError
from . import models as m
from .mcuboot import device_may_fetch_mcuboot  # a release's MCUboot image is an image too
from .notify import announce
from .prepared import Prefetch, Prepared, Record, in_consts

log = logging.getLogger(__name__)

ADMIN_ROLES = ("viewer", "operator", "release-manager", "security-officer")
ASSIGNMENT_STATES = ("assigned", "offered", "installing", "done", "failed")


_CLOCK: Clock = SYSTEM_CLOCK


def set_clock(clock: Clock) -> Clock:
    """Use ``clock`` for every timestamp the store writes (the fleet simulator shares one
    SimClock with the server); returns the previous clock so it can be restored."""
    global _CLOCK
    prev, _CLOCK = _CLOCK, clock
    return prev


def now_s() -> int:
    return int(_CLOCK.now())


# Statements on the device request path are built once and executed with parameters (the
# column values of an INSERT or UPDATE ... SET come from the parameter names): building a
# statement and its cache key per request cost more than running it on SQLite.
_INSERT_IGNORE: dict[tuple[str, str, tuple[str, ...]], Prepared] = {}


def _only_columns(table: Any, values: dict[str, Any]) -> None:
    """A parameter that names no column would be ignored by an executed statement (a
    ``.values()`` built per call refused it): refuse it here too."""
    extra = values.keys() - table.c.keys()
    if extra:
        raise ServerError(ErrorCode.INTERNAL, f"not columns of {table.name}: {sorted(extra)}", 500)


def _insert_ignore(conn: Connection, table: Any, values: dict[str, Any], keys: list[str]) -> bool:
    """INSERT that silently does nothing on a unique conflict; True if a row was written."""
    # RETURNING, not rowcount: drivers disagree on rowcount for a conflict-skipped insert.
    _only_columns(table, values)
    dialect = conn.dialect.name
    ck = (dialect, table.name, tuple(keys))
    stmt = _INSERT_IGNORE.get(ck)
    if stmt is None:
        ins = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
        stmt = Prepared(ins.on_conflict_do_nothing(index_elements=keys).returning(table.c.id))
        _INSERT_IGNORE[ck] = stmt
    return stmt.execute(conn, values).first() is not None


# --- devices -----------------------------------------------------------------------------------
def register_device(
    conn: Connection,
    *,
    serial: str,
    model: str,
    hw_rev: str,
    groups: Sequence[str],
    cert_fingerprint: str,
    cert_not_after: int,
    replace: bool = False,
) -> int:
    """Add a device, or (``replace``) give an existing one a new certificate.

    A re-enrolled device's old certificate stops working at once: the server accepts only the
    fingerprint stored here.
    """
    row = conn.execute(select(m.devices.c.id).where(m.devices.c.serial == serial)).first()
    if row is not None and not replace:
        raise OtaError(ErrorCode.EXISTS, f"device {serial} is already enrolled (use --replace)")
    t = now_s()
    if row is None:
        dev_id = conn.execute(
            insert(m.devices).values(
                serial=serial,
                model=model,
                hw_rev=hw_rev,
                cert_fingerprint=cert_fingerprint,
                cert_not_after=cert_not_after,
                revoked=False,
                enrolled_at=t,
                suspect=False,
            )
        ).inserted_primary_key[0]  # type: ignore[index]
    else:
        dev_id = row.id
        conn.execute(
            update(m.devices)
            .where(m.devices.c.id == dev_id)
            .values(
                model=model,
                hw_rev=hw_rev,
                cert_fingerprint=cert_fingerprint,
                cert_not_after=cert_not_after,
                revoked=False,
                revoked_at=None,
                enrolled_at=t,
                # A renewal in flight or a superseded cert belongs to the replaced identity.
                pending_cert_fingerprint=None,
                pending_cert_not_after=None,
                prev_cert_fingerprint=None,
            )
        )
        conn.execute(delete(m.device_groups).where(m.device_groups.c.device_id == dev_id))
    for g in sorted(set(groups)):
        conn.execute(insert(m.device_groups).values(device_id=dev_id, name=g))
    return int(dev_id)


def revoke_device(conn: Connection, serial: str) -> None:
    res = conn.execute(
        update(m.devices)
        .where(m.devices.c.serial == serial)
        .values(revoked=True, revoked_at=now_s())
    )
    if not res.rowcount:
        raise OtaError(ErrorCode.NOT_FOUND, f"no device {serial}")


# Statements on the check-in hot path are built once: SQLAlchemy then reuses the statement's
# memoized cache key, compiled form and result metadata, instead of rebuilding and re-keying a
# new Select on every request (about two thirds of a small query's Python cost).
_DEVICE_BY_SERIAL = Prepared(select(m.devices).where(m.devices.c.serial == bindparam("serial")))


def device_by_serial(conn: Connection, serial: str) -> Record | None:
    return _DEVICE_BY_SERIAL.execute(conn, {"serial": serial}).first()


def device_groups(conn: Connection, device_id: int) -> list[str]:
    rows = conn.execute(
        select(m.device_groups.c.name).where(m.device_groups.c.device_id == device_id)
    )
    return sorted(r.name for r in rows)


def record_checkin(
    conn: Connection, device: Record, facts: dict[str, Any], *, lastseen_interval: int
) -> None:
    """Write what the device reported; skip the write when nothing changed but the clock.

    An idle fleet polling every few minutes then costs one indexed read per check-in, and a
    write only every ``lastseen_interval`` seconds per device.
    """
    values = checkin_changes(device, facts, lastseen_interval=lastseen_interval)
    if values is not None:
        _only_columns(m.devices, values)
        _UPDATE_DEVICE.execute(conn, dict(values, b_id=device.id))


_UPDATE_DEVICE = Prepared(update(m.devices).where(m.devices.c.id == bindparam("b_id")))


def checkin_changes(
    device: Record, facts: dict[str, Any], *, lastseen_interval: int
) -> dict[str, Any] | None:
    """The device-row values a check-in must write, or None if only the clock moved."""
    t = now_s()
    changed = {k: v for k, v in facts.items() if getattr(device, k) != v}
    if not changed and device.last_seen is not None and t - device.last_seen < lastseen_interval:
        return None
    return dict(changed, last_seen=t)


_OPEN_STATES = ("assigned", "offered", "installing")  # an assignment still to be carried out
_PENDING_UPDATE = Prepared(
    select(m.releases, m.assignments.c.state.label("assignment_state"))
    .select_from(m.assignments.join(m.releases, m.assignments.c.release_id == m.releases.c.id))
    .where(
        m.assignments.c.device_id == bindparam("device_id"),
        in_consts(m.assignments.c.state, _OPEN_STATES),
    )
)


def pending_update(conn: Connection, device_id: int) -> Record | None:
    """The release assigned to this device (joined), if its assignment is still open."""
    return _PENDING_UPDATE.execute(conn, {"device_id": device_id}).first()


# --- a re-poll check-in in one statement -------------------------------------------------------
# What a check-in that changes nothing reads: the device row, its open assignment's release (the
# columns of ``pending_update``) and the newest key-list version. As three statements that is
# three round trips on PostgreSQL, and the event loop waits through each of them; as one it is
# one (docs/benchmarks.md, "What a check-in costs on PostgreSQL").
_PENDING_COLS = list(_PENDING_UPDATE.stmt.exported_columns)  # type: ignore[attr-defined]
_row_type: Any = namedtuple  # field names known at import time only
_DeviceRow: Any = _row_type("Record", [c.key for c in m.devices.c])
_PendingRow: Any = _row_type("Record", [c.key for c in _PENDING_COLS])
_N_DEV, _N_PENDING = len(_DeviceRow._fields), len(_PendingRow._fields)
_CHECKIN_SNAPSHOT = Prepared(
    select(
        *m.devices.c,
        *(c.label(f"p_{c.key}") for c in _PENDING_COLS),
        select(func.max(m.keylists.c.version)).scalar_subquery().label("newest_keylist"),
    )
    .select_from(
        m.devices.outerjoin(
            m.assignments.join(m.releases, m.assignments.c.release_id == m.releases.c.id),
            and_(
                m.assignments.c.device_id == m.devices.c.id,
                in_consts(m.assignments.c.state, _OPEN_STATES),
            ),
        )
    )
    .where(m.devices.c.serial == bindparam("serial"))
)


@dataclass(frozen=True)
class CheckinSnapshot:
    """One statement's view of a device: its row, ``pending_update`` for it, and the newest
    key-list version (None: no key list published)."""

    device: Record
    pending: Record | None
    keylist_version: int | None


def checkin_snapshot(conn: Connection, serial: str) -> CheckinSnapshot | None:
    """The device ``serial`` with what a check-in reads, in one round trip; None: unknown."""
    return _snapshot_of(_CHECKIN_SNAPSHOT.execute(conn, {"serial": serial}).all())


def checkin_snapshot_prefetch(dialect: Dialect, serial: str) -> Prefetch[CheckinSnapshot | None]:
    """:func:`checkin_snapshot` to be sent with the per-device limit's statement (one round
    trip for both on PostgreSQL: ``sharedlimits.SharedBuckets.take_with``)."""
    return Prefetch(_CHECKIN_SNAPSHOT, dialect, {"serial": serial}, _snapshot_of)


def _snapshot_of(rows: list[Any]) -> CheckinSnapshot | None:
    if not rows:
        return None
    row = rows[0]
    pending = _PendingRow._make(row[_N_DEV : _N_DEV + _N_PENDING])
    return CheckinSnapshot(
        device=_DeviceRow._make(row[:_N_DEV]),
        pending=pending if pending.id is not None else None,
        keylist_version=row[_N_DEV + _N_PENDING],
    )


_UPDATE_ASSIGNMENT = Prepared(
    update(m.assignments).where(m.assignments.c.device_id == bindparam("b_device_id"))
)
_DELETE_ASSIGNMENT = Prepared(
    delete(m.assignments).where(m.assignments.c.device_id == bindparam("b_device_id"))
)
_INSERT_ASSIGNMENT = Prepared(insert(m.assignments))


def set_assignment_state(conn: Connection, device_id: int, state: str) -> None:
    _UPDATE_ASSIGNMENT.execute(
        conn, {"state": state, "updated_at": now_s(), "b_device_id": device_id}
    )


def assign(conn: Connection, device_id: int, release_id: int, campaign_id: int | None) -> None:
    """Point a device at a release (replacing any earlier target: one target per device)."""
    t = now_s()
    _DELETE_ASSIGNMENT.execute(conn, {"b_device_id": device_id})
    _INSERT_ASSIGNMENT.execute(
        conn,
        {
            "device_id": device_id,
            "release_id": release_id,
            "campaign_id": campaign_id,
            "state": "assigned",
            "assigned_at": t,
            "updated_at": t,
        },
    )


_MAY_FETCH: dict[str, Prepared] = {}
_MAY_FETCH_DELTA: dict[str, Prepared] = {}


def device_may_fetch(conn: Connection, device_id: int, column: str, blob: str) -> bool:
    """Only a device that was offered a release may download its manifest or image
    (or, for a release with deltas, a delta manifest or patch: ``image_blob`` covers patches)."""
    q = _MAY_FETCH.get(column)
    if q is None:
        col = m.releases.c[column]  # KeyError for a column that does not exist
        j = m.assignments.join(m.releases, m.assignments.c.release_id == m.releases.c.id)
        q = _MAY_FETCH[column] = Prepared(
            select(m.releases.c.id)
            .select_from(j)
            .where(m.assignments.c.device_id == bindparam("device_id"), col == bindparam("blob"))
            .limit(1)
        )
    params = {"device_id": device_id, "blob": blob}
    row = q.execute(conn, params).first()
    if row is not None or _device_may_fetch_delta(conn, params, column):
        return True
    if column != "image_blob":
        return False
    return device_may_fetch_mcuboot(conn, device_id, blob)


def _device_may_fetch_delta(conn: Connection, params: dict[str, Any], column: str) -> bool:
    q = _MAY_FETCH_DELTA.get(column)
    if q is None:
        d = m.release_deltas
        col = d.c.envelope_blob if column == "envelope_blob" else d.c.patch_blob
        j = m.assignments.join(d, m.assignments.c.release_id == d.c.release_id)
        q = _MAY_FETCH_DELTA[column] = Prepared(
            select(d.c.id)
            .select_from(j)
            .where(m.assignments.c.device_id == bindparam("device_id"), col == bindparam("blob"))
        )
    return q.execute(conn, params).first() is not None


# --- reports -----------------------------------------------------------------------------------
def insert_report(conn: Connection, device_id: int, report: dict[str, Any]) -> bool:
    """Store a status report once; a repeated ``report_id`` from the same device is a no-op."""
    values = dict(report, device_id=device_id, received_at=now_s())
    return _insert_ignore(conn, m.status_reports, values, ["device_id", "report_id"])


def count_reports(conn: Connection, device_id: int | None = None) -> int:
    q = select(func.count()).select_from(m.status_reports)
    if device_id is not None:
        q = q.where(m.status_reports.c.device_id == device_id)
    return int(conn.execute(q).scalar_one())


# --- probes ------------------------------------------------------------------------------------
def record_probe(
    conn: Connection,
    *,
    device_id: int | None,
    ip: str | None,
    kind: str,
    path: str,
    detail: str = "",
) -> None:
    conn.execute(
        _INSERT_PROBE,
        {
            "device_id": device_id,
            "ip": ip,
            "kind": kind,
            "path": path[:200],
            "detail": detail[:200],
            "at": now_s(),
        },
    )


_INSERT_PROBE = insert(m.probe_events)


def flag_suspect(conn: Connection, device_id: int, reason: str) -> None:
    conn.execute(
        update(m.devices)
        .where(m.devices.c.id == device_id)
        .values(suspect=True, suspect_reason=reason[:200])
    )


def probe_history(conn: Connection, device_id: int, limit: int = 100) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(m.probe_events)
        .where(m.probe_events.c.device_id == device_id)
        .order_by(m.probe_events.c.id.desc())
        .limit(limit)
    )
    return [
        {"kind": r.kind, "ip": r.ip, "path": r.path, "detail": r.detail, "at": r.at} for r in rows
    ]


# --- releases ----------------------------------------------------------------------------------
def insert_release(conn: Connection, values: dict[str, Any]) -> int:
    existing = conn.execute(
        select(m.releases.c.id).where(
            (m.releases.c.manifest_digest == values["manifest_digest"])
            | (
                (m.releases.c.class_id == values["class_id"])
                & (m.releases.c.version == values["version"])
            )
        )
    ).first()
    if existing is not None:
        raise ServerError(
            ErrorCode.CONFLICT, f"release exists (id {existing.id}) for this manifest/version", 409
        )
    return int(
        conn.execute(insert(m.releases).values(**values, created_at=now_s())).inserted_primary_key[
            0
        ]  # type: ignore[index]
    )


def release_by_id(conn: Connection, release_id: int) -> Record | None:
    return conn.execute(select(m.releases).where(m.releases.c.id == release_id)).first()


# --- deltas ------------------------------------------------------------------------------------
def insert_delta(conn: Connection, values: dict[str, Any]) -> int:
    d = m.release_deltas
    existing = conn.execute(
        select(d.c.id).where(
            (d.c.manifest_digest == values["manifest_digest"])
            | (
                (d.c.release_id == values["release_id"])
                & (d.c.base_digest == values["base_digest"])
            )
        )
    ).first()
    if existing is not None:
        raise ServerError(
            ErrorCode.CONFLICT, f"delta exists (id {existing.id}) for this manifest/base", 409
        )
    res = conn.execute(insert(d).values(**values, created_at=now_s()))
    return int(res.inserted_primary_key[0])  # type: ignore[index]


_DELTA_REF = Prepared(
    select(m.release_deltas).where(
        m.release_deltas.c.release_id == bindparam("release_id"),
        m.release_deltas.c.base_digest == bindparam("base"),
    )
)


def delta_ref(
    conn: Connection, release_id: int, running_digest: str | None
) -> dict[str, Any] | None:
    """The delta of ``release_id`` whose base is the device's running image, as offered."""
    if not running_digest:
        return None
    row = _DELTA_REF.execute(conn, {"release_id": release_id, "base": running_digest}).first()
    if row is None:
        return None
    return {
        "base_digest": row.base_digest,
        "manifest_digest": row.manifest_digest,
        "manifest_url": f"/v1/manifests/{row.envelope_blob}",
        "patch_url": f"/v1/images/{row.patch_blob}",
        "patch_size": row.patch_size,
        "patch_digest": row.patch_digest,
    }


# --- key lists ---------------------------------------------------------------------------------
def put_keylist(conn: Connection, version: int, document: bytes) -> None:
    latest = conn.execute(select(func.max(m.keylists.c.version))).scalar()
    if latest is not None and version <= latest:
        raise ServerError(ErrorCode.REPLAY, f"key list version {version} <= stored {latest}", 409)
    conn.execute(
        insert(m.keylists).values(
            version=version,
            document=document,
            sha256=hashlib.sha256(document).hexdigest(),
            created_at=now_s(),
        )
    )
    announce(conn)  # the other nodes reload their anchors when this commits


_LATEST_KEYLIST = Prepared(select(m.keylists).order_by(m.keylists.c.version.desc()).limit(1))


def latest_keylist(conn: Connection) -> Record | None:
    return _LATEST_KEYLIST.execute(conn).first()


# --- admin tokens ------------------------------------------------------------------------------
DEFAULT_TOKEN_LIFETIME = 90 * 86400


def create_token(
    conn: Connection, name: str, role: str, *, valid_for: int | None = DEFAULT_TOKEN_LIFETIME
) -> str:
    """Create a bearer token; only its SHA-256 is stored, the token is shown once.

    It expires ``valid_for`` seconds from now on the server clock (a stolen laptop's token
    stops working on its own); ``valid_for=None`` makes a token that never expires.
    """
    if role not in ADMIN_ROLES:
        raise OtaError(ErrorCode.USAGE, f"role must be one of {', '.join(ADMIN_ROLES)}")
    if valid_for is not None and valid_for <= 0:
        raise OtaError(ErrorCode.USAGE, f"token lifetime must be positive, got {valid_for}s")
    token = "otg_" + secrets.token_urlsafe(32)
    t = now_s()
    conn.execute(
        insert(m.admin_tokens).values(
            name=name,
            token_sha256=hashlib.sha256(token.encode()).hexdigest(),
            role=role,
            created_at=t,
            revoked=False,
            expires_at=None if valid_for is None else t + valid_for,
        )
    )
    return token


def token_expiry(conn: Connection, name: str) -> int | None:
    """The named token's ``expires_at`` (None: never expires); E_NOT_FOUND if no such token."""
    row = conn.execute(
        select(m.admin_tokens.c.expires_at).where(m.admin_tokens.c.name == name)
    ).first()
    if row is None:
        raise OtaError(ErrorCode.NOT_FOUND, f"no admin token {name!r}")
    return None if row.expires_at is None else int(row.expires_at)


TOKEN_EXPIRING_SOON = 14 * 86400  # token-list marks tokens expiring within this


def list_tokens(conn: Connection) -> list[dict[str, Any]]:
    """Every admin token's name, role, creation, expiry and state, never the token or its
    hash. State: ``revoked``, ``expired``, ``expiring`` (within 14 days: renew it: create a
    new one, then revoke this) or ``active``."""
    t = m.admin_tokens
    now = now_s()
    out: list[dict[str, Any]] = []
    for r in conn.execute(
        select(t.c.name, t.c.role, t.c.created_at, t.c.expires_at, t.c.revoked).order_by(t.c.name)
    ):
        exp = None if r.expires_at is None else int(r.expires_at)
        if r.revoked:
            state = "revoked"
        elif exp is not None and now >= exp:
            state = "expired"
        elif exp is not None and exp - now <= TOKEN_EXPIRING_SOON:
            state = "expiring"
        else:
            state = "active"
        out.append(
            {
                "name": r.name,
                "role": r.role,
                "created_at": int(r.created_at),
                "expires_at": exp,
                "state": state,
            }
        )
    return out


def revoke_token(conn: Connection, name: str) -> bool:
    """Revoke the named token: from the commit on, every request with it gets 401 (the
    server looks tokens up per request). False if it was already revoked; E_NOT_FOUND if
    there is no such token."""
    t = m.admin_tokens
    row = conn.execute(select(t.c.revoked).where(t.c.name == name)).first()
    if row is None:
        raise OtaError(ErrorCode.NOT_FOUND, f"no admin token {name!r}")
    if row.revoked:
        return False
    conn.execute(update(t).where(t.c.name == name).values(revoked=True))
    log.warning("admin token revoked: %r", name)
    return True


_TOKEN_BY_HASH = select(
    m.admin_tokens.c.name, m.admin_tokens.c.role, m.admin_tokens.c.expires_at
).where(
    m.admin_tokens.c.token_sha256 == bindparam("sha256"),
    m.admin_tokens.c.revoked.is_(False),
)


def token_role(conn: Connection, token: str) -> tuple[str, str] | None:
    """(name, role) of a live token; None if unknown or revoked.

    An expired token (``expires_at`` reached on the server clock) is refused with 401
    ``E_AUTH`` "token expired" and logged at WARNING with its name: someone still holds it.
    """
    row = conn.execute(
        _TOKEN_BY_HASH, {"sha256": hashlib.sha256(token.encode()).hexdigest()}
    ).first()
    if row is None:
        return None
    if row.expires_at is not None and now_s() >= row.expires_at:
        log.warning("expired admin token presented: %r (expired at %d)", row.name, row.expires_at)
        raise ServerError(ErrorCode.AUTH, "token expired", 401)
    return (row.name, row.role)


def device_view(conn: Connection, device: Record) -> dict[str, Any]:
    return {
        "serial": device.serial,
        "model": device.model,
        "hw_rev": device.hw_rev,
        "groups": device_groups(conn, device.id),
        "revoked": bool(device.revoked),
        "current_version": device.current_version,
        "security_counter": device.security_counter,
        "keylist_version": device.keylist_version,
        "slot_state": json.loads(device.slot_state) if device.slot_state else None,
        "running_digest": device.running_digest,
        "last_seen": device.last_seen,
        "last_error": device.last_error,
        "suspect": bool(device.suspect),
        "suspect_reason": device.suspect_reason,
        "probe_history": probe_history(conn, device.id),
    }


# --- certificate renewal (docs/operations.md#certificate-renewal) -------------------------------
def set_pending_cert(conn: Connection, device_id: int, fingerprint: str, not_after: int) -> None:
    """Remember a renewed certificate; it replaces an earlier pending one (the device lost it,
    or asked again), and becomes current only when the device presents it."""
    conn.execute(
        update(m.devices)
        .where(m.devices.c.id == device_id)
        .values(pending_cert_fingerprint=fingerprint, pending_cert_not_after=not_after)
    )


def promote_pending_cert(conn: Connection, device_id: int, fingerprint: str) -> bool:
    """The device used its renewed certificate: make it current and supersede the old one.

    Guarded on the pending fingerprint, so two server processes promoting at once (or a
    re-enrollment in between) change the row at most once; True if this call did."""
    row = conn.execute(
        select(m.devices.c.cert_fingerprint, m.devices.c.pending_cert_not_after).where(
            m.devices.c.id == device_id, m.devices.c.pending_cert_fingerprint == fingerprint
        )
    ).first()
    if row is None:
        return False
    conn.execute(
        update(m.devices)
        .where(m.devices.c.id == device_id, m.devices.c.pending_cert_fingerprint == fingerprint)
        .values(
            prev_cert_fingerprint=row.cert_fingerprint,
            cert_fingerprint=fingerprint,
            cert_not_after=row.pending_cert_not_after,
            pending_cert_fingerprint=None,
            pending_cert_not_after=None,
            cert_renewed_at=now_s(),
        )
    )
    return True


def certs_expiring(conn: Connection, before: int, limit: int = 1000) -> list[dict[str, Any]]:
    """Devices (not revoked) whose current certificate ends before ``before``, soonest first."""
    rows = conn.execute(
        select(
            m.devices.c.serial,
            m.devices.c.cert_not_after,
            m.devices.c.pending_cert_not_after,
            m.devices.c.cert_renewed_at,
            m.devices.c.last_seen,
        )
        .where(m.devices.c.cert_not_after < before, m.devices.c.revoked == False)  # noqa: E712
        .order_by(m.devices.c.cert_not_after, m.devices.c.serial)
        .limit(limit)
    )
    t = now_s()
    return [
        {
            "serial": r.serial,
            "cert_not_after": r.cert_not_after,
            "expired": r.cert_not_after <= t,
            "renewal_pending": r.pending_cert_not_after is not None,
            "cert_renewed_at": r.cert_renewed_at,
            "last_seen": r.last_seen,
        }
        for r in rows
    ]
