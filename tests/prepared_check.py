"""The cross-check of prepared statements against SQLAlchemy Core (tests/test_prepared.py):
an autouse fixture for modules that re-run server flows under it. Every prepared execution is
also run through Core in the same transaction and the two must agree: for a query, the same
column names, rows and value types; for a write, the same rows returned and the same table
contents afterwards (the prepared write runs first in a savepoint that is rolled back, then
Core's for real)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from otaguard.server.storage.prepared import Prepared

_execute = Prepared.execute


# the re-run flows: each must really have gone through the cross-check
FLOWS = {
    "test_full_device_flow",
    "test_phased_campaign_end_to_end",
    "test_failing_self_test_pauses_campaign",
    "test_delta_offer_by_running_digest_and_range",
    "test_device_installs_through_server_delta",
}


def _snapshot(conn: Any, table: Any, mask: int | None) -> list[tuple[Any, ...]]:
    key = list(table.primary_key.columns) or list(table.c)
    rows = conn.execute(select(table).order_by(*key))
    return [tuple(v for i, v in enumerate(r) if i != mask) for r in rows]


def _typed(rows: Any, mask: int | None = None) -> list[list[tuple[Any, type]]]:
    return [[(v, type(v)) for i, v in enumerate(r) if i != mask] for r in rows]


@pytest.fixture(autouse=True)
def cross_check(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[set[str]]:
    checked: set[str] = set()

    def execute(self: Prepared, conn: Any, params: Any = None) -> Any:
        params = dict(params or {})
        stmt: Any = self.stmt
        if stmt.is_dml:
            # PostgreSQL sequences do not roll back: an inserted row's new id differs
            cols = list(stmt.table.c.keys())
            mask = cols.index("id") if stmt.is_insert and "id" in cols else None
            ret = 0 if stmt.is_insert and mask is not None else None  # RETURNING id
            with conn.begin_nested() as sp:
                fast = _execute(self, conn, params)
                fast_after = _snapshot(conn, stmt.table, mask)
                sp.rollback()
            core = conn.execute(stmt, params)
            core_rows = core.all() if core.returns_rows else []
            assert len(fast.all()) == len(core_rows), str(stmt)
            assert _typed(fast, ret) == _typed(core_rows, ret), str(stmt)
            assert fast_after == _snapshot(conn, stmt.table, mask), str(stmt)
            if not stmt.is_insert:  # (psycopg reports -1 for Core's INSERT: not compared)
                assert fast.rowcount == core.rowcount, str(stmt)
        else:
            fast = _execute(self, conn, params)
            core = conn.execute(stmt, params)
            keys = list(core.keys())
            core_rows = core.all()
            assert list(self.plan(conn.dialect, params).row._fields) == keys, str(stmt)
            assert _typed(fast) == _typed(core_rows), str(stmt)
            for row in fast:
                assert list(row._fields) == keys
                assert [getattr(row, k) for k in keys] == list(row)
        checked.add(f"{conn.dialect.name}: {str(stmt)[:60]}")
        return fast

    monkeypatch.setattr(Prepared, "execute", execute)
    yield checked
    if request.node.originalname in FLOWS:
        assert len(checked) >= 5, checked
