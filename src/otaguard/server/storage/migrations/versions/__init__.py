"""Migration scripts, oldest first (``revision`` / ``down_revision`` chain)."""
