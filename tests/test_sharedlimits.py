"""server/sharedlimits.py: per-device limits and probe counters that hold across nodes.

Three :class:`SharedState` objects are three nodes (each its own PostgreSQL connections) on
one database, driven by one injectable clock, so the counts are exact."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otaguard.server.ratelimit import RateLimit, TokenBuckets
from otaguard.server.sharedlimits import SharedBuckets, SharedProbeDetector, SharedState
from otaguard.server.storage import store
from otaguard.server.storage.db import Database
from tests.pg import PgCluster, pg_cluster  # noqa: F401
from tests.test_checkin_snapshot import register


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def pg_db(pg_cluster: PgCluster) -> Iterator[Database]:
    db = Database(pg_cluster.create_database())
    db.upgrade()
    yield db
    db.dispose()


def _nodes(db: Database, clock: Clock, n: int = 3) -> list[SharedState]:
    return [SharedState(db, clock=clock) for _ in range(n)]


def test_a_device_gets_its_limit_once_across_three_nodes(pg_db: Database) -> None:
    clock = Clock()
    limit = RateLimit(rate=1.0, burst=5)
    buckets = [SharedBuckets(s, limit) for s in _nodes(pg_db, clock)]
    allowed = [b.take("SN-1") == 0.0 for _ in range(10) for b in buckets]
    assert sum(allowed) == 5  # per-node buckets would have let 15 through
    wait = buckets[0].take("SN-1")
    assert wait == pytest.approx(1.0)
    clock.t += 2.0
    assert sum(b.take("SN-1") == 0.0 for b in buckets for _ in range(3)) == 2
    # Another device has a bucket of its own.
    assert buckets[2].take("SN-2") == 0.0


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2), st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0, 3.0]), st.booleans()
        ),
        min_size=1,
        max_size=40,
    )
)
def test_shared_buckets_equal_one_bucket(
    pg_db: Database, ops: list[tuple[int, float, bool]]
) -> None:
    """Whatever node each request reaches, the cluster decides as a single bucket would,
    whether the take comes alone or with a check-in's read (``take_with``: the read's value
    when allowed, the same value an ordinary read gives; nothing when refused)."""
    clock = Clock()
    limit = RateLimit(rate=2.0, burst=3)
    key = f"SN-{uuid.uuid4().hex}"  # a fresh bucket per example (one database for all)
    nodes = [SharedBuckets(s, limit) for s in _nodes(pg_db, clock)]
    model = TokenBuckets(limit, clock=clock)
    _enroll(pg_db, key)
    with pg_db.read() as conn:
        expected = store.checkin_snapshot(conn, key)
    assert expected is not None
    dialect = pg_db.engine.dialect
    for node, dt, with_read in ops:
        clock.t += dt
        allowed = model.take(key) == 0.0
        if not with_read:
            assert (nodes[node].take(key) == 0.0) == allowed
            continue
        wait, fetched = nodes[node].take_with(
            key, lambda: store.checkin_snapshot_prefetch(dialect, key)
        )
        assert (wait == 0.0) == allowed
        if allowed:
            assert fetched is not None and fetched.value == expected
        else:
            assert fetched is None


def _enroll(db: Database, serial: str) -> None:
    with db.write() as conn:
        register(conn, serial)


def test_take_with_reads_in_the_same_round_trip(pg_db: Database) -> None:
    """One statement sent per allowed check-in (the take and the read in one pipeline), an
    unknown device's read is None, and a device refused on this node alone costs nothing."""
    clock = Clock()
    shared = SharedState(pg_db, clock=clock)
    b = SharedBuckets(shared, RateLimit(rate=0.001, burst=2))
    dialect = pg_db.engine.dialect
    _enroll(pg_db, "SN-P")
    shared.prune(3600.0)  # due once a minute: done now, so only the takes count below
    before = shared.statements
    wait, fetched = b.take_with("SN-P", lambda: store.checkin_snapshot_prefetch(dialect, "SN-P"))
    assert wait == 0.0 and fetched is not None and fetched.value is not None
    assert fetched.value.device.serial == "SN-P" and fetched.value.pending is None
    wait, fetched = b.take_with(
        "SN-NONE", lambda: store.checkin_snapshot_prefetch(dialect, "SN-NONE")
    )
    assert wait == 0.0 and fetched is not None and fetched.value is None
    assert shared.statements == before + 2
    assert b.take_with("SN-P", lambda: store.checkin_snapshot_prefetch(dialect, "SN-P"))[0] == 0
    wait, fetched = b.take_with("SN-P", lambda: store.checkin_snapshot_prefetch(dialect, "SN-P"))
    assert wait > 0 and fetched is None
    assert shared.statements == before + 3  # refused by this node's own bucket: no round trip


