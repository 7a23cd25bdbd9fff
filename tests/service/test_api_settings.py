"""Settings: embedded defaults derived from DATA_DIR, NBA_* environment, and the time-limit invariants."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.core.settings import Settings


def test_embedded_defaults(tmp_path, monkeypatch) -> None:
    for var in ("NBA_DATABASE_URL", "NBA_BROKER_URL", "NBA_STORAGE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NBA_DATA_DIR", str(tmp_path))
    s = Settings()
    assert s.database_url == f"sqlite:///{tmp_path / 'nba.db'}"
    assert s.storage_url == f"file://{tmp_path / 'artifacts'}"
    assert s.embedded_broker and s.broker_url == "filesystem://"
    opts = s.broker_transport_options()
    assert opts["data_folder_in"] == opts["data_folder_out"] == str(tmp_path / "broker" / "queue")
    s.ensure_dirs()
    assert (tmp_path / "broker" / "queue").is_dir() and (tmp_path / "artifacts").is_dir()
    assert s.max_model_bytes == s.max_dataset_bytes == 2 * 1024**3 and s.max_attempts == 3


def test_env_overrides(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NBA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("NBA_BROKER_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("NBA_MAX_MODEL_BYTES", "1234")
    s = Settings()
    assert s.broker_url == "redis://127.0.0.1:6379/3" and not s.embedded_broker
    assert s.max_model_bytes == 1234
    assert s.broker_transport_options() == {"visibility_timeout": s.visibility_timeout}


@pytest.mark.parametrize("kw", [
    {"job_hard_time_limit": 100, "job_soft_time_limit": 50, "visibility_timeout": 100},
    {"job_hard_time_limit": 100, "job_soft_time_limit": 100, "visibility_timeout": 200},
    {"max_model_bytes": 0},
])
def test_invalid_limits_are_refused(tmp_path, kw) -> None:
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, **kw)
