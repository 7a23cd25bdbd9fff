"""The detection table (issue 8): is the trigger-free verdict right, before and after each defense?

One command: `python -m bench.detection` (defaults: the six attacks + all-to-all + two-target BadNets on seeds 0-2,
benign models on seeds 0-9, defenses ft nad nba, 4 scan seeds for the flip rate). Per model it records the
before-verdict at every scan seed (flip rate), and per defense the after-verdict next to the real trigger's ASR.
Rows go to docs/benchmarks/detection.jsonl (resumable); the report to detection.{json,md}. Tuning seeds (10-13)
are for choosing thresholds only and are never in the reported table (`--seeds`/`--benign-seeds` say what runs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .common import OUT_DIR, RowLog, parse_overrides, provenance
from .detect_models import KINDS, load_or_make, truth

KEY = ("kind", "seed", "defense", "scan_seed")
ASR_CLEAN, ASR_BACKDOORED = 0.05, 0.50  # the agreement bands for the after-verdict


def run_model(kind: str, seed: int, defenses: list[str], scan_seeds: list[int], log: RowLog, commit: str,
              dataset: str = "mnist5k", scan_overrides: str = "") -> None:
    import torch

    from nba_core.defenses import get_defense
    from nba_core.defenses.base import DefenseContext
    from nba_core.device import pick_device, seed_everything
    from nba_core.metrics import clean_accuracy
    from nba_core.verdict import VerdictSession

    torch.set_num_threads(1)
    r = load_or_make(kind, seed, dataset=dataset)
    k = r.spec.num_classes
    base = {"dataset": dataset, "kind": kind, "seed": seed, "truth": truth(kind), "asr_before": r.asr(r.model),
            "ca_before": clean_accuracy(r.model, r.test.x, r.test.y), "attack_train_seconds": r.meta["seconds"],
            "clean_subset_size": len(r.clean), "commit": commit, "scan": scan_overrides}
    sessions = {}
    for s in scan_seeds:
        t0 = time.perf_counter()
        session = VerdictSession(r.model, r.clean.x, r.clean.y, num_classes=k, seed=s,
                                 scan_settings=parse_overrides(scan_overrides))
        verdict, scan = session.judge(r.model)
        sessions[s] = (session, verdict, scan)
        if not log.has(kind=kind, seed=seed, defense="none", scan_seed=s):
            log.add(base | {"defense": "none", "scan_seed": s, "verdict": verdict.to_dict(),
                            "verdict_seconds": time.perf_counter() - t0,
                            "reference_seconds": session.reference_seconds, "scan_seconds": scan.seconds})
    session, verdict, scan = sessions[scan_seeds[0]]
    for name in defenses:
        if log.has(kind=kind, seed=seed, defense=name, scan_seed=scan_seeds[0]):
            continue
        ctx = DefenseContext(spec=r.spec, device=pick_device("cpu"), generator=seed_everything(seed), seed=seed,
                             hflip=r.spec.in_channels == 3, verdict=(verdict, scan))
        t0 = time.perf_counter()
        result = get_defense(*defense_spec(name)).run(r.model, r.clean, ctx)
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        after, _ = session.judge(result.model, before=verdict)  # as a job judges it
        log.add(base | {"defense": name, "scan_seed": scan_seeds[0], "verdict_before": verdict.to_dict(),
                        "verdict": after.to_dict(), "asr_after": r.asr(result.model),
                        "ca_after": clean_accuracy(result.model, r.test.x, r.test.y), "defense_seconds": seconds,
                        "verdict_seconds": time.perf_counter() - t1})


def spread(benign: list, backdoored: list) -> list:
    """Benign models spread evenly among the backdoored ones, so that a run stopped early still has both."""
    keyed = [((i + 0.5) / len(benign), 0, u) for i, u in enumerate(benign)]
    keyed += [((i + 0.5) / len(backdoored), 1, u) for i, u in enumerate(backdoored)]
    return [u for *_, u in sorted(keyed, key=lambda t: (t[0], t[1]))]


def unit_done(log: RowLog, kind: str, seed: int, defenses: list[str], scan_seeds: list[int]) -> bool:
    return (all(log.has(kind=kind, seed=seed, defense="none", scan_seed=s) for s in scan_seeds)
            and all(log.has(kind=kind, seed=seed, defense=d, scan_seed=scan_seeds[0]) for d in defenses))


def run_unit(kind: str, seed: int, defenses: list[str], scan_seeds: list[int], rows_path: Path, commit: str,
             dataset: str, scan: str = "") -> None:
    """One model in a spawned process: its own view of the rows file, to which it appends."""
    run_model(kind, seed, defenses, scan_seeds, RowLog(rows_path, KEY), commit, dataset=dataset, scan_overrides=scan)


def run_units(units: list[tuple[str, int]], args, rows_path: Path, commit: str) -> None:
    """Models in `args.jobs` spawned processes (one thread each: run_model pins torch to one)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_unit, kind, seed, args.defenses, args.scan_seeds, rows_path, commit,
                               args.dataset, args.scan): (kind, seed) for kind, seed in units}
        for fut in as_completed(futures):
            fut.result()
            kind, seed = futures[fut]
            print(f"done {kind} seed {seed} after {time.perf_counter() - t0:.0f} s", flush=True)


