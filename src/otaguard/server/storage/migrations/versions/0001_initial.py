"""Initial schema: devices, groups, releases, assignments, status reports, probes, key lists.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("serial", sa.String(64), nullable=False, unique=True),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("hw_rev", sa.String(32), nullable=False),
        sa.Column("cert_fingerprint", sa.String(64), nullable=False),
        sa.Column("cert_not_after", sa.BigInteger, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.Column("revoked_at", sa.BigInteger),
        sa.Column("enrolled_at", sa.BigInteger, nullable=False),
        sa.Column("current_version", sa.String(32)),
        sa.Column("security_counter", sa.BigInteger),
        sa.Column("keylist_version", sa.BigInteger),
        sa.Column("slot_state", sa.Text),
        sa.Column("running_digest", sa.String(128)),
        sa.Column("last_seen", sa.BigInteger),
        sa.Column("last_error", sa.String(64)),
        sa.Column("suspect", sa.Boolean, nullable=False),
        sa.Column("suspect_reason", sa.String(200)),
    )
    op.create_index("ix_devices_model_hw", "devices", ["model", "hw_rev"])
    op.create_table(
        "device_groups",
        sa.Column(
            "device_id",
            sa.Integer,
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("name", sa.String(64), primary_key=True),
    )
    op.create_index("ix_device_groups_name", "device_groups", ["name"])
    op.create_table(
        "releases",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("hw_rev", sa.String(32), nullable=False),
        sa.Column("vendor_id", sa.String(36), nullable=False),
        sa.Column("class_id", sa.String(36), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("min_version", sa.String(32)),
        sa.Column("security_counter", sa.BigInteger, nullable=False),
        sa.Column("sequence_number", sa.BigInteger, nullable=False),
        sa.Column("expires", sa.BigInteger),
        sa.Column("digest_alg", sa.String(16), nullable=False),
        sa.Column("manifest_digest", sa.String(128), nullable=False, unique=True),
        sa.Column("envelope_blob", sa.String(64), nullable=False),
        sa.Column("image_digest", sa.String(128), nullable=False),
        sa.Column("image_size", sa.BigInteger, nullable=False),
        sa.Column("image_blob", sa.String(64), nullable=False),
        sa.Column("signers", sa.Text, nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("uploaded_by", sa.String(64)),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("class_id", "version", name="uq_releases_class_version"),
    )
    op.create_index("ix_releases_envelope_blob", "releases", ["envelope_blob"])
    op.create_index("ix_releases_image_blob", "releases", ["image_blob"])
    op.create_table(
        "assignments",
        sa.Column(
            "device_id",
            sa.Integer,
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("release_id", sa.Integer, sa.ForeignKey("releases.id"), nullable=False),
        sa.Column("campaign_id", sa.Integer),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("assigned_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_assignments_release", "assignments", ["release_id"])
    op.create_index("ix_assignments_campaign", "assignments", ["campaign_id"])
    op.create_table(
        "status_reports",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "device_id",
            sa.Integer,
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("report_id", sa.String(64), nullable=False),
        sa.Column("release_id", sa.Integer, sa.ForeignKey("releases.id")),
        sa.Column("campaign_id", sa.Integer),
        sa.Column("manifest_digest", sa.String(128)),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("error_code", sa.String(32)),
        sa.Column("version", sa.String(32)),
        sa.Column("detail", sa.String(500)),
        sa.Column("received_at", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("device_id", "report_id", name="uq_status_reports_device_report"),
    )
    op.create_index("ix_status_reports_release_state", "status_reports", ["release_id", "state"])
    op.create_table(
        "probe_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.Integer, sa.ForeignKey("devices.id", ondelete="CASCADE")),
        sa.Column("ip", sa.String(64)),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("path", sa.String(200)),
        sa.Column("detail", sa.String(200)),
        sa.Column("at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_probe_events_device_at", "probe_events", ["device_id", "at"])
    op.create_table(
        "keylists",
        sa.Column("version", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("document", sa.LargeBinary, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "admin_tokens",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "admin_tokens",
        "keylists",
        "probe_events",
        "status_reports",
        "assignments",
        "releases",
        "device_groups",
        "devices",
    ):
        op.drop_table(table)
