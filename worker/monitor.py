"""A background thread that keeps a running job's row alive: heartbeat, stage/progress, cancel flag.

The pipeline's progress callback only updates memory; this thread is the single writer to the database, every
`interval` seconds (so a fast defense cannot flood the DB, and a slow epoch cannot make the heartbeat go stale).
The cancellation callback reads the flag the thread last saw, plus the soft deadline.
"""

from __future__ import annotations

import logging
import threading
import time

from .jobstate import Claim, SessionFactory, heartbeat

log = logging.getLogger(__name__)

# Why should_cancel() said yes.
REASON_CANCEL = "cancel_requested"
REASON_LOST = "lost"  # another attempt took the job over: stop without writing anything
REASON_DEADLINE = "deadline"


class JobMonitor:
    def __init__(self, session_factory: SessionFactory, claim: Claim, *, interval: float,
                 soft_deadline: float | None = None):
        self.session_factory = session_factory
        self.claim = claim
        self.interval = interval
        self.soft_deadline = soft_deadline  # time.monotonic() value
        self.stop_reason: str | None = None
        self._stage: str | None = "starting"
        self._progress = 0.0
        self._events: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"job-monitor-{claim.job_id[:8]}", daemon=True)

    # --- callbacks handed to nba_core.pipeline.sanitize (called from the job's thread)
    def progress(self, stage: str, fraction: float) -> None:
        with self._lock:
            if stage != self._stage:
                self._events.append(("stage", {"stage": stage, "progress": round(float(fraction), 4)}))
            self._stage, self._progress = stage, float(fraction)

    def should_cancel(self) -> bool:
        if self.stop_reason is None and self.soft_deadline is not None and time.monotonic() > self.soft_deadline:
            self.stop_reason = REASON_DEADLINE
        return self.stop_reason is not None

    # --- thread
    def start(self) -> "JobMonitor":
        self._thread.start()
        return self

    def flush(self) -> None:
        """Write the current state now (also used for the final flush before finishing)."""
        with self._lock:
            stage, progress, events, self._events = self._stage, self._progress, self._events, []
        try:
            cancel = heartbeat(self.session_factory, self.claim, stage=stage, progress=progress, events=events)
        except Exception:  # a DB hiccup must not kill the job; the next beat retries
            log.warning("heartbeat for job %s failed", self.claim.job_id, exc_info=True)
            with self._lock:
                self._events = events + self._events
            return
        if cancel is None:
            self.stop_reason = REASON_LOST
        elif cancel and self.stop_reason is None:
            self.stop_reason = REASON_CANCEL

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
