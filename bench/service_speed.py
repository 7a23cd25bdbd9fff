"""Service speed against the real stack on loopback: a fresh Postgres database (dropped at the end), Redis db 14
as the broker, a local artifact store in a temporary folder, uvicorn API subprocesses and a Celery worker.

Measures, each against a reference measured in the same run (speed is reported as a ratio):
1. a 1 GiB upload (an uncompressed tar of image-named members, streamed from a file by curl) against an fsync'd
   copy of the same file on the same disk, and the API process's peak RSS (VmHWM): the upload path must stay
   constant-memory (target: >= 0.8x the copy, RSS <= 300 MB);
2. GET /v1/jobs/{id} polls per second and latency percentiles under N keep-alive connections (wrk), next to two
   ceilings served by the same processes with the same settings: a constant-JSON endpoint (no thread, no DB) and
   a one-SELECT-by-primary-key endpoint (one thread hop, one pooled query); enabled by NBA_BENCH_ENDPOINTS=1,
   off by default (targets: >= 1,500 req/s, p99 <= 50 ms, >= 0.8x the one-SELECT ceiling);
3. a 200 MB download (GET /v1/jobs/{id}/model, curl to /dev/null) against `cat` of the stored file (>= 0.5x),
   straight from uvicorn and, when nginx is installed, through nginx with X-Accel-Redirect as deployed;
4. a tiny real job's end-to-end overhead beyond compute: POST /v1/jobs → status succeeded as seen by a polling
   client, minus the pipeline's own report["timing"]["total_seconds"] (= queue + fetch/load + save + DB).

The API runs as production does (Dockerfile): uvicorn --loop uvloop --http httptools, 2 processes for polls.

`python -m bench.service_speed` writes docs/benchmarks/service_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from .common import OUT_DIR, provenance

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("NBA_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_BASE = os.environ.get("NBA_BENCH_PG_BASE", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("NBA_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")

GIB = 1024**3
UPLOAD_MEMBERS = 256
UPLOAD_MEMBER_BYTES = 4 * 1024**2
UPLOAD_BYTES = UPLOAD_MEMBERS * (512 + UPLOAD_MEMBER_BYTES) + 1024  # ~1 GiB tar
DOWNLOAD_BYTES = 200 * 1000**2
UPLOAD_CHUNK = 1024 * 1024
SAFETENSORS_HEADER_BYTES = 128  # JSON header padded with spaces to this length (a multiple of 8)
POLL_SECONDS = 20
POLL_CONNECTIONS = 16
LOADGEN_MAX_REQUESTS = 500_000  # the fallback load generator stops at this count or at the deadline
E2E_RUNS = 5  # warm runs, after one cold run (the pool child's first job imports torch & co.)
DIGITS_SPEC = {"arch": "small_cnn", "num_classes": 10, "in_channels": 1, "input_size": [8, 8],
               "mean": [0.5], "std": [0.5]}


def _log(msg: str) -> None:
    print(f"[service_speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _loopback_only(url: str) -> None:
    if urlparse(url).hostname != "127.0.0.1":
        raise ValueError(f"refusing to load a non-loopback URL: {url}")


# ------------------------------------------------------------------------------------------------- the stack

def create_database() -> str:
    import psycopg

    name = f"nba_bench_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_BASE}/{name}"


def drop_database(url: str) -> None:
    import psycopg

    from app.core.db import dispose_engines

    dispose_engines()
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def flush_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_kb(pid: int, field: str) -> int:
    """VmHWM (peak RSS) or VmRSS (current) of a process, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


