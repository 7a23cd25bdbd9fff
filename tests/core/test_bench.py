"""Benchmark code that outside readers rely on: the quality report's honesty notes, and the GPU ladder (run on the
CPU here, so that its code paths are exercised before a GPU is ever lent)."""

from __future__ import annotations

import pytest

from bench.gpu_speed import markdown, scan_ladder, training_ladder
from bench.report import ATTACK_ORDER, DEFENSE_ORDER, completeness_notes, quality_markdown


def _rows(seeds=(0, 1, 2), commit="abc", ca_before=0.98):
    return [{"dataset": "d", "arch": "a", "attack": a, "defense": d, "seed": s, "ca_before": ca_before,
             "asr_before": 1.0, "ca_after": 0.97, "asr_after": 0.01, "ra_after": 0.9, "der": 0.99, "seconds": 1.0,
             "commit": commit} for a in ATTACK_ORDER for d in DEFENSE_ORDER for s in seeds]


def test_a_complete_table_from_one_commit_needs_no_note():
    assert completeness_notes(_rows(), {}) == []
    assert "PARTIAL" not in quality_markdown(_rows(), {"commit": "abc"})


def test_missing_seeds_cells_and_mixed_commits_are_reported():
    notes = " ".join(completeness_notes(_rows(seeds=(0,)), {"note": "run on a CPU"}))
    assert "run on a CPU" in notes and "PARTIAL" in notes and "1 seed(s)" in notes
    rows = [r for r in _rows() if not (r["defense"] == "nba" and r["seed"] == 2)] + _rows(seeds=(3,), commit="def")
    notes = " ".join(completeness_notes(rows, {}))
    assert "fewer seeds in" in notes and "nba" in notes and "several commits" in notes
    assert "> PARTIAL" in quality_markdown(rows, {"commit": "def"})


def test_defenses_that_cannot_apply_are_not_reported_missing():
    rows = [r for r in _rows() if r["defense"] not in ("anp", "fp")]
    assert "anp" in " ".join(completeness_notes(rows, {}))
    assert completeness_notes(rows, {"not_applicable": {"anp": "LayerNorm", "fp": "LayerNorm"}}) == []


def test_defenses_on_different_models_of_one_unit_are_flagged():
    rows = _rows()
    for r in rows:
        if r["defense"] == "nba" and r["attack"] == "sig" and r["seed"] == 1:
            r["ca_before"] = 0.97
    notes = " ".join(completeness_notes(rows, {}))
    assert "WARNING" in notes and "sig seed 1" in notes


def test_gpu_ladder_code_runs_on_the_cpu_and_reports_every_step():
    training = training_ladder("cpu", arch="small_cnn", n_images=64, epochs=1, batch_size=32)
    names = [r["step"] for r in training["steps"]]
    assert names[0].startswith("reference") and names[-1].startswith("nba_core") and len(names) == 5
    assert all(r["images_per_s"] > 0 and r["tflops"] > 0 for r in training["steps"])
    assert training["steps"][0]["speedup_vs_reference"] == 1.0 and training["peak_bf16_tflops"] is None
    scan = scan_ladder("cpu", arch="small_cnn", n_images=40, steps=2, batch_size=2)
    assert scan["per_class_loop_seconds"] > 0 and scan["batched_seconds"] > 0
    text = markdown({"training": training, "class_scan": scan}, {"commit": "abc", "when": "now"})
    assert "reference: DataLoader" in text and "Class scan" in text


def test_a_suite_with_fewer_attacks_is_complete_on_its_own_scope():
    scope = ["badnets", "blended", "wanet"]
    rows = [r for r in _rows() if r["attack"] in scope]
    assert "trojan" in " ".join(completeness_notes(rows, {}))  # the default scope is all six attacks
    assert completeness_notes(rows, {"scope_attacks": scope}) == []
    assert "wanet/nba" in " ".join(completeness_notes(
        [r for r in rows if (r["attack"], r["defense"]) != ("wanet", "nba")], {"scope_attacks": scope}))


