"""The status poll, GET /v1/jobs/{id}: the hot path, one SQL statement per request when the answer is not in
the poll cache (app/api/poll_cache.py).

Key, owner, job and result artifact come back from one query (key by its indexed prefix, job joined on id AND
owner, so another owner's job simply is not there), run outside a transaction (an autocommit connection: no BEGIN
and ROLLBACK round trips) with Core rows instead of ORM entities. The key's hash is compared in constant time as
everywhere else; last_used_at is written only when it is older than a minute (a second, guarded statement).
"""

from __future__ import annotations

import hmac
from datetime import timedelta
from types import SimpleNamespace

from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.orm import Session

from app.core import keys
from app.core.models import ApiKey, Artifact, Job, Owner, utcnow
from nba_core.errors import NBAError

from .errors import not_found
from .schemas import JobOut

_K, _O, _J, _A = ApiKey.__table__, Owner.__table__, Job.__table__, Artifact.__table__
_RESULT_COLUMNS = ("id", "kind", "sha256", "size_bytes", "format", "filename", "spec", "created_at")


# Built once with bound parameters: constructing a 40-column select per request cost more CPU than running it.
_POLL = (select(_K.c.id.label("k_id"), _K.c.key_hash.label("k_hash"), _K.c.last_used_at.label("k_used"),
                *_J.c, *[_A.c[name].label(f"r_{name}") for name in _RESULT_COLUMNS])
         .select_from(_K.join(_O, _O.c.id == _K.c.owner_id)
                      .outerjoin(_J, and_(_J.c.id == bindparam("job_id"), _J.c.owner_id == _O.c.id))
                      .outerjoin(_A, _A.c.id == _J.c.result_id))
         .where(_K.c.prefix == bindparam("prefix"), _K.c.revoked_at.is_(None)))


def poll_job(session: Session, token: str | None, job_id: str) -> JobOut:
    """401 for a bad key, 404 for a job that is not the caller's; else the job as the API shows it."""
    return poll_row(session, token, job_id)[0]


def token_digest(token: str | None) -> str | None:
    """The stored hash of a well-formed key (None for anything that cannot be one)."""
    if (not token or not token.startswith(keys.KEY_PREFIX) or len(token) < keys.PREFIX_LEN
            or len(token) > 200):
        return None
    return keys.hash_key(token)


def poll_row(session: Session, token: str | None, job_id: str) -> tuple[JobOut, str, str]:
    """`poll_job`, plus the key's id and the owner's id (what the poll cache keeps)."""
    digest = token_digest(token)
    if token is None or digest is None:
        raise NBAError(keys.UNAUTHORIZED, "missing, invalid or revoked API key", http_status=401)
    ident = job_id if len(job_id) <= 36 else ""
    for row in session.execute(_POLL, {"prefix": token[:keys.PREFIX_LEN], "job_id": ident}):
        if not hmac.compare_digest(row.k_hash, digest):
            continue
        now = utcnow()
        stale = now - timedelta(seconds=keys.LAST_USED_GRANULARITY_S)
        if row.k_used is None or row.k_used < stale:
            session.execute(update(ApiKey).where(ApiKey.id == row.k_id, or_(ApiKey.last_used_at.is_(None),
                                                                             ApiKey.last_used_at < stale))
                            .values(last_used_at=now).execution_options(synchronize_session=False))
            session.commit()
        if row.id is None:
            raise not_found("job", job_id)
        result = None
        if row.r_id is not None:
            result = SimpleNamespace(**{name: getattr(row, f"r_{name}") for name in _RESULT_COLUMNS})
        return JobOut.of(row, result), row.k_id, row.owner_id  # type: ignore[arg-type]
    raise NBAError(keys.UNAUTHORIZED, "missing, invalid or revoked API key", http_status=401)
