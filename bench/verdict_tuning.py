"""Tuning runs of the verdict (tuning seeds only): before-verdict of cached models at two scan seeds, one JSON row each.

    python bench/verdict_tuning.py docs/benchmarks/verdict_tuning_seed10.jsonl badnets_all2all:10 none:10 badnets:10
"""
import json, sys, time, torch
torch.set_num_threads(1)
from bench.detect_models import load_or_make
from nba_core.verdict import VerdictSession
out = open(sys.argv[1], "a")
for item in sys.argv[2:]:
    kind, seed = item.split(":")
    r = load_or_make(kind, int(seed))
    for scan_seed in (0, 1):
        t0 = time.time()
        sess = VerdictSession(r.model, r.clean.x, r.clean.y, num_classes=10, seed=scan_seed)
        v, scan = sess.judge(r.model)
        row = {"kind": kind, "seed": int(seed), "scan_seed": scan_seed, "asr": r.meta["asr"],
               "verdict": sess.report(v, scan), "seconds": time.time() - t0}
        out.write(json.dumps(row) + "\n"); out.flush()
        print(kind, seed, scan_seed, v.status, v.targets, v.pairs, round(v.score, 2),
              {k: [round(x, 2) for x in vals] for k, vals in v.scores.items()}, round(time.time() - t0, 1), flush=True)
