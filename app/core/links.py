"""Short-lived, signed links to a job's HTML report, so it opens in a browser (which cannot send the API key).

A link is `/v1/shared-reports/<job id>.<expiry, unix seconds>.<HMAC-SHA256 of both>`: anyone holding it can read
that one report until it expires, nothing else; nothing is stored server-side.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from nba_core.errors import NBAError

LINK_INVALID = "link_invalid"
LINK_EXPIRED = "link_expired"
SECRET_FILE = "link-secret"


def link_secret(settings) -> bytes:
    """The configured secret, or the data dir's (created once, mode 0600)."""
    if settings.link_secret:
        return settings.link_secret.encode()
    path = Path(settings.data_dir).expanduser().absolute() / SECRET_FILE
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return path.read_bytes().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path.read_bytes().strip()


def _signature(secret: bytes, job_id: str, expires: int) -> str:
    return hmac.new(secret, f"report:{job_id}:{expires}".encode(), hashlib.sha256).hexdigest()


def make_token(secret: bytes, job_id: str, ttl: int, now: float | None = None) -> tuple[str, int]:
    expires = int(now if now is not None else time.time()) + int(ttl)
    return f"{job_id}.{expires}.{_signature(secret, job_id, expires)}", expires


def check_token(secret: bytes, token: str, now: float | None = None) -> str:
    """The job id a valid, unexpired token grants; NBAError (403) otherwise."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        raise NBAError(LINK_INVALID, "this report link is malformed", http_status=403)
    job_id, expires, signature = parts[0], int(parts[1]), parts[2]
    if not hmac.compare_digest(signature, _signature(secret, job_id, expires)):
        raise NBAError(LINK_INVALID, "this report link is not valid (wrong signature)", http_status=403)
    if (now if now is not None else time.time()) > expires:
        raise NBAError(LINK_EXPIRED, "this report link has expired; ask for a new one (nba download JOB "
                       "--report-link)", http_status=403)
    return job_id
