"""Verdict stability on TUNING models (issue 8): status, targets and score of the trigger-free verdict at several
scan seeds, with one and with all of the scan's restarts (both read from one scan: each restart is kept).

    python -m bench.verdict_stability [--kinds none badnets ...] [--seeds 10 11] [--scan-seeds 0 1 2] [--stem S]
                                      [--scan steps=40,batch_size=6]   # a cheaper scan, measured beside the default

Rows go to docs/benchmarks/verdict_stability_tuning.jsonl (one per model and scan seed); the summary to the .md.
Only tuning seeds (>= 10) are accepted: this is where the scan's restarts and the reference's epochs were chosen.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

from .common import OUT_DIR, RowLog, parse_overrides, provenance

STEM = "verdict_stability_tuning"
KEY = ("kind", "seed", "scan_seed", "scan")  # scan: the overrides of verdict.SCAN as written ("" = the default)


def run(kind: str, seed: int, scan_seed: int, scan_overrides: str = "") -> dict:
    import torch

    from nba_core import verdict as V

    from .detect_models import load_or_make

    torch.set_num_threads(1)
    r = load_or_make(kind, seed)
    t0 = time.perf_counter()
    session = V.VerdictSession(r.model, r.clean.x, r.clean.y, num_classes=r.spec.num_classes, seed=scan_seed,
                               scan_settings=parse_overrides(scan_overrides))
    _, scan = session.judge(r.model)
    row = {"kind": kind, "seed": seed, "scan_seed": scan_seed, "scan": scan_overrides, "asr": r.asr(r.model),
           "reference_seconds": session.reference_seconds, "train_seconds": r.meta.get("seconds"),
           "seconds": time.perf_counter() - t0, "scan_seconds": scan.seconds,
           "restarts": len(scan.patch_l1_restarts), "reference_epochs": V.REFERENCE["epochs"],
           "patch_l1_restarts": scan.patch_l1_restarts,
           "ref_patch_l1_restarts": session.reference_scan.patch_l1_restarts,
           "global_restarts": scan.global_success_restarts,
           "ref_global_restarts": session.reference_scan.global_success_restarts,
           "warp_success": scan.warp_success, "ref_warp_success": session.reference_scan.warp_success}
    for k in range(1, row["restarts"] + 1):
        v = V.judge(scan.with_restarts(k), session.reference_scan.with_restarts(k), too_little_data=session.problem,
                    unreliable_reference=session.reference_problem)
        row[f"verdict_r{k}"] = v.to_dict()
    # Every restart of both families as run (a --scan with more universal-perturbation restarts than mask restarts
    # shows here; verdict_rk keeps the first k of each).
    row["verdict_all"] = V.judge(scan, session.reference_scan, too_little_data=session.problem,
                                 unreliable_reference=session.reference_problem).to_dict()
    return row


def summarize(rows: list[dict]) -> list[str]:
    lines = ["| scan (overrides of SCAN) | restarts used | models | flips across scan seeds | "
             "benign scans suspected / inconclusive | highest benign score | backdoored scans suspected | "
             "exact target | lowest backdoored score | scan s (mean, as run) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for setting in sorted({r.get("scan", "") for r in rows}):
        rs = [r for r in rows if r.get("scan", "") == setting]
        for k, field in ((1, "verdict_r1"), (2, "verdict_r2"), ("all", "verdict_all")):
            by = defaultdict(list)
            for r in rs:
                if field in r:
                    by[(r["kind"], r["seed"])].append(r[field])
            ben = [v for (kind, _), vs in by.items() if kind == "none" for v in vs]
            bad = [v for (kind, _), vs in by.items() if kind != "none" for v in vs]
            if not ben or not bad:
                continue
            flips = sum(len({v["status"] for v in vs}) > 1 for vs in by.values())
            secs = sum(r["scan_seconds"] for r in rs) / len(rs)
            lines.append(f"| {setting or 'default'} | {k} | {len(by)} | {flips} | "
                         f"{sum(v['status'] == 'suspected' for v in ben)}/{len(ben)} / "
                         f"{sum(v['status'] == 'inconclusive' for v in ben)} | {max(v['score'] for v in ben):.2f} | "
                         f"{sum(v['status'] == 'suspected' for v in bad)}/{len(bad)} | "
                         f"{sum(v['targets'] == [0] for v in bad)}/{len(bad)} | {min(v['score'] for v in bad):.2f} | "
                         f"{secs:.1f} |")
    lines += ["", "| model | scan | scan seed | restarts run | verdict (1 restart) | verdict (2 restarts) |",
              "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kind"], r["seed"], r.get("scan", ""), r["scan_seed"])):
        cell = lambda v: f"{v['status']} {v['targets'] or ''} {v['score']:.2f}" if v else "–"
        lines.append(f"| {r['kind']} s{r['seed']} | {r.get('scan') or 'default'} | {r['scan_seed']} | {r['restarts']} | "
                     f"{cell(r.get('verdict_r1'))} | "
                     f"{cell(r.get('verdict_r2'))} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", default=["none", "badnets", "blended", "trojan", "sig", "wanet"])
    p.add_argument("--seeds", nargs="+", type=int, default=[10, 11])
    p.add_argument("--benign-seeds", nargs="+", type=int, default=[10, 11, 12, 13])
    p.add_argument("--scan-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument("--scan", default="", help="overrides of nba_core.verdict.SCAN, e.g. steps=40,batch_size=6 "
                   "(rows are kept per setting, so a cheaper scan is measured beside the default)")
    p.add_argument("--stem", default=STEM, help="file stem of the rows and report (a separate study keeps its own)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if min(args.seeds + args.benign_seeds) < 10:
        p.error("tuning seeds only (>= 10): the reported seeds 0-9 are for bench.detection")
    log = RowLog(args.out / f"{args.stem}.jsonl", KEY)
    for r in log.rows:
        r.setdefault("scan", "")  # rows from before --scan existed ran the default
    prov = provenance()
    if not args.report_only:
        units = [("none", s) for s in args.benign_seeds] + [(k, s) for k in args.kinds if k != "none" for s in args.seeds]
        for kind, seed in units:
            for s in args.scan_seeds:
                if log.has(kind=kind, seed=seed, scan_seed=s, scan=args.scan):
                    continue
                row = run(kind, seed, s, args.scan) | {"commit": prov["commit"]}
                log.add(row)
                print(kind, seed, s, row["verdict_r1"]["status"], row.get("verdict_r2", {}).get("status"), flush=True)
    rows = {log.key(r): r for r in log.rows}
    md = ["# Verdict stability on tuning models (MNIST-5k small CNN, 200 clean images)", "",
          f"`python -m bench.verdict_stability` — report written at commit `{str(prov['commit'])[:10]}`, {prov['when']}. "
          "Tuning seeds only: where the scan's restarts (2) and the benign reference's epochs (30) were chosen. "
          "Both columns come from the same scans (each restart is kept; '1 restart' uses the first).", ""]
    (args.out / f"{args.stem}.md").write_text("\n".join(md + summarize(list(rows.values()))) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
