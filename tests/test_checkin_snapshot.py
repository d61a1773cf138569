"""The re-poll check-in's one statement (``store.checkin_snapshot``) says what the three reads it
replaces say: the device row (``device_by_serial``), its open assignment's release
(``pending_update``) and the newest key-list version (``latest_keylist``).

A property test over registries of several devices, each with no assignment or one in any
state, against any number of releases and key lists, on SQLite and PostgreSQL. The fast path
decides what a device is offered from this snapshot, so a row that leaks from another device,
a closed assignment that counts as open, or an old key-list version would offer the wrong
thing; each of those makes this test fail.
"""

# ruff: noqa: F811  (pytest fixtures imported from other modules are redefined as parameters)
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, delete

from otaguard.server.storage import models as m
from otaguard.server.storage import store
from otaguard.server.storage.db import Database
from tests.pg import db_url, pg_cluster  # noqa: F401

STATES = ["assigned", "offered", "installing", "done", "failed"]
_serial = itertools.count()


def _release(conn: object, n: int) -> int:
    return store.insert_release(
        conn,  # type: ignore[arg-type]
        {
            "model": "gw",
            "hw_rev": "r1",
            "vendor_id": "v" * 36,
            "class_id": "c" * 36,
            "version": f"1.{n}.0",
            "min_version": None,
            "security_counter": n,
            "sequence_number": n,
            "expires": None,
            "digest_alg": "sha256",
            "manifest_digest": f"{n:064x}",
            "envelope_blob": f"{n + 1:064x}",
            "image_digest": f"{n + 2:064x}",
            "image_size": 1000 + n,
            "image_blob": f"{n + 3:064x}",
            "signers": "[]",
            "description": f"release {n}",
            "uploaded_by": "ci",
        },
    )


def register(conn: Connection, serial: str) -> int:
    """A bare enrolled device (model gw/r1, a certificate valid until 2033)."""
    return store.register_device(
        conn,
        serial=serial,
        model="gw",
        hw_rev="r1",
        groups=[],
        cert_fingerprint="ab" * 32,
        cert_not_after=2_000_000_000,
    )


# Per device: None (no assignment) or (index of its release, assignment state).
fleets = st.lists(
    st.one_of(st.none(), st.tuples(st.integers(0, 2), st.sampled_from(STATES))),
    min_size=1,
    max_size=4,
)


@pytest.fixture
def db(db_url: str) -> Database:
    database = Database(db_url)
    database.upgrade()
    return database


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(fleet=fleets, keylists=st.lists(st.integers(1, 10**6), unique=True, max_size=3))
def test_snapshot_says_what_the_three_reads_say(
    db: Database, fleet: list[tuple[int, str] | None], keylists: list[int]
) -> None:
    with db.write() as conn:
        for table in (m.assignments, m.devices, m.releases, m.keylists):
            conn.execute(delete(table))
        base = next(_serial) * 10
        releases = [_release(conn, base + i) for i in range(3)]
        serials = []
        for plan in fleet:
            serial = f"dev-{next(_serial)}"
            serials.append(serial)
            dev_id = register(conn, serial)
            if plan is not None:
                store.assign(conn, dev_id, releases[plan[0]], None)
                store.set_assignment_state(conn, dev_id, plan[1])
        for version in sorted(keylists):
            store.put_keylist(conn, version, b"doc")
    for snapshot in (True, False):
        with db.read(snapshot=snapshot) as conn:
            assert store.checkin_snapshot(conn, "nobody") is None
            kl = store.latest_keylist(conn)
            for serial, plan in zip(serials, fleet, strict=True):
                snap = store.checkin_snapshot(conn, serial)
                assert snap is not None
                dev = store.device_by_serial(conn, serial)
                assert tuple(snap.device) == tuple(dev)  # type: ignore[arg-type]
                assert snap.device._fields == dev._fields  # type: ignore[attr-defined]
                pending = store.pending_update(conn, dev.id)  # type: ignore[union-attr]
                if pending is None:
                    assert snap.pending is None
                else:
                    assert snap.pending is not None
                    assert tuple(snap.pending) == tuple(pending)
                    assert snap.pending._fields == pending._fields  # type: ignore[attr-defined]
                # and independently of the code under comparison:
                is_open = plan is not None and plan[1] in ("assigned", "offered", "installing")
                assert (snap.pending is not None) == is_open
                if is_open:
                    assert plan is not None and snap.pending is not None
                    assert snap.pending.id == releases[plan[0]]
                    assert snap.pending.assignment_state == plan[1]
                assert snap.keylist_version == (kl.version if kl is not None else None)
                assert snap.keylist_version == (max(keylists) if keylists else None)
