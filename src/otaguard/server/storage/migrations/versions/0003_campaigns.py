"""Campaigns: one JSON state column per campaign plus per-state counts, one progress row per
(campaign, device).

Revision ID: 0003_campaigns
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_campaigns"
down_revision = "0002"
branch_labels = None
depends_on = None

STATES = ("pending", "offered", "downloading", "installed", "succeeded", "failed", "reverted")


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("release_id", sa.Integer, sa.ForeignKey("releases.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("created_by", sa.String(64)),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        *(sa.Column(f"n_{s}", sa.Integer, nullable=False, server_default="0") for s in STATES),
    )
    op.create_index("ix_campaigns_status", "campaigns", ["status"])
    op.create_table(
        "campaign_devices",
        sa.Column(
            "campaign_id",
            sa.Integer,
            sa.ForeignKey("campaigns.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "device_id",
            sa.Integer,
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("version", sa.String(32)),
        sa.Column("step_done", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("steps", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", sa.String(64)),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_campaign_devices_device", "campaign_devices", ["device_id"])
    op.create_index(
        "ix_campaign_devices_campaign_state", "campaign_devices", ["campaign_id", "state"]
    )


def downgrade() -> None:
    op.drop_index("ix_campaign_devices_campaign_state", table_name="campaign_devices")
    op.drop_index("ix_campaign_devices_device", table_name="campaign_devices")
    op.drop_table("campaign_devices")
    op.drop_index("ix_campaigns_status", table_name="campaigns")
    op.drop_table("campaigns")