def defense_spec(name: str) -> tuple[str, dict]:
    """"ft" or "ft:epochs=1,lr=0.001" (a deliberately weak defense, to see the verdict on a surviving backdoor)."""
    method, _, rest = name.partition(":")
    return method, parse_overrides(rest)


def auroc(pos: list[float], neg: list[float]) -> float | None:
    """Probability that a backdoored model scores above a benign one (ties count half)."""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def agreement(rows: list[dict], status_of) -> dict:
    """The issue's two agreement counts (agreeing, rows): real ASR <= 5 % judged not_suspected, >= 50 % suspected."""
    clean = [r for r in rows if r["asr_after"] <= ASR_CLEAN]
    dirty = [r for r in rows if r["asr_after"] >= ASR_BACKDOORED]
    return {"clean_not_suspected": (sum(status_of(r) == "not_suspected" for r in clean), len(clean)),
            "backdoored_suspected": (sum(status_of(r) == "suspected" for r in dirty), len(dirty))}


def capped_status(before: dict, after: dict) -> str:
    """The after-verdict's status had its scores been capped at the before-verdict's (nba_core.verdict.cap_at), from
    the per-class scores a row records: suspected when a capped patch/global/warp score reaches 1 or the capped shift row
    does with pairs found; inconclusive in the band or when the recorded verdict was inconclusive for another reason
    (too little data, unreliable reference); else not_suspected. Rows judged with the cap already are unchanged."""
    from nba_core.verdict import INCONCLUSIVE_BAND, PER_CLASS_FAMILIES, cap_at

    scores, _ = cap_at(after["scores"], before["scores"])
    if any(v >= 1 for f in PER_CLASS_FAMILIES for v in scores.get(f, [])) or (scores["shift"][0] >= 1 and after["pairs"]):
        return "suspected"
    top = max(max(v) for v in scores.values())
    if top >= INCONCLUSIVE_BAND or (after["status"] == "inconclusive" and after["score"] < INCONCLUSIVE_BAND):
        return "inconclusive"
    return "not_suspected"


