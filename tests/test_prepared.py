"""Prepared statements (server/storage/prepared.py) behave exactly like SQLAlchemy Core executions.

The cross-check (tests/prepared_check.py): the full device flow and two phased-campaign
flows run again here against a real server on SQLite and PostgreSQL, with every prepared
execution also run through Core in the same transaction; the two must agree (rows, column
names and value types; for writes, the table contents). tests/test_prepared_delta.py does the
same for the delta flows.

Then what the cross-check cannot reach: driver errors become ``E_DATABASE``, a lost
PostgreSQL connection invalidates the pool as an ordinary execution does, and the plans that
the fast path cannot run faithfully are refused when they are built.
"""

# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as parameters)
from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, insert, select, text

from otaguard.errors import ErrorCode, ServerError
from otaguard.server.storage import models as m
from otaguard.server.storage import store
from otaguard.server.storage.db import Database, sqlite_url
from otaguard.server.storage.prepared import Prepared, in_consts
from tests.pg import PgCluster, db_url, fleet_ca, harness, pg_cluster, server_tls  # noqa: F401
from tests.prepared_check import cross_check  # noqa: F401  (autouse)
from tests.test_campaign_server import (  # noqa: F401  (re-run under the cross-check)
    hc,
    lab,
    test_failing_self_test_pauses_campaign,
    test_phased_campaign_end_to_end,
)
from tests.test_server_api import hxt, test_full_device_flow  # noqa: F401


# --- errors ------------------------------------------------------------------------------------
def _seed(db: Database) -> None:
    with db.write() as conn:
        store.register_device(
            conn,
            serial="dev-1",
            model="gw",
            hw_rev="r1",
            groups=["lab"],
            cert_fingerprint="ab" * 32,
            cert_not_after=2_000_000_000,
        )


def test_rows_match_core_and_booleans_are_bool(db_url: str) -> None:
    db = Database(db_url)
    db.upgrade()
    try:
        _seed(db)
        with db.read() as conn:
            dev = store.device_by_serial(conn, "dev-1")
            assert store.device_by_serial(conn, "nobody") is None
        assert dev is not None
        assert dev.serial == "dev-1" and dev[1] == "dev-1"
        assert dev.revoked is False and dev.suspect is False  # SQLite stores 0: bool again
    finally:
        db.dispose()


def test_driver_error_is_e_database_and_the_next_transaction_works(db_url: str) -> None:
    db = Database(db_url)
    db.upgrade()
    broken = Prepared(select(m.devices.c.id).where(text("no_such_column = 1")))
    try:
        _seed(db)
        with pytest.raises(ServerError) as ei, db.read() as conn:
            broken.execute(conn)
        assert ei.value.code is ErrorCode.DATABASE and ei.value.status == 503
        with db.read() as conn:
            assert store.device_by_serial(conn, "dev-1") is not None
    finally:
        db.dispose()


def test_lost_postgresql_connection_invalidates_the_pool(pg_cluster: PgCluster) -> None:
    """After a PostgreSQL restart every pooled connection is dead. The first transaction
    that meets one fails (503; the device retries); the pool is invalidated then, so the
    next transaction reconnects instead of meeting the next dead connection."""
    url = pg_cluster.create_database()
    db = Database(url, pool_size=4)
    db.upgrade()
    other = Database(url, pool_size=1)  # not from db's pool: it must not kill itself
    try:
        _seed(db)
        conns = [db.engine.connect() for _ in range(4)]  # fill the pool with live connections
        pids = [c.exec_driver_sql("SELECT pg_backend_pid()").scalar() for c in conns]
        for c in conns:
            c.close()
        with other.engine.connect() as killer:
            for pid in pids:
                killer.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
        with pytest.raises(ServerError) as ei, db.read() as conn:
            store.device_by_serial(conn, "dev-1")
        assert ei.value.code is ErrorCode.DATABASE
        for _ in range(4):
            with db.read() as conn:
                assert store.device_by_serial(conn, "dev-1") is not None
    finally:
        db.dispose()
        other.dispose()


# --- plans the fast path refuses -----------------------------------------------------------------
def _scratch_db(tmp_path: Path) -> Database:
    db = Database(sqlite_url(tmp_path / "x.db"))
    db.upgrade()
    return db


