"""Device certificate renewal: a pending (issued, not yet used) and a superseded certificate.

``pending_cert_*`` is the renewed certificate the server issued and the device has not yet
presented; ``prev_cert_fingerprint`` the one it replaced once the device used the new one
(refused from then on as E_CERT_SUPERSEDED); ``cert_renewed_at`` when that happened. Existing
rows keep NULLs: nothing pending, nothing superseded. The index serves the "certificates
expiring within N days" listing.

Revision ID: 0006_cert_renewal
Revises: 0005_admin_token_expiry
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_cert_renewal"
down_revision = "0005_admin_token_expiry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("pending_cert_fingerprint", sa.String(64), nullable=True))
        batch.add_column(sa.Column("pending_cert_not_after", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("prev_cert_fingerprint", sa.String(64), nullable=True))
        batch.add_column(sa.Column("cert_renewed_at", sa.BigInteger, nullable=True))
        batch.create_index("ix_devices_cert_not_after", ["cert_not_after"])


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_index("ix_devices_cert_not_after")
        batch.drop_column("cert_renewed_at")
        batch.drop_column("prev_cert_fingerprint")
        batch.drop_column("pending_cert_not_after")
        batch.drop_column("pending_cert_fingerprint")
