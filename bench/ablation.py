"""NBA ablation: each component on and off, on the same backdoored models, across attacks.

Variants are parameter overrides of the NBA defaults (`nba methods nba`); the defaults themselves are the row
"default". Run: python -m bench.ablation [--attacks ...] [--seeds ...].
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from .common import OUT_DIR, RowLog, fmt_pct, provenance
from .report import ATTACK_ORDER, ordered

# name -> (overrides, what it tests). Filled from NBAConfig's switches.
VARIANTS: dict[str, tuple[dict, str]] = {
    "default": ({}, "NBA defaults: attention, class scan + universal δ, pseudo CE 2, suspect KD 1, no KL, no γ"),
    "pseudo_off": ({"pseudo": "off"}, "no pseudo samples: behaviour alignment on clean inputs only (NAD-like)"),
    "pseudo_per_sample": ({"pseudo": "per_sample"}, "untargeted per-sample δ maximising S/T disagreement"),
    "pseudo_universal": ({"pseudo": "universal"}, "untargeted universal δ maximising S/T disagreement"),
    "pseudo_class_scan": ({"pseudo": "class_scan", "scan_eps": 0.0}, "class scan (mask+pattern) only, no δ"),
    "with_kl": ({"kl_weight": 1.0}, "adds the logit term KL(T(x̃)‖S(x̃))"),
    "with_gamma": ({"gamma": 1.0}, "adds behaviour alignment on pseudo samples"),
    "no_clean_alignment": ({"beta": 0.0}, "β = 0: no behaviour alignment on clean inputs"),
    "repr_channel": ({"representations": "channel"}, "channel behaviour instead of attention"),
    "repr_relational": ({"representations": "relational"}, "relational (Gram) behaviour instead of attention"),
    "no_suspect_kd": ({"suspect_kd": 0.0}, "drops KL(B(x)‖S(x)) on clean inputs (B = the suspect model, T = 2)"),
    "suspect_kd_0.3": ({"suspect_kd": 0.3}, "that KL at weight 0.3 instead of 1"),
    "suspect_kd_2": ({"suspect_kd": 2.0}, "that KL at weight 2 instead of 1"),
    "student_lr_0.005": ({"student_lr": 0.005}, "student learning rate halved"),
    "student_epochs_10": ({"student_epochs": 10}, "half the student epochs"),
    "repr_all": ({"representations": "attention,channel,relational,flow"}, "all four representations"),
}
KEY = ("attack", "seed", "variant")


def run_unit(attack: str, seed: int, variants: dict, threads: int) -> list[dict]:
    import torch

    torch.set_num_threads(threads)
    from nba_core.defenses import get_defense
    from nba_core.defenses.base import DefenseContext
    from nba_core.device import pick_device, seed_everything
    from nba_core.metrics import defense_effectiveness_rating, evaluate_with_trigger

    from .quality import load_or_make_backdoor

    run = load_or_make_backdoor("mnist5k", "small_cnn", attack, seed, "auto")  # the quality table's models
    test, trig, target = run.test, run.test_triggered, run.target
    before = evaluate_with_trigger(run.model, test.x, test.y, trig.x, trig.y, target)
    rows = []
    for name, (params, _) in variants.items():
        ctx = DefenseContext(spec=run.spec, device=pick_device("auto"), generator=seed_everything(seed), seed=seed)
        t0 = time.perf_counter()
        result = get_defense("nba", params).run(run.model, run.clean_subset, ctx)
        seconds = time.perf_counter() - t0
        after = evaluate_with_trigger(result.model, test.x, test.y, trig.x, trig.y, target)
        rows.append({"dataset": "mnist5k", "arch": "small_cnn", "attack": attack, "seed": seed, "variant": name,
                     "params": params, "ca_before": before["clean_accuracy"], "asr_before": before["attack_success_rate"],
                     "ca_after": after["clean_accuracy"], "asr_after": after["attack_success_rate"],
                     "ra_after": after["robust_accuracy"],
                     "der": defense_effectiveness_rating(before["clean_accuracy"], before["attack_success_rate"],
                                                         after["clean_accuracy"], after["attack_success_rate"]),
                     "seconds": seconds, "stage_seconds": result.stage_seconds,
                     "suspects": result.info.get("suspect_classes")})
    return rows


def write_report(rows: list[dict], out: Path, prov: dict, stem: str = "ablation_nba", title: str = "NBA ablation") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"provenance": prov, "variants": {
        k: {"params": v[0], "tests": v[1]} for k, v in VARIANTS.items()}, "rows": rows}, indent=1) + "\n")
    attacks = ordered({r["attack"] for r in rows}, ATTACK_ORDER)
    by = defaultdict(list)
    for r in rows:
        by[(r["variant"], r["attack"])].append(r)
    lines = [f"# {title} (MNIST-5k, small CNN)", "",
             f"Commit `{prov['commit']}`{' (dirty tree)' if prov.get('dirty') else ''}; {prov['machine']}; "
             f"{prov['when']}. Seeds: {sorted({r['seed'] for r in rows})}. Cells: CA after / ASR after (%), mean ± std.",
             "", "| variant | what it tests | " + " | ".join(attacks) + " | avg CA drop | avg ASR | avg DER | s |",
             "|---|---|" + "---|" * (len(attacks) + 4)]
    for name, (params, what) in VARIANTS.items():
        rs = [r for r in rows if r["variant"] == name]
        if not rs:
            continue
        cells = [f"{fmt_pct([r['ca_after'] for r in by[(name, a)]])} / {fmt_pct([r['asr_after'] for r in by[(name, a)]])}"
                 if by[(name, a)] else "–" for a in attacks]
        n = len(rs)
        lines.append(f"| {name} | {what} | " + " | ".join(cells) +
                     f" | {100 * sum(r['ca_before'] - r['ca_after'] for r in rs) / n:.1f} | "
                     f"{100 * sum(r['asr_after'] for r in rs) / n:.1f} | {100 * sum(r['der'] for r in rs) / n:.1f} | "
                     f"{sum(r['seconds'] for r in rs) / n:.0f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="NBA ablation on MNIST-5k.")
    p.add_argument("--attacks", nargs="+", default=["badnets", "blended", "sig", "wanet"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument("--stem", default="ablation_nba", help="output file names (another stem keeps runs apart)")
    p.add_argument("--title", default="NBA ablation")
    args = p.parse_args(argv)
    path = args.out / f"{args.stem}.jsonl"
    if args.fresh and path.exists():
        path.unlink()
    log = RowLog(path, KEY)
    prov = provenance()
    variants = {k: VARIANTS[k] for k in args.variants}
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    units = []
    for a in args.attacks:
        for s in args.seeds:
            todo = {k: v for k, v in variants.items() if not log.has(attack=a, seed=s, variant=k)}
            if todo:
                units.append((a, s, todo))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_unit, a, s, todo, threads): (a, s) for a, s, todo in units}
        for fut in as_completed(futures):
            for row in fut.result():
                log.add(row | {"commit": prov["commit"]})
            print(f"  done {futures[fut]} after {time.perf_counter() - t0:.0f} s", flush=True)
    write_report(log.rows, args.out, prov | {"wall_seconds": time.perf_counter() - t0}, args.stem, args.title)
    print(f"wrote {args.out / args.stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