def test_expanding_in_is_refused_and_in_consts_works(tmp_path: Path) -> None:
    db = _scratch_db(tmp_path)
    try:
        _seed(db)
        expanding = Prepared(select(m.devices.c.id).where(m.devices.c.serial.in_(("dev-1", "x"))))
        consts = Prepared(select(m.devices.c.id).where(in_consts(m.devices.c.serial, ["dev-1"])))
        with db.read() as conn:
            with pytest.raises(TypeError, match="expanding IN"):
                expanding.execute(conn)
            assert consts.execute(conn).scalar() == 1
    finally:
        db.dispose()


def test_execution_time_defaults_are_refused(tmp_path: Path) -> None:
    meta = MetaData()
    t = Table(
        "with_default",
        meta,
        Column("id", Integer, primary_key=True),
        Column("name", String(8), default="x"),
    )
    db = _scratch_db(tmp_path)
    try:
        meta.create_all(db.engine)
        with db.write() as conn, pytest.raises(TypeError, match="column defaults"):
            Prepared(insert(t)).execute(conn, {"id": 1})
        with db.write() as conn:  # with every value given it runs
            Prepared(insert(t)).execute(conn, {"id": 1, "name": "y"})
        with db.read() as conn:
            assert conn.execute(select(t.c.name)).scalar() == "y"
    finally:
        db.dispose()


def test_missing_parameter_is_an_internal_error(tmp_path: Path) -> None:
    db = _scratch_db(tmp_path)
    try:
        q = Prepared(select(m.devices.c.id).where(m.devices.c.serial == bindparam("serial")))
        with pytest.raises(ServerError) as ei, db.read() as conn:
            q.execute(conn, {})
        assert ei.value.code is ErrorCode.INTERNAL
    finally:
        db.dispose()


def test_update_columns_come_from_the_parameters(tmp_path: Path) -> None:
    """One UPDATE statement, different SET lists: each parameter set gets its own plan, and a
    column not named keeps its value."""
    db = _scratch_db(tmp_path)
    try:
        _seed(db)
        upd = Prepared(m.devices.update().where(m.devices.c.id == bindparam("b_id")))
        with db.write() as conn:
            assert upd.execute(conn, {"b_id": 1, "last_error": "E_X"}).rowcount == 1
            assert upd.execute(conn, {"b_id": 1, "current_version": "2.0"}).rowcount == 1
            assert upd.execute(conn, {"b_id": 99, "current_version": "9"}).rowcount == 0
        with db.read() as conn:
            dev = store.device_by_serial(conn, "dev-1")
        assert dev is not None
        assert (dev.last_error, dev.current_version) == ("E_X", "2.0")
    finally:
        db.dispose()


def test_constants_in_the_statement_as_core_treats_them(tmp_path: Path) -> None:
    """A value built into the statement is used unless a parameter of its rendered name is
    given (the cross-check fixture compares each execution with Core's)."""
    db = _scratch_db(tmp_path)
    try:
        _seed(db)
        q = Prepared(
            select(m.devices.c.id).where(in_consts(m.devices.c.serial, ["dev-1"]))  # param_1
        )
        with db.read() as conn:
            assert q.execute(conn, {}).scalar() == 1
            assert q.execute(conn, {"param_1": "nobody"}).scalar() is None
            assert conn.execute(q.stmt, {"param_1": "nobody"}).scalar() is None  # Core too
    finally:
        db.dispose()


def test_a_parameter_used_twice(tmp_path: Path) -> None:
    """One named parameter at two places: SQLite's positional ``?`` gets it twice."""
    db = _scratch_db(tmp_path)
    try:
        _seed(db)
        d = m.devices.c
        q = Prepared(select(d.id).where((d.serial == bindparam("s")) | (d.model == bindparam("s"))))
        with db.read() as conn:
            assert q.execute(conn, {"s": "dev-1"}).scalar() == 1
            assert q.execute(conn, {"s": "gw"}).scalar() == 1
            assert q.execute(conn, {"s": "r1"}).scalar() is None
    finally:
        db.dispose()
