"""NBA with and without the verdict's universal warps as pseudo triggers (`warp_pseudo`), on TUNING WaNet models.

    python -m bench.nba_warp_tuning [--kinds wanet] [--seeds 10 11]

One verdict per model (scan seed 0, as a job computes it), handed to both NBA runs; rows (ASR left, CA drop, which
classes got a warp) go to docs/benchmarks/nba_warp_pseudo_tuning.jsonl. Tuning seeds only (>= 10).
"""

from __future__ import annotations

import argparse
import time

from .common import OUT_DIR, RowLog, provenance

STEM = "nba_warp_pseudo_tuning"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", default=["wanet"])
    p.add_argument("--seeds", nargs="+", type=int, default=[10, 11])
    args = p.parse_args(argv)
    if min(args.seeds) < 10:
        p.error("tuning seeds only (>= 10)")
    import torch

    from nba_core import verdict as V
    from nba_core.defenses import get_defense
    from nba_core.defenses.base import DefenseContext
    from nba_core.device import pick_device, seed_everything
    from nba_core.metrics import clean_accuracy

    from .detect_models import load_or_make

    torch.set_num_threads(1)
    log = RowLog(OUT_DIR / f"{STEM}.jsonl", ("kind", "seed", "warp_pseudo"))
    commit = provenance()["commit"]
    for kind in args.kinds:
        for seed in args.seeds:
            r = load_or_make(kind, seed)
            session = V.VerdictSession(r.model, r.clean.x, r.clean.y, num_classes=r.spec.num_classes, seed=0)
            verdict, scan = session.judge(r.model)
            ca0 = clean_accuracy(r.model, r.test.x, r.test.y)
            for warp_pseudo in (True, False):
                if log.has(kind=kind, seed=seed, warp_pseudo=warp_pseudo):
                    continue
                ctx = DefenseContext(spec=r.spec, device=pick_device("cpu"), generator=seed_everything(seed),
                                     seed=seed, hflip=False, verdict=(verdict, scan))
                t0 = time.perf_counter()
                res = get_defense("nba", {"warp_pseudo": warp_pseudo}).run(r.model, r.clean, ctx)
                row = {"kind": kind, "seed": seed, "warp_pseudo": warp_pseudo, "verdict": verdict.status,
                       "targets": verdict.targets, "asr_after": r.asr(res.model),
                       "ca_drop": ca0 - clean_accuracy(res.model, r.test.x, r.test.y),
                       "warp_suspects": res.info.get("warp_suspects"), "seconds": time.perf_counter() - t0,
                       "commit": commit}
                log.add(row)
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
