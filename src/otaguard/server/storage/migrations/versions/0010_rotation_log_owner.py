"""Which rotation audit log each rotation action went to.

The rotation log is one hash chain with one writer (a file on the node that writes it). With
several nodes, the first node to write a rotation action keeps the cluster's log; the log's
id (and where it lives) recorded with each action lets every other node refuse rotation
actions with a message naming that node, instead of starting a second chain that the
database anchor would contradict.

Revision ID: 0010_rotation_log_owner
Revises: 0009_dashboard_logouts
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_rotation_log_owner"
down_revision = "0009_dashboard_logouts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rotation_events") as batch:
        batch.add_column(sa.Column("audit_log_id", sa.String(64)))
        batch.add_column(sa.Column("audit_node", sa.String(300)))


def downgrade() -> None:
    with op.batch_alter_table("rotation_events") as batch:
        batch.drop_column("audit_node")
        batch.drop_column("audit_log_id")
