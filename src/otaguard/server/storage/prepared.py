"""Statements of the device request path, compiled once and run on the DB-API cursor.

Why: SQLAlchemy Core spends 60-150 µs of Python per execution (cache key, execution context,
result metadata, events) where SQLite needs 5 µs for the indexed read itself; a check-in runs
five to ten such statements, which made SQLAlchemy the largest single item of the update
server's CPU. A :class:`Prepared` statement is still built with Core (one schema, one
dialect-aware compiler: ``?`` for SQLite, ``%(name)s`` for psycopg), but it is compiled once
per dialect (and per set of parameter names, for INSERT and UPDATE, whose columns come from
the parameters), and each execution goes straight to the cursor of the connection that the
caller's transaction (``Database.read()`` / ``write()``) holds. The transaction itself stays
SQLAlchemy's: begin, commit, rollback and pooling are unchanged.

What is kept of SQLAlchemy's execution: the column types' bind and result processors (so a
Boolean comes back as ``bool`` on SQLite too), and its error wrapping: a driver error becomes
the ``DBAPIError`` that Core would raise (``E_DATABASE``, 503, in ``Database``); after a lost
PostgreSQL connection the transaction's rollback, which Core runs, invalidates the pool.
``tests/test_prepared.py`` and ``tests/test_prepared_delta.py`` run every prepared statement
of the device, delta and campaign flows both ways on SQLite and PostgreSQL and compare rows
and table contents.

Limits, refused when the plan is built (a programming error, caught by the tests): no
expanding ``IN`` parameters (write constant lists as :func:`in_consts`), no column defaults
computed at execution (pass every value), no executemany. A bound parameter that carries a
value in the statement (``literal``, ``column + 1``) keeps it unless a parameter of its
rendered name (``param_1``) is given, which replaces it, as in Core.
"""

from __future__ import annotations

import threading
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import Connection, Select, literal
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Delete, Insert, Update
from sqlalchemy.sql.elements import ClauseElement

from ...errors import ErrorCode, ServerError

Processor = Callable[[Any], Any]
T = TypeVar("T")


class Record(Protocol):
    """A result row: columns by attribute (``row.version``) or by position."""

    def __getattr__(self, name: str) -> Any: ...

    def __getitem__(self, index: int) -> Any: ...


def in_consts(column: ColumnElement[Any], values: Iterable[Any]) -> ColumnElement[bool]:
    """``column IN (<constants>)`` with one plain bound parameter per value (a tuple would
    be one "expanding" parameter, rendered anew at every execution)."""
    return column.in_([literal(v, column.type) for v in values])


class _Plan:
    """One compiled form: SQL text, how parameters become the driver's arguments, and how
    a driver row becomes a :class:`Record`."""

    __slots__ = ("binds", "positional", "procs", "returns_rows", "row", "sql")

    def __init__(self, stmt: ClauseElement, dialect: Dialect, keys: Sequence[str] | None) -> None:
        compiled = stmt.compile(dialect=dialect, column_keys=list(keys) if keys else None)
        assert isinstance(compiled, SQLCompiler)
        sql = compiled.string
        if "POSTCOMPILE" in sql:
            raise TypeError(f"expanding IN parameter in a prepared statement: {sql}")
        if getattr(compiled, "insert_prefetch", None) or getattr(compiled, "update_prefetch", None):
            raise TypeError(f"column defaults computed at execution: pass every value: {sql}")
        self.sql = sql
        pos = compiled.positiontup  # the order of ``?`` (a name may repeat), or None: named
        names: list[str] = list(pos if pos is not None else compiled.binds)
        # (name, constant or None, required, bind processor)
        binds: list[tuple[str, Any, bool, Processor | None]] = []
        for name in names:
            bp = compiled.binds[name]
            proc = bp.type.dialect_impl(dialect).bind_processor(dialect)
            constant = not bp.required and bp.callable is None
            binds.append((name, bp.effective_value if constant else None, not constant, proc))
        self.binds = binds
        self.positional = pos is not None
        self.returns_rows = isinstance(stmt, Select) or bool(compiled.effective_returning)
        self.row: Any = None
        self.procs: list[tuple[int, Processor]] = []
        if self.returns_rows:
            cols = list(stmt.exported_columns)  # type: ignore[attr-defined]
            keys_out = [c.key for c in cols]
            if len(set(keys_out)) != len(keys_out):
                raise TypeError(f"duplicate result column names in a prepared statement: {sql}")
            self.row = namedtuple("Record", keys_out)  # type: ignore[misc]
            for i, c in enumerate(cols):
                rp = c.type.dialect_impl(dialect).result_processor(dialect, None)
                if rp is not None:
                    self.procs.append((i, rp))

    def args(self, params: Mapping[str, Any]) -> Any:
        values: list[Any] = []
        for name, const, required, proc in self.binds:
            if required:
                try:
                    v = params[name]
                except KeyError:
                    raise ServerError(
                        ErrorCode.INTERNAL, f"no value for bound parameter {name!r}", 500
                    ) from None
            else:
                v = params.get(name, const)  # as Core: a parameter of its name replaces it
            values.append(v if proc is None else proc(v))
        if self.positional:
            return values
        return {b[0]: v for b, v in zip(self.binds, values, strict=True)}

    def record(self, raw: Sequence[Any]) -> Any:
        if not self.procs:
            return self.row._make(raw)
        vals = list(raw)
        for i, proc in self.procs:
            vals[i] = proc(vals[i])
        return self.row._make(vals)


