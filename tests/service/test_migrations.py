"""Alembic: empty → head, head → base → head round trip on Postgres, upgrade on SQLite, and the migration matches
the ORM models (autogenerate finds nothing to do)."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.core.db import downgrade_database, normalize_url, upgrade_database
from app.core.models import Base

from .conftest import create_database, drop_database

TABLES = {"owners", "api_keys", "artifacts", "jobs", "job_events"}


def _tables(url: str) -> set[str]:
    engine = create_engine(normalize_url(url))
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _diff(url: str) -> list:
    engine = create_engine(normalize_url(url))
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()


@pytest.fixture()
def empty_pg():
    url = create_database("nba_mig")
    yield url
    drop_database(url)


def test_postgres_upgrade_downgrade_round_trip(empty_pg: str) -> None:
    assert _tables(empty_pg) == set()
    upgrade_database(empty_pg)
    assert _tables(empty_pg) == TABLES
    assert _diff(empty_pg) == []
    downgrade_database(empty_pg, "base")
    assert _tables(empty_pg) == set()
    upgrade_database(empty_pg)
    assert _tables(empty_pg) == TABLES


def test_sqlite_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'nba.db'}"
    upgrade_database(url)
    assert _tables(url) == TABLES
    assert _diff(url) == []
    downgrade_database(url, "base")
    assert _tables(url) == set()