def summarize(rows: list[dict]) -> dict:
    before = [r for r in rows if r["defense"] == "none"]
    first_seed = min((r["scan_seed"] for r in before), default=0)
    primary = [r for r in before if r["scan_seed"] == first_seed]
    pos = [r["verdict"]["score"] for r in primary if r["truth"]["backdoored"] and r["asr_before"] >= ASR_BACKDOORED]
    neg = [r["verdict"]["score"] for r in primary if not r["truth"]["backdoored"]]
    benign_flagged = [r for r in primary if not r["truth"]["backdoored"] and r["verdict"]["status"] == "suspected"]
    per_kind = {}
    for kind in KINDS:
        rs = [r for r in primary if r["kind"] == kind]
        if not rs:
            continue
        hits = []
        for r in rs:
            t, v = r["truth"], r["verdict"]
            if not t["backdoored"]:
                hits.append(v["status"] == "not_suspected")
            elif t["pairs"]:
                hits.append(v["status"] == "suspected" and sorted(map(tuple, v["pairs"])) == sorted(map(tuple, t["pairs"])))
            else:
                hits.append(v["status"] == "suspected" and sorted(v["targets"]) == sorted(t["targets"]))
        per_kind[kind] = {"models": len(rs), "exact": sum(hits), "statuses": [r["verdict"]["status"] for r in rs],
                          "scores": [round(r["verdict"]["score"], 2) for r in rs],
                          "targets": [r["verdict"]["targets"] for r in rs],
                          "pairs": [len(r["verdict"]["pairs"]) for r in rs],
                          "asr_before": [round(r["asr_before"], 3) for r in rs]}
    # Flip rate: a model whose status differs between scan seeds.
    by_model: dict[tuple, set] = {}
    for r in before:
        by_model.setdefault((r["kind"], r["seed"]), set()).add(r["verdict"]["status"])
    multi = {m: s for m, s in by_model.items()
             if sum(1 for r in before if (r["kind"], r["seed"]) == m) > 1}
    after = [r for r in rows if r["defense"] != "none"]
    as_run = lambda r: r["verdict"]["status"]
    capped = lambda r: capped_status(r["verdict_before"], r["verdict"])
    per_defense = {}
    for d in sorted({r["defense"] for r in after}):
        rs = [r for r in after if r["defense"] == d]
        per_defense[d] = {"rows": len(rs), "agreement": agreement(rs, as_run), "agreement_capped": agreement(rs, capped),
                          "asr_after": [round(r["asr_after"], 3) for r in rs],
                          "ca_drop": [round(100 * (r["ca_before"] - r["ca_after"]), 2) for r in rs],
                          "after_statuses": [r["verdict"]["status"] for r in rs]}
    secs = [r["verdict_seconds"] for r in before]
    return {
        "cost": cost(primary, after),
        "auroc_before": auroc(pos, neg), "backdoored_models": len(pos), "benign_models": len(neg),
        "benign_fpr": (len(benign_flagged) / len(neg)) if neg else None,
        "flip_rate": (sum(len(s) > 1 for s in multi.values()) / len(multi)) if multi else None,
        "flip_models": len(multi),
        "agreement": agreement(after, as_run), "agreement_capped": agreement(after, capped),
        "per_kind": per_kind, "per_defense": per_defense,
        "verdict_seconds_mean": (sum(secs) / len(secs)) if secs else None,
    }


def cost(primary: list[dict], after: list[dict]) -> dict:
    """Per defense, a job's parts in seconds (means over models) and the whole job against the time the attack took
    to train the model it cleans (issue 8's ratio; a job = before-verdict (reference + scan) + defense + after-scan).
    The rows of one run share the machine's load, so the ratio holds where absolute seconds drift."""
    before = {(r["kind"], r["seed"]): r for r in primary}
    job = lambda b, a: b["verdict_seconds"] + a["defense_seconds"] + a["verdict_seconds"]
    out = {}
    for d in sorted({r["defense"] for r in after}):
        parts = [(before[(a["kind"], a["seed"])], a) for a in after
                 if a["defense"] == d and (a["kind"], a["seed"]) in before]
        if not parts:
            continue
        avg = lambda f: sum(f(b, a) for b, a in parts) / len(parts)
        out[d] = {"models": len(parts), "reference_s": avg(lambda b, a: b.get("reference_seconds", 0.0)),
                  "before_verdict_s": avg(lambda b, a: b["verdict_seconds"]),
                  "defense_s": avg(lambda b, a: a["defense_seconds"]),
                  "after_verdict_s": avg(lambda b, a: a["verdict_seconds"]), "job_s": avg(job),
                  "attack_train_s": avg(lambda b, a: b["attack_train_seconds"]),
                  "job_over_train": avg(lambda b, a: job(b, a) / b["attack_train_seconds"])}
    return out


