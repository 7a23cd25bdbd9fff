"""Database engine/session factory from settings, and programmatic `alembic upgrade head`.

Works with `postgresql+psycopg://` and `sqlite:///` URLs. Engines are cached per URL so the API, the worker and
tests that build several Settings objects share connection pools.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from .settings import Settings, get_settings

_engines: dict[str, Engine] = {}
_lock = threading.Lock()

# Repo root (alembic.ini and migrations/ live there).
_ROOT = Path(__file__).resolve().parents[2]


def normalize_url(url: str) -> str:
    """Accept bare `postgresql://` / `postgres://` URLs and route them to the psycopg 3 driver."""
    for bare in ("postgres://", "postgresql://"):
        if url.startswith(bare):
            return "postgresql+psycopg://" + url[len(bare):]
    return url


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # Foreign keys are off by default in SQLite; WAL lets the API read while the worker writes.
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(url: str, pool_size: int | None = None, recycle: int = 1800) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # No pre-ping (a round trip on every checkout): connections are recycled instead, and a connection that
    # died anyway fails one request with 503 and invalidates the pool (SQLAlchemy does so on disconnect errors).
    size = pool_size or get_settings_pool_size()
    return create_engine(url, pool_pre_ping=False, pool_size=size, max_overflow=max(4, size // 4),
                         pool_recycle=recycle, pool_timeout=10)


def get_settings_pool_size() -> int:
    """One connection per API thread (settings.api_threads): the per-process concurrency."""
    try:
        return get_settings().api_threads
    except Exception:  # settings invalid in this process: a modest default
        return 8


def get_engine(url: str | None = None, pool_size: int | None = None, recycle: int = 1800) -> Engine:
    """The shared engine for `url` (default: settings' DATABASE_URL)."""
    url = normalize_url(url or str(get_settings().database_url))
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url, pool_size, recycle)
        return engine


def dispose_engines() -> None:
    """Close all pooled connections (tests call this before dropping their database; workers after fork)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def session_factory(settings_or_url: Settings | str | None = None) -> sessionmaker[Session]:
    pool_size, recycle = None, 1800
    if isinstance(settings_or_url, Settings):
        url = str(settings_or_url.database_url)
        pool_size, recycle = settings_or_url.api_threads, settings_or_url.db_pool_recycle
    else:
        url = settings_or_url
    # expire_on_commit=False: ORM objects stay readable after commit (the API serialises them afterwards).
    return sessionmaker(bind=get_engine(url, pool_size, recycle), expire_on_commit=False)


@contextmanager
def session_scope(settings_or_url: Settings | str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(settings_or_url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str | None = None):
    from alembic.config import Config

    cfg = Config(str(_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(_ROOT / "migrations"))
    if url:
        # ConfigParser interpolation: a '%' in a password would otherwise break.
        cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


@contextmanager
def migration_lock(url: str) -> Iterator[None]:
    """Serialise migrations of one database across processes: `nba serve` and `nba keys create` started together
    on a fresh data dir used to run two upgrades at once ("table owners already exists"). SQLite: an exclusive
    flock on a file next to the database; Postgres: a session advisory lock (released with the connection)."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if not path or path == ":memory:":
            yield
            return
        import fcntl

        lock_path = Path(path + ".migrate.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return
    if url.startswith("postgresql"):
        from sqlalchemy import text

        engine = create_engine(url, poolclass=__import__("sqlalchemy.pool", fromlist=["NullPool"]).NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(7261001)"))
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(7261001)"))
                    conn.commit()
        finally:
            engine.dispose()
        return
    yield


def upgrade_database(url: str | None = None, revision: str = "head") -> None:
    """Run `alembic upgrade <revision>` against `url` (default: settings' DATABASE_URL), one process at a time."""
    from alembic import command

    url = url or str(get_settings().database_url)
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    with migration_lock(url):
        command.upgrade(alembic_config(url), revision)


def downgrade_database(url: str | None = None, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url or str(get_settings().database_url)), revision)
