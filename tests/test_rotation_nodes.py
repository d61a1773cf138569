"""Key rotation on several nodes: the rotation audit log is one hash chain with one writer.

The first node that writes a rotation action keeps the cluster's log; the database records the
log's id and where it is with every action. Another node (its own data directory, so its own
log) refuses rotation actions with E_CONFLICT naming that node, before anything is written —
no second chain that the database's anchor would contradict — and the keeping node carries on,
its log still verifying against the anchor.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from otaguard.server.admin_api.rotation import audit_log_path, local_log_id, log_owner
from otaguard.server.app import UpdateServer
from otaguard.server.dashboard.audit import rotation_audit
from otaguard.server.pki.ca import FleetCA
from otaguard.server.pki.mtls import ThreadedServer, server_ssl_context
from otaguard.server.storage import models as m
from tests.dashboard_support import scene
from tests.pg import db_url, fleet_ca, pg_cluster, server_tls  # noqa: F401


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_rotation_actions_go_to_the_node_that_keeps_the_log(
    db_url: str,
    fleet_ca: FleetCA,
    server_tls: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with scene(fleet_ca, server_tls, tmp_path, monkeypatch, devices=1, db_url=db_url) as sc:
        node1 = sc.h.srv
        data2 = tmp_path / "node2"
        node2 = UpdateServer(node1.db, node1.blobs, node1.settings, node1.trust, data_dir=data2)
        ctx = server_ssl_context(
            server_tls / "server.pem", server_tls / "server.key", None, require_client_cert=False
        )
        listener = ThreadedServer(node2.asgi("admin"), ctx).start()
        try:
            officer = httpx.Client(
                base_url=listener.url,
                verify=ssl.create_default_context(cafile=str(tmp_path / "tls" / "ca.pem")),
                headers={"Authorization": f"Bearer {sc.token('security-officer')}"},
            )
            sc.h.clients.append(officer)
            assert log_owner_of(sc) is None
            sc.start_rotation()  # through node 1: its log becomes the cluster's
            owner = log_owner_of(sc)
            assert owner is not None and owner[0] == local_log_id(node1)
            assert str(tmp_path) in owner[1]
            rid = current_rotation_id(sc)

            # Node 2 refuses, names node 1, and writes nothing (no log of its own, no event).
            body = {"force": True, "reason": "INC-42 forced"}
            r = officer.post(f"/admin/v1/rotations/{rid}/advance", json=body)
            assert r.status_code == 409, r.text
            assert r.json()["error"] == "E_CONFLICT"
            assert owner[0] in r.json()["detail"] and str(tmp_path) in r.json()["detail"]
            assert not audit_log_path(node2).exists()
            assert officer.get(f"/admin/v1/rotations/{rid}").json()["state"] == "started"
            assert events(sc) == ["start"]

            # Node 1 carries on; its log verifies against the database's anchor.
            r = sc.api("security-officer").post(f"/admin/v1/rotations/{rid}/advance", json=body)
            assert r.status_code == 200, r.text
            assert events(sc) == ["start", "advance"]
            view = rotation_audit(node1)
            assert view["verify"] is not None and view["verify"]["valid"], view["verify"]
            assert view["kept_at"] is None
            # Node 2's audit page points at node 1 instead of reporting a broken log.
            view2 = rotation_audit(node2)
            assert view2["kept_at"] == owner[1] and view2["verify"] is None
        finally:
            listener.stop()


def log_owner_of(sc: object) -> tuple[str, str] | None:
    with sc.h.db.read() as conn:  # type: ignore[attr-defined]
        return log_owner(conn)


def current_rotation_id(sc: object) -> int:
    with sc.h.db.read() as conn:  # type: ignore[attr-defined]
        return int(conn.execute(select(m.rotations.c.id)).scalar_one())


def events(sc: object) -> list[str]:
    with sc.h.db.read() as conn:  # type: ignore[attr-defined]
        return [
            r.action
            for r in conn.execute(
                select(m.rotation_events.c.action).order_by(m.rotation_events.c.id)
            )
        ]
