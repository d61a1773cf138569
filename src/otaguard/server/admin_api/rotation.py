"""Key rotation as a server workflow (DESIGN §8, docs/operations.md): start → advance → finish.

* **start**: publish a key-list update that ADDS the new key (root-signed, or signed by the old
  key in transition mode); devices install it on their next check-in and report its version.
* **status**: the fraction of the targeted fleet on that list, stragglers (last seen, last
  error), unreachable devices (no check-in for ``unreachable_after``), key-expiry warnings.
* **advance**: once the fraction reaches the threshold (default 97 %), new releases must be
  signed with the new key: the server refuses uploads signed by the old one (E_KEY_RETIRED)
  and ``GET /admin/v1/release-key`` tells the release pipeline which key to use.
* **finish**: publish the final key list that removes and revokes the old key.

Advance and finish are refused below the threshold (E_ROTATION_PENDING) unless a
security-officer forces them with a reason. Every action is written to the rotation audit log
(hash-chained, :mod:`otaguard.signing.audit`) and to ``rotation_events`` (with the audit
record's position and hash, so the two can be cross-checked). The server never signs
anything: both key lists arrive signed and are verified against its trust store first.
"""

from __future__ import annotations

import base64
import binascii
import json
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Row, insert, select, text, update
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...errors import ErrorCode, OtaError, ServerError
from ...signing.audit import AuditHead, AuditLog, read_records
from ...trust.model import Role
from ...trust.store import TrustStore
from ...wire import decimal, loads_json
from ..storage import models as m
from ..storage import store
from ..storage.admin_queries import rotation_targets
from .auth import require_role

if TYPE_CHECKING:
    from ..context import ServerContext

DEFAULT_THRESHOLD = 0.97
DEFAULT_UNREACHABLE = 7 * 86400
DEFAULT_WARN_DAYS = 90
MAX_LISTED = 200
ACTIVE_STATES = ("started", "advanced")
ADVANCE_ROLES = frozenset({"release-manager", "security-officer"})
_audit_lock = threading.Lock()


# --- audit ---------------------------------------------------------------------------------------
def audit_log_path(srv: ServerContext) -> Path:
    """One place that knows where the rotation log lives (the API writes it, the dashboard
    verifies it); E_CONFIG when the server has no local data directory."""
    if srv.data_dir is None:
        raise OtaError(ErrorCode.CONFIG, "no data directory for the rotation audit log")
    return srv.data_dir / "audit" / "rotation-audit.log"


def audit_log(srv: ServerContext) -> AuditLog:
    """The server's rotation audit log (``<data dir>/audit/rotation-audit.log`` by default).

    Sealed by the server's audit-sealing key (``server run --audit-seal-*``: an HSM key the
    root authorized for the audit role only) when one is configured, so that a rewritten or
    truncated history no longer verifies; the DB history also keeps each record's hash, which
    is the log's anchor (:func:`audit_anchor`, ``audit verify --server-db-url``).
    """
    with _audit_lock:
        log: AuditLog | None = getattr(srv, "rotation_audit", None)
        if log is None:
            log = AuditLog.open(audit_log_path(srv), srv.settings.audit_sealer, seal_every=1)
            srv.rotation_audit = log  # type: ignore[attr-defined]
        return log


def close_audit_log(srv: ServerContext) -> None:
    """Seal and close the rotation log at shutdown (a closed, sealed log ends with a seal)."""
    with _audit_lock:
        log: AuditLog | None = getattr(srv, "rotation_audit", None)
        if log is not None:
            log.close()
            srv.rotation_audit = None  # type: ignore[attr-defined]


_PG_ROTATION_LOG_LOCK = 0x07A6_0002  # serializes rotation-log writers across nodes


def local_log_id(srv: ServerContext) -> str | None:
    """This node's rotation log's id (its genesis record), without creating the log."""
    log: AuditLog | None = getattr(srv, "rotation_audit", None)
    if log is not None:
        return log.log_id
    path = audit_log_path(srv)
    if not path.exists():
        return None
    for rec in read_records(path):
        value = rec.subject.get("log_id")
        return str(value) if value else None
    return None


