"""Per-device rate limits and probe counters shared by every node on one PostgreSQL.

With the in-memory :class:`~.ratelimit.TokenBuckets` of each process, N nodes behind a
balancer let a device through at N times its limit, and N probe detectors each count a
fraction of its refusals. Here the state lives in PostgreSQL (UNLOGGED tables, migration
0008) and every node reads and changes it in one statement:

* :class:`SharedBuckets`: one ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` per take,
  the refill and the take computed by the database from the row it has locked, so concurrent
  takes on several nodes serialize on that row. A device gets **exactly** its limit across
  the cluster: at most ``burst + rate × t`` requests in any ``t`` seconds, however many nodes
  it spreads them over (the one inexactness is clock skew between nodes: the refill uses each
  node's wall clock, never moving a bucket's time backwards). The node's own bucket runs
  first and refuses without a round trip once this node alone granted the whole limit, so a
  flood against one node does not become a flood against the database.
* :class:`SharedProbeDetector`: one row per counted refusal and one flag row per identity;
  the flag is an ``INSERT ... ON CONFLICT DO NOTHING``, so the cluster flags an identity once,
  and a flagged identity's refusals write nothing more.

A check-in sends its reads with the take (:meth:`SharedBuckets.take_with`): the limit costs
no round trip of its own, and the whole re-poll check-in is one statement.

Why PostgreSQL and not Redis/Valkey: a PostgreSQL cluster needs PostgreSQL anyway, so no
second stateful service to run, secure and monitor, and no second failure domain (a node
without its database answers 503 whatever the limiter does), and the take can share the
check-in's round trip, which a separate service could not (measured in bench/server.py,
docs/benchmarks.md); UNLOGGED tables and
``synchronous_commit=off`` on the limiter's own connections keep it off the WAL and the disk.

When the database is away the node falls back to its local buckets (the parent class) for a
second before trying again: the request then fails on its own database work (503
``E_DATABASE``) anyway, and a limiter outage must not add latency to every request.
SQLite deployments keep the local buckets (one node, nothing to share).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .ratelimit import ProbeDetector, RateLimit, T, TokenBuckets
from .storage.db import Database
from .storage.prepared import Fetched, Prefetch

log = logging.getLogger("otaguard.server")
RETRY_SHARED_AFTER = 1.0  # seconds on local buckets after a database error
PRUNE_EVERY = 60.0

_TAKE = """
INSERT INTO rate_buckets AS b (key, tokens, at, ok)
VALUES (%(key)s, %(burst)s - 1.0, %(now)s, true)
ON CONFLICT (key) DO UPDATE SET
    tokens = LEAST(%(burst)s, b.tokens + GREATEST(0.0, %(now)s - b.at) * %(rate)s)
        - CASE WHEN LEAST(%(burst)s, b.tokens + GREATEST(0.0, %(now)s - b.at) * %(rate)s) >= 1.0
          THEN 1.0 ELSE 0.0 END,
    ok = LEAST(%(burst)s, b.tokens + GREATEST(0.0, %(now)s - b.at) * %(rate)s) >= 1.0,
    at = GREATEST(b.at, %(now)s)
RETURNING ok, tokens
"""
_HIT = """
WITH added AS (INSERT INTO limit_hits (kind, key, at) VALUES (%(kind)s, %(key)s, %(now)s))
SELECT count(*) + 1 FROM limit_hits
WHERE kind = %(kind)s AND key = %(key)s AND at > %(since)s
"""
_FLAG = """
INSERT INTO limit_flags (kind, key, at) VALUES (%(kind)s, %(key)s, %(now)s)
ON CONFLICT (kind, key) DO NOTHING RETURNING 1
"""
_FLAGGED = "SELECT 1 FROM limit_flags WHERE kind = %(kind)s AND key = %(key)s"


class SharedState:
    """The limiter's PostgreSQL connections: one per thread (the event loop's, and worker
    threads'), autocommit, asynchronous commit; reconnected after an error."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        if db.dialect != "postgresql":
            raise ValueError("shared limits need PostgreSQL")
        self.db = db
        self.clock = clock
        self._local = threading.local()
        self._down_until = 0.0
        self._last_prune = 0.0
        self.errors = 0
        self.statements = 0  # sent to the database (observability, tests)
        self._joined: dict[tuple[str, str], str] = {}  # (take, read) -> one statement

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            import psycopg

            engine = self.db.engine
            cargs, cparams = engine.dialect.create_connect_args(engine.url)
            conn = psycopg.connect(
                *cargs,
                **cparams,
                autocommit=True,
                connect_timeout=2,
                options="-c synchronous_commit=off",
            )
            self._local.conn = conn
        return conn

    def run(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]] | None:
        """Rows of ``sql``, or None while the database is unreachable (the caller then
        decides locally)."""
        now = time.monotonic()
        if now < self._down_until:
            return None
        import psycopg

        self.statements += 1
        try:
            cur = self._conn().execute(sql, params, prepare=True)
            return cur.fetchall() if cur.description is not None else []
        except psycopg.Error as exc:
            self._failed(now, exc)
            return None

    def run_with(
        self, take: str, params: dict[str, Any], read: Prefetch[Any]
    ) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]] | None:
        """The take statement (``INSERT ... RETURNING``) and ``read`` as one statement:
        ``WITH take AS (...) SELECT take.*, read.* FROM take LEFT JOIN (read) ON true`` —
        one round trip, one implicit transaction, one cursor (a psycopg pipeline of the two
        costs more Python per request). Returns the take's row and the read's rows; None
        while the database is unreachable, as :meth:`run`."""
        now = time.monotonic()
        if now < self._down_until:
            return None
        import psycopg

        sql = self._joined.get((take, read.sql))
        if sql is None:
            if set(read.args) & set(params):
                raise ValueError("the take and the read share a parameter name")
            # Both parts are this program's own statements (the take above, a compiled
            # Prepared select); values travel only as parameters.
            sql = (
                f"WITH take AS ({take.strip()}) SELECT take.*, r.* FROM take "  # noqa: S608
                f"LEFT JOIN ({read.sql}) AS r ON true"
            )
            self._joined[(take, read.sql)] = sql
        self.statements += 1
        try:
            rows = self._conn().execute(sql, {**read.args, **params}, prepare=True).fetchall()
        except psycopg.Error as exc:
            self._failed(now, exc)
            return None
        width = len(rows[0]) - read.width
        first = rows[0][:width]
        # No row of the read: one row of NULLs from the outer join (its first column is a
        # primary key, never NULL in a row that exists).
        found = [r[width:] for r in rows if r[width] is not None]
        return first, found

    def _failed(self, now: float, exc: Exception) -> None:
        self.errors += 1
        self._down_until = now + RETRY_SHARED_AFTER
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        log.warning("shared limits unavailable (%s): local limits for now", exc)

    def prune(self, keep: float) -> None:
        """Drop bucket rows full again and counted refusals older than ``keep`` seconds (at
        most once a minute): absent rows mean the same, and the tables stay fleet-sized."""
        now = self.clock()
        if now - self._last_prune < PRUNE_EVERY:
            return
        self._last_prune = now
        self.run("DELETE FROM rate_buckets WHERE at < %(t)s", {"t": now - keep})
        self.run("DELETE FROM limit_hits WHERE at < %(t)s", {"t": now - keep})


