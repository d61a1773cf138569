"""Database notifications between the nodes of a cluster (PostgreSQL ``NOTIFY``).

A notification carries nothing but its channel: it tells the other nodes to re-read what the
committing transaction changed (server/trustsync.py listens). PostgreSQL delivers it only when
that transaction commits, never for a rolled-back one. On SQLite there is nothing to notify
(nodes on one SQLite file re-check on their own).
"""

from __future__ import annotations

from sqlalchemy import Connection, text

TRUST = "otaguard_trust"  # a key list was published
CAMPAIGNS = "otaguard_campaigns"  # a campaign was started, paused, resumed, aborted, advanced


def announce(conn: Connection, channel: str = TRUST) -> None:
    """Wake the other nodes once ``conn``'s transaction commits."""
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"NOTIFY {channel}"))
