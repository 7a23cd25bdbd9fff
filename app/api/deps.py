"""Per-app service state and request dependencies (DB session, authenticated owner)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from app.core import keys
from app.core.models import Owner
from app.core.settings import Settings
from app.core.storage import ArtifactStore

log = logging.getLogger("nba.api")


@dataclass
class ServiceState:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore
    # Sends the task message for a committed job; raises if the broker is unreachable.
    enqueue: Callable[[str], None]
    quotas: Any = None  # app.api.quotas.Quotas
    # Sessions on autocommit connections (no BEGIN/ROLLBACK round trips) for read-mostly hot paths.
    read_sessions: Any = None
    # Status polls kept in memory, dropped on Postgres change notifications (app.api.poll_cache.PollCache);
    # None where there is no NOTIFY (SQLite) or the setting is off.
    poll_cache: Any = None

    def __post_init__(self) -> None:
        if self.read_sessions is None:
            self.read_sessions = sessionmaker(
                bind=self.sessions.kw["bind"].execution_options(isolation_level="AUTOCOMMIT"),
                expire_on_commit=False)
    extra: dict = field(default_factory=dict)


async def get_state(request: Request) -> ServiceState:
    # async: FastAPI runs sync dependencies in the threadpool, one hop each; this one needs no thread.
    return request.app.state.nba


def get_session(state: ServiceState = Depends(get_state)) -> Iterator[Session]:
    session = state.sessions()
    try:
        yield session
    finally:
        session.close()


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(state: ServiceState, request: Request) -> Owner:
    """Resolve the caller's owner from `Authorization: Bearer <key>` (401 unauthorized otherwise)."""
    with owner_session(state, request) as (_session, owner):
        return owner


@contextmanager
def owner_session(state: ServiceState, request: Request) -> Iterator[tuple[Session, Owner]]:
    """One session for a whole request: the key and its owner in one query, then the route's own queries.
    last_used_at is written (and committed) only when it actually changed, i.e. about once a minute per key."""
    with state.sessions() as session:
        owner, touched = keys.authenticate(session, bearer_token(request))
        if touched:
            session.commit()
        yield session, owner


def current_owner(request: Request, state: ServiceState = Depends(get_state)) -> Owner:
    return authenticate(state, request)
