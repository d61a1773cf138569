"""Admin bearer tokens expire: a nullable ``expires_at`` (POSIX seconds) on ``admin_tokens``.

Existing rows keep NULL (no expiry), so an upgrade never locks an operator out.

Revision ID: 0005_admin_token_expiry
Revises: 0004_key_rotation
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_admin_token_expiry"
down_revision = "0004_key_rotation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("admin_tokens") as batch:
        batch.add_column(sa.Column("expires_at", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("admin_tokens") as batch:
        batch.drop_column("expires_at")
