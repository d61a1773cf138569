"""Key rotations and their audited history.

Revision ID: 0004_key_rotation
Revises: 0003_campaigns
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_key_rotation"
down_revision = "0003_campaigns"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rotations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("old_kid", sa.String(64), nullable=False),
        sa.Column("new_kid", sa.String(64), nullable=False),
        sa.Column("start_version", sa.BigInteger, nullable=False),
        sa.Column("final_version", sa.BigInteger),
        sa.Column("threshold", sa.Integer, nullable=False),
        sa.Column("unreachable_after", sa.BigInteger, nullable=False),
        sa.Column("target_model", sa.String(64)),
        sa.Column("target_hw_rev", sa.String(32)),
        sa.Column("target_group", sa.String(64)),
        sa.Column("started_at", sa.BigInteger, nullable=False),
        sa.Column("advanced_at", sa.BigInteger),
        sa.Column("finished_at", sa.BigInteger),
    )
    op.create_index("ix_rotations_state", "rotations", ["state"])
    op.create_table(
        "rotation_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "rotation_id",
            sa.Integer,
            sa.ForeignKey("rotations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("forced", sa.Boolean, nullable=False),
        sa.Column("fraction", sa.Integer, nullable=False),
        sa.Column("reason", sa.String(500)),
        sa.Column("audit_seq", sa.BigInteger),
        sa.Column("audit_hash", sa.String(64)),
    )
    op.create_index("ix_rotation_events_rotation", "rotation_events", ["rotation_id"])


def downgrade() -> None:
    op.drop_index("ix_rotation_events_rotation", table_name="rotation_events")
    op.drop_table("rotation_events")
    op.drop_index("ix_rotations_state", table_name="rotations")
    op.drop_table("rotations")
