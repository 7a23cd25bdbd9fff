"""NBA when the user has few clean images (issue 8): the detection bench's models, the defender's clean subset cut
down to `--n` images (stratified, the same count per class), the trigger-free verdict and NBA run on those alone, as
a CLI job would, at several sanitize seeds (the goal holds at the worst seed, not on average).

    python -m bench.few_clean                        # BadNets + Blended, seeds 0-2, 50 images, sanitize seeds 0-3
    python -m bench.few_clean --kinds badnets_all2all --sanitize-seeds 0

Rows go to docs/benchmarks/few_clean.jsonl (resumable); the report to few_clean.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .common import OUT_DIR, RowLog, parse_overrides, provenance
from .detect_models import load_or_make

KEY = ("kind", "seed", "n_requested", "sanitize_seed", "params")  # n_requested 0: the whole clean subset
GOAL_ASR, GOAL_CA_DROP = 0.02, 2.0  # the goal for NBA on 50 clean images


def stratified_take(y: np.ndarray, n: int, num_classes: int, seed: int) -> np.ndarray:
    """Indices of n images, n // K per class (the remainder from the first classes), drawn with `seed`."""
    rng = np.random.default_rng(seed)
    per, extra = divmod(n, num_classes)
    picked = []
    for c in range(num_classes):
        pool = np.flatnonzero(y == c)
        want = per + (c < extra)
        if len(pool) < want:
            raise ValueError(f"class {c} has {len(pool)} clean images, {want} wanted")
        picked.append(rng.choice(pool, size=want, replace=False))
    return np.sort(np.concatenate(picked))


def run_one(kind: str, seed: int, n: int, sanitize_seed: int, commit: str, params: str = "") -> dict:
    import torch

    from nba_core.defenses import get_defense
    from nba_core.defenses.base import DefenseContext
    from nba_core.device import pick_device, seed_everything
    from nba_core.metrics import clean_accuracy
    from nba_core.verdict import VerdictSession

    torch.set_num_threads(1)
    r = load_or_make(kind, seed)
    k = r.spec.num_classes
    # The subset depends on the model seed only: the sanitize seeds vary the job, not the user's data.
    clean = r.clean if n <= 0 else r.clean.subset(stratified_take(np.asarray(r.clean.y), n, k, seed))
    ca_before = clean_accuracy(r.model, r.test.x, r.test.y)
    t0 = time.perf_counter()
    session = VerdictSession(r.model, clean.x, clean.y, num_classes=k, seed=sanitize_seed)
    verdict, scan = session.judge(r.model)
    ctx = DefenseContext(spec=r.spec, device=pick_device("cpu"), generator=seed_everything(sanitize_seed),
                         seed=sanitize_seed, hflip=r.spec.in_channels == 3, verdict=(verdict, scan))
    result = get_defense("nba", parse_overrides(params)).run(r.model, clean, ctx)
    after, _ = session.judge(result.model, before=verdict)
    seconds = time.perf_counter() - t0
    ca_after = clean_accuracy(result.model, r.test.x, r.test.y)
    vb, va = verdict.to_dict(), after.to_dict()
    return {"kind": kind, "seed": seed, "n_clean": len(clean), "n_requested": n, "sanitize_seed": sanitize_seed,
            "params": params, "asr_before": r.asr(r.model), "ca_before": ca_before, "asr_after": r.asr(result.model),
            "ca_after": ca_after, "ca_drop_points": 100 * (ca_before - ca_after), "verdict_before": vb,
            "verdict_after": va, "raw_before": raw_status(vb), "raw_after": raw_status(va), "seconds": seconds,
            "commit": commit}


def raw_status(v: dict) -> str:
    """The status the verdict's scores give before the too-few-images rule turns a clear into 'inconclusive'."""
    if v["targets"] or v["pairs"]:
        return "suspected"
    return "inconclusive" if v["score"] >= 0.8 else "not_suspected"


