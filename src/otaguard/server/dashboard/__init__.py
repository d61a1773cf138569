"""The operators' web dashboard (docs/dashboard.md)."""