class SharedBuckets(TokenBuckets):
    """:class:`TokenBuckets` whose state is the cluster's.

    The node's own bucket (the parent class, on the same clock) runs first and counts only
    what the cluster granted through this node: when it is empty the cluster's is too (it
    holds at least these grants), so the request is refused without asking the database —
    a device flooding one node costs no round trips once its limit is spent. It is also the
    fallback while the database is away."""

    def __init__(self, shared: SharedState, limit: RateLimit, **kw: Any) -> None:
        kw.setdefault("clock", shared.clock)
        super().__init__(limit, **kw)
        self.shared = shared
        # A bucket untouched this long is full again: its row can go.
        self._full_after = limit.burst / limit.rate + 1.0

    def take(self, key: str) -> float:
        local_wait = super().take(key)
        if local_wait > 0:
            return local_wait  # this node alone has granted the device's whole limit
        rows = self.shared.run(_TAKE, self._params(key))
        if rows is None:
            return 0.0  # database away: the local bucket (which granted it) decides
        return self._judge(key, rows)

    def take_with(
        self, key: str, prefetch: Callable[[], Prefetch[T]]
    ) -> tuple[float, Fetched[T] | None]:
        """:meth:`take` with ``prefetch``'s read in the same round trip. The read is
        returned only when the request is allowed (a refused one reads nothing more)."""
        local_wait = TokenBuckets.take(self, key)
        if local_wait > 0:
            return local_wait, None
        read = prefetch()
        both = self.shared.run_with(_TAKE, self._params(key), read)
        if both is None:
            return 0.0, None  # database away: the local bucket decides, the caller reads
        wait = self._judge(key, [both[0]])
        return wait, (Fetched(read.decode(both[1])) if wait == 0.0 else None)

    def _params(self, key: str) -> dict[str, Any]:
        return {
            "key": key,
            "burst": float(self.limit.burst),
            "rate": self.limit.rate,
            "now": self.shared.clock(),
        }

    def _judge(self, key: str, rows: list[tuple[Any, ...]]) -> float:
        """The cluster's answer (the row the database computed) as a wait in seconds."""
        ok, tokens = rows[0]
        self.shared.prune(max(self._full_after, 3600.0))
        if ok:
            return 0.0
        self._refund(key)  # the cluster refused: this node granted nothing
        return (1.0 - float(tokens)) / self.limit.rate

    def _refund(self, key: str) -> None:
        state = self._state.get(key)
        if state is not None:
            self._state[key] = (min(float(self.limit.burst), state[0] + 1.0), state[1])


class SharedProbeDetector(ProbeDetector):
    """:class:`ProbeDetector` counting every node's refusals; ``kind`` names the detector.

    An identity this node knows to be flagged costs no more database writes: a prober writes
    at most ``threshold`` rows per window before the cluster flags it, then none."""

    def __init__(
        self, shared: SharedState, kind: str, threshold: int, window: float, **kw: Any
    ) -> None:
        super().__init__(threshold, window, **kw)
        self.shared = shared
        self.kind = kind

    def hit(self, key: str) -> bool:
        if key in self._flagged:
            return False  # flagged already (here or, as this node learned, elsewhere)
        now = self.shared.clock()
        p = {"kind": self.kind, "key": key, "now": now, "since": now - self.window}
        rows = self.shared.run(_HIT, p)
        if rows is None:
            return super().hit(key)
        if int(rows[0][0]) < self.threshold:
            return False
        flagged = self.shared.run(_FLAG, p)
        if flagged is None:
            return super().hit(key)
        self._flagged.add(key)  # by this node now, or by another before: either way, done
        return bool(flagged)

    def flagged(self, key: str) -> bool:
        rows = self.shared.run(_FLAGGED, {"kind": self.kind, "key": key})
        if rows is None:
            return super().flagged(key)
        return bool(rows)