def test_tuning_grids_start_at_each_defenses_default_and_give_everyone_the_same_budget():
    from bench.tuning import GRIDS, grid_names
    from nba_core.defenses import get_defense

    for method, (param, values) in GRIDS.items():
        assert len(values) == 4 and len(set(values)) == 4, method  # NBA's budget: four values of one knob
        assert getattr(get_defense(method, {}).config, param) == values[0], method
        assert grid_names(method)[0] == method
        for name in grid_names(method)[1:]:  # every alternative is a valid parameter set
            from bench.quality import defense_params

            m, params = defense_params(name)
            assert m == method and get_defense(m, params).config is not None


def test_tuning_selects_the_best_mean_der_ties_to_the_default_and_tuned_rows_read_it(tmp_path, monkeypatch):
    import json

    import bench.tuning as tuning
    from bench.quality import defense_params

    def row(defense, attack, seed, der):
        return {"defense": defense, "attack": attack, "seed": seed, "der": der}

    cells = [("badnets", 10), ("blended", 10), ("badnets", 11)]
    rows = [row("ft", a, s, 0.8) for a, s in cells] + [row("ft:lr=0.05", a, s, 0.9) for a, s in cells]
    rows += [row("ft:lr=0.02", "badnets", 10, 1.0)]  # better, but measured on one cell only: does not compete
    rows += [row("nad", a, s, 0.7) for a, s in cells] + [row("nad:lr=0.05", a, s, 0.7) for a, s in cells]
    chosen = tuning.select(rows)
    assert chosen["ft"]["row"] == "ft:lr=0.05" and chosen["ft"]["params"] == {"lr": 0.05}
    assert chosen["nad"]["row"] == "nad" and chosen["nad"]["params"] == {}  # a tie keeps the default
    from bench import common

    monkeypatch.setattr(common, "OUT_DIR", tmp_path)
    tuning.tuning_path("mnist5k", "small_cnn").write_text(json.dumps({"chosen": chosen}))
    assert defense_params("ft:tuned", "mnist5k", "small_cnn") == ("ft", {"lr": 0.05})
    assert defense_params("ft:epochs=1,lr=0.001") == ("ft", {"epochs": 1, "lr": 0.001})
    assert defense_params("ibau:authors") == ("ibau", {"preset": "authors"})
    # A unit asks whether it needs NBA's verdict through the same suite-aware lookup (a ':tuned' row once made every
    # unit fail after training its model).
    from bench.quality import needs_verdict

    chosen["nba"] = {"row": "nba:suspect_kd=2.0", "params": {"suspect_kd": 2.0}}
    tuning.tuning_path("mnist5k", "small_cnn").write_text(json.dumps({"chosen": chosen}))
    assert needs_verdict(["ft:tuned", "nba:tuned"], "mnist5k", "small_cnn")
    assert not needs_verdict(["ft:tuned", "ibau:authors"], "mnist5k", "small_cnn")


def test_verdict_stability_refuses_reported_seeds_and_counts_flips():
    from bench import verdict_stability as vs

    with pytest.raises(SystemExit):
        vs.main(["--seeds", "2", "--report-only"])
    v = lambda status, score, targets=(): {"status": status, "score": score, "targets": list(targets)}
    rows = [{"kind": "none", "seed": 10, "scan_seed": s, "restarts": 2, "verdict_r1": v("not_suspected", 0.4),
             "verdict_r2": v("not_suspected", 0.4)} for s in (0, 1)]
    rows += [{"kind": "badnets", "seed": 10, "scan_seed": 0, "restarts": 2, "verdict_r1": v("not_suspected", 0.5),
              "verdict_r2": v("suspected", 1.5, [0])},
             {"kind": "badnets", "seed": 10, "scan_seed": 1, "restarts": 2, "verdict_r1": v("suspected", 2.0, [0]),
              "verdict_r2": v("suspected", 2.1, [0])}]
    for r in rows:
        r["scan_seconds"] = 10.0
    # A cheaper scan's rows are summarised beside the default's, never mixed into them.
    rows += [r | {"scan": "steps=40", "scan_seconds": 5.0, "verdict_r2": v("suspected", 3.0, [0])}
             for r in rows if r["kind"] == "badnets"]
    rows.append({"kind": "none", "seed": 10, "scan_seed": 0, "restarts": 2, "scan": "steps=40", "scan_seconds": 5.0,
                 "verdict_r1": v("suspected", 1.2, [2]), "verdict_r2": v("suspected", 1.2, [2])})
    table = vs.summarize(rows)
    assert table[2].startswith("| default | 1 | 2 | 1 |") and "| 1/2 |" in table[2] and table[2].endswith("| 10.0 |")
    assert table[3].startswith("| default | 2 | 2 | 0 |") and "| 2/2 |" in table[3]
    assert table[5].startswith("| steps=40 | 2 | 2 | 0 | 1/1 / 0 | 1.20 | 2/2 |") and table[5].endswith("| 5.0 |")


