"""Service settings from the environment (prefix NBA_), with embedded defaults that need no servers.

With nothing set, everything lives under DATA_DIR: SQLite database, filesystem broker and local artifact store,
so `nba serve` works on a laptop; production points DATABASE_URL/BROKER_URL/STORAGE_URL at Postgres/Redis/S3.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1024**3


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NBA_", extra="ignore")

    data_dir: Path = Path("./.nba")
    # None means "derive the embedded default from data_dir" (filled in by _fill_defaults).
    database_url: str | None = None
    broker_url: str | None = None
    storage_url: str | None = None

    # S3 (only used when storage_url is s3://bucket/prefix); unset values fall back to boto3's own lookup.
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None

    max_model_bytes: int = Field(default=2 * GIB, gt=0)
    max_dataset_bytes: int = Field(default=2 * GIB, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    job_soft_time_limit: int = Field(default=3600, gt=0)
    job_hard_time_limit: int = Field(default=3900, gt=0)
    # Redis redelivers unacked tasks after this many seconds: it must outlast the hard time limit, or a
    # long-running job would be handed to a second worker while the first is still on it.
    visibility_timeout: int = Field(default=4200, gt=0)
    sweep_interval: int = Field(default=60, gt=0)
    sweep_stale_after: int = Field(default=300, gt=0)
    heartbeat_interval: float = Field(default=0.5, gt=0)
    device: str = "auto"
    # HMAC key of shareable report links (GET /v1/jobs/{id}/report-link). Unset: a random key kept in
    # $NBA_DATA_DIR/link-secret (set it explicitly when several API replicas must accept each other's links).
    link_secret: str | None = None
    link_max_ttl: int = Field(default=24 * 3600, gt=0)

    # Request limits. JSON bodies (everything but the streamed uploads) are capped before any byte is parsed.
    max_json_body_bytes: int = Field(default=256 * 1024, gt=0)
    # A request body that stalls longer than this between chunks is cut (408); slow *headers* are the reverse
    # proxy's job (deploy/nginx.conf: client_header_timeout), uvicorn closes idle keep-alives after 5 s.
    body_read_timeout: float = Field(default=30.0, gt=0)

    # Per-key quotas (429 + Retry-After): queued+running jobs, job submissions per minute, stored upload bytes.
    # 0 disables one. The rate window lives in QUOTA_STORAGE_URL (`limits` storage URI; default: the Redis
    # broker, so several API processes share it; memory:// in embedded mode, where `nba serve` runs one process).
    quota_active_jobs: int = Field(default=10, ge=0)
    quota_jobs_per_minute: int = Field(default=60, ge=0)
    quota_stored_bytes: int = Field(default=50 * GIB, ge=0)
    quota_storage_url: str | None = None

    # Free space under which uploads are refused up front (507) and /readyz reports the storage not ready.
    min_free_bytes: int = Field(default=1 * GIB, ge=0)

    # Per-process concurrency: threads for blocking work (DB, disk) and the DB pool sized to match, so a
    # request never waits for a connection its thread could not use anyway. Connections are recycled after
    # DB_POOL_RECYCLE seconds instead of being pinged on every checkout.
    api_threads: int = Field(default=32, ge=1, le=512)
    db_pool_recycle: int = Field(default=1800, gt=0)
    # Behind nginx with the local artifact store mounted at this internal location (deploy/nginx.conf): model
    # downloads are answered with X-Accel-Redirect and nginx sends the file itself (sendfile, Range). Unset: the
    # API streams the file.
    accel_redirect_prefix: str | None = Field(default=None, pattern=r"^/[A-Za-z0-9_/-]*/$")
    # Serve repeated status polls from memory, invalidated by Postgres NOTIFY (app/api/poll_cache.py). Postgres
    # only; off means every poll is one SELECT.
    poll_cache: bool = True

    # Extra endpoints for bench/service_speed.py's ceilings (constant JSON, one SELECT by primary key). Off.
    bench_endpoints: bool = False
    # Enables /v1/_debug/* endpoints (tests use them to inspect the server process).
    debug: bool = False

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Settings":
        if self.job_soft_time_limit >= self.job_hard_time_limit:
            raise ValueError("JOB_SOFT_TIME_LIMIT must be smaller than JOB_HARD_TIME_LIMIT")
        if self.visibility_timeout <= self.job_hard_time_limit:
            raise ValueError("VISIBILITY_TIMEOUT must be greater than JOB_HARD_TIME_LIMIT")
        root = self.data_dir.expanduser().absolute()
        if self.database_url is None:
            self.database_url = f"sqlite:///{root / 'nba.db'}"
        if self.broker_url is None:
            self.broker_url = "filesystem://"
        if self.storage_url is None:
            self.storage_url = f"file://{root / 'artifacts'}"
        if self.quota_storage_url is None:
            broker = str(self.broker_url)
            self.quota_storage_url = broker if broker.startswith(("redis://", "rediss://")) else "memory://"
        return self

    @property
    def embedded_broker(self) -> bool:
        return str(self.broker_url).startswith("filesystem://")

    def broker_transport_options(self) -> dict[str, Any]:
        """Kombu transport options: folders for the filesystem broker, visibility timeout for Redis/SQS."""
        if self.embedded_broker:
            folder = self.data_dir.expanduser().absolute() / "broker"
            return {
                "data_folder_in": str(folder / "queue"),
                "data_folder_out": str(folder / "queue"),
                "processed_folder": str(folder / "processed"),
                "store_processed": False,
            }
        return {"visibility_timeout": self.visibility_timeout}

    def ensure_dirs(self) -> None:
        """Create the local folders the embedded defaults need (no-op for server-backed URLs)."""
        root = self.data_dir.expanduser().absolute()
        root.mkdir(parents=True, exist_ok=True)
        if self.embedded_broker:
            for key in ("data_folder_in", "processed_folder"):
                Path(self.broker_transport_options()[key]).mkdir(parents=True, exist_ok=True)
        if str(self.storage_url).startswith("file://"):
            Path(str(self.storage_url)[len("file://"):]).mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings read once from the environment (tests build their own Settings instead)."""
    return Settings()
