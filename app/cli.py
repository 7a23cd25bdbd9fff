"""Service commands for the `nba` CLI: serve, keys, submit, status, download, worker, sweeper, migrate, demo.

The service distribution (service/pyproject.toml) registers `register(subparsers)` in the `nba.commands`
entry-point group, which the library CLI (nba_core.cli) reads; `python -m app.cli` composes the same CLI
explicitly, so it works from a checkout whose service is not installed. Nothing heavy is imported at module import (no FastAPI, Celery or
torch): each command imports what it needs.

With no NBA_DATABASE_URL / NBA_BROKER_URL / NBA_STORAGE_URL set, everything runs "embedded" under the data dir
(SQLite, filesystem broker, local artifacts), so `nba serve` needs no servers; set those variables (Postgres,
Redis, S3) for production and the same commands use them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED = 0, 1
DEFAULT_URL = "http://127.0.0.1:8000"


# ------------------------------------------------------------------------------------------------ settings


def _settings(args=None):
    """Settings for this process; --data-dir (when given) wins over NBA_DATA_DIR and is passed to children."""
    from app.core.settings import get_settings

    data_dir = getattr(args, "data_dir", None)
    if data_dir:
        os.environ["NBA_DATA_DIR"] = str(Path(data_dir).expanduser().absolute())
    get_settings.cache_clear()
    settings = get_settings()
    settings.ensure_dirs()
    return settings


def _migrate(settings) -> None:
    from app.core.db import upgrade_database

    upgrade_database(str(settings.database_url))


def _redact(url: str) -> str:
    """Hide a password in a URL before printing it."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


# ------------------------------------------------------------------------------------------------ commands


def cmd_migrate(args) -> int:
    settings = _settings(args)
    _migrate(settings)
    print(f"database is at the latest revision ({_redact(str(settings.database_url))})")
    return EXIT_OK


def _database_is_new(args) -> tuple[bool, str]:
    """Whether the embedded database this command would use does not exist yet (and its path)."""
    from app.core.settings import Settings

    data_dir = getattr(args, "data_dir", None) or os.environ.get("NBA_DATA_DIR")
    probe = Settings(data_dir=Path(data_dir)) if data_dir else Settings()
    url = str(probe.database_url)
    if not url.startswith("sqlite:///"):
        return False, url
    path = Path(url[len("sqlite:///"):])
    return not path.exists(), str(path)


def cmd_keys(args) -> int:
    from app.core import keys
    from app.core.db import session_scope

    new_db, where = _database_is_new(args)
    if new_db and args.keys_command != "create":
        print(f"nba: no service database at {where}: run this where `nba serve` runs, or pass --data-dir / set "
              f"NBA_DATA_DIR (or NBA_DATABASE_URL)", file=sys.stderr)
        return EXIT_FAILED
    settings = _settings(args)
    _migrate(settings)  # idempotent; lets `nba keys create` work on a fresh embedded data dir
    with session_scope(settings) as session:
        if args.keys_command == "create":
            key = keys.create_key(session, args.owner)
            print(key)
            print(f"(API key for owner {args.owner!r}, stored in {_redact(str(settings.database_url))}; it is shown "
                  f"only once)", file=sys.stderr)
            if new_db:
                print(f"nba: note: that database did not exist and was created now ({where}). A server started from "
                      f"another folder or with another NBA_DATA_DIR / NBA_DATABASE_URL will not know this key; "
                      f"use the same --data-dir as `nba serve`.", file=sys.stderr)
        elif args.keys_command == "revoke":
            count = keys.revoke_key(session, args.prefix)
            if not count:
                print(f"nba: no active key matches {args.prefix!r}", file=sys.stderr)
                return EXIT_FAILED
            print(f"revoked {count} key(s)")
        else:
            rows = keys.list_keys(session, args.owner)
            if args.json:
                print(json.dumps([{"prefix": k.prefix, "owner": k.owner_name, "created_at": k.created_at.isoformat(),
                                   "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
                                   "last_used_at": k.last_used_at.isoformat() if k.last_used_at else None}
                                  for k in rows]))
            else:
                for k in rows:
                    state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
                    print(f"{k.prefix}  {k.owner_name:<20} created {k.created_at:%Y-%m-%d %H:%M}  {state}")
    return EXIT_OK