def _scores(target: float, other: float = 0.2, cls: int = 0) -> dict:
    patch = [other] * 10
    patch[cls] = target
    return {"patch": patch, "global": [0.1] * 10, "shift": [0.1]}


def _detection_rows():
    """Two benign models (one flipping between scan seeds, one flagged) and one backdoored model cleaned by NBA."""
    def before(kind, seed, scan_seed, status, score, backdoored):
        return {"dataset": "fmnist", "kind": kind, "seed": seed, "defense": "none", "scan_seed": scan_seed,
                "truth": {"backdoored": backdoored, "targets": [0] if backdoored else [], "pairs": []},
                "asr_before": 1.0 if backdoored else 0.01, "ca_before": 0.9, "verdict_seconds": 10.0,
                "reference_seconds": 6.0, "attack_train_seconds": 20.0,
                "verdict": {"status": status, "score": score, "targets": [0] if status == "suspected" else [],
                            "pairs": [], "scores": _scores(score)}}
    rows = [before("none", 0, 0, "not_suspected", 0.5, False), before("none", 0, 1, "suspected", 1.2, False),
            before("none", 1, 0, "suspected", 1.1, False), before("badnets", 0, 0, "suspected", 2.0, True)]
    rows.append(rows[-1] | {"defense": "nba", "asr_after": 0.01, "ca_after": 0.88, "defense_seconds": 4.0,
                            "verdict_before": rows[-1]["verdict"],
                            "verdict": {"status": "not_suspected", "score": 0.3, "targets": [], "pairs": [],
                                        "scores": _scores(0.3)}})
    # FT damaged the model: class 3 crossed the threshold after, not before (a false alarm the cap removes).
    rows.append(rows[-2] | {"defense": "ft", "asr_after": 0.01, "ca_after": 0.80, "defense_seconds": 1.0,
                            "verdict_before": rows[-2]["verdict"],
                            "verdict": {"status": "suspected", "score": 1.3, "targets": [3], "pairs": [],
                                        "scores": _scores(1.3, cls=3)}})
    return rows


def test_detection_summary_counts_false_alarms_flips_and_after_agreement(tmp_path):
    from bench.detection import summarize, write_report

    s = summarize(_detection_rows())
    assert s["benign_fpr"] == 0.5 and s["flip_rate"] == 1.0 and s["auroc_before"] == 1.0
    assert s["agreement"]["clean_not_suspected"] == (1, 2)
    assert s["agreement_capped"]["clean_not_suspected"] == (2, 2)
    assert s["per_defense"]["ft"]["agreement_capped"]["clean_not_suspected"] == (1, 1)
    assert s["per_defense"]["nba"]["ca_drop"] == [2.0]
    # The job is the before-verdict (10 s) + NBA (4 s) + the after-scan (10 s) against 20 s of attack training.
    assert s["cost"]["nba"]["job_s"] == 24.0 and s["cost"]["nba"]["job_over_train"] == 1.2
    prov = {"commit": "abc", "dirty": False, "when": "now", "machine": {"platform": "p", "torch": "t"}}
    write_report(_detection_rows(), tmp_path, prov, {"command": "x"}, "detection_fmnist", "fmnist")
    md = (tmp_path / "detection_fmnist.md").read_text()
    assert "Fashion-MNIST" in md and "| nba | 1 | 6.0 | 10.0 | 4.0 | 10.0 | 24.0 | 20.0 | 1.20× |" in md


