"""Engine setup and schema migrations, the same code for SQLite and PostgreSQL.

SQLite is the default (one file, WAL journal, busy timeout). Python's sqlite3 driver issues a
deferred ``BEGIN`` lazily, and a deferred transaction that reads and then writes can fail with
SQLITE_BUSY no matter how long the busy timeout is; so we take over transaction start and
open write transactions with ``BEGIN IMMEDIATE`` (the writer lock is taken up front, and the
busy timeout then really waits). Writers also queue on a lock file (``<database>-writelock``,
``flock``) before ``BEGIN IMMEDIATE``: several server processes on one SQLite file (the
simulator's pre-forked servers, or two ``otaguard server run``) then wait for each other in the
kernel and are woken when the writer finishes, instead of in SQLite's busy handler, which polls
with sleeps of 1 to 100 ms. PostgreSQL needs none of this.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from ...errors import ErrorCode, ServerError

MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_MS = 10_000
_PG_MIGRATION_LOCK = 0x07A6_0001


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


class WriterLock:
    """One SQLite writer at a time: the threads of this process on a lock, then the processes
    on ``flock`` of ``path`` (opened on first use, close-on-exec)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class Database:
    """One engine per process; ``read()`` / ``write()`` hand out transactional connections."""

    def __init__(self, url: str, *, pool_size: int = 8, sqlite_synchronous: str = "FULL") -> None:
        u = make_url(url)
        self.url = url
        self.dialect = u.get_backend_name()
        kwargs: dict[str, Any] = {"future": True}
        if self.dialect == "sqlite":
            if u.database in (None, "", ":memory:"):
                raise ServerError(ErrorCode.USAGE, "in-memory SQLite is not supported", 500)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_MS / 1000}
            kwargs["pool_size"] = pool_size
        elif self.dialect == "postgresql":
            if u.drivername == "postgresql":
                u = u.set(drivername="postgresql+psycopg")
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = pool_size
            # No pre-ping: it costs a round trip per transaction (~25% of a check-in's
            # throughput). After a PostgreSQL restart the first use of a stale pooled
            # connection fails (503 + Retry-After, the device retries) and SQLAlchemy then
            # invalidates the whole pool, so the next request reconnects.
            kwargs["pool_pre_ping"] = False
        else:
            raise ServerError(ErrorCode.USAGE, f"unsupported database {self.dialect!r}", 500)
        self.engine: Engine = create_engine(u, **kwargs)
        # Writers queue here, not inside SQLite's busy handler (which sleeps in coarse steps);
        # the busy timeout stays for processes that do not take the lock file.
        self._write_lock: WriterLock | None = None
        if self.dialect == "sqlite":
            assert u.database is not None
            self._write_lock = WriterLock(Path(f"{u.database}-writelock"))
        if self.dialect == "sqlite":
            sync = sqlite_synchronous.upper()
            if sync not in {"FULL", "NORMAL", "EXTRA"}:
                raise ServerError(ErrorCode.USAGE, "sqlite synchronous must be FULL/NORMAL/EXTRA")

            @event.listens_for(self.engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
                cur.execute(f"PRAGMA synchronous={sync}")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            @event.listens_for(self.engine, "begin")
            def _on_begin(conn: Connection) -> None:
                mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
                # Straight to the driver: a full SQLAlchemy execution here costs as much as a
                # check-in's own query. sqlite3's commit()/rollback() end it as usual.
                conn.connection.driver_connection.execute(f"BEGIN {mode}")  # type: ignore[union-attr]

    # --- transactions --------------------------------------------------------------------------
    @contextlib.contextmanager
    def read(self, *, snapshot: bool = True) -> Iterator[Connection]:
        """A read transaction. ``snapshot=False``: on PostgreSQL, statements in autocommit
        instead (no ``BEGIN`` and ``COMMIT`` round trips); what they see is the same as in a
        READ COMMITTED transaction, where every statement takes its own snapshot anyway.
        SQLite keeps its transaction (one snapshot for all the reads, and no round trips)."""
        if not snapshot and self.dialect == "postgresql":
            try:
                with self.engine.connect() as conn:
                    yield conn.execution_options(isolation_level="AUTOCOMMIT")
            except SQLAlchemyError as exc:
                raise ServerError(ErrorCode.DATABASE, type(exc).__name__, 503) from exc
            return
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
        except SQLAlchemyError as exc:
            raise ServerError(ErrorCode.DATABASE, type(exc).__name__, 503) from exc

    @contextlib.contextmanager
    def read_on_demand(self) -> Iterator[Connection]:
        """``read(snapshot=False)``, checked out from the pool only if the body uses it (a
        check-in whose rows came with its rate-limit statement usually needs no more)."""
        lazy = _LazyRead(self)
        try:
            yield lazy  # type: ignore[misc]
        except BaseException as exc:
            if lazy.stack is not None:  # the read's own error handling (E_DATABASE) applies
                lazy.stack.__exit__(type(exc), exc, exc.__traceback__)
            raise
        else:
            if lazy.stack is not None:
                lazy.stack.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        lock = self._write_lock or contextlib.nullcontext()
        try:
            with lock, self.engine.connect() as conn:
                if self.dialect == "sqlite":
                    conn = conn.execution_options(sqlite_begin="IMMEDIATE")
                with conn.begin():
                    yield conn
        except SQLAlchemyError as exc:
            raise ServerError(ErrorCode.DATABASE, type(exc).__name__, 503) from exc

    # --- schema --------------------------------------------------------------------------------
    def _alembic_config(self, conn: Connection) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = conn
        return cfg

    def upgrade(self) -> str:
        """Bring the schema to the newest revision; safe when several processes start at once."""
        with self.write() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            command.upgrade(self._alembic_config(conn), "head")
        return self.current_revision() or ""

    def current_revision(self) -> str | None:
        with self.read() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head_revision(self) -> str | None:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        return ScriptDirectory.from_config(cfg).get_current_head()

    def dispose(self) -> None:
        self.engine.dispose()
        if self._write_lock is not None:
            self._write_lock.close()


class _LazyRead:
    """Stands in for a :class:`Connection` and checks one out on first attribute use."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._conn: Connection | None = None
        self.stack: contextlib.ExitStack | None = None

    def __getattr__(self, name: str) -> Any:
        if self._conn is None:
            self.stack = contextlib.ExitStack()
            self._conn = self.stack.enter_context(self._db.read(snapshot=False))
        return getattr(self._conn, name)
