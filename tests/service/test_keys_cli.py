"""`nba keys` says which database it used, warns when it had to create one, and does not invent one to list or
revoke in (a key made in a stray ./.nba is a key the server never sees)."""

from __future__ import annotations

import pytest

from app.cli import main

pytestmark = pytest.mark.service


@pytest.fixture()
def embedded_env(monkeypatch, tmp_path):
    for var in ("NBA_DATABASE_URL", "NBA_BROKER_URL", "NBA_STORAGE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NBA_DATA_DIR", str(tmp_path / "default"))  # restored after the test (the CLI sets it)
    return tmp_path


def test_keys_create_names_its_database_and_warns_when_new(embedded_env, capsys):
    data_dir = embedded_env / "served"
    assert main(["keys", "create", "alice", "--data-dir", str(data_dir)]) == 0
    out, err = capsys.readouterr()
    assert out.strip().startswith("nba_")
    assert f"stored in sqlite:///{data_dir / 'nba.db'}" in err and "did not exist and was created" in err
    assert main(["keys", "create", "bob", "--data-dir", str(data_dir)]) == 0
    assert "did not exist" not in capsys.readouterr().err


def test_keys_list_refuses_a_database_that_does_not_exist(embedded_env, capsys):
    assert main(["keys", "list", "--data-dir", str(embedded_env / "elsewhere")]) == 1
    assert "no service database" in capsys.readouterr().err
    assert not (embedded_env / "elsewhere" / "nba.db").exists()
