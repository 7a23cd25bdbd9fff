"""The report in a real browser: a documented check (not a test: it needs Debian's `chromium`).

    python -m bench.report_browser            # or: make check-report-browser

Trains a small backdoored digits model, starts the embedded service, runs an NBA job through the client, asks for
a signed report link and opens it in headless Chromium WITHOUT the API key, the way a user's browser would. It
checks the rendered page (title, metric table, inlined plots) and writes the screenshot to
docs/report-in-browser.png. Exit status 0 when the page rendered as expected.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from app.demo import embedded_env, free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "report-in-browser.png"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no chromium on PATH: apt-get install -y chromium")


def browse(url: str, screenshot: Path) -> str:
    """The DOM Chromium rendered for `url`, and a screenshot of it (no key, no cookies: a fresh profile)."""
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tempfile.mkdtemp(prefix='nba-chromium-')}"]
    dom = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    subprocess.run(base + [f"--screenshot={screenshot}", "--window-size=900,1500", url], capture_output=True,
                   timeout=120, check=True)
    return dom


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--screenshot", default=str(SCREENSHOT))
    args = p.parse_args(argv)
    from nba_core.checkpoint import save_model
    from nba_core.client import sanitize
    from nba_core.data.formats import save_npz
    from nba_core.experiment import backdoor_experiment

    work = Path(tempfile.mkdtemp(prefix="nba-browser-"))
    run = backdoor_experiment("digits", "badnets", "small_cnn", seed=0, epochs=6, clean_fraction=0.3, device="cpu")
    save_model(run.model, work / "model.safetensors", spec=run.spec)
    save_npz(work / "clean.npz", run.clean_subset)
    save_npz(work / "probe.npz", run.test_triggered)
    port, service = free_port(), work / "service"
    env = embedded_env(service)
    url = f"http://127.0.0.1:{port}"
    with open(work / "service.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir",
                                 str(service)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(url, proc)
            key = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "browser-check", "--data-dir",
                                  str(service)], env=env, check=True, capture_output=True, text=True).stdout.split()[-1]
            job = sanitize(url, key, model=work / "model.safetensors", data=work / "clean.npz", method="nba",
                           probe=work / "probe.npz", probe_target=run.attack.target, timeout=1800,
                           class_names=["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                        "nine"])
            assert job["status"] == "succeeded", job.get("error")
            from nba_core.client import NBAClient

            with NBAClient(url, key) as client:
                link = client.report_link(job["id"], ttl=300)["url"]
            dom = browse(link, Path(args.screenshot))
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=30)
    checks = {"title": f"job {job['id']}" in dom, "metric table": "clean accuracy" in dom and "</table>" in dom,
              "class names": "<td>seven</td>" in dom,
              "plots inlined": dom.count("data:image/png;base64,") >= 1, "no error page": "link_" not in dom}
    for name, ok in checks.items():
        print(f"  {'ok ' if ok else 'FAIL'} {name}")
    print(f"screenshot -> {args.screenshot}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
