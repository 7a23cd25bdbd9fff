"""Shared service fixtures: a fresh Postgres database per test session (alembic upgrade head, dropped at the end),
Redis db 15 as the broker (flushed), a local artifact store, and a real uvicorn server in a subprocess on a free
loopback port (real HTTP, and its own process so tests can check its memory and imported modules).

Isolation: every test gets a fresh owner (api_key / second_owner_key), and the API scopes everything by owner, so
tests never see each other's rows. Fixtures for a real Celery worker live in conftest_worker.py (worker helper),
loaded below when present.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import psycopg
import pytest
import redis

from app.core import keys
from app.core.db import dispose_engines, session_factory, upgrade_database
from app.core.settings import Settings
from app.core.storage import LocalStore

REPO = Path(__file__).resolve().parents[2]
PG_ADMIN = os.environ.get("NBA_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_BASE = os.environ.get("NBA_TEST_PG_BASE", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_TEST_URL = os.environ.get("NBA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

DIGITS_SPEC: dict[str, Any] = {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "input_size": [8, 8],
                               "mean": [0.5], "std": [0.5]}


# ------------------------------------------------------------------------------------------------ databases

def create_database(prefix: str = "nba_test") -> str:
    """Create an empty Postgres database; returns its SQLAlchemy URL."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_BASE}/{name}"


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    dispose_engines()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = create_database()
    upgrade_database(url)
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_TEST_URL)
    client.flushdb()
    yield REDIS_TEST_URL
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def service_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nba-service")


@pytest.fixture(scope="session")
def service_env(pg_url: str, redis_url: str, service_dir: Path) -> dict[str, str]:
    """NBA_* environment shared by the API server and a test worker (same DB, broker, storage)."""
    return {
        "NBA_DATA_DIR": str(service_dir / "data"),
        "NBA_DATABASE_URL": pg_url,
        "NBA_BROKER_URL": redis_url,
        "NBA_STORAGE_URL": f"file://{service_dir / 'artifacts'}",
        "NBA_MAX_MODEL_BYTES": str(1024**3),
        "NBA_MAX_DATASET_BYTES": str(2 * 1024 * 1024),
        "NBA_DEVICE": "cpu",
        "NBA_DEBUG": "1",
    }


def settings_from_env(env: dict[str, str]) -> Settings:
    fields = {k[len("NBA_"):].lower(): v for k, v in env.items() if k.startswith("NBA_")}
    return Settings(**fields)


@pytest.fixture(scope="session")
def service_settings(service_env: dict[str, str]) -> Settings:
    return settings_from_env(service_env)


@pytest.fixture(scope="session")
def sessions(service_settings: Settings):
    """sessionmaker bound to the test database."""
    return session_factory(service_settings)


@pytest.fixture()
def db(sessions) -> Iterator:
    with sessions() as session:
        yield session


@pytest.fixture(scope="session")
def store(service_settings: Settings) -> LocalStore:
    return LocalStore(str(service_settings.storage_url)[len("file://"):])


