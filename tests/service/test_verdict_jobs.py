"""The backdoor verdict over REST with a real worker: a job that leaves the backdoor ends `succeeded` with the
after-verdict `suspected` and a warning; NBA on the same model ends `not_suspected`; a scan job gives a verdict
and no model; metrics.before and the before-verdict show while the job still runs."""

from __future__ import annotations

import pytest

from tests.service.conftest_worker import submit_digits_job, wait_for

pytestmark = pytest.mark.service

WEAK_FT = {"epochs": 1, "lr": 0.001}  # far too gentle to remove anything
# A verdict scans three models and trains a reference: more than the default test worker's 60 s on shared cores.
SLOW_LIMITS = {"job_soft_time_limit": 600, "job_hard_time_limit": 660, "visibility_timeout": 700}


@pytest.fixture(scope="module")
def mnist_files(tmp_path_factory) -> dict:
    """A BadNets small CNN on MNIST-5k (4 epochs) with its 5 % clean subset and a triggered probe set: 8×8 digits
    are too small for the verdict (docs/verdict.md)."""
    import numpy as np
    import torch

    from nba_core.checkpoint import save_model
    from nba_core.data.formats import save_npz
    from nba_core.experiment import backdoor_experiment

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("mnist")
    run = backdoor_experiment("mnist5k", "badnets", "small_cnn", seed=0, epochs=4, device="cpu")
    files = {"model": folder / "model.safetensors", "spec": folder / "model.json", "clean": folder / "clean.npz",
             "probe": folder / "probe.npz", "target": run.attack.target}
    save_model(run.model, files["model"], spec=run.spec)
    files["spec"].write_text(run.spec.to_json())
    save_npz(files["clean"], run.clean_subset)
    save_npz(files["probe"], run.test_triggered.subset(np.arange(300)))
    return files


@pytest.fixture()
def slow_worker(worker_factory):
    return worker_factory(**SLOW_LIMITS)


@pytest.mark.timeout(1500)
def test_job_that_leaves_the_backdoor_ends_suspected_with_a_warning(client, slow_worker, mnist_files):
    kept = submit_digits_job(client, mnist_files, method="ft", params=WEAK_FT)
    done = client.wait(kept["id"], poll=0.3, timeout=600)
    assert done["status"] == "succeeded", done
    assert done["metrics"]["after"]["attack_success_rate"] > 0.5  # the probe confirms the backdoor survived
    v = done["verdict"]
    assert v["before"]["status"] == "suspected" and mnist_files["target"] in v["before"]["targets"]
    assert v["after"]["status"] == "suspected"
    assert any("still suspected" in w for w in done["warnings"])
    assert v["headline"][0].startswith("backdoor verdict before: SUSPECTED")
    report = client.get_report(kept["id"])
    assert report["verdict"]["after"]["status"] == "suspected" and report["warnings"] == done["warnings"]


@pytest.mark.timeout(1500)  # NBA plus a reference and three scans on MNIST: minutes on a loaded 2-core machine
def test_nba_job_on_the_same_model_ends_not_suspected(client, slow_worker, mnist_files):
    cleaned = submit_digits_job(client, mnist_files, method="nba")
    done = client.wait(cleaned["id"], poll=0.5, timeout=1400)
    assert done["status"] == "succeeded", done
    assert done["metrics"]["after"]["attack_success_rate"] < 0.2
    assert done["verdict"]["after"]["status"] == "not_suspected", done["verdict"]
    assert not any("still suspected" in w for w in done["warnings"])


@pytest.mark.timeout(1500)
def test_scan_job_gives_a_verdict_and_no_model(client, slow_worker, mnist_files):
    job = submit_digits_job(client, mnist_files, method="scan", probe=False)
    done = client.wait(job["id"], poll=0.3, timeout=300)
    assert done["status"] == "succeeded", done
    assert done["verdict"]["before"]["status"] == "suspected" and done["verdict"]["after"] is None
    assert done["result"] is None and done["links"]["model"] is None
    assert client.get_report(job["id"])["kind"] == "nba-scan-report"


@pytest.mark.timeout(1500)
def test_before_metrics_and_verdict_appear_while_running(client, slow_worker, mnist_files):
    job = submit_digits_job(client, mnist_files, method="ft", params={"epochs": 300}, probe=False)

    def before_while_running():
        j = client.get_job(job["id"])
        assert j["status"] in ("queued", "running"), j
        return j if (j["metrics"] or {}).get("before") and j["verdict"] else None

    j = wait_for(before_while_running, 240, interval=0.3, what="metrics.before while running")
    assert j["verdict"]["before"]["status"] in ("suspected", "not_suspected", "inconclusive")
    assert j["verdict"]["after"] is None and "after" not in j["metrics"]
    client.cancel_job(job["id"])
    client.wait(job["id"], poll=0.3, timeout=120)
