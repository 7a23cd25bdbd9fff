"""NBA parameter variants on TUNING models, one verdict per model handed to every variant (as a job does).

    python -m bench.nba_variants --stem STEM --kinds none badnets --seeds 10 11 \
        --variant default= --variant no_pseudo=pseudo=off --variant kd3=suspect_kd=3

Each --variant is NAME=k=v,k=v (empty after the first '=' = the defaults). Rows (verdict, ASR left, CA drop, the
student's CA on the clean subset) go to docs/benchmarks/STEM.jsonl and resume there. Tuning seeds only (>= 10): the
reported seeds never choose a default.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from .common import OUT_DIR, RowLog, mean_std, parse_overrides, provenance


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, params = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"variant {text!r}: NAME=k=v,k=v")
    return name, parse_overrides(params) if params else {}


def summary(rows: list[dict]) -> str:
    by = defaultdict(list)
    for r in rows:
        by[(r["variant"] + " (forced miss)" * bool(r.get("forced_miss")), r["kind"])].append(r)
    lines = ["| variant | kind | models | CA drop mean (max) | ASR left mean (max) |", "|---|---|---|---|---|"]
    for (variant, kind), rs in sorted(by.items()):
        drop, asr = [r["ca_drop"] for r in rs], [r["asr_after"] for r in rs]
        lines.append(f"| {variant} | {kind} | {len(rs)} | {100 * mean_std(drop)[0]:.2f} ({100 * max(drop):.1f}) | "
                     f"{100 * mean_std(asr)[0]:.2f} ({100 * max(asr):.1f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stem", required=True)
    p.add_argument("--kinds", nargs="+", default=["none"])
    p.add_argument("--seeds", nargs="+", type=int, default=[10, 11])
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--variant", action="append", type=parse_variant, required=True)
    p.add_argument("--forced-miss", action="store_true",
                   help="hand NBA the verdict with its flags removed (status not_suspected, same scores): what NBA "
                        "does when the verdict misses a backdoor")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if min(args.seeds) < 10:
        p.error("tuning seeds only (>= 10)")
    log = RowLog(OUT_DIR / f"{args.stem}.jsonl", ("dataset", "kind", "seed", "variant", "forced_miss"))
    if not args.report_only:
        import torch

        from nba_core import verdict as V
        from nba_core.defenses import get_defense
        from nba_core.defenses.base import DefenseContext
        from nba_core.device import pick_device, seed_everything
        from nba_core.metrics import clean_accuracy

        from .detect_models import load_or_make

        torch.set_num_threads(1)
        commit = provenance()["commit"]
        for kind in args.kinds:
            for seed in args.seeds:
                todo = [(n, o) for n, o in args.variant
                        if not log.has(dataset=args.dataset, kind=kind, seed=seed, variant=n,
                                       forced_miss=args.forced_miss)]
                if not todo:
                    continue
                r = load_or_make(kind, seed, dataset=args.dataset)
                session = V.VerdictSession(r.model, r.clean.x, r.clean.y, num_classes=r.spec.num_classes, seed=0)
                verdict, scan = session.judge(r.model)
                true_status, true_targets = verdict.status, verdict.targets
                if args.forced_miss:
                    verdict = V.Verdict("not_suspected", [], [], verdict.score, verdict.scores)
                ca0 = clean_accuracy(r.model, r.test.x, r.test.y)
                for name, overrides in todo:
                    ctx = DefenseContext(spec=r.spec, device=pick_device("cpu"), generator=seed_everything(seed),
                                         seed=seed, hflip=False, verdict=(verdict, scan))
                    t0 = time.perf_counter()
                    res = get_defense("nba", overrides).run(r.model, r.clean, ctx)
                    row = {"dataset": args.dataset, "kind": kind, "seed": seed, "variant": name,
                           "overrides": overrides, "forced_miss": args.forced_miss, "verdict": true_status,
                           "targets": true_targets,  # the real verdict's, also under --forced-miss
                           "asr_before": r.asr(r.model), "asr_after": r.asr(res.model), "ca_before": ca0,
                           "asr_after_each": r.asr_each(res.model) if r.kind != "badnets_all2all" else None,
                           "ca_drop": ca0 - clean_accuracy(res.model, r.test.x, r.test.y),
                           "suspects": res.info.get("suspect_classes"), "uap_suspects": res.info.get("uap_suspects"),
                           "seconds": time.perf_counter() - t0, "commit": commit}
                    log.add(row)
                    print({k: row[k] for k in ("kind", "seed", "variant", "verdict", "asr_after", "ca_drop")},
                          flush=True)
    rows = [r for r in log.rows if r["dataset"] == args.dataset]
    text = f"# NBA variants ({args.stem}, {args.dataset}, tuning seeds)\n\n{summary(rows)}\n"
    (OUT_DIR / f"{args.stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