class Rows:
    """The fetched result of one prepared execution (all rows: these statements return a
    handful at most)."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def first(self) -> Record | None:
        return self._rows[0] if self._rows else None

    def all(self) -> list[Record]:
        return list(self._rows)

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def __iter__(self) -> Iterator[Record]:
        return iter(self._rows)


class Prepared:
    """A Core statement (SELECT, INSERT, UPDATE, DELETE, with RETURNING if wanted) to be
    executed many times with parameters inside a SQLAlchemy transaction."""

    __slots__ = ("_dml", "_lock", "_plans", "stmt")

    def __init__(self, stmt: ClauseElement) -> None:
        self.stmt = stmt
        self._dml = isinstance(stmt, Insert | Update | Delete)
        self._plans: dict[tuple[str, frozenset[str] | None], _Plan] = {}
        self._lock = threading.Lock()

    def plan(self, dialect: Dialect, params: Mapping[str, Any]) -> _Plan:
        keys = frozenset(params) if self._dml else None
        k = (dialect.name, keys)
        p = self._plans.get(k)
        if p is None:
            with self._lock:
                p = self._plans.get(k)
                if p is None:
                    p = _Plan(self.stmt, dialect, sorted(keys) if keys is not None else None)
                    self._plans[k] = p
        return p

    def execute(self, conn: Connection, params: Mapping[str, Any] | None = None) -> Rows:
        """Run on ``conn``'s DB-API connection, in its current transaction."""
        params = params or {}
        dialect = conn.dialect
        p = self.plan(dialect, params)
        args = p.args(params)
        dbapi_conn = conn.connection.driver_connection
        assert dbapi_conn is not None
        try:
            cur = dbapi_conn.cursor()
            cur.execute(p.sql, args)
            rows = [p.record(r) for r in cur.fetchall()] if p.returns_rows else []
            rowcount = cur.rowcount
            cur.close()
        except dialect.loaded_dbapi.Error as exc:
            # Wrapped as Core wraps it (``Database`` turns it into E_DATABASE). A lost
            # connection is then met again by the transaction's rollback, which Core runs:
            # that invalidates it and the pool, so the next transaction reconnects.
            raise DBAPIError.instance(
                p.sql, args, exc, dialect.loaded_dbapi.Error, dialect=dialect
            ) from exc
        return Rows(rows, rowcount)


class Prefetch(Generic[T]):
    """A prepared read to be sent together with another statement on a raw DB-API connection
    (one psycopg pipeline: one round trip for both), and how its rows become the caller's
    value. The module that owns the statement uses the same ``decode`` for its ordinary
    execution, so the two ways of reading give the same value."""

    __slots__ = ("_decode", "args", "plan")

    def __init__(
        self,
        stmt: Prepared,
        dialect: Dialect,
        params: Mapping[str, Any],
        decode: Callable[[list[Any]], T],
    ) -> None:
        self.plan = stmt.plan(dialect, params)
        self.args = self.plan.args(params)
        self._decode = decode

    @property
    def sql(self) -> str:
        return self.plan.sql

    @property
    def width(self) -> int:
        """Columns per row (the first must be a key, never NULL in a row that exists)."""
        return len(self.plan.row._fields)

    def decode(self, raw_rows: Iterable[Sequence[Any]]) -> T:
        """The value from the driver's rows (as fetched from the cursor)."""
        return self._decode([self.plan.record(r) for r in raw_rows])


class Fetched(Generic[T]):
    """A :class:`Prefetch`'s value, once it was read (``value`` may itself be None)."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value
