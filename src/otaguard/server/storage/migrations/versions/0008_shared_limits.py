"""Rate-limit buckets and probe counters shared by every node of a cluster.

``rate_buckets``: one token bucket per device (tokens left, when last updated, and whether the
last take was allowed). ``limit_hits`` / ``limit_flags``: the refusals the probe detectors
count, and the identities they flagged (once per cluster). Used on PostgreSQL only
(server/sharedlimits.py), created everywhere so the schema is one. On PostgreSQL the tables are
UNLOGGED: no WAL, no fsync per check-in; a database crash empties them, which only refills
every bucket and restarts the probe windows.

Revision ID: 0008_shared_limits
Revises: 0007_mcuboot
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0008_shared_limits"
down_revision = "0007_mcuboot"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    unlogged: dict[str, Any] = {"prefixes": ["UNLOGGED"]} if pg else {}
    op.create_table(
        "rate_buckets",
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("tokens", sa.Float, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("ok", sa.Boolean, nullable=False),
        **unlogged,
    )
    op.create_index("ix_rate_buckets_at", "rate_buckets", ["at"])
    op.create_table(
        "limit_hits",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        **unlogged,
    )
    op.create_index("ix_limit_hits_key", "limit_hits", ["kind", "key", "at"])
    op.create_table(
        "limit_flags",
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("at", sa.Float, nullable=False),
        **unlogged,
    )


def downgrade() -> None:
    op.drop_table("limit_flags")
    op.drop_index("ix_limit_hits_key", table_name="limit_hits")
    op.drop_table("limit_hits")
    op.drop_index("ix_rate_buckets_at", table_name="rate_buckets")
    op.drop_table("rate_buckets")
