"""Service speed against the real stack on loopback: a fresh Postgres database (dropped at the end), Redis db 14
as the broker, a local artifact store in a temporary folder, uvicorn API subprocesses and a Celery worker.

Measures
1. upload throughput of a 1 GiB safetensors streamed by the client (generated on the fly, never held in memory)
   and the API process's peak RSS (VmHWM) before/after: the upload path must stay constant-memory;
2. GET /v1/jobs/{id} polls per second and latency percentiles under N concurrent keep-alive connections (wrk when
   installed, else an asyncio httpx load generator in a separate process), for 1 and 2 uvicorn processes;
3. a tiny real job's end-to-end overhead beyond compute: POST /v1/jobs → status succeeded as seen by a polling
   client, minus the pipeline's own report["timing"]["total_seconds"] (= queue + fetch/load + save + DB).

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
UPLOAD_BYTES = GIB
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
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--no-access-log", "--workers", str(workers)]
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
    """Length prefix + header of a file of exactly `total` bytes holding one F32 tensor "blob" of zeros. The API
    only checks the header's structure; matching tensor names to the architecture is the worker's job."""
    n_bytes = total - 8 - SAFETENSORS_HEADER_BYTES
    assert n_bytes % 4 == 0
    header = json.dumps({"blob": {"dtype": "F32", "shape": [n_bytes // 4], "data_offsets": [0, n_bytes]}},
                        separators=(",", ":")).encode()
    header += b" " * (SAFETENSORS_HEADER_BYTES - len(header))
    return SAFETENSORS_HEADER_BYTES.to_bytes(8, "little") + header, n_bytes


def zero_chunks(head: bytes, n_bytes: int) -> Iterator[bytes]:
    yield head
    zeros = bytes(UPLOAD_CHUNK)
    left = n_bytes
    while left:
        piece = zeros if left >= UPLOAD_CHUNK else zeros[:left]
        left -= len(piece)
        yield piece


def bench_upload(api: Api, key: str, store_root: Path) -> dict[str, Any]:
    from app.client import NBAClient

    pid = api.serving_pids()[0]
    before = {"vmhwm_kb": proc_status_kb(pid, "VmHWM"), "vmrss_kb": proc_status_kb(pid, "VmRSS")}
    head, n_bytes = safetensors_head(UPLOAD_BYTES)
    t0 = time.perf_counter()
    with NBAClient(api.url, key, timeout=600) as client:
        out = client.upload_stream("/v1/models", zero_chunks(head, n_bytes), UPLOAD_BYTES,
                                   filename="blob.safetensors", fields={"spec": json.dumps(DIGITS_SPEC)})
    seconds = time.perf_counter() - t0
    after = {"vmhwm_kb": proc_status_kb(pid, "VmHWM"), "vmrss_kb": proc_status_kb(pid, "VmRSS")}
    # 1 GiB of zeros: delete the stored object now (the database goes at the end anyway).
    from app.core.storage import LocalStore, content_key

    LocalStore(store_root).delete(content_key(out["sha256"]))
    assert out["size_bytes"] == UPLOAD_BYTES, out
    return {"bytes": UPLOAD_BYTES, "seconds": seconds, "mb_per_s": UPLOAD_BYTES / seconds / 1e6,
            "mib_per_s": UPLOAD_BYTES / seconds / 2**20, "server_pid_memory_before": before,
            "server_pid_memory_after": after, "peak_rss_mb": after["vmhwm_kb"] / 1024,
            "peak_rss_target_mb": 300, "within_target": after["vmhwm_kb"] < 300 * 1024,
            "details": out.get("details")}


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
    url = f"{api.url}/v1/jobs/{job_id}"
    result = (run_wrk(url, key, seconds, connections, tmp) if shutil.which("wrk")
              else run_httpx_loadgen(url, key, seconds, connections))
    return {"uvicorn_processes": api.workers, "connections": connections, **result}


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
               "NBA_STORAGE_URL": f"file://{store_root}", "NBA_MAX_MODEL_BYTES": str(UPLOAD_BYTES + GIB // 4),
               "NBA_DEVICE": "cpu"}
        key = make_key(db_url)

        _log("API with 1 process: 1 GiB upload")
        api1 = start_api(env, tmp, workers=1)
        stack.callback(api1.stop)
        results["upload"] = bench_upload(api1, key, store_root)
        _log(f"upload: {results['upload']['mb_per_s']:.0f} MB/s, peak RSS {results['upload']['peak_rss_mb']:.0f} MB")

        # A placeholder job to poll: no worker runs yet, so it stays queued.
        from app.client import NBAClient

        model_bytes, _ = safetensors_head(8 + SAFETENSORS_HEADER_BYTES + 40 * 4)
        with NBAClient(api1.url, key) as client:
            model = client.upload_stream("/v1/models", [model_bytes, bytes(160)], len(model_bytes) + 160,
                                         filename="tiny.safetensors", fields={"spec": json.dumps(DIGITS_SPEC)})
            inputs = make_digits_inputs(tmp)
            data = client.upload_dataset(inputs["clean"])
            poll_job = client.create_job(model["id"], data["id"], "ft", {"epochs": 1})

        _log("polls, 1 uvicorn process")
        results["polls"] = [bench_polls(api1, key, poll_job["id"], tmp, poll_seconds)]
        api1.stop()
        _log("polls, 2 uvicorn processes")
        api2 = start_api(env, tmp, workers=2)
        stack.callback(api2.stop)
        results["polls"].append(bench_polls(api2, key, poll_job["id"], tmp, poll_seconds))
        for p in results["polls"]:
            _log(f"polls x{p['uvicorn_processes']}: {p['requests_per_s']:.0f} req/s, "
                 f"p99 {p['latency_ms']['p99']:.1f} ms, errors {p['errors']}")

        # The placeholder must never reach the worker: cancel it and drop its task message.
        with NBAClient(api2.url, key) as client:
            client.cancel_job(poll_job["id"])
        flush_redis()
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
            "api": f"uvicorn {uvicorn.__version__} (asyncio loop, h11; no uvloop/httptools installed), "
                   "--no-access-log; 1 process for the upload, 1 and 2 processes (--workers) for polls, "
                   "2 for the jobs",
            "worker": "celery prefork, --concurrency=1, OMP_NUM_THREADS=1, NBA_DEVICE=cpu",
            "load_generator": "wrk -t1" if shutil.which("wrk") else "httpx asyncio in a separate process",
            "cpus": os.cpu_count(), "note": "2 shared cores: client, load generator, API, worker, Postgres and "
                                            "Redis all run on the same machine alongside other work"}


def write_markdown(data: dict[str, Any], path: Path) -> None:
    up, jobs, cfg = data["upload"], data["jobs"], data["configuration"]
    la = data["load_average_start"]
    lines = [
        "# Service speed", "",
        f"Generated by `python -m bench.service_speed` at {data['provenance']['when']} "
        f"(commit {str(data['provenance']['commit'])[:10]}{', dirty tree' if data['provenance']['dirty'] else ''}).",
        f"Machine: {cfg['cpus']} CPUs, load average at start {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} "
        "(other work shares the cores; numbers are lower bounds for an idle machine).", "",
        "## Configuration", "",
        *[f"- {k}: {v}" for k, v in cfg.items()], "",
        "## 1 GiB model upload (POST /v1/models, streamed, header-only check)", "",
        "| bytes | seconds | MB/s | server VmHWM before | after (peak) | target |",
        "|---|---|---|---|---|---|",
        f"| {up['bytes']} | {up['seconds']:.1f} | {up['mb_per_s']:.0f} | "
        f"{up['server_pid_memory_before']['vmhwm_kb'] / 1024:.0f} MB | {up['peak_rss_mb']:.0f} MB | "
        f"< {up['peak_rss_target_mb']} MB ({'met' if up['within_target'] else 'MISSED'}) |", "",
        f"## GET /v1/jobs/{{id}} polls ({data['polls'][0]['connections']} keep-alive connections, "
        f"{data['polls'][0]['seconds']:.0f} s each)", "",
        "| uvicorn processes | requests | errors | req/s | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {p['uvicorn_processes']} | {p['requests']} | {p['errors']} | {p['requests_per_s']:.0f} | "
          f"{p['latency_ms']['p50']:.1f} | {p['latency_ms']['p95']:.1f} | {p['latency_ms']['p99']:.1f} | "
          f"{p['latency_ms']['max']:.1f} |" for p in data["polls"]], "",
        f"## Job end-to-end overhead (ft, epochs=1, {jobs['model']}; {len(jobs['warm_runs'])} warm runs "
        "after one cold run)", "",
        "Overhead = POST /v1/jobs → `succeeded` seen by a client polling every 20 ms, minus the pipeline's own "
        "`report.timing.total_seconds`: queueing, fetching inputs, loading, saving/uploading outputs, DB updates.",
        "",
        "| | wall s | pipeline s | overhead s | queue s (row) | worker claim→finish s (row) |",
        "|---|---|---|---|---|---|",
        f"| cold (first job of the pool child) | {jobs['cold']['wall_seconds']:.2f} | "
        f"{jobs['cold']['pipeline_seconds']:.2f} | {jobs['cold']['overhead_seconds']:.2f} | "
        f"{jobs['cold']['queue_seconds']:.2f} | {jobs['cold']['worker_seconds']:.2f} |",
        *[f"| warm {stat} | {jobs['warm']['wall_seconds'][stat]:.2f} | {jobs['warm']['pipeline_seconds'][stat]:.2f} | "
          f"{jobs['warm']['overhead_seconds'][stat]:.2f} | {jobs['warm']['queue_seconds'][stat]:.2f} | "
          f"{jobs['warm']['worker_seconds'][stat]:.2f} |" for stat in ("median", "max")], "",
        f"Whole benchmark: {data['bench_seconds']:.0f} s.", "",
    ]
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
