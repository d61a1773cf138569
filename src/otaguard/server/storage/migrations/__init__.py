"""Alembic migrations for the server database, run programmatically by ``Database.upgrade``."""
