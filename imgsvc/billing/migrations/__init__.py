"""Alembic migrations of the billing schema (run by `Database.migrate()`)."""