# -------------------------------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    env: dict[str, str]
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def memory_kb(self, field_name: str = "VmHWM") -> int:
        """VmHWM = peak resident set size, VmRSS = current (kB) of the server process."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{field_name} not found")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_server(env: dict[str, str], log_dir: Path, timeout: float = 30.0) -> Server:
    port = free_port()
    log_path = log_dir / f"uvicorn-{port}.log"
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("NBA_")}, **env}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning", "--no-access-log"],
            cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(proc=proc, url=f"http://127.0.0.1:{port}", env=env, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"API server exited ({proc.returncode}):\n{server.log()}")
        try:
            if httpx.get(server.url + "/healthz", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"API server did not start within {timeout} s:\n{server.log()}")


@pytest.fixture(scope="session")
def server_factory(service_env: dict[str, str], service_dir: Path) -> Iterator:
    """start(**overrides) → a fresh Server with service_env + NBA_* overrides; all stopped at session end."""
    started: list[Server] = []

    def start(**overrides: str) -> Server:
        env = {**service_env, **{f"NBA_{k.upper()}": str(v) for k, v in overrides.items()}}
        server = start_server(env, service_dir)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def api_server(server_factory) -> Server:
    return server_factory()


# ---------------------------------------------------------------------------------------------- API keys

@pytest.fixture()
def make_key(sessions):
    """make_key(owner_name=None) → plaintext key of a (fresh, unless named) owner."""

    def make(owner_name: str | None = None) -> str:
        with sessions() as session:
            plaintext = keys.create_key(session, owner_name or f"test-{uuid.uuid4().hex[:12]}")
            session.commit()
            return plaintext

    return make


@pytest.fixture()
def api_key(make_key) -> str:
    return make_key()


@pytest.fixture()
def second_owner_key(make_key) -> str:
    return make_key()


@pytest.fixture()
def http(api_server: Server, api_key: str) -> Iterator[httpx.Client]:
    """httpx client for the API server, authenticated as this test's owner."""
    with httpx.Client(base_url=api_server.url, headers={"Authorization": f"Bearer {api_key}"},
                      timeout=60.0) as client:
        yield client


@pytest.fixture()
def client(api_server: Server, api_key: str):
    from app.client import NBAClient

    with NBAClient(api_server.url, api_key) as c:
        yield c


# ------------------------------------------------------------------------------------------ tiny payloads

def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]] | None = None, fill: int = 0) -> bytes:
    """A syntactically valid safetensors file built by hand (no torch): {name: (dtype, shape)}."""
    tensors = tensors or {"fc.weight": ("F32", [10, 4]), "fc.bias": ("F32", [10])}
    itemsize = {"F32": 4, "F16": 2, "I64": 8, "U8": 1}
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = itemsize[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + bytes([fill]) * offset


def digits_npz_bytes(n: int = 40, seed: int = 0) -> bytes:
    """A small image dataset in .npz form (x: uint8 N×8×8×1, y: int64)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    np.savez(buf, x=rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8),
             y=np.arange(n, dtype=np.int64) % 10)
    return buf.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload_placeholders(base_url: str, key: str) -> dict[str, str]:
    """Upload a tiny model + dataset as `key`'s owner; returns {"model_id", "dataset_id"}."""
    from app.client import NBAClient

    with NBAClient(base_url, key) as c:
        model_bytes = safetensors_bytes()
        model = c.upload_stream("/v1/models", [model_bytes], len(model_bytes), filename="model.safetensors",
                                fields={"spec": json.dumps(DIGITS_SPEC)})
        data = digits_npz_bytes()
        dataset = c.upload_stream("/v1/datasets", [data], len(data), filename="digits.npz")
    return {"model_id": model["id"], "dataset_id": dataset["id"]}


@pytest.fixture()
def uploaded_factory():
    return upload_placeholders


@pytest.fixture()
def uploaded(client) -> dict[str, dict]:
    """A model and a dataset uploaded by this test's owner (cheap placeholders: jobs on them are never run)."""
    ids = upload_placeholders(client.base_url, client._http.headers["Authorization"].split(" ", 1)[1])
    return {"model": client.get_model(ids["model_id"]), "dataset": client.get_dataset(ids["dataset_id"])}


# --------------------------------------------------------------------- worker fixtures (worker helper's file)

_WORKER_PLUGIN = Path(__file__).with_name("conftest_worker.py")
if _WORKER_PLUGIN.exists():
    # Loaded into this module's namespace (not via pytest_plugins, which pytest refuses in a non-root conftest
    # when the suite is run from the repo root), so its fixtures can use the ones above.
    _spec = importlib.util.spec_from_file_location("tests_service_conftest_worker", _WORKER_PLUGIN)
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _module
    _spec.loader.exec_module(_module)
    globals().update({k: v for k, v in vars(_module).items() if not k.startswith("__")})
