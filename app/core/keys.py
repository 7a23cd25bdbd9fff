"""API keys: `nba_` + 40 URL-safe random characters, stored only as a SHA-256 hash.

The keys carry ~240 bits of entropy, so a fast hash is enough (no brute force possible); lookup is by the first
12 characters (indexed `prefix`), then the hash is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from nba_core.errors import NBAError

from .models import ApiKey, Owner, utcnow

KEY_PREFIX = "nba_"
PREFIX_LEN = 12
UNAUTHORIZED = "unauthorized"
# Don't write last_used_at on every request: once a minute per key is plenty and spares the DB.
LAST_USED_GRANULARITY_S = 60


@dataclass(frozen=True)
class KeyInfo:
    id: str
    owner_id: str
    owner_name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(30)[:40]


def get_or_create_owner(session: Session, name: str) -> Owner:
    name = name.strip()
    if not name:
        raise NBAError("invalid_owner", "owner name must not be empty")
    owner = session.execute(select(Owner).where(Owner.name == name)).scalar_one_or_none()
    if owner is None:
        owner = Owner(name=name, created_at=utcnow())
        session.add(owner)
        session.flush()
    return owner


def create_key(session: Session, owner_name: str) -> str:
    """Create a key for `owner_name` (creating the owner if needed); returns the plaintext, shown once."""
    owner = get_or_create_owner(session, owner_name)
    plaintext = generate_key()
    session.add(ApiKey(owner_id=owner.id, prefix=plaintext[:PREFIX_LEN], key_hash=hash_key(plaintext),
                       created_at=utcnow()))
    session.flush()
    return plaintext


def verify_key(session: Session, plaintext: str | None, *, touch: bool = True) -> Owner | None:
    """The owner of a valid, unrevoked key, else None. One query fetches key and owner together; last_used_at
    is written (and the caller must commit) only when it is older than the granularity: see `touched`."""
    owner, _touched = _verify(session, plaintext, touch)
    return owner


def _verify(session: Session, plaintext: str | None, touch: bool) -> tuple[Owner | None, bool]:
    if not plaintext or not plaintext.startswith(KEY_PREFIX) or len(plaintext) < PREFIX_LEN or len(plaintext) > 200:
        return None, False
    digest = hash_key(plaintext)
    rows = session.execute(
        select(ApiKey.id, ApiKey.key_hash, ApiKey.last_used_at, Owner)
        .join(Owner, Owner.id == ApiKey.owner_id)
        .where(ApiKey.prefix == plaintext[:PREFIX_LEN], ApiKey.revoked_at.is_(None))
    ).all()
    for key_id, key_hash, last_used_at, owner in rows:
        if hmac.compare_digest(key_hash, digest):
            now = utcnow()
            stale = now - timedelta(seconds=LAST_USED_GRANULARITY_S)
            if touch and (last_used_at is None or last_used_at < stale):
                # Guarded UPDATE: of concurrent requests, only one writes; the others change nothing.
                session.execute(update(ApiKey).where(
                    ApiKey.id == key_id, or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < stale))
                    .values(last_used_at=now))
                return owner, True
            return owner, False
    return None, False


def authenticate(session: Session, plaintext: str | None) -> tuple[Owner, bool]:
    """(owner, whether last_used_at was written and needs a commit); 401 unauthorized for a bad key."""
    owner, touched = _verify(session, plaintext, True)
    if owner is None:
        raise NBAError(UNAUTHORIZED, "missing, invalid or revoked API key", http_status=401)
    return owner, touched


def require_owner(session: Session, plaintext: str | None) -> Owner:
    return authenticate(session, plaintext)[0]


def revoke_key(session: Session, prefix_or_id: str) -> int:
    """Revoke by key id, 12-char prefix, or the full plaintext key. Returns how many keys were revoked."""
    ident = prefix_or_id.strip()
    if ident.startswith(KEY_PREFIX) and len(ident) > PREFIX_LEN:
        cond = ApiKey.key_hash == hash_key(ident)
    else:
        cond = or_(ApiKey.id == ident, ApiKey.prefix == ident)
    result = session.execute(update(ApiKey).where(cond, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
                             .execution_options(synchronize_session=False))
    return result.rowcount


def list_keys(session: Session, owner_name: str | None = None) -> list[KeyInfo]:
    stmt = select(ApiKey, Owner.name).join(Owner, Owner.id == ApiKey.owner_id).order_by(ApiKey.created_at)
    if owner_name is not None:
        stmt = stmt.where(Owner.name == owner_name)
    return [KeyInfo(id=k.id, owner_id=k.owner_id, owner_name=name, prefix=k.prefix, created_at=k.created_at,
                    revoked_at=k.revoked_at, last_used_at=k.last_used_at)
            for k, name in session.execute(stmt).all()]
