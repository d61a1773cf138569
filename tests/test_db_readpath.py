"""``Database.read(snapshot=False)``: the check-in's read-only path on PostgreSQL runs its
statements in autocommit (no BEGIN/COMMIT round trips) without leaking autocommit into the
pooled connection's later write transactions."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import event, text

from otaguard.errors import ErrorCode, ServerError
from otaguard.server.pki.ca import FleetCA
from otaguard.server.runtime import share_limits
from otaguard.server.sharedlimits import SharedBuckets
from otaguard.server.storage import store
from otaguard.server.storage.db import Database
from tests.pg import PgCluster, fleet_ca, harness, pg_cluster, server_tls  # noqa: F401


def test_autocommit_reads_leave_write_transactions_atomic(pg_cluster: PgCluster) -> None:
    """``Database.read(snapshot=False)`` (the check-in's read path on PostgreSQL) runs in
    autocommit; the pooled connection must come back transactional, or a later write
    transaction would commit statement by statement."""
    db = Database(pg_cluster.create_database(), pool_size=1)
    db.upgrade()
    try:
        with db.read(snapshot=False) as conn:
            assert conn.connection.driver_connection.autocommit is True  # type: ignore[union-attr]
            assert store.latest_keylist(conn) is None
        with pytest.raises(RuntimeError), db.write() as conn:
            store.put_keylist(conn, 7, b"doc")
            raise RuntimeError("roll back")
        with db.read() as conn:
            assert store.latest_keylist(conn) is None
    finally:
        db.dispose()


def test_a_repoll_checkin_is_one_round_trip_with_shared_limits(
    pg_cluster: PgCluster, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path
) -> None:
    """With the per-device limit in PostgreSQL, a check-in that changes nothing sends one
    statement (the limit's, with the device's snapshot in the same pipeline) and checks no
    pooled connection out; anything the snapshot says must be refused still is."""
    with harness(pg_cluster.create_database(), fleet_ca, server_tls, tmp_path) as h:
        share_limits(h.srv, h.db)
        buckets = h.srv.device_buckets
        assert isinstance(buckets, SharedBuckets)
        checkouts: list[object] = []
        event.listen(h.db.engine, "checkout", lambda *a: checkouts.append(a))
        dev = h.enroll("SN-RT")
        c = h.client(dev)
        body = {"version": "1.0.0"}
        assert c.post("/v1/checkin", json=body).status_code == 200  # first: writes last_seen
        buckets.shared.prune(3600.0)  # due once a minute: not within the count below
        before, pooled = buckets.shared.statements, len(checkouts)
        for _ in range(5):
            r = c.post("/v1/checkin", json=body)
            assert r.status_code == 200 and r.json()["update"] is None
        assert buckets.shared.statements - before == 5
        assert len(checkouts) == pooled
        with h.db.write() as conn:
            store.revoke_device(conn, "SN-RT")
        r = c.post("/v1/checkin", json=body)
        assert r.status_code == 403 and r.json()["error"] == "E_CERT_REVOKED"


def test_read_on_demand_checks_out_only_when_used(pg_cluster: PgCluster) -> None:
    db = Database(pg_cluster.create_database(), pool_size=1)
    db.upgrade()
    checkouts: list[object] = []
    event.listen(db.engine, "checkout", lambda *a: checkouts.append(a))
    try:
        with db.read_on_demand():
            pass
        assert checkouts == []
        with db.read_on_demand() as conn:
            assert store.latest_keylist(conn) is None
            assert conn.connection.driver_connection.autocommit is True  # type: ignore[union-attr]
        assert len(checkouts) == 1
        # A database error inside is the read's: E_DATABASE (503), not an internal error.
        with pytest.raises(ServerError) as err, db.read_on_demand() as conn:
            conn.execute(text("SELECT no_such_column FROM devices"))
        assert err.value.code is ErrorCode.DATABASE
        # and the connection went back to the pool in a usable state
        with db.read() as conn:
            assert store.latest_keylist(conn) is None
    finally:
        db.dispose()
