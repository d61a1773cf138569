"""MCUboot images per release, and the image format each device class consumes.

``release_mcuboot``: at most one MCUboot image per release (verified on upload: signed by one of
the release's trusted signers, same image bytes, version and security counter as the release).
``class_formats``: classes whose devices are offered the MCUboot image instead of SUIT; a class
without a row gets SUIT, as before.

Revision ID: 0007_mcuboot
Revises: 0006_cert_renewal
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_mcuboot"
down_revision = "0006_cert_renewal"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "release_mcuboot",
        sa.Column(
            "release_id",
            sa.Integer,
            sa.ForeignKey("releases.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("blob", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("mcuboot_version", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("uploaded_by", sa.String(64)),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_release_mcuboot_blob", "release_mcuboot", ["blob"])
    op.create_table(
        "class_formats",
        sa.Column("class_id", sa.String(36), primary_key=True),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("class_formats")
    op.drop_index("ix_release_mcuboot_blob", table_name="release_mcuboot")
    op.drop_table("release_mcuboot")
