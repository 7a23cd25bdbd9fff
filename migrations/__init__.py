"""Alembic migrations for the service database (see alembic.ini at the repo root)."""
