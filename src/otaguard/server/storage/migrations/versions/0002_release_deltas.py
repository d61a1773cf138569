"""Delta downloads per release: base image digest -> delta envelope + patch blob.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "release_deltas",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "release_id",
            sa.Integer,
            sa.ForeignKey("releases.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("base_digest", sa.String(128), nullable=False),
        sa.Column("base_version", sa.String(32)),
        sa.Column("manifest_digest", sa.String(128), nullable=False, unique=True),
        sa.Column("envelope_blob", sa.String(64), nullable=False),
        sa.Column("patch_digest", sa.String(128), nullable=False),
        sa.Column("patch_size", sa.BigInteger, nullable=False),
        sa.Column("patch_blob", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("release_id", "base_digest", name="uq_release_deltas_release_base"),
    )
    op.create_index("ix_release_deltas_envelope_blob", "release_deltas", ["envelope_blob"])
    op.create_index("ix_release_deltas_patch_blob", "release_deltas", ["patch_blob"])


def downgrade() -> None:
    op.drop_index("ix_release_deltas_patch_blob", table_name="release_deltas")
    op.drop_index("ix_release_deltas_envelope_blob", table_name="release_deltas")
    op.drop_table("release_deltas")
