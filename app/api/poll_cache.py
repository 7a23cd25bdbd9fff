"""Status polls served from memory, dropped the moment Postgres says the row changed.

A poll is the same JSON until the job's row changes, and clients poll far more often than jobs change. Each API
process keeps the last answer per job (and the owner behind each key hash) and a thread LISTENs on the
`nba_changes` channel, which migration 0004 fills from triggers on jobs, api_keys and artifacts. A notification
arrives only after the writing transaction committed, so:

- a hit is never older than the last notification this process received (milliseconds after the commit);
- a fill races a change: it stores only if no notification for that job or that key arrived since its read began
  (`ticket`), so neither an old job state nor a key revoked meanwhile is kept;
- while the LISTEN connection is down nothing is cached or served from cache (every poll goes to Postgres), and
  a reconnect starts from an empty cache, since notifications sent meanwhile are lost.

Entries also age out (keys after LAST_USED_GRANULARITY_S so that the DB path keeps last_used_at fresh; jobs after
JOB_TTL_S as a second line of defense), and both maps are bounded LRUs. SQLite (embedded mode) has no NOTIFY:
there the cache never goes live.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger("nba.api.poll_cache")

CHANNEL = "nba_changes"
JOB_TTL_S = 60.0
MAX_JOBS = 4096
MAX_KEYS = 4096
RECONNECT_S = 2.0
APPLICATION_NAME = "nba-poll-cache"  # how the LISTEN connection shows in pg_stat_activity


@dataclass(frozen=True)
class CachedKey:
    key_id: str
    owner_id: str
    expires: float


@dataclass(frozen=True)
class CachedJob:
    owner_id: str
    body: bytes
    expires: float


class PollCache:
    """Thread-safe: the event loop reads, a threadpool thread fills, the listener thread invalidates."""

    def __init__(self, key_ttl_s: float, job_ttl_s: float = JOB_TTL_S, max_jobs: int = MAX_JOBS,
                 max_keys: int = MAX_KEYS):
        self.key_ttl_s, self.job_ttl_s = key_ttl_s, job_ttl_s
        self.max_jobs, self.max_keys = max_jobs, max_keys
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, CachedJob] = OrderedDict()
        self._keys: OrderedDict[str, CachedKey] = OrderedDict()
        self._live = False
        # Notification sequence: `_changed["<table>:<id>"]` is the sequence number of that row's last
        # notification, and `_floor` covers every row whose number was forgotten (LRU) or lost (reconnect).
        self._seq = 0
        self._floor = 0
        self._changed: OrderedDict[str, int] = OrderedDict()
        self.hits = 0

    # ------------------------------------------------------------------------------------------------ reads
    @property
    def live(self) -> bool:
        return self._live

    def lookup(self, digest: str, job_id: str) -> bytes | None:
        """The cached body for this key's owner, or None (→ ask Postgres)."""
        if not self._live:
            return None
        now = time.monotonic()
        with self._lock:
            key = self._keys.get(digest)
            if key is None or key.expires < now:
                return None
            job = self._jobs.get(job_id)
            if job is None or job.expires < now or job.owner_id != key.owner_id:
                return None
            self._jobs.move_to_end(job_id)
            self.hits += 1
            return job.body

    def ticket(self) -> int:
        """Taken before reading Postgres; `store` refuses the fill if a change for that job came after it."""
        with self._lock:
            return self._seq if self._live else -1

    def store(self, ticket: int, digest: str, key_id: str, owner_id: str, job_id: str, body: bytes) -> bool:
        if ticket < 0:
            return False
        now = time.monotonic()
        with self._lock:
            if (not self._live or ticket < self._floor or self._changed.get(f"jobs:{job_id}", -1) > ticket
                    or self._changed.get(f"api_keys:{key_id}", -1) > ticket):
                return False  # the job changed or the key was revoked while the row was being read
            self._keys[digest] = CachedKey(key_id, owner_id, now + self.key_ttl_s)
            self._keys.move_to_end(digest)
            self._jobs[job_id] = CachedJob(owner_id, body, now + self.job_ttl_s)
            self._jobs.move_to_end(job_id)
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
            while len(self._jobs) > self.max_jobs:
                self._jobs.popitem(last=False)
            return True

    # ---------------------------------------------------------------------------------------- invalidation
    def changed(self, payload: str) -> None:
        """One notification, "<table>:<id>"."""
        table, _, ident = payload.partition(":")
        with self._lock:
            self._seq += 1
            self._changed[payload] = self._seq
            self._changed.move_to_end(payload)
            while len(self._changed) > 4 * self.max_jobs:
                _, seq = self._changed.popitem(last=False)
                self._floor = max(self._floor, seq)
            if table == "jobs":
                self._jobs.pop(ident, None)
            elif table == "api_keys":
                for digest in [d for d, k in self._keys.items() if k.key_id == ident]:
                    del self._keys[digest]
            else:  # an artifact (a job's result) changed or went away: rare, drop every job
                self._jobs.clear()
                self._floor = self._seq

    def set_live(self, live: bool) -> None:
        """Going live or dead both start from nothing: notifications may have been missed in between."""
        with self._lock:
            self._seq += 1
            self._floor = self._seq
            self._jobs.clear()
            self._keys.clear()
            self._changed.clear()
            self._live = live


def libpq_url(database_url: str) -> str | None:
    """The psycopg connection string of a Postgres SQLAlchemy URL; None for other databases."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        return None
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeListener:
    """A daemon thread holding one LISTEN connection; reconnects with a pause and marks the cache dead meanwhile."""

    def __init__(self, cache: PollCache, conninfo: str):
        self.cache, self.conninfo = cache, conninfo
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nba-change-listener", daemon=True)

    def start(self) -> "ChangeListener":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # the loop looks at it at least once a second
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5,
                                     application_name=APPLICATION_NAME) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.cache.set_live(True)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self.cache.changed(note.payload)
            except Exception as exc:  # the connection broke (or stop cancelled it): serve from Postgres
                if not self._stop.is_set():
                    log.warning("poll cache off until the change listener reconnects: %s", exc)
            finally:
                self.cache.set_live(False)
            self._stop.wait(RECONNECT_S)