def log_owner(conn: Connection) -> tuple[str, str] | None:
    """The rotation log the cluster's actions go to: (log id, where it is), from the newest
    action that names one (None: no action yet, or none since migration 0010)."""
    e = m.rotation_events.c
    row = conn.execute(
        select(e.audit_log_id, e.audit_node)
        .where(e.audit_log_id.is_not(None))
        .order_by(e.id.desc())
        .limit(1)
    ).first()
    return (str(row[0]), str(row[1] or "?")) if row is not None else None


def _claim_log(srv: ServerContext, conn: Connection) -> None:
    """Refuse a rotation action on a node whose log is not the cluster's (E_CONFLICT, 409,
    naming the node that keeps it): one chain, one writer. Serialized across nodes, so two
    nodes' first actions cannot both start a chain."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_ROTATION_LOG_LOCK})
    owner = log_owner(conn)
    if owner is not None and owner[0] != local_log_id(srv):
        raise ServerError(
            ErrorCode.CONFLICT,
            f"this cluster's rotation audit log (id {owner[0]}) is kept at {owner[1]}: send "
            "key-rotation actions to that node's admin listener",
            409,
        )


def _node_name(srv: ServerContext) -> str:
    return f"{socket.gethostname()}:{audit_log_path(srv).parent.parent}"


def audit_anchor(conn: Connection) -> AuditHead | None:
    """The newest rotation-log record the database knows (seq and hash): the log must hold it."""
    row = conn.execute(
        select(m.rotation_events.c.audit_seq, m.rotation_events.c.audit_hash)
        .where(m.rotation_events.c.audit_seq.is_not(None))
        .order_by(m.rotation_events.c.audit_seq.desc())
        .limit(1)
    ).first()
    return AuditHead(int(row[0]), str(row[1])) if row is not None else None


# --- queries -------------------------------------------------------------------------------------
def current_rotation(conn: Connection) -> Row[Any] | None:
    return conn.execute(select(m.rotations).order_by(m.rotations.c.id.desc()).limit(1)).first()


def rotation_by_id(conn: Connection, rid: int) -> Row[Any]:
    row = conn.execute(select(m.rotations).where(m.rotations.c.id == rid)).first()
    if row is None:
        raise ServerError(ErrorCode.NOT_FOUND, f"no rotation {rid}", 404)
    return row


def release_key(conn: Connection) -> dict[str, Any]:
    """Which key new releases are signed with, and which keys are retired for releases."""
    rows = conn.execute(
        select(m.rotations)
        .where(m.rotations.c.state.in_(("advanced", "finished")))
        .order_by(m.rotations.c.id)
    ).all()
    retired = sorted({r.old_kid for r in rows} - {rows[-1].new_kid} if rows else set())
    return {"kid": rows[-1].new_kid if rows else None, "retired": retired}


def check_release_signers(conn: Connection, signers_json: str) -> None:
    """Refuse a release signed by a key an advanced rotation retired (E_KEY_RETIRED)."""
    retired = set(release_key(conn)["retired"])
    if not retired:
        return
    used = set(json.loads(signers_json))
    if used & retired:
        raise ServerError(
            ErrorCode.KEY_RETIRED,
            f"release signed with retired key(s) {sorted(used & retired)}; sign new releases "
            "with the rotation's new key",
            409,
        )


def targeted(conn: Connection, rot: Row[Any]) -> list[Row[Any]]:
    """The rotation's devices (its own selection, revoked ones left out), by serial."""
    d = m.devices
    q = rotation_targets(
        select(d.c.serial, d.c.keylist_version, d.c.last_seen, d.c.last_error, d.c.current_version),
        rot,
    )
    rows: list[Row[Any]] = list(conn.execute(q.order_by(d.c.serial)))
    return rows


