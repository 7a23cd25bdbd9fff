"""`nba demo`: the README demo, end to end on one machine with no external servers.

1. backdoor a small CNN on MNIST-5k with BadNets (seed 0) and save model/spec/clean subset/test sets;
2. start the embedded service (`nba serve`: API + local worker, SQLite + filesystem broker) on a free port;
3. create an API key, upload the model, the clean subset and the triggered probe set, submit an NBA job;
4. follow it with a progress bar, download the cleaned model and verify its sha256;
5. print before/after clean accuracy and ASR, as the service measured them and as measured here on the test set.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EMBEDDED_OVERRIDES = ("NBA_DATABASE_URL", "NBA_BROKER_URL", "NBA_STORAGE_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embedded_env(data_dir: Path) -> dict[str, str]:
    """The demo always runs embedded, whatever service variables the shell has set."""
    env = {k: v for k, v in os.environ.items() if k not in EMBEDDED_OVERRIDES}
    env["NBA_DATA_DIR"] = str(data_dir)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited early (code {proc.returncode})")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the service did not become healthy within {timeout:.0f} s")


def make_backdoored_model(workdir: Path, quiet: bool) -> dict:
    from nba_core.checkpoint import save_model
    from nba_core.progress import ProgressBar
    from nba_core.data.formats import save_npz
    from nba_core.experiment import backdoor_experiment

    bar = ProgressBar(not quiet)
    try:
        run = backdoor_experiment("mnist5k", "badnets", "small_cnn", seed=0, progress=bar)
    finally:
        bar.close()
    files = {"model": workdir / "model.safetensors", "spec": workdir / "model.json", "clean": workdir / "clean.npz",
             "test": workdir / "test.npz", "test_triggered": workdir / "test_triggered.npz"}
    save_model(run.model, files["model"], spec=run.spec)
    files["spec"].write_text(run.spec.to_json() + "\n")
    save_npz(files["clean"], run.clean_subset)
    save_npz(files["test"], run.test)
    save_npz(files["test_triggered"], run.test_triggered)
    target = int(getattr(run.attack, "target", 0))
    return {"files": files, "target": target, "clean_accuracy": run.clean_accuracy,
            "attack_success_rate": run.attack_success_rate, "clean_subset": len(run.clean_subset)}


def evaluate_locally(model_path: Path, spec_path: Path, test: Path, triggered: Path, target: int) -> dict:
    from nba_core.checkpoint import load_model
    from nba_core.data.formats import load_dataset_file
    from nba_core.device import pick_device, prepare_model
    from nba_core.metrics import attack_success_rate, clean_accuracy
    from nba_core.spec import load_spec

    spec = load_spec(str(spec_path))
    shape = (spec.in_channels, *spec.input_size)
    model = prepare_model(load_model(str(model_path), spec), pick_device("auto"))
    clean = load_dataset_file(str(test), num_classes=spec.num_classes, expect_shape=shape)
    trig = load_dataset_file(str(triggered), num_classes=spec.num_classes, expect_shape=shape)
    return {"clean_accuracy": clean_accuracy(model, clean.x, clean.y),
            "attack_success_rate": attack_success_rate(model, trig.x, trig.y, target)}


def _pct(v) -> str:
    return f"{100 * v:6.2f} %" if isinstance(v, (int, float)) else "     n/a"


def run_demo(*, data_dir: str | None = None, workdir: str | None = None, method: str = "nba",
             params_json: str | None = None, port: int = 0, quiet: bool = False) -> int:
    import torch

    from nba_core.client import NBAClient
    from nba_core.params import parse_params
    from nba_core.progress import JobProgressBar

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    params = parse_params(None, params_json)
    work = Path(workdir or tempfile.mkdtemp(prefix="nba-demo-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    service_dir = Path(data_dir).absolute() if data_dir else work / "service"
    t0 = time.perf_counter()

    print(f"[1/5] training a BadNets-backdoored small CNN on MNIST-5k (seed 0) in {work}")
    made = make_backdoored_model(work, quiet)
    files, target = made["files"], made["target"]
    print(f"      clean accuracy {_pct(made['clean_accuracy'])}, attack success rate "
          f"{_pct(made['attack_success_rate'])} (target class {target}); defender's clean subset: "
          f"{made['clean_subset']} images")

    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = embedded_env(service_dir)
    print(f"[2/5] starting the embedded service at {url} (data dir {service_dir}; log {work / 'service.log'})")
    with open(work / "service.log", "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port),
                                 "--data-dir", str(service_dir)], env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(url, proc)
            key = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "demo", "--data-dir",
                                  str(service_dir)], env=env, check=True, capture_output=True, text=True
                                 ).stdout.strip().splitlines()[-1]
            client = NBAClient(url, key)

            print("[3/5] uploading the model, the clean subset and the triggered probe set; submitting the job")
            model = client.upload_model(str(files["model"]), spec=str(files["spec"]))
            data = client.upload_dataset(str(files["clean"]))
            probe = client.upload_dataset(str(files["test_triggered"]), kind="probe")
            job = client.create_job(model_id=model["id"], dataset_id=data["id"], method=method, params=params,
                                    probe_id=probe["id"], probe_target=target)
            print(f"[4/5] job {job['id']} ({method}) submitted; following it")
            bar = JobProgressBar(not quiet)
            try:
                job = client.wait(job["id"], on_progress=bar)
            finally:
                bar.close()
            if job["status"] != "succeeded":
                error = job.get("error") or {}
                print(f"nba demo: job ended {job['status']}: [{error.get('code')}] {error.get('message')}",
                      file=sys.stderr)
                return 1
            cleaned = work / "cleaned.safetensors"
            client.download_model(job["id"], str(cleaned))
            report = client.get_report(job["id"])
        finally:
            os.killpg(proc.pid, signal.SIGINT)  # serve shuts the worker down in order
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    from nba_core.checkpoint import sha256_file

    local_sha = sha256_file(cleaned)
    expected = (report.get("output") or {}).get("sha256")
    if local_sha != expected:
        print(f"nba demo: sha256 mismatch: downloaded {local_sha}, report says {expected}", file=sys.stderr)
        return 1
    print(f"[5/5] downloaded {cleaned} (sha256 {local_sha[:16]}…, verified); evaluating on the held-out test set")
    before = evaluate_locally(files["model"], files["spec"], files["test"], files["test_triggered"], target)
    after = evaluate_locally(cleaned, files["spec"], files["test"], files["test_triggered"], target)
    svc_b, svc_a = report["metrics"]["before"], report["metrics"]["after"]

    on = {"eval_set": "evaluation set", "holdout": "held-out subset",
          "clean_subset": "clean subset, optimistic"}.get(svc_b.get("clean_accuracy_on"), "held-out subset")
    rows = [("clean accuracy, test set (local)", before["clean_accuracy"], after["clean_accuracy"]),
            ("attack success rate, test set (local)", before["attack_success_rate"], after["attack_success_rate"]),
            (f"clean accuracy, {on} (service)", svc_b.get("clean_accuracy"), svc_a.get("clean_accuracy")),
            ("attack success rate, probe (service)", svc_b.get("attack_success_rate"),
             svc_a.get("attack_success_rate"))]
    print()
    for line in (report.get("verdict") or {}).get("headline") or []:  # the service's trigger-free verdict first
        print(f"  {line}")
    print(f"  {'metric':<50} {'before':>9} {'after':>9}")
    for name, b, a in rows:
        print(f"  {name:<50} {_pct(b):>9} {_pct(a):>9}")
    print()
    print(f"done in {time.perf_counter() - t0:.0f} s; files in {work}")
    return 0
