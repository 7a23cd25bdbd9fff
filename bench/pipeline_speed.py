"""Pipeline speed on the machine at hand: per-defense wall time by stage, the batched class scan against a
per-class loop, and one full `sanitize` run. The GPU ladder (device-resident data, bf16, channels_last, batched
scan against a plain reference loop) is bench/gpu_speed.py.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from .common import OUT_DIR, provenance, timed

DEFENSES = ("ft", "fp", "nad", "anp", "ibau", "nba")


def defense_stage_times(seed: int = 0) -> dict:
    from nba_core.defenses import get_defense
    from nba_core.defenses.base import DefenseContext
    from nba_core.device import pick_device, seed_everything
    from .quality import load_or_make_backdoor

    run = load_or_make_backdoor("mnist5k", "small_cnn", "badnets", seed, "auto")
    out = {}
    for name in DEFENSES:
        ctx = DefenseContext(spec=run.spec, device=pick_device("auto"), generator=seed_everything(seed), seed=seed)
        t0 = time.perf_counter()
        result = get_defense(name).run(run.model, run.clean_subset, ctx)
        out[name] = {"total_seconds": time.perf_counter() - t0, "stages": result.stage_seconds}
    return {"setup": "mnist5k small_cnn badnets seed 0, 200-image clean subset", "defenses": out, "run": run}


def time_class_scan(model, x, y, classes: list[int], *, steps: int = 60, batch_size: int = 8) -> dict:
    """The same trigger optimisation for all classes in one batch, and one class at a time (after a short warm-up,
    so neither side pays for first-call set-up)."""
    from nba_core.device import seed_everything
    from nba_core.triggerscan import optimise_triggers

    device = next(model.parameters()).device
    run = lambda cls, n: optimise_triggers(model, x, y, cls, steps=n, batch_size=batch_size, l1_weight=0.5,
                                           generator=seed_everything(0))
    run(classes, 2)
    batched = timed(lambda: run(classes, steps), device)
    loop = timed(lambda: [run([k], steps) for k in classes], device)
    return {"steps": steps, "batch_per_class": batch_size, "classes": len(classes), "batched_seconds": batched,
            "per_class_loop_seconds": loop, "speedup": loop / batched}


def scan_batched_vs_loop(run) -> dict:
    from nba_core.device import pick_device, to_device

    dev = pick_device("auto")
    x, y = to_device(run.clean_subset.x, dev), to_device(run.clean_subset.y, dev)
    return time_class_scan(run.model.to(dev), x, y, list(range(run.spec.num_classes)))


def full_sanitize(run) -> dict:
    from nba_core.checkpoint import save_model
    from nba_core.data.formats import save_npz
    from nba_core.pipeline import sanitize

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_model(run.model, d / "m.safetensors", spec=run.spec)
        save_npz(d / "clean.npz", run.clean_subset)
        t0 = time.perf_counter()
        report = sanitize(model_path=str(d / "m.safetensors"), spec=run.spec, data_path=str(d / "clean.npz"),
                          method="nba", params=None, out_path=str(d / "out.safetensors"))
        wall = time.perf_counter() - t0
    return {"method": "nba", "wall_seconds": wall, "timing": report["timing"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    prov = provenance()
    stages = defense_stage_times()
    run = stages.pop("run")
    result = {"provenance": prov, "defense_stage_times": stages, "class_scan": scan_batched_vs_loop(run),
              "sanitize_nba": full_sanitize(run)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pipeline_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Pipeline speed", "", f"Commit `{prov['commit']}`; machine {prov['machine']}; {prov['when']}.", "",
             "## Defense wall time by stage (CPU, MNIST-5k, small CNN, BadNets, 200-image clean subset)", "",
             "| defense | total s | stages (s) |", "|---|---|---|"]
    for name, r in stages["defenses"].items():
        st = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
        lines.append(f"| {name} | {r['total_seconds']:.1f} | {st} |")
    cs = result["class_scan"]
    lines += ["", "## Class scan: all classes batched vs one class at a time", "",
              f"{cs['classes']} classes × {cs['steps']} steps × {cs['batch_per_class']} images: batched "
              f"{cs['batched_seconds']:.2f} s, per-class loop {cs['per_class_loop_seconds']:.2f} s "
              f"(×{cs['speedup']:.1f}).", "",
              "## One `nba sanitize --method nba` (pipeline incl. trigger-free evidence before and after)", "",
              f"{result['sanitize_nba']['wall_seconds']:.1f} s wall: " + ", ".join(
                  f"{k} {v:.1f}" for k, v in result["sanitize_nba"]["timing"].items() if isinstance(v, float)), "",
              "The GPU comparison is a separate run: `python -m bench.gpu_speed` (docs/benchmarks/gpu_speed.md)."]
    (args.out / "pipeline_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