def fleet_progress(
    conn: Connection, rot: Row[Any], now: int, devices: list[Row[Any]] | None = None
) -> dict[str, Any]:
    """``devices``: :func:`targeted` when the caller already read it (one scan per page)."""
    devices = targeted(conn, rot) if devices is None else devices
    on_new = [r for r in devices if (r.keylist_version or 0) >= rot.start_version]
    on_final = (
        [r for r in devices if (r.keylist_version or 0) >= rot.final_version]
        if rot.final_version
        else []
    )
    stragglers, unreachable = [], []
    for r in devices:
        if (r.keylist_version or 0) >= (rot.final_version or rot.start_version):
            continue
        entry = {
            "serial": r.serial,
            "keylist_version": r.keylist_version,
            "version": r.current_version,
            "last_seen": r.last_seen,
            "last_error": r.last_error,
        }
        if r.last_seen is None or now - r.last_seen > rot.unreachable_after:
            unreachable.append(entry)
        else:
            stragglers.append(entry)
    n = len(devices)
    fraction = len(on_new) / n if n else 1.0
    return {
        "targeted": n,
        "on_new_list": len(on_new),
        "on_final_list": len(on_final),
        "fraction": round(fraction, 4),
        "threshold": rot.threshold / 1000,
        "threshold_met": fraction * 1000 >= rot.threshold,
        "stragglers": stragglers[:MAX_LISTED],
        "unreachable": unreachable[:MAX_LISTED],
        "straggler_count": len(stragglers),
        "unreachable_count": len(unreachable),
    }


def key_expiry(srv: ServerContext, now: int, warn_days: int) -> list[dict[str, Any]]:
    """Keys in the server's trust store, days left, and a warning inside ``warn_days``."""
    ts = srv.trust.resolver
    if not isinstance(ts, TrustStore):
        return []
    out = []
    for a in ts.keylist.authorizations:
        if a.key_id in ts.keylist.revoked:
            continue
        t = a.trusted
        days_left = (t.not_after - now) / 86400
        out.append(
            {
                "kid": a.key_id.hex(),
                "name": t.name,
                "roles": sorted(r.value for r in t.roles),
                "not_after": t.not_after,
                "days_left": round(days_left, 1),
                "warning": days_left <= warn_days,
                "expired": days_left < 0,
            }
        )
    return out


def rotation_view(
    srv: ServerContext,
    conn: Connection,
    rot: Row[Any],
    warn_days: int,
    devices: list[Row[Any]] | None = None,
) -> Any:
    now = store.now_s()
    events = conn.execute(
        select(m.rotation_events)
        .where(m.rotation_events.c.rotation_id == rot.id)
        .order_by(m.rotation_events.c.id)
    ).all()
    expiry = key_expiry(srv, now, warn_days)
    return {
        "id": rot.id,
        "state": rot.state,
        "old_kid": rot.old_kid,
        "new_kid": rot.new_kid,
        "release_kid": rot.new_kid if rot.state != "started" else rot.old_kid,
        "start_keylist_version": rot.start_version,
        "final_keylist_version": rot.final_version,
        "unreachable_after": rot.unreachable_after,
        "target": {
            "model": rot.target_model,
            "hw_rev": rot.target_hw_rev,
            "group": rot.target_group,
        },
        "started_at": rot.started_at,
        "advanced_at": rot.advanced_at,
        "finished_at": rot.finished_at,
        **fleet_progress(conn, rot, now, devices),
        "history": [
            {
                "at": e.at,
                "action": e.action,
                "actor": e.actor,
                "forced": bool(e.forced),
                "fraction": e.fraction / 1000,
                "reason": e.reason,
                "audit_seq": e.audit_seq,
                "audit_hash": e.audit_hash,
            }
            for e in events
        ],
        "expiry_warnings": [k for k in expiry if k["warning"]],
    }


