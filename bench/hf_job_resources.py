"""A ResNet-18-sized Hugging Face model (ResNetConfig, basic blocks, depths 2-2-2-2, bench/configs/hf_resnet18.json)
at 64×64 through one real service job on the CPU: `nba serve` (embedded mode: API + local worker), upload of the
save_pretrained folder as a zip with no spec, a job, the cleaned zip downloaded and loaded with from_pretrained.
Records wall time per phase and the peak resident memory (VmHWM) of the API process and of the worker
process(es). The clean images are the colour 32×32 set (shapes32, 5 % clean subset), so the worker also resizes
them to the model's 64×64 input (the report says so). The model is randomly initialised: this measures cost, not
cleaning quality.

    python -m bench.hf_job_resources [--method nba] [--params JSON]
writes docs/benchmarks/hf_resnet18_job.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from .common import OUT_DIR, provenance

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "bench" / "configs" / "hf_resnet18.json"
SMALL_NBA = {"teacher_epochs": 2, "student_epochs": 2, "scan_steps": 10, "refresh_every": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        for k in map(int, kids):
            out.append(k)
            todo.append(k)
    return out


def _status(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return ""


def make_inputs(folder: Path) -> dict:
    import torch

    from nba_core.data.formats import save_npz
    from nba_core.experiment import default_spec
    from nba_core.data.builtin import train_test
    from nba_core.data.imageset import stratified_split
    from nba_core.hf_io import pack_hf_zip
    from nba_core.models.hf import adapt_config, new_hf_classifier, write_hf_folder

    base = default_spec("shapes32", "small_cnn")
    spec = base.model_copy(update={"arch": "hf:resnet", "input_size": (64, 64)})
    config = adapt_config(json.loads(CONFIG.read_text()), num_labels=base.num_classes, num_channels=3,
                          input_size=(64, 64))
    torch.manual_seed(0)
    model = new_hf_classifier(config, spec)
    write_hf_folder(model, spec, folder / "model")  # preprocessor_config.json says 64×64
    pack_hf_zip(folder / "model", folder / "model.zip")
    train, _ = train_test("shapes32")
    _, idx = stratified_split(train.y, 0.05, 0)
    save_npz(folder / "clean.npz", train.subset(idx))
    return {"parameters": sum(p.numel() for p in model.parameters()), "clean_images": len(idx),
            "zip_bytes": (folder / "model.zip").stat().st_size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="nba")
    p.add_argument("--params", default=json.dumps(SMALL_NBA))
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    from app.client import NBAClient

    result: dict = {"method": args.method, "params": json.loads(args.params), "config": CONFIG.name,
                    "input_size": [64, 64]}
    with tempfile.TemporaryDirectory(prefix="nba-hf-job-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        result["inputs"] = make_inputs(tmp)
        result["seconds_make_inputs"] = time.perf_counter() - t0
        data_dir, port = tmp / "data", _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("NBA_")}
        env.update({"NBA_DEVICE": "cpu", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)})
        log = open(tmp / "serve.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir",
                                 str(data_dir)], cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        peaks: dict[int, int] = {}

        def sample() -> None:
            for pid in [proc.pid, *_descendants(proc.pid)]:
                hwm = _status(pid, "VmHWM")
                if hwm:
                    peaks[pid] = max(peaks.get(pid, 0), hwm)

        try:
            import httpx

            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((tmp / "serve.log").read_text()[-3000:])
                time.sleep(0.3)
            key = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "bench", "--data-dir",
                                  str(data_dir)], env=env, capture_output=True, text=True, check=True).stdout.strip()
            with NBAClient(url, key) as client:
                t1 = time.perf_counter()
                model = client.upload_model(tmp / "model.zip")
                data = client.upload_dataset(tmp / "clean.npz")
                result["seconds_upload"] = time.perf_counter() - t1
                t2 = time.perf_counter()
                job = client.create_job(model["id"], data["id"], args.method, json.loads(args.params))
                done = client.wait(job["id"], poll=2.0, timeout=args.timeout, on_progress=lambda _j: sample())
                result["seconds_job"] = time.perf_counter() - t2
                sample()
                if done["status"] != "succeeded":
                    raise RuntimeError(f"job ended {done['status']}: {done.get('error')}")
                t3 = time.perf_counter()
                client.download_model(job["id"], tmp / "cleaned.zip")
                result["seconds_download"] = time.perf_counter() - t3
                report = client.get_report(job["id"])
            with zipfile.ZipFile(tmp / "cleaned.zip") as zf:
                zf.extractall(tmp / "cleaned")
            from transformers import AutoModelForImageClassification

            src = AutoModelForImageClassification.from_pretrained(tmp / "model").state_dict()
            back = AutoModelForImageClassification.from_pretrained(tmp / "cleaned").state_dict()
            result["from_pretrained_keys_and_shapes_identical"] = (
                list(src) == list(back) and all(src[k].shape == back[k].shape for k in src))
            result["report_timing"] = report["timing"]
            result["report_data"] = report["data"]
            result["metrics"] = report["metrics"]
        except BaseException:
            print((tmp / "serve.log").read_text(errors="replace")[-8000:], file=sys.stderr)  # the worker's traceback
            raise
        finally:
            sample()
            processes = [{"pid": pid, "cmd": _cmdline(pid), "peak_rss_mb": round(kb / 1024, 1)}
                         for pid, kb in sorted(peaks.items())]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            log.close()
        result["processes"] = processes
    prov = provenance() | ({"note": args.note} if args.note else {})
    payload = {"provenance": prov, "result": result}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hf_resnet18_job.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    lines = ["# A ResNet-18-sized Hugging Face model through one CPU job", "",
             f"Commit `{str(prov.get('commit'))[:10]}`, {prov['machine']['cpu_count']} CPUs, torch "
             f"{prov['machine']['torch']}, {prov['when']}. "
             + (f"Note: {args.note}" if args.note else ""), "",
             f"`python -m bench.hf_job_resources --method {args.method} --params '{args.params}'`", "",
             f"- model: `{CONFIG.name}` ({result['inputs']['parameters'] / 1e6:.2f} M parameters), 64×64 input, "
             f"zip {result['inputs']['zip_bytes'] / 2**20:.1f} MiB; clean subset {result['inputs']['clean_images']} "
             f"colour 32×32 images resized to 64×64 by the worker (report: resized_from "
             f"{result['report_data'].get('resized_from')})",
             f"- upload (model zip + data): {result['seconds_upload']:.1f} s; job (queue → succeeded): "
             f"{result['seconds_job']:.1f} s, of which the pipeline reports "
             f"{result['report_timing']['total_seconds']:.1f} s; download: {result['seconds_download']:.2f} s",
             f"- from_pretrained loads the cleaned folder with identical keys and shapes: "
             f"{result['from_pretrained_keys_and_shapes_identical']}", "",
             "| process | peak RSS (MB) |", "|---|---|"]
    lines += [f"| `{p_['cmd'][:90]}` | {p_['peak_rss_mb']} |" for p_ in result["processes"]]
    (args.out / "hf_resnet18_job.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
