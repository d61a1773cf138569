"""Keep every node's trust anchors equal to the database's: the key lists a cluster publishes.

A node verifies release uploads, key-list updates and rotations against the trust store it
holds in memory (the trust bundle's root plus the newest published key list). With several
``otaguard server run`` processes on one database, a key list published through one of them
must reach the others, or node 2 refuses a release signed by the key node 1 just added
(E_UNTRUSTED_KEY) — or, worse, keeps accepting a key node 1's list revoked.

The database is the truth and the key-list version is its generation number. Three ways a
node learns of a new one, from cheapest to most certain:

* **notification**: the publishing transaction sends ``NOTIFY otaguard_trust`` (PostgreSQL
  delivers it on commit); each node LISTENs on a connection of its own and reloads within
  milliseconds;
* **periodic re-check** (every ``recheck`` s, default 2): covers a notification lost with a
  dropped listening connection, and SQLite, which has no notifications;
* **before a decision**: :meth:`TrustSync.refresh` runs (one indexed read) before every
  upload verification, key-list publication and rotation step, so no security decision is
  taken on anchors older than the database's, whatever happened to the notifications.

The same listening connection carries ``otaguard_campaigns``: a campaign written by one node
(started, paused, a phase advanced) makes the others refresh their campaign cache at their
next request instead of at its next 5-second tick. Campaign decisions that write re-read the
campaign row under its lock anyway (server/campaigns.py); this only shortens how long another
node's read-only check-ins see the previous state.

Reloading replays each newer key list in version order on top of the node's store (a
transition-mode list may be signed by a key only the previous list authorizes). Retired keys
(rotation ``advance``) need none of this: they are read from the database at each upload.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from ..errors import OtaError
from ..trust.store import TrustStore
from .storage import models as m
from .storage.db import Database
from .storage.notify import CAMPAIGNS, TRUST

if TYPE_CHECKING:
    from .context import TrustState

log = logging.getLogger("otaguard.server")
CHANNEL = TRUST
DEFAULT_RECHECK = 2.0


class TrustSync:
    """Reloads one node's :class:`~.app.TrustState` from the database's key lists."""

    def __init__(
        self,
        db: Database,
        trust: TrustState,
        *,
        recheck: float = DEFAULT_RECHECK,
        on_campaigns: Callable[[], None] | None = None,
    ):
        """``on_campaigns``: called when another node changed a campaign (the node's
        campaign cache then refreshes at its next request instead of within 5 s)."""
        self.db = db
        self.trust = trust
        self.recheck = recheck
        self.on_campaigns = on_campaigns
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bad_version: int | None = None
        self.reloads = 0  # key lists applied from the database (observability, tests)

    # --- reload ---------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Apply every key list newer than this node's (E_DATABASE when it is unreachable)."""
        current = self.trust.resolver
        if not isinstance(current, TrustStore):
            return  # static keys (--trusted-key) or no anchors: nothing is published
        with self.db.read() as conn:
            newer = conn.execute(
                select(m.keylists.c.version, m.keylists.c.document)
                .where(m.keylists.c.version > current.version)
                .order_by(m.keylists.c.version)
            ).all()
        if not newer:
            return
        with self._lock:
            store = self.trust.resolver
            assert isinstance(store, TrustStore)
            for version, doc in newer:
                if version <= store.version:
                    continue
                try:
                    store = store.apply_update(bytes(doc))
                except OtaError as err:
                    # Accepted by another node against the same root, refused here: a node
                    # started with another trust bundle. Keep the anchors we can verify.
                    if self._bad_version != version:
                        self._bad_version = version
                        log.error(
                            "published key list v%d does not verify against this node's "
                            "anchors (%s: %s); is every node on the same trust bundle?",
                            version,
                            err.code.value,
                            err.detail,
                        )
                    break
                self.reloads += 1
            if store is not current:
                self.trust.replace(store)
                log.info("trust anchors reloaded from the database: key list v%d", store.version)

    def _refresh_quietly(self) -> None:
        try:
            self.refresh()
        except OtaError as err:  # the database is away: the next round tries again
            log.debug("trust re-check failed: %s", err)

    # --- background -----------------------------------------------------------------------------
    def start(self) -> TrustSync:
        self._thread = threading.Thread(target=self._run, name="otaguard-trustsync", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the thread to end (it notices within ``recheck`` s; a daemon, it never holds
        up the process's exit)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=min(self.recheck, 2.0))

    def _run(self) -> None:
        if self.db.dialect == "postgresql":
            self._listen()
        else:
            while not self._stop.wait(self.recheck):
                self._refresh_quietly()

    def _listen(self) -> None:
        import psycopg

        conn: Any = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self._connect(psycopg)
                    self._campaigns_changed()  # whatever changed while not listening
                    self._refresh_quietly()
                channels = {n.channel for n in conn.notifies(timeout=self.recheck, stop_after=1)}
                if CAMPAIGNS in channels:
                    self._campaigns_changed()
                if CHANNEL in channels or not channels:
                    self._refresh_quietly()  # a notification, or the periodic re-check
            except (psycopg.Error, OSError) as exc:
                log.warning("trust notifications lost (%s); reconnecting", exc)
                if conn is not None:
                    conn.close()
                    conn = None
                self._stop.wait(min(self.recheck, 1.0))
                self._refresh_quietly()
        if conn is not None:
            conn.close()

    def _campaigns_changed(self) -> None:
        if self.on_campaigns is not None:
            self.on_campaigns()

    def _connect(self, psycopg: Any) -> Any:
        engine = self.db.engine
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        conn = psycopg.connect(*cargs, **cparams, autocommit=True, connect_timeout=5)
        conn.execute(f"LISTEN {CHANNEL}")
        conn.execute(f"LISTEN {CAMPAIGNS}")
        return conn
