"""The light client and the two distributions: a user's `pip install nba-sanitizer` brings the library and the
HTTP client only; the service (app, worker, migrations, bench) is service/pyproject.toml and plugs its commands
into `nba` through the `nba.commands` entry-point group."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCK_SERVICE = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'fastapi', 'celery', 'sqlalchemy', 'torch', 'app', 'worker', 'boto3'}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_client_imports_without_service_dependencies_or_torch():
    code = BLOCK_SERVICE + "from nba_core.client import NBAClient, APIError, sanitize\nprint('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_library_cli_runs_without_the_service():
    code = (BLOCK_SERVICE.replace("'torch', ", "")  # the library's own commands do need torch
            + "from nba_core.cli import main\nraise SystemExit(main(['methods', 'ft']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ft: ") and "epochs" in proc.stdout


def test_library_wheel_ships_only_nba_core_and_service_wheel_the_rest():
    lib = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert lib["tool"]["setuptools"]["packages"]["find"]["include"] == ["nba_core*"]
    assert "httpx>=0.27" in lib["project"]["dependencies"]
    assert not any(d.split(">")[0].split("[")[0] in ("fastapi", "celery", "sqlalchemy")
                   for d in lib["project"]["dependencies"])
    svc = tomllib.loads((ROOT / "service" / "pyproject.toml").read_text())
    assert svc["project"]["entry-points"]["nba.commands"] == {"service": "app.cli:register"}
    assert set(svc["tool"]["setuptools"]["packages"]["find"]["include"]) == {"app*", "worker*", "migrations*",
                                                                              "bench*"}


def test_command_groups_compose_the_cli():
    from nba_core.cli import build_parser

    def register(sub):
        sub.add_parser("hello").set_defaults(func=lambda args: 0)

    parser = build_parser([register])
    assert parser.parse_args(["hello"]).command == "hello"
    from app.cli import main as service_main
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            service_main(["--help"])
        except SystemExit:
            pass
    for command in ("attack", "sanitize", "evaluate", "methods", "serve", "keys", "submit", "download", "demo"):
        assert command in out.getvalue()


def test_service_cli_runs_as_a_module_whether_or_not_its_entry_point_is_installed(tmp_path):
    """`python -m app.cli` registers the service commands once, also when the nba.commands entry point is visible
    (an editable install, or its egg-info next to the code)."""
    info = tmp_path / "fake_service-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-service\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[nba.commands]\nservice = app.cli:register\n")
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    for module in ("app.cli", "nba_core.cli"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "serve" in proc.stdout and "sanitize" in proc.stdout
