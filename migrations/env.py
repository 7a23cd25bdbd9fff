"""Alembic environment: URL from `-x url=`, then the config's sqlalchemy.url, then app.core.settings."""

from __future__ import annotations

from alembic import context

from app.core.db import make_engine, normalize_url
from app.core.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from app.core.settings import Settings

        url = str(Settings().database_url)
    return normalize_url(url)


def run_migrations_offline() -> None:
    url = _url()
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = _url()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            # Batch mode lets ALTER-style migrations work on SQLite (copy-and-move of the table).
            context.configure(connection=connection, target_metadata=target_metadata,
                              render_as_batch=url.startswith("sqlite"))
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
