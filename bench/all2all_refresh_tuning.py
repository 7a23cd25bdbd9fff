"""NBA on all-to-all BadNets, tuning seeds only: its default against variants for label-shift backdoors --
re-optimising the suspect triggers (on these models: the verdict's label-shift trigger) against the student every 5
or 2 epochs, or also unlearning the patch trigger and δ of every class a flagged pair lands in (`pair_patches`).
One JSON row per (seed, variant).

    python -m bench.all2all_refresh_tuning docs/benchmarks/nba_all2all_refresh_tuning.jsonl 10 11 [--variants default pairs]

Rows named "default" before pair_patches became the default (commits 53c25c7, 3d5851d) are "no_pairs" today.
"""
import argparse
import json
import time

import torch

from bench.detect_models import load_or_make
from nba_core.defenses import get_defense
from nba_core.defenses.base import DefenseContext
from nba_core.device import pick_device, seed_everything
from nba_core.metrics import clean_accuracy
from nba_core.verdict import VerdictSession

VARIANTS = {"default": {}, "refresh5": {"refresh_every": 5}, "refresh2": {"refresh_every": 2},
            "pairs": {"pair_patches": True}, "no_pairs": {"pair_patches": False}}
TUNING_SEEDS = range(10, 20)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("seeds", nargs="+", type=int)
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = open(args.out, "a")
    for seed in args.seeds:
        if seed not in TUNING_SEEDS:
            raise SystemExit(f"seed {seed} is not a tuning seed ({TUNING_SEEDS.start}-{TUNING_SEEDS.stop - 1})")
        r = load_or_make("badnets_all2all", seed)
        session = VerdictSession(r.model, r.clean.x, r.clean.y, num_classes=10, seed=0)
        verdict, scan = session.judge(r.model)
        ca0 = clean_accuracy(r.model, r.test.x, r.test.y)
        for name in args.variants:
            params = VARIANTS[name]
            ctx = DefenseContext(spec=r.spec, device=pick_device("cpu"), generator=seed_everything(seed), seed=seed,
                                 hflip=False, verdict=(verdict, scan))
            t0 = time.time()
            res = get_defense("nba", params).run(r.model, r.clean, ctx)
            secs = time.time() - t0
            after, _ = session.judge(res.model, before=verdict)
            row = {"seed": seed, "variant": name, "params": params, "asr_before": r.asr(r.model),
                   "verdict_before": verdict.status, "pairs_before": len(verdict.pairs), "asr": r.asr(res.model),
                   "ca_drop": 100 * (ca0 - clean_accuracy(res.model, r.test.x, r.test.y)), "after": after.status,
                   "after_score": after.score, "seconds": secs}
            print(row, flush=True)
            out.write(json.dumps(row) + "\n")
            out.flush()
