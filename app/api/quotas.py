"""Per-owner quotas: 429 with Retry-After and a code, shared by every API process.

- active jobs (queued + running): counted in the database, the source of truth every process sees; on Postgres
  the count and the insert run under a per-owner transaction advisory lock, so two processes cannot both admit
  the 11th job;
- job submissions per minute: a moving window in the `limits` library's storage (Redis by default, the broker's;
  `memory://` in embedded mode, where `nba serve` runs a single API process);
- stored bytes: the sum of the owner's uploads in the database, checked before and after an upload streams.
"""

from __future__ import annotations

import logging
import math
import time
import zlib

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.core.models import Artifact, Job
from app.core.settings import Settings
from nba_core.errors import NBAError

log = logging.getLogger("nba.api")

TOO_MANY_ACTIVE_JOBS = "too_many_active_jobs"
RATE_LIMITED = "rate_limited"
STORAGE_QUOTA_EXCEEDED = "storage_quota_exceeded"
ACTIVE_RETRY_AFTER_S = 30
STORAGE_RETRY_AFTER_S = 3600
STORE_BACKOFF_S = 15.0


class QuotaExceeded(NBAError):
    def __init__(self, code: str, message: str, retry_after: int):
        super().__init__(code, message, http_status=429)
        self.headers = {"Retry-After": str(max(1, int(retry_after)))}


class Quotas:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._limiter = None
        self._rate = None
        self._down_until = 0.0
        if settings.quota_jobs_per_minute > 0:
            from limits import RateLimitItemPerMinute
            from limits.storage import storage_from_string
            from limits.strategies import MovingWindowRateLimiter

            storage = storage_from_string(str(settings.quota_storage_url), **_storage_options(settings))
            self._limiter = MovingWindowRateLimiter(storage)
            self._rate = RateLimitItemPerMinute(settings.quota_jobs_per_minute)

    # ------------------------------------------------------------------------------------------ submissions
    def hit_submission(self, owner_id: str) -> None:
        """Count one job submission; 429 rate_limited when the per-minute window is full."""
        if self._limiter is None or time.monotonic() < self._down_until:
            return
        try:
            allowed = self._limiter.hit(self._rate, "jobs", owner_id)
            stats = None if allowed else self._limiter.get_window_stats(self._rate, "jobs", owner_id)
        except Exception as e:  # noqa: BLE001 - the window's store (Redis) is down
            # Fail open: job creation must keep working while Redis is down (jobs wait for the sweeper then), and
            # the active-jobs quota, kept in the database, still bounds each owner.
            self._down_until = time.monotonic() + STORE_BACKOFF_S
            log.warning("rate-limit storage unavailable, submissions not rate-limited for %.0f s: %s",
                        STORE_BACKOFF_S, e)
            return
        if not allowed:
            retry = math.ceil(stats.reset_time - time.time())
            raise QuotaExceeded(RATE_LIMITED, f"more than {self.settings.quota_jobs_per_minute} job submissions "
                                "in a minute", retry)

    # ----------------------------------------------------------------------------------------- active jobs
    def lock_owner(self, session: Session, owner_id: str) -> None:
        """Serialise quota checks of one owner until the transaction ends. Postgres: a transaction advisory lock
        per owner. SQLite: a no-op write to the owner's row takes the database's write lock now, before the count
        (a plain SELECT would run unlocked and two requests could both count 9 and both insert the 10th)."""
        dialect = session.get_bind().dialect.name
        if dialect == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                            {"k": 0x4E424100_00000000 + zlib.crc32(owner_id.encode())})
        elif dialect == "sqlite":
            session.execute(text("UPDATE owners SET name = name WHERE id = :id"), {"id": owner_id})

    def check_active_jobs(self, session: Session, owner_id: str) -> None:
        limit = self.settings.quota_active_jobs
        if limit <= 0:
            return
        active = session.execute(select(func.count()).select_from(Job).where(
            Job.owner_id == owner_id, Job.status.in_(("queued", "running")))).scalar_one()
        if active >= limit:
            raise QuotaExceeded(TOO_MANY_ACTIVE_JOBS, f"{active} jobs are queued or running (limit {limit}); wait "
                                "for one to finish or cancel one", ACTIVE_RETRY_AFTER_S)

    # ---------------------------------------------------------------------------------------- stored bytes
    def check_storage(self, session: Session, owner_id: str, incoming: int = 0) -> None:
        limit = self.settings.quota_stored_bytes
        if limit <= 0:
            return
        stored = session.execute(select(func.coalesce(func.sum(Artifact.size_bytes), 0)).where(
            Artifact.owner_id == owner_id, Artifact.kind.in_(("model", "dataset", "probe")))).scalar_one()
        if int(stored) + incoming > limit:
            raise QuotaExceeded(STORAGE_QUOTA_EXCEEDED, f"your uploads use {int(stored)} bytes; {incoming} more "
                                f"would exceed the quota of {limit} bytes", STORAGE_RETRY_AFTER_S)


def _storage_options(settings: Settings) -> dict:
    # A dead Redis must cost little per request: short socket timeouts (redis-py would otherwise wait long).
    url = str(settings.quota_storage_url)
    return {"socket_timeout": 1.0, "socket_connect_timeout": 1.0} if url.startswith(("redis://", "rediss://")) else {}