# --- actions -------------------------------------------------------------------------------------
def _event(
    srv: ServerContext,
    conn: Connection,
    rot_id: int,
    action: str,
    actor: str,
    forced: bool,
    fraction: float,
    reason: str | None,
    subject: dict[str, Any],
) -> None:
    _claim_log(srv, conn)
    log = audit_log(srv)
    head = log.append(
        actor,
        f"rotation-{action}",
        {"rotation": rot_id, "forced": forced, "fraction": fraction, "reason": reason, **subject},
    )
    conn.execute(
        insert(m.rotation_events).values(
            rotation_id=rot_id,
            at=store.now_s(),
            action=action,
            actor=actor,
            forced=forced,
            fraction=round(fraction * 1000),
            reason=reason,
            audit_seq=head.seq,
            audit_hash=head.hash,
            audit_log_id=log.log_id,
            audit_node=_node_name(srv)[:300],
        )
    )


def _apply_keylist(srv: ServerContext, doc: bytes) -> TrustStore:
    current = srv.trust.fresh()
    if not isinstance(current, TrustStore):
        raise ServerError(ErrorCode.UNTRUSTED_KEY, "key lists need a trust bundle (root)", 409)
    try:
        return current.apply_update(doc)
    except OtaError as err:
        raise ServerError(
            err.code, err.detail, 409 if err.code == ErrorCode.REPLAY else 400
        ) from None


def _kid(value: Any, what: str) -> bytes:
    try:
        kid = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        kid = b""
    if len(kid) != 16:
        raise ServerError(ErrorCode.MALFORMED, f"{what} must be a 32-hex-digit key id", 400)
    return kid


def _usable(ts: TrustStore, kid: bytes) -> bool:
    return any(k.key_id == kid for k in ts.usable(Role.FIRMWARE, None))


def start(srv: ServerContext, actor: str, body: dict[str, Any], doc: bytes) -> int:
    old, new = _kid(body.get("old_kid"), "old_kid"), _kid(body.get("new_kid"), "new_kid")
    threshold = body.get("threshold", DEFAULT_THRESHOLD)
    unreachable = body.get("unreachable_after", DEFAULT_UNREACHABLE)
    if not isinstance(threshold, int | float) or not 0 < threshold <= 1:
        raise ServerError(ErrorCode.MALFORMED, "threshold must be in (0, 1]", 400)
    if not isinstance(unreachable, int) or unreachable <= 0:
        raise ServerError(ErrorCode.MALFORMED, "unreachable_after must be seconds > 0", 400)
    current = srv.trust.fresh()
    if not isinstance(current, TrustStore) or not _usable(current, old):
        raise ServerError(ErrorCode.UNTRUSTED_KEY, "old_kid is not a usable key today", 400)
    new_store = _apply_keylist(srv, doc)
    if not _usable(new_store, new):
        raise ServerError(ErrorCode.UNTRUSTED_KEY, "the key list does not add new_kid", 400)
    if not _usable(new_store, old):
        raise ServerError(
            ErrorCode.ROTATION_STATE,
            "a start list must keep the old key (devices still run releases signed with it); "
            "remove it with `rotation finish`",
            400,
        )
    target = {k: body.get(k) for k in ("model", "hw_rev", "group")}
    for k, v in target.items():
        if v is not None and (not isinstance(v, str) or not 0 < len(v) <= 64):
            raise ServerError(ErrorCode.MALFORMED, f"{k} must be a short string", 400)
    with srv.db.write() as conn:
        cur = current_rotation(conn)
        if cur is not None and cur.state in ACTIVE_STATES:
            raise ServerError(
                ErrorCode.ROTATION_STATE, f"rotation {cur.id} is still {cur.state}", 409
            )
        store.put_keylist(conn, new_store.version, doc)
        rid = int(
            conn.execute(
                insert(m.rotations).values(
                    state="started",
                    old_kid=old.hex(),
                    new_kid=new.hex(),
                    start_version=new_store.version,
                    threshold=round(threshold * 1000),
                    unreachable_after=unreachable,
                    target_model=target["model"],
                    target_hw_rev=target["hw_rev"],
                    target_group=target["group"],
                    started_at=store.now_s(),
                )
            ).inserted_primary_key[0]  # type: ignore[index]
        )
        _event(
            srv, conn, rid, "start", actor, False, 0.0, body.get("reason"),
            {"old_kid": old.hex(), "new_kid": new.hex(), "keylist_version": new_store.version},
        )  # fmt: skip
    srv.trust.replace(new_store)
    return rid


