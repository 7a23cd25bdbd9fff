"""Per-app service state and request dependencies (DB session, authenticated owner)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

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
    extra: dict = field(default_factory=dict)


def get_state(request: Request) -> ServiceState:
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
    with state.sessions() as session:
        owner = keys.require_owner(session, bearer_token(request))
        session.commit()  # persists last_used_at
        return owner


def current_owner(request: Request, state: ServiceState = Depends(get_state)) -> Owner:
    return authenticate(state, request)
