"""The audit trails as the dashboard shows them: verified on every view.

Rotation log: the same check as ``otaguard audit verify --server-data-dir``: every hash link,
every seal against the server's audit-sealing key, and the newest record the database's
rotation history names (the anchor: a log cut back to an earlier seal no longer holds it). A
live log may end in records no seal covers yet; those are reported, not refused.

Signing log (``server run --signing-audit-log`` with the signing service's seal keys): the
signing service's log, or a copy of it, checked the same way but without an anchor (the
signing service's state database holds that: ``audit verify --state`` on its host). Instead,
every release the server holds is looked up in it: the ``sign-manifest`` record of its manifest
digest says who asked for the signature and when; a release without one is flagged.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from ...crypto.keys import PublicKey
from ...errors import AuditError
from ...signing.audit import read_records, verify_log
from ..admin_api.rotation import audit_anchor, audit_log_path, local_log_id, log_owner

if TYPE_CHECKING:
    from ..context import ServerContext

SHOWN = 50
OP_SIGN = "sign-manifest"  # signing.service.OP_SIGN (the server imports no signing service)


def rotation_audit(srv: ServerContext) -> dict[str, Any]:
    path = audit_log_path(srv)
    with srv.db.read() as conn:
        anchor = audit_anchor(conn)
        owner = log_owner(conn)
    out: dict[str, Any] = {
        "log_path": str(path),
        "anchor": None if anchor is None else {"seq": anchor.seq, "hash": anchor.hash},
        "sealed": srv.settings.audit_sealer is not None,
        "records": [],
        "verify": None,
        "kept_at": None,
    }
    if owner is not None and owner[0] != local_log_id(srv):
        out["kept_at"] = owner[1]  # another node's log: the anchor is not this node's to check
        return out
    if not path.exists():
        return out
    sealer = srv.settings.audit_sealer
    try:
        report = verify_log(
            path,
            [sealer.public_key] if sealer is not None else [],
            allow_unsealed_tail=True,
            expect_head=anchor,
            allow_torn_tail=True,  # a record being appended right now
        )
        out["verify"] = {"valid": True, **report.to_dict()}
    except AuditError as err:
        out["verify"] = {"valid": False, "error": err.code.value, "detail": err.detail}
        return out
    recs = []
    try:
        for r in read_records(path):
            recs.append(r.to_dict())
            del recs[:-SHOWN]
    except AuditError:
        pass  # a torn last line (being written): the records before it are shown
    out["records"] = recs[::-1]
    return out


@dataclass(frozen=True)
class SigningAuditSource:
    path: Path
    keys: tuple[PublicKey, ...]


_SIGNING: WeakKeyDictionary[ServerContext, SigningAuditSource] = WeakKeyDictionary()
_SIGNING_LOCK = threading.Lock()


def configure_signing_audit(srv: ServerContext, path: Path, keys: list[PublicKey]) -> None:
    """Show (and verify) the signing service's audit log at ``path`` on the audit page."""
    with _SIGNING_LOCK:
        _SIGNING[srv] = SigningAuditSource(path, tuple(keys))


def signing_audit(srv: ServerContext, releases: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The signing log's verification and who asked for each release's signature (None: no
    log configured)."""
    with _SIGNING_LOCK:
        src = _SIGNING.get(srv)
    if src is None:
        return None
    out: dict[str, Any] = {"log_path": str(src.path), "verify": None, "requested": {}}
    if not src.path.exists():
        out["verify"] = {"valid": False, "error": "E_NOT_FOUND", "detail": "no such file"}
        return out
    try:
        report = verify_log(src.path, list(src.keys), allow_unsealed_tail=True)
    except AuditError as err:
        out["verify"] = {"valid": False, "error": err.code.value, "detail": err.detail}
        return out
    out["verify"] = {"valid": True, **report.to_dict()}
    signed: dict[str, dict[str, Any]] = {}
    for r in read_records(src.path):
        digest = r.subject.get("manifest_digest")
        if r.op == OP_SIGN and isinstance(digest, str):
            signed[digest] = {"actor": r.actor, "time": r.time, "seq": r.seq}
    out["requested"] = {rel["id"]: signed.get(rel["manifest_digest"]) for rel in releases}
    out["unaccounted"] = [rel["id"] for rel in releases if rel["manifest_digest"] not in signed]
    return out
