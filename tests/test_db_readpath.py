"""``Database.read(snapshot=False)``: the check-in's read-only path on PostgreSQL runs its
statements in autocommit (no BEGIN/COMMIT round trips) without leaking autocommit into the
pooled connection's later write transactions."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import pytest

from otaguard.server.storage import store
from otaguard.server.storage.db import Database
from tests.pg import PgCluster, pg_cluster  # noqa: F401


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
