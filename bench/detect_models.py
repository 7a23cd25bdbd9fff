"""The models of the detection table: the bench's six attacks, all-to-all and two-target BadNets, and benign models
(attack "none"), each cached on disk with its defender's clean subset and its triggered test set(s)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
KINDS = ("none", "badnets", "blended", "trojan", "sig", "cl", "wanet", "badnets_all2all", "badnets_2target")
SECOND_TARGET = 5  # the two-target case: BadNets bottom-right -> 0 and top-left -> 5


def experiment_args(kind: str) -> dict:
    if kind == "badnets_all2all":
        return {"attack": "badnets", "all_to_all": True}
    if kind == "badnets_2target":
        return {"attack": "badnets", "second_target": SECOND_TARGET}
    return {"attack": kind}


def truth(kind: str) -> dict:
    """What the verdict should find: target classes and label-shift pairs."""
    if kind == "none":
        return {"backdoored": False, "targets": [], "pairs": []}
    if kind == "badnets_all2all":
        return {"backdoored": True, "targets": [], "pairs": [[s, (s + 1) % 10] for s in range(10)]}
    if kind == "badnets_2target":
        return {"backdoored": True, "targets": [0, SECOND_TARGET], "pairs": []}
    return {"backdoored": True, "targets": [0], "pairs": []}


def load_or_make(kind: str, seed: int, dataset: str = "mnist5k", arch: str = "small_cnn", device: str = "cpu"):
    """Model, spec, clean subset, clean test set and a `asr(model)` function measuring the real trigger."""
    from nba_core.checkpoint import load_model, save_model
    from nba_core.data.formats import load_dataset_file, save_npz
    from nba_core.device import pick_device, prepare_model
    from nba_core.experiment import backdoor_experiment
    from nba_core.spec import load_spec

    folder = CACHE_DIR / f"det_{dataset}_{arch}_{kind}_s{seed}"
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        t0 = time.perf_counter()
        run = backdoor_experiment(dataset, arch=arch, seed=seed, device=device, **experiment_args(kind))
        folder.mkdir(parents=True, exist_ok=True)
        save_model(run.model, folder / "model.safetensors", spec=run.spec)
        (folder / "model.json").write_text(run.spec.to_json())
        save_npz(folder / "clean_subset.npz", run.clean_subset)
        save_npz(folder / "test.npz", run.test)
        sets = run.attack.triggered_sets(run.test) if hasattr(run.attack, "triggered_sets") else \
            [(run.attack.target, run.test_triggered)]
        for i, (_, trig) in enumerate(sets):
            save_npz(folder / f"test_triggered_{i}.npz", trig)
        meta_path.write_text(json.dumps({"kind": kind, "seed": seed, "targets": [t for t, _ in sets],
                                         "clean_accuracy": run.clean_accuracy, "asr": run.attack_success_rate,
                                         "seconds": time.perf_counter() - t0}))
    meta = json.loads(meta_path.read_text())
    spec = load_spec(str(folder / "model.json"))
    shape = (spec.in_channels, *spec.input_size)

    def load(name):
        return load_dataset_file(folder / name, num_classes=spec.num_classes, expect_shape=shape)

    trig = [load(f"test_triggered_{i}.npz") for i in range(len(meta["targets"]))]
    model = prepare_model(load_model(folder / "model.safetensors", spec), pick_device(device))

    def asr(m) -> float:
        from nba_core.train import predict

        if kind == "badnets_all2all":
            pred = predict(m, trig[0].x).cpu().numpy()
            return float((pred == (trig[0].y + 1) % spec.num_classes).mean())
        return max(asr_each(m))

    def asr_each(m) -> list[float]:
        """Per trigger (the two-target case has two), in the order of meta["targets"]."""
        from nba_core.metrics import attack_success_rate

        return [attack_success_rate(m, t.x, t.y, k) for k, t in zip(meta["targets"], trig)]

    return SimpleNamespace(kind=kind, seed=seed, spec=spec, model=model, clean=load("clean_subset.npz"),
                           test=load("test.npz"), asr=asr, asr_each=asr_each, meta=meta)


if __name__ == "__main__":  # warm the cache: python -m bench.detect_models KIND:SEED ...
    import sys

    import torch

    torch.set_num_threads(1)
    for item in sys.argv[1:]:
        kind, seed = item.split(":")
        r = load_or_make(kind, int(seed))
        print(kind, seed, json.dumps(r.meta), flush=True)