def cmd_worker(args) -> int:
    settings = _settings(args)
    if settings.embedded_broker or str(settings.database_url).startswith("sqlite"):
        _migrate(settings)
    from worker.celery_app import app as celery
    from worker.embedded import worker_argv

    celery.worker_main(worker_argv(pool=args.pool, concurrency=args.concurrency, loglevel=args.loglevel,
                                   hostname=args.hostname)[2:])
    return EXIT_OK


def cmd_sweeper(args) -> int:
    import logging

    from worker.sweeper import run_from_settings

    settings = _settings(args)
    if str(settings.database_url).startswith("sqlite"):
        _migrate(settings)  # embedded: the sweeper may be the first process to touch a fresh data dir
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_from_settings()
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_serve(args) -> int:
    from worker.embedded import serve

    settings = _settings(args)
    return serve(settings, host=args.host, port=args.port, with_worker=not args.no_worker,
                 migrate=not args.no_migrate, pool=args.pool)


# ------------------------------------------------------------------------------------------ client commands


def _client(args):
    from nba_core.client import NBAClient

    url = args.url or os.environ.get("NBA_URL") or DEFAULT_URL
    key = args.api_key or os.environ.get("NBA_API_KEY")
    if not key:
        raise _usage("an API key is needed: --api-key or NBA_API_KEY (create one with `nba keys create OWNER`)")
    return NBAClient(url, key)


def _usage(message: str):
    from nba_core.errors import NBAError

    return NBAError("usage", message)


def _print_job(job: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(job, indent=2))
        return
    for line in (job.get("verdict") or {}).get("headline") or []:  # the verdict first
        print(line)
    print(f"job {job['id']}: {job['status']}"
          + (f" ({job.get('stage')}, {100 * float(job.get('progress') or 0):.0f} %)" if job["status"] == "running"
             else ""))
    for warning in job.get("warnings") or []:
        print(f"  WARNING: {warning}")
    if job.get("error"):
        print(f"  error [{job['error'].get('code')}]: {job['error'].get('message')}")
    metrics = job.get("metrics") or {}
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    for key, label in (("clean_accuracy", "clean accuracy"), ("attack_success_rate", "attack success rate")):
        if isinstance(before.get(key), (int, float)) and isinstance(after.get(key), (int, float)):
            print(f"  {label:<22} {100 * before[key]:6.2f} % -> {100 * after[key]:6.2f} %"
                  + (f"  (held-out n={before.get('holdout_size')})" if key == "clean_accuracy" else ""))


def _wait(client, job_id: str, *, quiet: bool) -> dict:
    from nba_core.progress import JobProgressBar

    bar = JobProgressBar(not quiet)
    try:
        return client.wait(job_id, on_progress=bar)
    finally:
        bar.close()


def cmd_submit(args) -> int:
    from nba_core.params import parse_params

    params = parse_params(None, args.params)
    from nba_core.data.classes import read_class_file

    class_names = read_class_file(args.classes) if args.classes else None
    client = _client(args)
    model = client.upload_model(args.model, spec=args.spec)
    data = client.upload_dataset(args.data)
    classes = (data.get("details") or {}).get("classes")
    if classes and not args.json and class_names is None:  # folder/archive uploads: how folder names become labels (before any work)
        print(f"data: {data.get('details', {}).get('images')} images; folders -> labels: "
              + ", ".join(f"{k}={v}" for k, v in sorted(classes.items(), key=lambda kv: kv[1])), file=sys.stderr)
    probe = client.upload_dataset(args.probe, kind="probe") if args.probe else None
    job = client.create_job(model_id=model["id"], dataset_id=data["id"], method=args.method.strip().lower(),
                            params=params, probe_id=probe["id"] if probe else None, probe_target=args.probe_target,
                            class_names=class_names, allow_low_accuracy=args.allow_low_accuracy)
    print(job["id"] if not args.json else json.dumps(job))
    if not (args.wait or args.out):
        return EXIT_OK
    job = _wait(client, job["id"], quiet=args.quiet)
    _print_job(job, args.json)
    if job["status"] != "succeeded":
        return EXIT_FAILED
    if not args.json:
        from nba_core.cli import print_label_mapping

        report = client.get_report(job["id"])
        print_label_mapping((report.get("data") or {}).get("class_names"), (report.get("data") or {}).get("class_counts"))
        for warning in report.get("warnings") or []:
            print(f"nba: warning: {warning}", file=sys.stderr)
    if args.out:
        got = client.download_model(job["id"], args.out)
        print(f"cleaned model -> {got['path']} (sha256 {got['sha256']}, verified)")
    return EXIT_OK


