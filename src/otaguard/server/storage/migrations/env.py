"""Alembic environment: always handed an open connection by ``otaguard.server.storage.db``."""

from __future__ import annotations

from alembic import context

from otaguard.server.storage.models import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations()
