"""server/trustsync.py on its own: a node's anchors follow key lists another process
publishes — by notification (PostgreSQL), after a lost listening connection, and by the
re-check alone (SQLite) — and never go back or accept a list they cannot verify."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.device.lab import Lab
from otaguard.server.context import TrustState
from otaguard.server.storage import store
from otaguard.server.storage.db import Database
from otaguard.server.storage.notify import CAMPAIGNS, announce
from otaguard.server.trustsync import TrustSync
from otaguard.trust.store import TrustStore
from tests.pg import PgCluster, db_url, pg_cluster  # noqa: F401


def _wait(cond: Callable[[], bool], seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _version(trust: TrustState) -> int:
    r = trust.resolver
    assert isinstance(r, TrustStore)
    return r.version


def _node(url: str, lab: Lab, recheck: float) -> tuple[Database, TrustState, TrustSync]:
    db = Database(url)
    trust = TrustState(lab.bundle.store())
    sync = TrustSync(db, trust, recheck=recheck)
    trust.refresh = sync.refresh
    return db, trust, sync


def _publish(db: Database, doc: bytes, version: int) -> None:
    with db.write() as conn:
        store.put_keylist(conn, version, doc)


def test_notification_reloads_within_the_recheck_interval(pg_cluster: PgCluster) -> None:
    url = pg_cluster.create_database()
    Database(url).upgrade()
    lab = Lab()
    db, trust, sync = _node(url, lab, recheck=3600.0)  # only a notification can wake it
    other = Database(url)
    try:
        sync.start()
        time.sleep(0.3)  # LISTEN registered
        _publish(other, lab.keylist_update([SoftwareSigner(generate_private_key("ed25519"))]), 2)
        assert _wait(lambda: _version(trust) == 2)
    finally:
        sync.stop()
        db.dispose()
        other.dispose()


def test_lost_listener_connection_is_caught_up(pg_cluster: PgCluster) -> None:
    """The listening backend is terminated and a list is published while it is gone: the
    reconnect re-reads the database (no notification is ever delivered for it)."""
    url = pg_cluster.create_database()
    Database(url).upgrade()
    lab = Lab()
    db, trust, sync = _node(url, lab, recheck=0.5)
    other = Database(url)
    try:
        sync.start()
        time.sleep(0.3)
        dbname = url.split("/")[-1].split("?")[0]
        with psycopg.connect(
            host=str(pg_cluster.socket_dir), user="postgres", dbname="postgres", autocommit=True
        ) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND query LIKE 'LISTEN%%'",
                (dbname,),
            )
        _publish(other, lab.keylist_update(), 2)
        assert _wait(lambda: _version(trust) == 2)
    finally:
        sync.stop()
        db.dispose()
        other.dispose()


def test_recheck_alone_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    Database(url).upgrade()
    lab = Lab()
    db, trust, sync = _node(url, lab, recheck=0.1)
    other = Database(url)
    try:
        sync.start()
        _publish(other, lab.keylist_update(), 2)
        _publish(other, lab.keylist_update(), 3)
        assert _wait(lambda: _version(trust) == 3)
        assert sync.reloads == 2  # each list replayed in order
    finally:
        sync.stop()
        db.dispose()
        other.dispose()


def test_fresh_reads_the_database_before_a_decision(db_url: str) -> None:
    Database(db_url).upgrade()
    lab = Lab()
    db, trust, _sync = _node(db_url, lab, recheck=3600.0)  # never started: no background
    other = Database(db_url)
    try:
        _publish(other, lab.keylist_update(), 2)
        assert _version(trust) == 1  # the cache alone is stale ...
        fresh = trust.fresh()  # ... the decision path is not
        assert isinstance(fresh, TrustStore) and fresh.version == 2
        # Never back: an older store handed to replace() is ignored.
        trust.replace(lab.bundle.store())
        assert _version(trust) == 2
    finally:
        db.dispose()
        other.dispose()


def test_a_list_this_node_cannot_verify_is_not_applied(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A list from another root (a node started with another bundle) stays unapplied; the
    node keeps the anchors it can verify and says why."""
    Database(db_url).upgrade()
    lab, stranger = Lab(), Lab()
    db, trust, _sync = _node(db_url, lab, recheck=3600.0)
    other = Database(db_url)
    try:
        stranger.keylist_version = 1
        _publish(other, stranger.keylist_update(), 2)
        with caplog.at_level("ERROR", logger="otaguard.server"):
            trust.fresh()
        assert _version(trust) == 1
        assert "does not verify" in caplog.text
    finally:
        db.dispose()
        other.dispose()


def test_concurrent_refreshes_apply_each_list_once(db_url: str) -> None:
    Database(db_url).upgrade()
    lab = Lab()
    db, trust, sync = _node(db_url, lab, recheck=3600.0)
    other = Database(db_url)
    try:
        for v in (2, 3, 4):
            _publish(other, lab.keylist_update(), v)
        threads = [threading.Thread(target=trust.fresh) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _version(trust) == 4 and sync.reloads == 3
    finally:
        db.dispose()
        other.dispose()


def test_campaign_changes_wake_the_other_nodes(pg_cluster: PgCluster) -> None:
    """A campaign change committed by one node calls the others' ``on_campaigns`` (their
    campaign cache then refreshes at the next request); a rolled-back one does not."""
    url = pg_cluster.create_database()
    Database(url).upgrade()
    woken = threading.Event()
    db = Database(url)
    sync = TrustSync(db, TrustState(None), recheck=3600.0, on_campaigns=woken.set)
    other = Database(url)
    try:
        sync.start()
        assert woken.wait(5)  # once at connect: whatever changed while not listening
        woken.clear()
        with pytest.raises(RuntimeError), other.write() as conn:
            announce(conn, CAMPAIGNS)
            raise RuntimeError("rolled back: nothing is delivered")
        assert not woken.wait(0.5)
        with other.write() as conn:
            announce(conn, CAMPAIGNS)
        assert woken.wait(5)
    finally:
        sync.stop()
        db.dispose()
        other.dispose()