def test_concurrent_takes_on_three_nodes_are_exact(pg_db: Database) -> None:
    clock = Clock()  # frozen: no refill, the bucket holds exactly ``burst``
    limit = RateLimit(rate=0.001, burst=20)
    buckets = [SharedBuckets(s, limit) for s in _nodes(pg_db, clock)]
    results: list[bool] = []
    lock = threading.Lock()

    def hammer(b: SharedBuckets) -> None:
        for _ in range(25):
            ok = b.take("SN-hot") == 0.0
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=hammer, args=(b,)) for b in buckets for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 150 and sum(results) == 20


def test_probe_detector_counts_every_node_and_flags_once(pg_db: Database) -> None:
    clock = Clock()
    dets = [SharedProbeDetector(s, "refusal", 4, 60.0) for s in _nodes(pg_db, clock)]
    assert [d.hit("SN-9") for d in dets] == [False, False, False]
    assert not any(d.flagged("SN-9") for d in dets)
    assert dets[1].hit("SN-9") is True  # the 4th refusal, on whichever node
    assert [d.hit("SN-9") for d in dets] == [False, False, False]  # flagged once
    assert all(d.flagged("SN-9") for d in dets)
    # Outside the window old refusals no longer count.
    assert dets[0].hit("SN-10") is False
    clock.t += 61.0
    assert [dets[i % 3].hit("SN-10") for i in range(3)] == [False, False, False]
    assert dets[0].hit("SN-10") is True
    # Detectors of another kind count separately.
    other = SharedProbeDetector(SharedState(pg_db, clock=clock), "rate_limit", 4, 60.0)
    assert other.hit("SN-9") is False and not other.flagged("SN-9")


def test_database_away_falls_back_to_local_buckets(pg_cluster: PgCluster) -> None:
    db = Database(f"postgresql+psycopg://postgres@/nope?host={pg_cluster.socket_dir}/absent")
    shared = SharedState(db, clock=Clock())
    b = SharedBuckets(shared, RateLimit(rate=0.001, burst=2))
    assert [b.take("SN-1") == 0.0 for _ in range(3)] == [True, True, False]
    assert shared.errors == 1  # one failed attempt, then local until RETRY_SHARED_AFTER
    # With a read: the local bucket decides and nothing was read (the caller reads itself).
    b2 = SharedBuckets(SharedState(db, clock=Clock()), RateLimit(rate=0.001, burst=1))
    read = lambda: store.checkin_snapshot_prefetch(db.engine.dialect, "SN-2")  # noqa: E731
    assert b2.take_with("SN-2", read) == (0.0, None)
    wait, fetched = b2.take_with("SN-2", read)
    assert wait > 0 and fetched is None
    db.dispose()


def test_shared_limits_refuse_sqlite(tmp_path: object) -> None:
    with pytest.raises(ValueError):
        SharedState(Database(f"sqlite:///{tmp_path}/o.db"))


def test_a_flood_on_one_node_stops_reaching_the_database(pg_db: Database) -> None:
    """Once a node alone granted the whole limit, its own bucket refuses without a round
    trip; refusals of a flagged identity write nothing more."""
    clock = Clock()
    shared = SharedState(pg_db, clock=clock)
    b = SharedBuckets(shared, RateLimit(rate=0.001, burst=5))
    probes = SharedProbeDetector(shared, "rate_limit", 3, 60.0)
    assert [b.take("SN-F") == 0.0 for _ in range(5)] == [True] * 5
    before = shared.statements
    assert all(b.take("SN-F") > 0 for _ in range(50))
    assert shared.statements == before  # refused locally
    assert [probes.hit("SN-F") for _ in range(3)] == [False, False, True]
    before = shared.statements
    assert not any(probes.hit("SN-F") for _ in range(50))
    assert shared.statements == before


def test_a_cluster_refusal_gives_the_local_token_back(pg_db: Database) -> None:
    """Node A's own bucket counts only what the cluster granted through A: refusals there
    (the device spent its limit on node B) must not make A refuse once the cluster refills."""
    clock = Clock()
    limit = RateLimit(rate=1.0, burst=3)
    a, b = (SharedBuckets(s, limit) for s in _nodes(pg_db, clock, 2))
    assert all(b.take("SN-R") == 0.0 for _ in range(3))
    assert all(a.take("SN-R") > 0 for _ in range(5))  # the cluster refuses, A refunds
    clock.t += 1.0
    assert a.take("SN-R") == 0.0  # one token refilled, and A's own bucket agrees
    assert b.take("SN-R") > 0