def _gate(
    conn: Connection, rot: Row[Any], role: str, force: bool, reason: Any
) -> tuple[float, bool]:
    """(fraction, forced): refuse below threshold unless a security officer forces it."""
    progress = fleet_progress(conn, rot, store.now_s())
    if progress["threshold_met"]:
        return progress["fraction"], False
    if not force:
        raise ServerError(
            ErrorCode.ROTATION_PENDING,
            f"only {progress['fraction']:.1%} of {progress['targeted']} devices are on key list "
            f"v{rot.start_version} (threshold {rot.threshold / 10:.1f}%); wait, or force it "
            "(security officer, with --reason)",
            409,
        )
    if role != "security-officer":
        raise ServerError(ErrorCode.FORBIDDEN, "only a security officer may force", 403)
    if not isinstance(reason, str) or not reason.strip():
        raise ServerError(ErrorCode.USAGE, "a forced step needs a reason", 400)
    return progress["fraction"], True


def advance(srv: ServerContext, actor: str, role: str, rid: int, body: dict[str, Any]) -> Any:
    with srv.db.write() as conn:
        rot = rotation_by_id(conn, rid)
        if rot.state != "started":
            raise ServerError(ErrorCode.ROTATION_STATE, f"rotation {rid} is {rot.state}", 409)
        fraction, forced = _gate(conn, rot, role, bool(body.get("force")), body.get("reason"))
        conn.execute(
            update(m.rotations)
            .where(m.rotations.c.id == rid)
            .values(state="advanced", advanced_at=store.now_s())
        )
        _event(
            srv, conn, rid, "advance", actor, forced, fraction, body.get("reason"),
            {"release_kid": rot.new_kid, "retired_kid": rot.old_kid},
        )  # fmt: skip
        return {"id": rid, "state": "advanced", "forced": forced, "release_kid": rot.new_kid}


def finish(
    srv: ServerContext, actor: str, role: str, rid: int, body: dict[str, Any], doc: bytes
) -> Any:
    with srv.db.read() as conn:
        rot = rotation_by_id(conn, rid)
    if rot.state != "advanced":
        raise ServerError(
            ErrorCode.ROTATION_STATE, f"rotation {rid} is {rot.state}; advance it first", 409
        )
    old, new = bytes.fromhex(rot.old_kid), bytes.fromhex(rot.new_kid)
    new_store = _apply_keylist(srv, doc)
    kl = new_store.keylist
    if old not in kl.revoked or kl.key(old) is not None:
        raise ServerError(
            ErrorCode.ROTATION_STATE, "the final key list must remove AND revoke the old key", 400
        )
    if not _usable(new_store, new):
        raise ServerError(ErrorCode.UNTRUSTED_KEY, "the final key list lacks the new key", 400)
    with srv.db.write() as conn:
        rot = rotation_by_id(conn, rid)
        if rot.state != "advanced":
            raise ServerError(ErrorCode.ROTATION_STATE, f"rotation {rid} is {rot.state}", 409)
        fraction, forced = _gate(conn, rot, role, bool(body.get("force")), body.get("reason"))
        store.put_keylist(conn, new_store.version, doc)
        conn.execute(
            update(m.rotations)
            .where(m.rotations.c.id == rid)
            .values(state="finished", final_version=new_store.version, finished_at=store.now_s())
        )
        _event(
            srv, conn, rid, "finish", actor, forced, fraction, body.get("reason"),
            {"revoked_kid": rot.old_kid, "keylist_version": new_store.version},
        )  # fmt: skip
    srv.trust.replace(new_store)
    return {"id": rid, "state": "finished", "forced": forced, "keylist_version": kl.version}


# --- HTTP ----------------------------------------------------------------------------------------
async def _who(srv: ServerContext, request: Request, roles: frozenset[str]) -> tuple[str, str]:
    return await require_role(srv, request, roles, "do this")