def cmd_status(args) -> int:
    client = _client(args)
    job = _wait(client, args.job, quiet=args.quiet) if args.wait else client.get_job(args.job)
    _print_job(job, args.json)
    return EXIT_OK if job["status"] not in ("failed", "cancelled") else EXIT_FAILED


def cmd_download(args) -> int:
    client = _client(args)
    if not (args.out or args.report or args.report_link):
        raise _usage("give --out, --report and/or --report-link")
    if args.report:
        html = args.html or str(args.report).lower().endswith((".html", ".htm"))
        report = client.get_report(args.job, html=html)
        Path(args.report).write_text(report if html else json.dumps(report, indent=2), encoding="utf-8")
        print(f"report -> {args.report}" + (" (HTML: open it in a browser)" if html else ""))
    if args.report_link:
        link = client.report_link(args.job, ttl=args.ttl)
        print(f"report link (valid until {link['expires_at']}, no key needed): {link['url']}")
    if args.out:
        got = client.download_model(args.job, args.out)
        print(f"cleaned model -> {got['path']} (sha256 {got['sha256']}, verified)")
    return EXIT_OK


def cmd_demo(args) -> int:
    from app.demo import run_demo

    return run_demo(data_dir=args.data_dir, workdir=args.workdir, method=args.method, params_json=args.params,
                    port=args.port, quiet=args.quiet)


def _api_errors(func):
    """Report the service's error code/message the way the CLI reports library errors."""
    import functools

    @functools.wraps(func)
    def wrapper(args) -> int:
        import httpx

        from nba_core.client import APIError
        from nba_core.errors import NBAError

        try:
            return func(args)
        except APIError as e:
            raise NBAError(e.code, e.message) from e
        except httpx.TransportError as e:
            raise NBAError("unreachable", f"cannot reach the service at {args.url or os.environ.get('NBA_URL') or DEFAULT_URL}: {e}") from e

    return wrapper


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="service URL (default: NBA_URL or http://127.0.0.1:8000)")
    p.add_argument("--api-key", help="API key (default: NBA_API_KEY)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _register_client_commands(sub) -> None:
    s = sub.add_parser("submit", help="upload a model + clean data to the service and start a sanitization job")
    s.add_argument("model", help="suspect model (.safetensors or .pt state_dict)")
    s.add_argument("--spec", help="model spec JSON file (default: the spec a .safetensors written by nba carries)")
    s.add_argument("--data", required=True, help="clean subset: a folder of class folders (zipped on the fly), a "
                   "zip/tar of them, or .npz")
    s.add_argument("--classes", metavar="FILE", help="class names in label order, one per line")
    s.add_argument("--allow-low-accuracy", action="store_true", help="run even if the model is near chance on the "
                   "clean data (normally a label-order or mean/std mistake, refused)")
    s.add_argument("--method", default="nba")
    s.add_argument("--params", help="hyperparameter overrides as JSON")
    s.add_argument("--probe", help="optional triggered probe set (npz with true labels) to measure ASR")
    s.add_argument("--probe-target", type=int)
    s.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    s.add_argument("--out", help="download the cleaned model here when done (implies --wait)")
    _add_client_options(s)
    s.set_defaults(func=_api_errors(cmd_submit))

    st = sub.add_parser("status", help="show a job (with --wait: follow it until it ends)")
    st.add_argument("job")
    st.add_argument("--wait", action="store_true")
    _add_client_options(st)
    st.set_defaults(func=_api_errors(cmd_status))

    d = sub.add_parser("download", help="download a finished job's cleaned model and/or report")
    d.add_argument("job")
    d.add_argument("--out", help="where to write the cleaned .safetensors")
    d.add_argument("--report", help="where to write the report (JSON; HTML with --html or a .html name)")
    d.add_argument("--html", action="store_true", help="write the report as a self-contained HTML page")
    d.add_argument("--report-link", action="store_true", help="print a signed URL of the HTML report that a "
                   "browser opens without the API key")
    d.add_argument("--ttl", type=int, default=900, help="seconds the --report-link URL stays valid (default 900)")
    _add_client_options(d)
    d.set_defaults(func=_api_errors(cmd_download))

    dm = sub.add_parser("demo", help="end-to-end demo on this machine: backdoor MNIST-5k, sanitize it through the "
                                     "embedded service, compare before/after")
    dm.add_argument("--data-dir", help="service data dir (default: a fresh temporary folder)")
    dm.add_argument("--workdir", help="where to keep the demo files (default: a temporary folder)")
    dm.add_argument("--method", default="nba")
    dm.add_argument("--params", help="hyperparameter overrides as JSON")
    dm.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    dm.add_argument("--quiet", action="store_true")
    dm.set_defaults(func=cmd_demo)


# ---------------------------------------------------------------------------------------------- registration


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="embedded-mode data folder (default: NBA_DATA_DIR or ./.nba)")