def test_detection_spreads_benign_models_and_skips_finished_ones(tmp_path):
    """A run stopped early has benign and backdoored models alike; a resumed one skips models with every row."""
    from bench.common import RowLog
    from bench.detection import KEY, spread, unit_done

    units = spread([("none", s) for s in range(4)], [(k, s) for s in range(2) for k in "abcd"])
    assert sorted(units) == sorted([("none", s) for s in range(4)] + [(k, s) for s in range(2) for k in "abcd"])
    assert ("none", 0) in units[:3] and ("none", 3) in units[-3:]
    log = RowLog(tmp_path / "rows.jsonl", KEY)
    for scan_seed in (0, 1):
        log.add({"kind": "a", "seed": 0, "defense": "none", "scan_seed": scan_seed})
    assert not unit_done(log, "a", 0, ["nba"], [0, 1])
    log.add({"kind": "a", "seed": 0, "defense": "nba", "scan_seed": 0})
    assert unit_done(log, "a", 0, ["nba"], [0, 1]) and not unit_done(log, "a", 0, ["nba"], [0, 1, 2])


def test_quality_rows_of_nba_carry_the_before_verdict_it_was_handed(tmp_path, monkeypatch):
    """A quality table's NBA rows say what the trigger-free verdict said of the model (the other rows need none)."""
    import bench.quality as quality

    monkeypatch.setattr(quality, "CACHE_DIR", tmp_path / "cache")
    rows = quality.run_unit("digits", "small_cnn", "badnets", 0,
                            ("none", "nba:teacher_epochs=1,student_epochs=1"), "cpu", 1)
    by = {r["defense"]: r for r in rows}
    v = by["nba:teacher_epochs=1,student_epochs=1"]["verdict_before"]
    assert v["status"] in ("suspected", "not_suspected", "inconclusive") and isinstance(v["targets"], list)
    assert "verdict_before" not in by["none"]


def test_few_clean_subset_is_stratified_and_the_goal_is_judged_at_the_worst_run(tmp_path):
    import numpy as np

    from bench.few_clean import stratified_take, summarize, write_report

    y = np.repeat(np.arange(10), 20)
    idx = stratified_take(y, 50, 10, seed=3)
    assert len(idx) == 50 and np.bincount(y[idx], minlength=10).tolist() == [5] * 10
    assert np.array_equal(idx, stratified_take(y, 50, 10, seed=3))  # the same model seed: the same images
    assert not np.array_equal(idx, stratified_take(y, 50, 10, seed=4))
    with pytest.raises(ValueError, match="class 9"):
        stratified_take(y[y != 9], 50, 10, seed=0)

    def row(s, asr, drop):
        v = {"status": "not_suspected", "targets": [], "score": 0.3}
        return {"kind": "badnets", "seed": 0, "n_clean": 50, "sanitize_seed": s, "asr_before": 1.0,
                "ca_before": 0.98, "asr_after": asr, "ca_after": 0.98 - drop / 100, "ca_drop_points": drop,
                "verdict_before": v | {"status": "suspected", "targets": [0]}, "verdict_after": v, "seconds": 1.0}

    good = [row(s, 0.005, 1.0) for s in range(4)]
    assert summarize(good)[0]["goal_met"]
    one_bad = good[:3] + [row(3, 0.03, 1.0)]  # mean 1.1 % ASR would pass; the worst run (3 %) does not
    (s,) = summarize(one_bad)
    assert not s["goal_met"] and s["asr_worst"] == 0.03 and s["runs"] == 4 and s["before_suspected"] == 4
    write_report(one_bad, tmp_path, {"commit": "abc", "machine": {}, "when": "now"})
    assert "**not met**" in (tmp_path / "few_clean.md").read_text()