def _fmt(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


DATASET_TITLE = {"mnist5k": "MNIST-5k", "fmnist": "Fashion-MNIST (6k)"}


def write_report(rows: list[dict], out: Path, prov: dict, args: dict, stem: str = "detection",
                 dataset: str = "mnist5k") -> None:
    summary = summarize(rows)
    (out / f"{stem}.json").write_text(json.dumps({"provenance": prov, "args": args, "summary": summary,
                                                    "rows": rows}, indent=1))
    s = summary
    lines = [f"# Trigger-free verdict: detection table ({DATASET_TITLE.get(dataset, dataset)}, small CNN)", "",
             f"Command: `{args['command']}`  ", f"Commit `{str(prov['commit'])[:10]}`{' (dirty)' if prov['dirty'] else ''},"
             f" {prov['when']}, {prov['machine']['platform']}, torch {prov['machine']['torch']}, CPU.", ""]
    if args.get("note"):
        lines += [f"**{args['note']}**", ""]
    pair = lambda t: f"{t[0]}/{t[1]}" + (f" ({100 * t[0] / t[1]:.0f} %)" if t[1] else "")
    lines += ["| measure | value | goal |", "|---|---|---|",
              f"| AUROC of the before-score (backdoored with ASR ≥ 50 % vs benign) | "
              f"{_fmt(s['auroc_before'], '{:.3f}')} "
              f"({s['backdoored_models']} vs {s['benign_models']} models) | high |",
              f"| false-positive rate on benign models (suspected) | "
              f"{_fmt(s['benign_fpr'], '{:.1%}')} | ≤ 2 % |",
              f"| flip rate of the before-verdict across scan seeds | "
              f"{_fmt(s['flip_rate'], '{:.0%}')} ({s['flip_models']} models) | 0 |",
              f"| after a defense, real ASR ≤ 5 %: verdict not_suspected | {pair(s['agreement']['clean_not_suspected'])} | ≥ 98 % |",
              f"| after a defense, real ASR ≥ 50 %: verdict suspected | {pair(s['agreement']['backdoored_suspected'])} | all |",
              f"| the same two, each after-score capped at its before-score (from the recorded scores) | "
              f"{pair(s['agreement_capped']['clean_not_suspected'])}; "
              f"{pair(s['agreement_capped']['backdoored_suspected'])} | ≥ 98 %; all |",
              f"| verdict time per model (reference + scan, CPU, shared) | "
              f"{_fmt(s['verdict_seconds_mean'], '{:.1f} s')} | |", "",
              "## Before, per model kind (first scan seed)", "",
              "| kind | models | exact (status + targets/pairs) | statuses | scores | targets | #pairs | real ASR |",
              "|---|---|---|---|---|---|---|---|"]
    for kind, v in s["per_kind"].items():
        lines.append(f"| {kind} | {v['models']} | {v['exact']} | {', '.join(v['statuses'])} | {v['scores']} | "
                     f"{v['targets']} | {v['pairs']} | {v['asr_before']} |")
    if s["per_defense"]:
        lines += ["", "## After each defense", "",
                  "| defense | rows | ASR ≤ 5 % → not_suspected | ASR ≥ 50 % → suspected | the same, capped | real ASR after | CA drop (points) | after-verdicts |",
                  "|---|---|---|---|---|---|---|---|"]
        for d, v in s["per_defense"].items():
            a, c = v["agreement"], v["agreement_capped"]
            frac = lambda t: f"{t[0]}/{t[1]}"
            lines.append(f"| {d} | {v['rows']} | {frac(a['clean_not_suspected'])} | {frac(a['backdoored_suspected'])} | "
                         f"{frac(c['clean_not_suspected'])}; {frac(c['backdoored_suspected'])} | "
                         f"{v['asr_after']} | {v['ca_drop']} | {', '.join(v['after_statuses'])} |")
    if s["cost"]:
        lines += ["", "## Cost of a job (CPU, one thread per model, means over models)", "",
                  "A job = before-verdict (benign reference + scan) + defense + after-scan; the ratio is against the "
                  "time the attack took to train the same model, on the same machine (goal for NBA: < 0.6×).", "",
                  "| defense | models | reference s | before-verdict s | defense s | after-scan s | job s | "
                  "attack training s | job / training |", "|---|---|---|---|---|---|---|---|---|"]
        for d, v in s["cost"].items():
            lines.append(f"| {d} | {v['models']} | {v['reference_s']:.1f} | {v['before_verdict_s']:.1f} | "
                         f"{v['defense_s']:.1f} | {v['after_verdict_s']:.1f} | {v['job_s']:.1f} | "
                         f"{v['attack_train_s']:.1f} | {v['job_over_train']:.2f}× |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Regenerate the trigger-free verdict's detection table.")
    p.add_argument("--kinds", nargs="*", default=[k for k in KINDS if k != "none"],
                   help="backdoored kinds (none: only the benign models)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--benign-seeds", nargs="*", type=int, default=list(range(10)),
                   help="benign models (none: only the backdoored kinds, e.g. to extend a slice)")
    p.add_argument("--defenses", nargs="*", default=["ft", "nad", "nba", "ft:epochs=1,lr=0.001"],
                   help="methods, optionally with params (ft:epochs=1,lr=0.001 leaves the backdoor on purpose)")
    p.add_argument("--scan-seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--dataset", default="mnist5k", choices=sorted(DATASET_TITLE),
                   help="built-in dataset of the models (the verdict's thresholds were fitted on MNIST-5k tuning "
                        "models only, so fmnist measures how they carry over)")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument("--stem", default=None, help="default: detection, or detection_<dataset> for other datasets")
    p.add_argument("--note", default="")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the rows already there")
    p.add_argument("--scan", default="", help="overrides of nba_core.verdict.SCAN for every scan (e.g. "
                   "steps=40,batch_size=6: a cheaper scan measured on tuning seeds under its own --stem); NBA gets "
                   "that scan's verdict as a job hands it over")
    p.add_argument("--jobs", type=int, default=1,
                   help="models scanned in parallel processes (one thread each; 2 on a 2-core machine)")
    args = p.parse_args(argv)
    args.stem = args.stem or ("detection" if args.dataset == "mnist5k" else f"detection_{args.dataset}")
    log = RowLog(args.out / f"{args.stem}.jsonl", KEY)
    prov = provenance()
    units = spread([("none", s) for s in args.benign_seeds], [(k, s) for s in args.seeds for k in args.kinds])
    t0 = time.perf_counter()
    if not args.report_only:
        todo = [u for u in units if not unit_done(log, *u, args.defenses, args.scan_seeds)]
        if args.jobs > 1:
            run_units(todo, args, log.path, prov["commit"])
            log = RowLog(log.path, KEY)  # re-read what the workers appended; the first row of a key counts
            first: dict = {}
            for row in log.rows:
                first.setdefault(log.key(row), row)
            log.rows = list(first.values())
        else:
            for kind, seed in todo:
                run_model(kind, seed, args.defenses, args.scan_seeds, log, prov["commit"], dataset=args.dataset,
                          scan_overrides=args.scan)
                print(f"done {kind} seed {seed} after {time.perf_counter() - t0:.0f} s", flush=True)
    import sys

    write_report(log.rows, args.out, prov, {"command": "python -m bench.detection " + " ".join(argv or sys.argv[1:]),
                                            "note": args.note}, args.stem, args.dataset)
    print(f"wrote {args.out}/{args.stem}.{{json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
