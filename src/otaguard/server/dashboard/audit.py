"""The rotation audit trail as the dashboard shows it: verified on every view.

The same check as ``otaguard audit verify --server-data-dir``: every hash link, every seal
against the server's audit-sealing key, and the newest record the database's rotation history
names (the anchor: a log cut back to an earlier seal no longer holds it). A live log may end
in records no seal covers yet; those are reported, not refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import AuditError
from ...signing.audit import read_records, verify_log
from ..admin_api.rotation import audit_anchor

if TYPE_CHECKING:
    from ..context import ServerContext

SHOWN = 50


def rotation_audit(srv: ServerContext) -> dict[str, Any]:
    path = srv.blobs.root.parent / "audit" / "rotation-audit.log"
    with srv.db.read() as conn:
        anchor = audit_anchor(conn)
    out: dict[str, Any] = {
        "log_path": str(path),
        "anchor": None if anchor is None else {"seq": anchor.seq, "hash": anchor.hash},
        "sealed": srv.settings.audit_sealer is not None,
        "records": [],
        "verify": None,
    }
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