READ_ROLES = frozenset({"viewer", "operator", "release-manager", "security-officer"})
OFFICER = frozenset({"security-officer"})


async def _body(srv: ServerContext, request: Request) -> tuple[dict[str, Any], bytes | None]:
    raw = await srv.read_body(request, 4 * srv.settings.max_envelope)
    try:
        obj = loads_json(raw or b"{}")
    except OtaError as err:
        raise ServerError(err.code, err.detail, 400) from None
    if not isinstance(obj, dict):
        raise ServerError(ErrorCode.MALFORMED, "body must be a JSON object", 400)
    doc = None
    if "keylist" in obj:
        try:
            doc = base64.b64decode(str(obj["keylist"]), validate=True)
        except (binascii.Error, ValueError):
            raise ServerError(ErrorCode.MALFORMED, "keylist must be base64", 400) from None
    return obj, doc


def _warn_days(request: Request) -> int:
    v = request.query_params.get("warn_days", str(DEFAULT_WARN_DAYS))
    n = decimal(v)
    if n is None or n > 3650:
        raise ServerError(ErrorCode.MALFORMED, "warn_days must be 0..3650", 400)
    return n


def rotation_routes(srv: ServerContext) -> list[Route]:
    async def start_ep(request: Request) -> Response:
        actor, _ = await _who(srv, request, OFFICER)
        body, doc = await _body(srv, request)
        if doc is None:
            raise ServerError(ErrorCode.MALFORMED, "need keylist (base64)", 400)
        rid = await run_in_threadpool(start, srv, actor, body, doc)
        return JSONResponse({"id": rid, "state": "started"}, status_code=201)

    async def show(request: Request) -> Response:
        await _who(srv, request, READ_ROLES)
        warn = _warn_days(request)
        raw_id = request.path_params.get("rid")

        def work() -> Any:
            with srv.db.read() as conn:
                rot = current_rotation(conn) if raw_id is None else rotation_by_id(conn, raw_id)
                if rot is None:
                    raise ServerError(ErrorCode.NOT_FOUND, "no rotation yet", 404)
                return rotation_view(srv, conn, rot, warn)

        return JSONResponse(await run_in_threadpool(work))

    async def advance_ep(request: Request) -> Response:
        actor, role = await _who(srv, request, ADVANCE_ROLES)
        body, _ = await _body(srv, request)
        rid = int(request.path_params["rid"])
        return JSONResponse(await run_in_threadpool(advance, srv, actor, role, rid, body))

    async def finish_ep(request: Request) -> Response:
        actor, role = await _who(srv, request, OFFICER)
        body, doc = await _body(srv, request)
        if doc is None:
            raise ServerError(ErrorCode.MALFORMED, "need keylist (base64)", 400)
        rid = int(request.path_params["rid"])
        out = await run_in_threadpool(finish, srv, actor, role, rid, body, doc)
        return JSONResponse(out)

    async def expiry_ep(request: Request) -> Response:
        await _who(srv, request, READ_ROLES)
        keys = key_expiry(srv, store.now_s(), _warn_days(request))
        return JSONResponse({"keys": keys, "warnings": [k for k in keys if k["warning"]]})

    async def release_key_ep(request: Request) -> Response:
        await _who(srv, request, READ_ROLES)

        def work() -> Any:
            with srv.db.read() as conn:
                return release_key(conn)

        return JSONResponse(await run_in_threadpool(work))

    return [
        Route("/admin/v1/rotations", start_ep, methods=["POST"]),
        Route("/admin/v1/rotations/current", show, methods=["GET"]),
        Route("/admin/v1/rotations/{rid:int}", show, methods=["GET"]),
        Route("/admin/v1/rotations/{rid:int}/advance", advance_ep, methods=["POST"]),
        Route("/admin/v1/rotations/{rid:int}/finish", finish_ep, methods=["POST"]),
        Route("/admin/v1/keys/expiry", expiry_ep, methods=["GET"]),
        Route("/admin/v1/release-key", release_key_ep, methods=["GET"]),
    ]