def register(sub) -> None:
    s = sub.add_parser("serve", help="run the service: REST API + a local worker + the sweeper")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    _add_data_dir(s)
    s.add_argument("--no-worker", action="store_true", help="API only (run workers with `nba worker`)")
    s.add_argument("--no-migrate", action="store_true", help="do not run database migrations at start")
    s.add_argument("--pool", default="solo", choices=("solo", "prefork"), help="local worker pool (default solo)")
    s.set_defaults(func=cmd_serve)

    k = sub.add_parser("keys", help="manage API keys (directly in the database)")
    _add_data_dir(k)
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = ksub.add_parser("create", help="create a key for OWNER (created if new) and print it")
    kc.add_argument("owner")
    kr = ksub.add_parser("revoke", help="revoke a key by its 12-character prefix (or id)")
    kr.add_argument("prefix")
    kl = ksub.add_parser("list", help="list keys (prefixes only)")
    kl.add_argument("--owner")
    kl.add_argument("--json", action="store_true")
    for action in (kc, kr, kl):  # accept --data-dir after the action too (SUPPRESS: don't reset the parent's)
        action.add_argument("--data-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    k.set_defaults(func=cmd_keys)

    w = sub.add_parser("worker", help="run a Celery worker (one per GPU: set CUDA_VISIBLE_DEVICES, keep -c 1)")
    _add_data_dir(w)
    w.add_argument("--pool", default="prefork", choices=("prefork", "solo"))
    w.add_argument("-c", "--concurrency", type=int, default=1)
    w.add_argument("--loglevel", default="INFO")
    w.add_argument("-n", "--hostname", help="worker node name, e.g. gpu0@%%h")
    w.set_defaults(func=cmd_worker)

    sw = sub.add_parser("sweeper", help="re-enqueue jobs the broker lost (loop every NBA_SWEEP_INTERVAL s)")
    _add_data_dir(sw)
    sw.set_defaults(func=cmd_sweeper)

    m = sub.add_parser("migrate", help="upgrade the database schema to the latest revision")
    _add_data_dir(m)
    m.set_defaults(func=cmd_migrate)

    _register_client_commands(sub)


def main(argv: list[str] | None = None) -> int:
    """The whole `nba` CLI: the library's commands plus this module's (whether or not entry points are installed)."""
    from app import cli as this_module  # under `python -m app.cli` this file is __main__: use the importable one,
    from nba_core.cli import main as library_main  # the object the nba.commands entry point loads (no duplicate)

    return library_main(argv, extra_groups=[this_module.register])


if __name__ == "__main__":
    sys.exit(main())