@dataclass
class Proc:
    """A server subprocess in its own process group, with its log file."""
    proc: subprocess.Popen
    log_path: Path

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def stop(self, grace: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(5)
        except ProcessLookupError:
            pass


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> Proc:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NBA_")} | env
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Proc(proc, log_path)


@dataclass
class Api(Proc):
    url: str = ""
    workers: int = 1

    def serving_pids(self) -> list[int]:
        """The processes that handle requests: the uvicorn process itself, or its spawned workers."""
        if self.workers == 1:
            return [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(p) for p in children
                if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def start_api(env: dict[str, str], log_dir: Path, workers: int = 1, timeout: float = 60.0) -> Api:
    import httpx

    port = free_port()
    # The production command line (Dockerfile), on loopback.
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--no-access-log", "--workers", str(workers),
           "--loop", "uvloop", "--http", "httptools", "--timeout-keep-alive", "5"]
    p = _spawn(cmd, env, log_dir / f"uvicorn-{port}.log")
    api = Api(p.proc, p.log_path, url=f"http://127.0.0.1:{port}", workers=workers)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api.proc.poll() is not None:
            raise RuntimeError(f"API exited ({api.proc.returncode}):\n{api.log()}")
        try:
            # Every worker must be up: with 2 processes, wait until both are spawned and one answers.
            if (httpx.get(api.url + "/healthz", timeout=1.0).status_code == 200
                    and len(api.serving_pids()) == workers):
                time.sleep(0.5 if workers > 1 else 0)  # the second worker may still be importing
                return api
        except (httpx.HTTPError, FileNotFoundError):
            pass
        time.sleep(0.1)
    api.stop()
    raise RuntimeError(f"API not up within {timeout} s:\n{api.log()}")


def start_worker(env: dict[str, str], log_dir: Path, timeout: float = 90.0) -> Proc:
    name = f"bench{os.getpid()}"
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=prefork",
           "--concurrency=1", "-Q", "nba", "--loglevel=INFO", "--without-gossip", "--without-mingle",
           "-n", f"{name}@%h"]
    # One torch thread: the box is shared; the overhead we measure is outside the compute anyway.
    worker = _spawn(cmd, env | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                    log_dir / "worker.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise RuntimeError(f"worker exited ({worker.proc.returncode}):\n{worker.log()}")
        if " ready." in worker.log_path.read_text(errors="replace"):
            return worker
        time.sleep(0.2)
    worker.stop()
    raise RuntimeError(f"worker not ready within {timeout} s:\n{worker.log()}")


def make_key(db_url: str) -> str:
    from app.core import keys
    from app.core.db import session_factory

    with session_factory(db_url)() as session:
        plaintext = keys.create_key(session, f"bench-{secrets.token_hex(6)}")
        session.commit()
    return plaintext


# ----------------------------------------------------------------------------------------- 1. big upload

def safetensors_head(total: int) -> tuple[bytes, int]:
    """Length prefix + header of a file of exactly `total` bytes holding one F32 tensor "blob" of zeros."""
    n_bytes = total - 8 - SAFETENSORS_HEADER_BYTES
    assert n_bytes % 4 == 0
    header = json.dumps({"blob": {"dtype": "F32", "shape": [n_bytes // 4], "data_offsets": [0, n_bytes]}},
                        separators=(",", ":")).encode()
    header += b" " * (SAFETENSORS_HEADER_BYTES - len(header))
    return SAFETENSORS_HEADER_BYTES.to_bytes(8, "little") + header, n_bytes


def write_upload_file(path: Path) -> None:
    """An uncompressed tar of UPLOAD_MEMBERS class-folder members (random bytes named .png: the upload check
    reads headers only), ~1 GiB. Random, so nothing on the way can compress or deduplicate it."""
    import tarfile

    rng = os.urandom
    with open(path, "wb") as f:
        for i in range(UPLOAD_MEMBERS):
            info = tarfile.TarInfo(f"{i % 10}/{i}.png")
            info.size = UPLOAD_MEMBER_BYTES
            f.write(info.tobuf(format=tarfile.USTAR_FORMAT))
            f.write(rng(UPLOAD_MEMBER_BYTES))
        f.write(bytes(1024))
    assert path.stat().st_size == UPLOAD_BYTES


def fsynced_copy_seconds(src: Path, dest: Path, chunk: int = 4 * 1024**2) -> float:
    """The reference: copy the same file on the same disk, 4 MiB at a time, fsync at the end (what a stored
    upload costs at minimum: read it, write it, make it durable)."""
    t0 = time.perf_counter()
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while data := fin.read(chunk):
            fout.write(data)
        fout.flush()
        os.fsync(fout.fileno())
    seconds = time.perf_counter() - t0
    dest.unlink()
    return seconds


def curl(args: list[str], timeout: float = 600) -> dict[str, Any]:
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", *args],
                         capture_output=True, text=True, timeout=timeout, check=True).stdout.split()
    return {"status": int(out[0]), "seconds": float(out[1])}


def bench_upload(api: Api, key: str, store_root: Path, tmp: Path) -> dict[str, Any]:
    from app.core.storage import LocalStore, content_key

    src = tmp / "upload.tar"
    write_upload_file(src)
    subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # both runs read from page cache
    copy_s = min(fsynced_copy_seconds(src, tmp / "copy.tar") for _ in range(2))
    pid = api.serving_pids()[0]
    before = {"vmhwm_kb": proc_status_kb(pid, "VmHWM"), "vmrss_kb": proc_status_kb(pid, "VmRSS")}
    _loopback_only(api.url)
    form = ["-X", "POST", "-H", f"Authorization: Bearer {key}", "-F", f"file=@{src};filename=upload.tar"]
    res = curl([*form, f"{api.url}/v1/datasets"])
    after = {"vmhwm_kb": proc_status_kb(pid, "VmHWM"), "vmrss_kb": proc_status_kb(pid, "VmRSS")}
    assert res["status"] == 201, res
    # Ceilings in the same run: the same server reads the same multipart body and discards it (best of 2), and
    # SHA-256 of the file on one core (the content address every stored upload needs).
    sink = [curl([*form, f"{api.url}/v1/_bench/sink"]) for _ in range(2)]
    assert all(r["status"] == 200 for r in sink), sink
    sink_s = min(r["seconds"] for r in sink)
    import hashlib

    t0 = time.perf_counter()
    digest = hashlib.sha256()
    with open(src, "rb") as f:
        while data := f.read(4 * 1024**2):
            digest.update(data)
    hash_s = time.perf_counter() - t0
    LocalStore(store_root).delete(content_key(digest.hexdigest()))
    src.unlink()
    seconds = res["seconds"]
    return {"bytes": UPLOAD_BYTES, "seconds": seconds, "mb_per_s": UPLOAD_BYTES / seconds / 1e6,
            "reference": "fsync'd 4 MiB-chunk copy of the same file, same disk (best of 2)",
            "reference_seconds": copy_s, "reference_mb_per_s": UPLOAD_BYTES / copy_s / 1e6,
            "ratio": copy_s / seconds, "ratio_target": 0.8,
            "sink_seconds": sink_s, "sink_mb_per_s": UPLOAD_BYTES / sink_s / 1e6, "sink_ratio": copy_s / sink_s,
            "upload_vs_sink": sink_s / seconds, "sha256_seconds": hash_s,
            "sha256_mb_per_s": UPLOAD_BYTES / hash_s / 1e6,
            "server_pid_memory_before": before, "server_pid_memory_after": after,
            "peak_rss_mb": after["vmhwm_kb"] / 1024, "peak_rss_target_mb": 300,
            "within_target": after["vmhwm_kb"] < 300 * 1024}


def bench_download(api: Api, key: str, db_url: str, store_root: Path, tmp: Path, job_id: str,
                   accel: str | None = None) -> dict[str, Any]:
    """200 MB through GET /v1/jobs/{id}/model (a succeeded placeholder job whose result is a 200 MB object)
    against `cat` of the stored file; both from page cache, best of 3."""
    from sqlalchemy import update

    from app.core.db import session_factory
    from app.core.models import Artifact, Job, utcnow
    from app.core.storage import LocalStore

    src = tmp / "result.bin"
    with open(src, "wb") as f:
        for _ in range(DOWNLOAD_BYTES // (4 * 10**6)):
            f.write(os.urandom(4 * 10**6))
    stored = LocalStore(store_root).put_file(src)
    src.unlink()
    with session_factory(db_url)() as session:
        job = session.get(Job, job_id)
        art = Artifact(owner_id=job.owner_id, kind="result", sha256=stored.sha256, size_bytes=stored.size,
                       storage_key=stored.key, filename="result.safetensors", format="safetensors",
                       created_at=utcnow())
        session.add(art)
        session.flush()
        session.execute(update(Job).where(Job.id == job_id).values(status="succeeded", result_id=art.id))
        session.commit()
    path = LocalStore(store_root).path_for(stored.key)
    results = {"direct": _timed_downloads(api.url, key, job_id, path)}
    if accel is not None:  # the compose deployment: nginx in front, the API answering with X-Accel-Redirect
        results["nginx_accel"] = _timed_downloads(accel, key, job_id, path)
        results["nginx_static"] = _timed_downloads(accel, key, job_id, path,
                                                   url_path=STATIC_CEILING + stored.key)
    return results


DOWNLOAD_PATHS = {"direct": "uvicorn streams the file (no proxy)",
                  "nginx_accel": "through nginx, X-Accel-Redirect (the compose deployment)",
                  "nginx_static": "ceiling: nginx sends the stored file, no API, no auth"}
STATIC_CEILING = "/_bench_static/"


def nginx_artifacts_location(store_root: Path) -> str:
    """deploy/nginx.conf's `location /_artifacts/ {...}` block, aliased to `store_root`: what deploys, runnable here."""
    import re

    conf = (REPO / "deploy" / "nginx.conf").read_text()
    match = re.search(r"location /_artifacts/ \{.*?\n        \}", conf, re.S)
    if match is None:
        raise RuntimeError("deploy/nginx.conf has no /_artifacts/ location")
    return match.group(0).replace("alias /data/artifacts/;", f"alias {store_root}/;")


def start_nginx(upstream: str, store_root: Path, folder: Path) -> tuple[Proc, str] | None:
    """nginx in front of `upstream` with deploy/nginx.conf's /_artifacts/ location (None without nginx)."""
    import getpass

    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if binary is None:
        return None
    location = nginx_artifacts_location(store_root)
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nginx.conf").write_text(
        f"daemon off; user {getpass.getuser()}; worker_processes 1; pid {folder}/nginx.pid;\n"
        f"error_log {folder}/error.log warn; events {{ worker_connections 256; }}\n"
        f"http {{ access_log off; client_body_temp_path {folder}/body; proxy_temp_path {folder}/proxy;\n"
        f"  types {{ }} default_type application/octet-stream;\n"
        f"  upstream api {{ server {upstream.split('//', 1)[1]}; keepalive 16; }}\n"
        f"  server {{ listen 127.0.0.1:{port};\n"
        f"    location / {{ proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection \"\";"
        f" proxy_buffering off; }}\n    {location}\n"
        # The ceiling: nginx sending the same stored file with no API in the way (bench only, never deployed).
        f"    location {STATIC_CEILING} {{ alias {store_root}/; sendfile on; tcp_nopush on; }}\n  }}\n}}\n")
    proc = _spawn([binary, "-p", str(folder), "-c", str(folder / "nginx.conf")], {}, folder / "stdout.log")
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(100):
        try:
            httpx.get(url + "/healthz", timeout=1.0)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.stop()
    raise RuntimeError("nginx did not start: " + (folder / "error.log").read_text(errors="replace")[-2000:])


def _timed_downloads(url: str, key: str, job_id: str, path: Path, url_path: str | None = None) -> dict[str, Any]:
    cat_s = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
        cat_s.append(time.perf_counter() - t0)
    _loopback_only(url)
    size = path.stat().st_size
    target = url + (url_path or f"/v1/jobs/{job_id}/model")
    runs = [big_buffer_get(target, key) for _ in range(3)]
    assert all(r["status"] == 200 and r["bytes"] == size for r in runs), runs
    curl_runs = [curl(["-H", f"Authorization: Bearer {key}", target]) for _ in range(3)]
    assert all(r["status"] == 200 for r in curl_runs), curl_runs
    best, ref = min(r["seconds"] for r in runs), min(cat_s)
    curl_best = min(r["seconds"] for r in curl_runs)
    return {"bytes": size, "seconds": best, "mb_per_s": size / best / 1e6,
            "reference": "cat of the stored file to /dev/null (best of 3)", "reference_seconds": ref,
            "reference_mb_per_s": size / ref / 1e6, "ratio": ref / best, "ratio_target": 0.5,
            "client": "one keep-alive-less HTTP/1.1 GET reading 4 MiB at a time (best of 3), request to last byte",
            "curl_seconds": curl_best, "curl_mb_per_s": size / curl_best / 1e6, "curl_ratio": ref / curl_best}


def big_buffer_get(url: str, key: str, buffer: int = 4 * 1024**2) -> dict[str, Any]:
    """GET `url` and discard the body, reading up to `buffer` bytes per recv. curl reads 16 KiB per call and is
    itself the bottleneck above ~3 GB/s on this machine (it gets no more from nginx serving a static file)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    buf = memoryview(bytearray(buffer))
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("GET", parts.path, headers={"Authorization": f"Bearer {key}"})
    resp = conn.getresponse()
    got = 0
    while n := resp.readinto(buf):
        got += n
    seconds = time.perf_counter() - t0
    conn.close()
    return {"status": resp.status, "bytes": got, "seconds": seconds}


# ------------------------------------------------------------------------------------------- 2. status polls

WRK_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d},"latency_us":{"p50":%d,"p90":%d,"p95":%d,"p99":%d,"max":%d,"mean":%.1f}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(95), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def run_wrk(url: str, key: str, seconds: int, connections: int, tmp: Path) -> dict[str, Any]:
    _loopback_only(url)
    script = tmp / "report.lua"
    script.write_text(WRK_REPORT)
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-H", f"Authorization: Bearer {key}",
           "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    raw = json.loads(next(line for line in out.splitlines() if line.startswith("WRKJSON "))[len("WRKJSON "):])
    lat = raw["latency_us"]
    errors = sum(raw["errors"].values())
    return {"tool": "wrk 1 thread", "requests": raw["requests"], "errors": errors, "error_detail": raw["errors"],
            "seconds": raw["duration_us"] / 1e6, "requests_per_s": raw["requests"] / (raw["duration_us"] / 1e6),
            "latency_ms": {k: v / 1000 for k, v in lat.items()}}


async def _httpx_load(url: str, key: str, seconds: float, connections: int, max_requests: int) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=10) as client:
        async def loop() -> None:
            nonlocal errors
            while time.perf_counter() < deadline and len(latencies) + errors < max_requests:
                t0 = time.perf_counter()
                try:
                    ok = (await client.get(url)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(connections)))
        elapsed = time.perf_counter() - t0
    latencies.sort()

    def pct(p: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] if latencies else float("nan")

    # One Python client process tops out near ~170 req/s here: these numbers bound the client as much as the server.
    return {"tool": "httpx asyncio (1 process; client-bound)", "requests": len(latencies) + errors, "errors": errors,
            "seconds": elapsed, "requests_per_s": (len(latencies) + errors) / elapsed,
            "latency_ms": {"p50": pct(50), "p90": pct(90), "p95": pct(95), "p99": pct(99), "max": pct(100),
                           "mean": 1000 * statistics.fmean(latencies) if latencies else float("nan")}}


def run_httpx_loadgen(url: str, key: str, seconds: int, connections: int) -> dict[str, Any]:
    """The fallback load generator, in its own process so it does not share our interpreter's GIL."""
    _loopback_only(url)
    cmd = [sys.executable, "-m", "bench.service_speed", "--loadgen", url, "--seconds", str(seconds),
           "--connections", str(connections)]
    out = subprocess.run(cmd, cwd=REPO, env=os.environ | {"NBA_BENCH_KEY": key}, capture_output=True, text=True,
                         timeout=seconds + 60, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_polls(api: Api, key: str, job_id: str, tmp: Path, seconds: int = POLL_SECONDS,
                connections: int = POLL_CONNECTIONS) -> dict[str, Any]:
    """The poll and its two ceilings, same processes, same settings, one after the other (poll in the middle)."""
    out: dict[str, Any] = {"uvicorn_processes": api.workers, "connections": connections}
    targets = {"constant_json": "/v1/_bench/constant", "poll": f"/v1/jobs/{job_id}",
               "one_select": f"/v1/_bench/select/{job_id}"}
    for name, path in targets.items():
        url = api.url + path
        out[name] = (run_wrk(url, key, seconds, connections, tmp) if shutil.which("wrk")
                     else run_httpx_loadgen(url, key, seconds, connections))
    poll = out["poll"]["requests_per_s"]
    out["poll_vs_one_select"] = poll / out["one_select"]["requests_per_s"]
    out["poll_vs_constant_json"] = poll / out["constant_json"]["requests_per_s"]
    out["targets"] = {"poll_req_per_s": 1500, "poll_p99_ms": 50, "poll_vs_one_select": 0.8}
    return out


# ---------------------------------------------------------------------------------------- 3. job overhead

def make_digits_inputs(folder: Path) -> dict[str, Any]:
    import torch

    from nba_core.checkpoint import save_model
    from nba_core.data.formats import save_npz
    from nba_core.experiment import backdoor_experiment

    torch.set_num_threads(1)
    run = backdoor_experiment("digits", "badnets", "small_cnn", 0, epochs=2)
    files = {"model": folder / "model.safetensors", "clean": folder / "clean.npz"}
    save_model(run.model, files["model"], spec=run.spec)
    save_npz(files["clean"], run.clean_subset)
    return {**files, "spec": run.spec.model_dump(mode="json"), "clean_images": len(run.clean_subset)}


def _seconds_between(a: str | None, b: str | None) -> float | None:
    from datetime import datetime

    if not a or not b:
        return None
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def one_job(client, model_id: str, dataset_id: str, poll_s: float = 0.02, timeout: float = 120.0
            ) -> dict[str, Any]:
    t0 = time.perf_counter()
    job = client.create_job(model_id, dataset_id, "ft", {"epochs": 1})
    deadline = t0 + timeout
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"job {job['id']} still {job['status']} after {timeout} s")
        time.sleep(poll_s)
        job = client.get_job(job["id"])
    wall = time.perf_counter() - t0
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error')}")
    compute = client.get_report(job["id"])["timing"]["total_seconds"]
    return {"job_id": job["id"], "wall_seconds": wall, "pipeline_seconds": compute, "overhead_seconds": wall - compute,
            # From the job row's own timestamps (server clocks): queue wait, and claim → finish in the worker.
            "queue_seconds": _seconds_between(job["created_at"], job["started_at"]),
            "worker_seconds": _seconds_between(job["started_at"], job["finished_at"])}


def bench_jobs(api: Api, key: str, inputs: dict[str, Any], runs: int = E2E_RUNS) -> dict[str, Any]:
    from app.client import NBAClient

    with NBAClient(api.url, key, timeout=120) as client:
        model = client.upload_model(inputs["model"], spec=inputs["spec"])
        data = client.upload_dataset(inputs["clean"])
        cold = one_job(client, model["id"], data["id"])
        warm = [one_job(client, model["id"], data["id"]) for _ in range(runs)]

    def stats(key_name: str) -> dict[str, float]:
        values = [r[key_name] for r in warm if r[key_name] is not None]
        return {"median": statistics.median(values), "max": max(values), "min": min(values)}

    return {"method": "ft", "params": {"epochs": 1}, "model": "small_cnn digits 8x8 (badnets, 2 epochs)",
            "clean_images": inputs["clean_images"], "poll_interval_s": 0.02, "cold": cold, "warm_runs": warm,
            "warm": {k: stats(k) for k in ("wall_seconds", "pipeline_seconds", "overhead_seconds",
                                           "queue_seconds", "worker_seconds")}}


# ------------------------------------------------------------------------------------------------- driver

def run_all(poll_seconds: int = POLL_SECONDS, e2e_runs: int = E2E_RUNS) -> dict[str, Any]:
    from app.core.db import upgrade_database

    load_start = os.getloadavg()
    started = time.perf_counter()
    results: dict[str, Any] = {"load_average_start": load_start}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nba-bench-")))
        db_url = create_database()
        stack.callback(drop_database, db_url)
        upgrade_database(db_url)
        flush_redis()
        stack.callback(flush_redis)
        store_root = tmp / "artifacts"
        env = {"NBA_DATA_DIR": str(tmp / "data"), "NBA_DATABASE_URL": db_url, "NBA_BROKER_URL": REDIS_URL,
               "NBA_STORAGE_URL": f"file://{store_root}", "NBA_MAX_DATASET_BYTES": str(UPLOAD_BYTES + GIB // 4),
               "NBA_DEVICE": "cpu", "NBA_BENCH_ENDPOINTS": "1", "NBA_MIN_FREE_BYTES": str(256 * 1024**2)}
        key = make_key(db_url)

        _log("API with 1 process: 1 GiB upload")
        api1 = start_api(env, tmp, workers=1)
        stack.callback(api1.stop)
        results["upload"] = bench_upload(api1, key, store_root, tmp)
        up = results["upload"]
        _log(f"upload: {up['mb_per_s']:.0f} MB/s vs fsync'd copy {up['reference_mb_per_s']:.0f} MB/s "
             f"({up['ratio']:.2f}x), peak RSS {up['peak_rss_mb']:.0f} MB")

        # A placeholder job to poll: no worker runs yet, so it stays queued.
        from app.client import NBAClient

        model_bytes, _ = safetensors_head(8 + SAFETENSORS_HEADER_BYTES + 40 * 4)
        with NBAClient(api1.url, key) as client:
            model = client.upload_stream("/v1/models", [model_bytes, bytes(160)], len(model_bytes) + 160,
                                         filename="tiny.safetensors", fields={"spec": json.dumps(DIGITS_SPEC)})
            inputs = make_digits_inputs(tmp)
            data = client.upload_dataset(inputs["clean"])
            poll_job = client.create_job(model["id"], data["id"], "ft", {"epochs": 1})
        api1.stop()

        _log("polls and ceilings, 2 uvicorn processes")
        api2 = start_api(env, tmp, workers=2)
        stack.callback(api2.stop)
        p = bench_polls(api2, key, poll_job["id"], tmp, poll_seconds)
        results["polls"] = p
        _log(f"polls: {p['poll']['requests_per_s']:.0f} req/s p99 {p['poll']['latency_ms']['p99']:.1f} ms; "
             f"one-SELECT {p['one_select']['requests_per_s']:.0f}; constant {p['constant_json']['requests_per_s']:.0f}"
             f" -> {p['poll_vs_one_select']:.2f}x / {p['poll_vs_constant_json']:.2f}x")

        # The placeholder must never reach the worker: drop its task message, then make it a finished job with a
        # 200 MB result to download.
        flush_redis()
        accel_url = None
        api_accel = start_api(env | {"NBA_ACCEL_REDIRECT_PREFIX": "/_artifacts/"}, tmp, workers=1)
        stack.callback(api_accel.stop)
        nginx = start_nginx(api_accel.url, store_root, tmp / "nginx")
        if nginx is not None:
            stack.callback(nginx[0].stop)
            accel_url = nginx[1]
        else:
            _log("nginx not installed: the download through the proxy is not measured")
        results["download"] = bench_download(api2, key, db_url, store_root, tmp, poll_job["id"], accel_url)
        for name, d in results["download"].items():
            _log(f"download ({name}): {d['mb_per_s']:.0f} MB/s vs cat {d['reference_mb_per_s']:.0f} MB/s "
                 f"({d['ratio']:.2f}x)")

        if e2e_runs > 0:
            _log("Celery worker: end-to-end jobs")
            worker = start_worker(env, tmp)
            stack.callback(worker.stop)
            results["jobs"] = bench_jobs(api2, key, inputs, e2e_runs)
            _log(f"jobs: overhead median {results['jobs']['warm']['overhead_seconds']['median']:.2f} s")
    results["load_average_end"] = os.getloadavg()
    results["bench_seconds"] = time.perf_counter() - started
    return results


def configuration() -> dict[str, Any]:
    import uvicorn

    return {"postgres": "127.0.0.1:5432, fresh temporary database (alembic head), dropped at the end",
            "redis": REDIS_URL, "storage": "LocalStore in a temporary folder (same disk)",
            "api": f"uvicorn {uvicorn.__version__} --loop uvloop --http httptools --no-access-log "
                   "--timeout-keep-alive 5 (the Dockerfile's settings); 1 process for the upload, 2 (--workers) "
                   "for polls, ceilings, download and jobs; NBA_BENCH_ENDPOINTS=1 adds the two ceilings",
            "worker": "celery prefork, --concurrency=1, OMP_NUM_THREADS=1, NBA_DEVICE=cpu",
            "load_generator": "wrk -t1" if shutil.which("wrk") else "httpx asyncio in a separate process",
            "upload_download_client": "curl (file upload with -F, download to /dev/null)",
            "cpus": os.cpu_count(), "note": "2 shared cores: client, load generator, API, worker, Postgres and "
                                            "Redis all run on the same machine alongside other work"}


def write_markdown(data: dict[str, Any], path: Path) -> None:
    up, dl, polls, cfg = data["upload"], data["download"], data["polls"], data["configuration"]
    la, lb = data["load_average_start"], data["load_average_end"]

    def met(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = [
        "# Service speed", "",
        f"Generated by `python -m bench.service_speed` at {data['provenance']['when']} "
        f"(commit {str(data['provenance']['commit'])[:10]}{', dirty tree' if data['provenance']['dirty'] else ''}).",
        f"Machine: {cfg['cpus']} CPUs, load average {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} at start, "
        f"{lb[0]:.2f} / {lb[1]:.2f} / {lb[2]:.2f} at the end (other work shares the cores; absolute numbers are "
        "lower bounds for an idle machine, ratios are against references measured in the same run).", "",
        "## Configuration", "",
        *[f"- {k}: {v}" for k, v in cfg.items()], "",
        "## GET /v1/jobs/{id} polls next to two ceilings "
        f"({polls['connections']} keep-alive connections, {polls['uvicorn_processes']} processes, "
        f"{polls['poll']['seconds']:.0f} s each)", "",
        "| endpoint | requests | errors | req/s | p50 ms | p95 ms | p99 ms | max ms | poll / this |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {name} | {polls[name]['requests']} | {polls[name]['errors']} | {polls[name]['requests_per_s']:.0f} | "
          f"{polls[name]['latency_ms']['p50']:.1f} | {polls[name]['latency_ms']['p95']:.1f} | "
          f"{polls[name]['latency_ms']['p99']:.1f} | {polls[name]['latency_ms']['max']:.1f} | "
          f"{polls['poll']['requests_per_s'] / polls[name]['requests_per_s']:.2f} |"
          for name in ("constant_json", "one_select", "poll")], "",
        f"Targets: >= 1,500 req/s ({met(polls['poll']['requests_per_s'] >= 1500)}), p99 <= 50 ms "
        f"({met(polls['poll']['latency_ms']['p99'] <= 50)}), >= 0.8x the one-SELECT ceiling "
        f"({polls['poll_vs_one_select']:.2f}x, {met(polls['poll_vs_one_select'] >= 0.8)}).", "",
        "## ~1 GiB upload (POST /v1/datasets, an uncompressed tar streamed by curl) vs an fsync'd copy", "",
        "| bytes | upload s | upload MB/s | copy MB/s | ratio | API VmHWM before | after (peak) |",
        "|---|---|---|---|---|---|---|",
        f"| {up['bytes']} | {up['seconds']:.2f} | {up['mb_per_s']:.0f} | {up['reference_mb_per_s']:.0f} | "
        f"{up['ratio']:.2f} | {up['server_pid_memory_before']['vmhwm_kb'] / 1024:.0f} MB | "
        f"{up['peak_rss_mb']:.0f} MB |", "",
        f"Targets: >= 0.8x the copy ({met(up['ratio'] >= 0.8)}), API RSS <= 300 MB ({met(up['within_target'])}).", "",
        *([
            "Ceilings measured in the same run:", "",
            "| | s | MB/s | copy / this |", "|---|---|---|---|",
            f"| the same server reads the same multipart body and discards it (`POST /v1/_bench/sink`, best of 2) | "
            f"{up['sink_seconds']:.2f} | {up['sink_mb_per_s']:.0f} | {up['sink_ratio']:.2f} |",
            f"| SHA-256 of the file on one core (every stored upload is content-addressed) | "
            f"{up['sha256_seconds']:.2f} | {up['sha256_mb_per_s']:.0f} | {up['reference_seconds'] / up['sha256_seconds']:.2f} |",
            "", f"The upload runs at {up['upload_vs_sink']:.2f}x the server's own body-reading ceiling.", "",
        ] if "sink_seconds" in up else []),
        "## 200 MB download (GET /v1/jobs/{id}/model, curl to /dev/null) vs `cat` of the stored file", "",
        "| path | bytes | download s | MB/s | cat MB/s | ratio | curl MB/s | curl ratio |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {DOWNLOAD_PATHS[name]} | {d['bytes']} | {d['seconds']:.3f} | {d['mb_per_s']:.0f} | "
          f"{d['reference_mb_per_s']:.0f} | {d['ratio']:.2f} | {d.get('curl_mb_per_s', 0):.0f} | "
          f"{d.get('curl_ratio', 0):.2f} |" for name, d in dl.items()], "",
        "Client: a GET that reads 4 MiB per call, timed from the request to the last byte; curl (16 KiB per read, "
        "the last two columns) is itself the limit above ~3 GB/s here.", "",
        "Target: >= 0.5x cat (" + ", ".join(f"{DOWNLOAD_PATHS[name].split(' (')[0]}: {met(d['ratio'] >= 0.5)}"
                                             for name, d in dl.items() if name != "nginx_static") + ").", "",
    ]
    jobs = data.get("jobs")
    if jobs:
        lines += [
            f"## Job end-to-end overhead (ft, epochs=1, {jobs['model']}; {len(jobs['warm_runs'])} warm runs "
            "after one cold run)", "",
            "| | wall s | pipeline s | overhead s | queue s (row) | worker claim→finish s (row) |",
            "|---|---|---|---|---|---|",
            f"| cold | {jobs['cold']['wall_seconds']:.2f} | {jobs['cold']['pipeline_seconds']:.2f} | "
            f"{jobs['cold']['overhead_seconds']:.2f} | {jobs['cold']['queue_seconds']:.2f} | "
            f"{jobs['cold']['worker_seconds']:.2f} |",
            *[f"| warm {stat} | {jobs['warm']['wall_seconds'][stat]:.2f} | "
              f"{jobs['warm']['pipeline_seconds'][stat]:.2f} | {jobs['warm']['overhead_seconds'][stat]:.2f} | "
              f"{jobs['warm']['queue_seconds'][stat]:.2f} | {jobs['warm']['worker_seconds'][stat]:.2f} |"
              for stat in ("median", "max")], ""]
    lines += [f"Whole benchmark: {data['bench_seconds']:.0f} s.", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poll-seconds", type=int, default=POLL_SECONDS)
    parser.add_argument("--jobs", type=int, default=E2E_RUNS, help="warm end-to-end runs")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    # Internal: the fallback load generator's subprocess entry point.
    parser.add_argument("--loadgen", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=int, default=POLL_SECONDS, help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, default=POLL_CONNECTIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loadgen:
        _loopback_only(args.loadgen)
        print(json.dumps(asyncio.run(_httpx_load(args.loadgen, os.environ["NBA_BENCH_KEY"], args.seconds,
                                                 args.connections, LOADGEN_MAX_REQUESTS))))
        return

    data = {"provenance": provenance(), "configuration": configuration(),
            **run_all(args.poll_seconds, args.jobs)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "service_speed.json").write_text(json.dumps(data, indent=2) + "\n")
    write_markdown(data, args.out / "service_speed.md")
    _log(f"wrote {args.out / 'service_speed.json'} and service_speed.md")


if __name__ == "__main__":
    main()
