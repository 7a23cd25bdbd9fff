"""`nba serve`: the API, a local Celery worker and the sweeper on one machine.

The worker is a real `celery worker` subprocess (the same code path as production; solo pool by default so a
laptop runs one job at a time in one process), the sweeper a thread of the serve process, the API uvicorn in the
foreground. With the embedded defaults (no NBA_DATABASE_URL / NBA_BROKER_URL) they talk through SQLite and the
kombu filesystem broker under the data dir. That broker deletes a message when it is delivered (no late-ack
redelivery), so a job interrupted by a crash is recovered by the sweeper after SWEEP_STALE_AFTER seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def child_env(settings) -> dict[str, str]:
    """Environment for child processes: the same settings, with the data dir made absolute."""
    env = dict(os.environ)
    env["NBA_DATA_DIR"] = str(Path(settings.data_dir).expanduser().absolute())
    # The children must import this checkout even when started from elsewhere.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def worker_argv(*, pool: str = "prefork", concurrency: int = 1, loglevel: str = "INFO",
                hostname: str | None = None) -> list[str]:
    """The `celery worker` command line (run it with `python -m celery`)."""
    from .celery_app import QUEUE

    argv = ["-A", "worker.celery_app", "worker", f"--pool={pool}", f"--concurrency={concurrency}", "-Q", QUEUE,
            f"--loglevel={loglevel}", "--without-gossip", "--without-mingle"]
    if hostname:
        argv += ["-n", hostname]
    return argv


def start_worker(settings, *, pool: str = "solo", loglevel: str = "INFO", hostname: str | None = None,
                 log_file=None) -> subprocess.Popen:
    """Start `python -m celery -A worker.celery_app worker` in its own process group (Ctrl-C in the terminal
    reaches only the serve process, which then shuts the worker down in order)."""
    cmd = [sys.executable, "-m", "celery", *worker_argv(pool=pool, loglevel=loglevel, hostname=hostname)]
    return subprocess.Popen(cmd, env=child_env(settings), start_new_session=True,
                            stdout=log_file, stderr=subprocess.STDOUT if log_file else None)


def stop_process(proc: subprocess.Popen, *, grace: float = 20.0) -> None:
    """SIGTERM (Celery: warm shutdown), then SIGKILL after `grace` seconds; the sweeper re-runs a killed job."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def start_sweeper_thread(settings) -> threading.Event:
    from app.core.db import session_factory

    from .celery_app import enqueue_job
    from .sweeper import backlog_from_settings, run_sweeper

    stop = threading.Event()
    thread = threading.Thread(
        target=run_sweeper, name="nba-sweeper", daemon=True,
        kwargs=dict(session_factory=session_factory(settings), enqueue=enqueue_job,
                    interval=settings.sweep_interval, stale_after=settings.sweep_stale_after, stop=stop,
                    backlog=backlog_from_settings(settings)))
    thread.start()
    return stop


def server_options() -> dict:
    """uvicorn settings for `nba serve`: uvloop/httptools when installed (uvicorn[standard]), idle keep-alives
    closed after 5 s, a cap on concurrent connections. A laptop has no proxy in front; production uses one."""
    import importlib.util

    fast = importlib.util.find_spec("uvloop") is not None and importlib.util.find_spec("httptools") is not None
    options = {"timeout_keep_alive": 5, "limit_concurrency": 1000, "backlog": 2048}
    if fast:
        options.update(loop="uvloop", http="httptools")
    return options


def _raise_system_exit(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def serve(settings, *, host: str = "127.0.0.1", port: int = 8000, with_worker: bool = True, migrate: bool = True,
          pool: str = "solo") -> int:
    import uvicorn

    from app.core.db import upgrade_database

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.ensure_dirs()
    if migrate:
        upgrade_database(str(settings.database_url))
    mode = "embedded" if settings.embedded_broker else "external broker"
    log.info("nba serve on http://%s:%d (%s; data dir %s)", host, port, mode, settings.data_dir)
    worker = start_worker(settings, pool=pool) if with_worker else None
    stop_sweeper = start_sweeper_thread(settings)
    # uvicorn re-raises the signal that stopped it; turn SIGTERM into an exception so `finally` still runs.
    signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_level="info",
                    **server_options())
    finally:
        stop_sweeper.set()
        if worker is not None:
            stop_process(worker)
    return 0