def summarize(rows: list[dict]) -> list[dict]:
    """Per (kind, n): the mean and the WORST over models and sanitize seeds, and whether the goal holds."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kind"], r["n_clean"], r.get("params", "")), []).append(r)
    out = []
    for (kind, n, params), rs in sorted(groups.items()):
        asr = [r["asr_after"] for r in rs]
        drop = [r["ca_drop_points"] for r in rs]
        out.append({"kind": kind, "n_clean": n, "params": params, "runs": len(rs), "models": len({r["seed"] for r in rs}),
                    "asr_mean": float(np.mean(asr)), "asr_worst": max(asr),
                    "ca_drop_mean": float(np.mean(drop)), "ca_drop_worst": max(drop),
                    "after_not_suspected": sum(r["verdict_after"]["status"] == "not_suspected" for r in rs),
                    "before_suspected": sum(r["verdict_before"]["status"] == "suspected" for r in rs),
                    "goal_met": max(asr) <= GOAL_ASR and max(drop) <= GOAL_CA_DROP})
    return out


def write_report(rows: list[dict], out: Path, prov: dict, stem: str = "few_clean") -> None:
    summary = summarize(rows)
    (out / f"{stem}.json").write_text(json.dumps({"provenance": prov, "summary": summary, "rows": rows}, indent=1))
    lines = [f"# NBA with few clean images ({stem})", "",
             f"Commit `{prov['commit']}`; machine {prov['machine']}; generated {prov['when']}. "
             "`python -m bench.few_clean`.", "",
             "MNIST-5k, small CNN, the detection bench's models; the defender's clean subset cut to n images "
             "(stratified, drawn with the model seed); verdict and NBA (defaults) on those n images only, as a job "
             f"would; several sanitize seeds per model. Goal: ASR ≤ {100 * GOAL_ASR:.0f} % and CA drop ≤ "
             f"{GOAL_CA_DROP:.0f} points at the **worst** run.", "",
             "| attack | n | NBA params | models × seeds | ASR after mean / worst | CA drop mean / worst | before suspected | "
             "after not suspected | goal |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['kind']} | {s['n_clean']} | {s['params'] or 'defaults'} | {s['runs']} ({s['models']} models) | "
                     f"{100 * s['asr_mean']:.1f} / {100 * s['asr_worst']:.1f} % | {s['ca_drop_mean']:.2f} / "
                     f"{s['ca_drop_worst']:.2f} | {s['before_suspected']}/{s['runs']} | "
                     f"{s['after_not_suspected']}/{s['runs']} | {'met' if s['goal_met'] else '**not met**'} |")
    lines += ["", "## Runs", "", "| attack | seed | n | NBA params | sanitize seed | ASR before → after | CA before → after | "
              "verdict before → after | s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kind"], r["n_clean"], r.get("params", ""), r["seed"], r["sanitize_seed"])):
        vb, va = r["verdict_before"], r["verdict_after"]
        lines.append(f"| {r['kind']} | {r['seed']} | {r['n_clean']} | {r.get('params') or 'defaults'} | {r['sanitize_seed']} | "
                     f"{100 * r['asr_before']:.1f} → {100 * r['asr_after']:.1f} % | {100 * r['ca_before']:.1f} → "
                     f"{100 * r['ca_after']:.1f} | {vb['status']} {vb['targets'] or ''} ({vb['score']:.2f}) → "
                     f"{va['status']} ({va['score']:.2f}) | {r['seconds']:.0f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="*", default=["badnets", "blended"], help="none given: only rewrite the report")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n", type=int, default=50, help="clean images the defender has (0: the whole clean subset, "
                   "to measure the spread over sanitize seeds at the bench's size)")
    p.add_argument("--sanitize-seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument("--stem", default="few_clean")
    p.add_argument("--params", default="", help="NBA parameter overrides, e.g. min_student_images=4000")
    args = p.parse_args(argv)
    prov = provenance()
    log = RowLog(args.out / f"{args.stem}.jsonl", KEY)
    for kind in args.kinds:
        for seed in args.seeds:
            for s in args.sanitize_seeds:
                if log.has(kind=kind, seed=seed, n_requested=args.n, sanitize_seed=s, params=args.params):
                    continue
                row = run_one(kind, seed, args.n, s, prov["commit"], args.params)
                log.add(row)
                print(f"{kind} seed {seed} sanitize seed {s}: ASR {100 * row['asr_after']:.1f} %, CA drop "
                      f"{row['ca_drop_points']:.2f}, after {row['verdict_after']['status']}", flush=True)
                write_report(log.rows, args.out, prov, args.stem)
    write_report(log.rows, args.out, prov, args.stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
