"""Dashboard sessions logged out, shared by every node of a cluster.

A session cookie is signed and checked without a server-side session store; a log-out must
still end it on every node, so its id is kept here until the cookie would have expired.

Revision ID: 0009_dashboard_logouts
Revises: 0008_shared_limits
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_dashboard_logouts"
down_revision = "0008_shared_limits"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dashboard_logouts",
        sa.Column("sid", sa.String(64), primary_key=True),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("dashboard_logouts")
