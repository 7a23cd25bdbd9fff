"""`nba` command line: make a backdoored model, sanitize it, evaluate it, list the defenses. Other installed
distributions add command groups through the `nba.commands` entry-point group (the service adds serve, keys,
submit, status, download, demo, ...); this module imports nothing from them.

Exit codes: 0 success, 2 usage error, 3 bad input (an NBAError: its code is printed), 4 cancelled, 1 unexpected,
5 the job ran but the model is (still) suspected of a backdoor: `nba sanitize` when the after-verdict is
`suspected`, `nba scan` when the verdict is `suspected` (the report/JSON is written and printed as usual).
"""

from __future__ import annotations

import argparse
from importlib.metadata import entry_points
import json
import sys
from pathlib import Path

from .errors import Cancelled, INVALID_PARAMS, NBAError
from .params import parse_params
from .progress import ProgressBar

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_SUSPECTED = 0, 1, 2, 3, 4, 5

METHOD_HELP = ("ft (fine-tuning), fp (fine-pruning), nad, anp, ibau, sau (shared adversarial unlearning), ftsam "
               "(fine-tuning with sharpness-aware minimisation), nba (any case; `nba methods` describes each parameter); presets: --params '{\"preset\": \"paper\"}' (nba), "
               "'{\"preset\": \"authors\"}' (ibau)")
METHOD_TITLES = {"ft": "fine-tuning on the clean subset", "fp": "fine-pruning (Liu et al. 2018)",
                 "nad": "neural attention distillation (Li et al. 2021)",
                 "anp": "adversarial neuron pruning (Wu & Wang 2021)",
                 "ibau": "implicit backdoor adversarial unlearning (Zeng et al. 2022)",
                 "sau": "shared adversarial unlearning", "ftsam": "fine-tuning with sharpness-aware minimisation",
                 "nba": "neural behavioral alignment, as reconstructed from the abstract (Ying & Wu 2023)"}


def cmd_attack(args) -> int:
    from .checkpoint import save_model
    from .data.formats import save_npz
    from .experiment import backdoor_experiment
    from .pipeline import write_json_atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = _read_hf_config(args.hf_config) if args.hf_config else None
    bar = ProgressBar(not args.quiet)
    try:
        run = backdoor_experiment(args.dataset, args.attack, args.arch, args.seed, poison_rate=args.poison_rate,
                                  clean_fraction=args.clean_fraction, target=args.target, epochs=args.epochs,
                                  device=args.device, all_to_all=args.all_to_all, progress=lambda s, f: bar(s, f),
                                  hf_config=hf_config)
    finally:
        bar.close()
    if hf_config is not None:  # a Hugging Face folder (what save_pretrained writes) instead of safetensors + spec
        from .models.hf import write_hf_folder

        write_hf_folder(run.model, run.spec, out / "model")
        args.arch = run.spec.arch
    else:
        save_model(run.model, out / "model.safetensors", spec=run.spec)
        (out / "model.json").write_text(run.spec.to_json() + "\n")
    save_npz(out / "clean.npz", run.clean_subset)
    save_npz(out / "test.npz", run.test)
    save_npz(out / "test_triggered.npz", run.test_triggered)
    summary = {"dataset": args.dataset, "attack": args.attack, "arch": args.arch, "seed": args.seed,
               "target": None if args.all_to_all else args.target, "all_to_all": args.all_to_all,
               "pairs": run.attack.pairs() if args.all_to_all else None, "poison_rate": args.poison_rate,
               "clean_subset_size": len(run.clean_subset),
               "clean_accuracy": run.clean_accuracy, "attack_success_rate": run.attack_success_rate,
               "seconds": run.seconds, "files": sorted(p.name for p in out.iterdir())}
    write_json_atomic(out / "attack.json", summary)
    if args.json:
        print(json.dumps(summary))
    else:
        what = "all-to-all, y -> y+1" if args.all_to_all else f"target {args.target}"
        print(f"backdoored {args.arch} on {args.dataset} with {args.attack} ({what}) -> {out}/")
        print(f"  clean accuracy      {100 * run.clean_accuracy:6.2f} %")
        print(f"  attack success rate {100 * run.attack_success_rate:6.2f} %")
        print(f"  defender's clean subset: {len(run.clean_subset)} images in {out / 'clean.npz'}")
    return EXIT_OK


def _read_hf_config(path: str) -> dict:
    from .hf_config import HF_CONFIG_INVALID, MAX_CONFIG_BYTES, check_hf_config

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise NBAError(HF_CONFIG_INVALID, f"cannot read {path}: {e.strerror}") from None
    return check_hf_config(raw).config


def _floats(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise NBAError(INVALID_PARAMS, f"expected comma-separated numbers, got {text!r}") from None


def cmd_sanitize(args) -> int:
    from .hf_pipeline import is_hf_model_path, sanitize_hf
    from .pipeline import sanitize

    params = parse_params(args.param, args.params)
    args.method = args.method.strip().lower()
    bar = ProgressBar(not args.quiet)
    common = dict(data_path=args.data, method=args.method, params=params, out_path=args.out,
                  report_path=args.report, probe_path=args.probe, probe_target=args.probe_target,
                  device=args.device, seed=args.seed, holdout_fraction=args.holdout, progress=bar,
                  evidence=not args.no_evidence)
    try:
        if args.spec is None and is_hf_model_path(args.model):
            report = sanitize_hf(model_path=args.model, input_size=tuple(args.input_size) if args.input_size
                                 else None, mean=_floats(args.mean), std=_floats(args.std),
                                 allow_low_accuracy=args.allow_low_accuracy, eval_path=args.eval_data,
                                 crossfit=args.crossfit, **common)
        else:  # spec None: the one a .safetensors written by nba carries (a clear error otherwise)
            report = sanitize(model_path=args.model, spec=args.spec, eval_path=args.eval_data,
                              crossfit=args.crossfit, class_names=_class_list(args.classes),
                              allow_low_accuracy=args.allow_low_accuracy, **common)
    finally:
        bar.close()
    for warning in report.get("warnings") or []:
        print(f"nba: warning: {warning}", file=sys.stderr)
    code = EXIT_SUSPECTED if ((report.get("verdict") or {}).get("after") or {}).get("status") == "suspected" \
        else EXIT_OK
    if args.json:
        print(json.dumps({k: report[k] for k in ("verdict", "warnings", "method", "metrics", "timing", "output")}))
        return code
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    for line in (report.get("verdict") or {}).get("headline", []):
        print(line)
    for w in report.get("warnings", []):
        print(f"WARNING: {w}")
    print(f"sanitized with {args.method} in {report['timing']['total_seconds']:.1f} s -> {args.out}")
    print(f"  sha256 {report['output']['sha256']}")
    print_label_mapping(report["data"].get("class_names"), report["data"].get("class_counts"))

    def row(name, key, sub=None):
        b = before.get(sub, {}).get(key) if sub else before.get(key)
        a = after.get(sub, {}).get(key) if sub else after.get(key)
        if b is None or a is None:
            return
        fmt = (lambda v: f"{100 * v:7.2f} %") if isinstance(b, float) and key != "anomaly_index" else (lambda v: f"{v:9}")
        print(f"  {name:<34} {fmt(b)} -> {fmt(a)}")

    on = {"eval_set": "evaluation set", "holdout": "held-out part of D",
          "clean_subset": "D itself: optimistic after"}[before.get("clean_accuracy_on", "holdout")]
    row(f"clean accuracy ({on}, n={before.get('holdout_size')})", "clean_accuracy")
    for name, m in (("before", before), ("after", after)):
        if m.get("clean_accuracy_ci95"):
            lo, hi = m["clean_accuracy_ci95"]
            print(f"    95 % interval {name}: {100 * lo:.1f} - {100 * hi:.1f} %")
    row("attack success rate (probe)", "attack_success_rate")
    cf = report.get("crossfit")
    if cf:
        print(f"  clean accuracy, {cf['k']}-fold cross-fit      {100 * cf['clean_accuracy_before']:7.2f} % -> "
              f"{100 * cf['clean_accuracy_after']:7.2f} %")
    change = (report.get("verdict") or {}).get("change")
    if change:
        print(f"  verdict change: {change['summary']}")
    if args.report:
        print(f"  report: {args.report}")
    return code


def cmd_scan(args) -> int:
    from .pipeline import scan

    bar = ProgressBar(not args.quiet)
    try:
        common = dict(model_path=args.model, data_path=args.data, report_path=args.report, device=args.device,
                      seed=args.seed, progress=bar)
        from .hf_pipeline import is_hf_model_path

        if args.spec is None and is_hf_model_path(args.model):
            from .hf_pipeline import scan_hf

            report = scan_hf(**common)
        else:
            report = scan(spec=args.spec, **common)
    finally:
        bar.close()
    before = report["verdict"]["before"]
    if args.json:
        print(json.dumps({"verdict": report["verdict"], "timing": report["timing"]}))
    else:
        print(report["verdict"]["headline"][0])
        for reason in before.get("reasons", []):
            print(f"  {reason}")
        print(f"  scanned {before['images']} clean images in {report['timing']['total_seconds']:.1f} s")
    return EXIT_SUSPECTED if before["status"] == "suspected" else EXIT_OK


def _class_list(path: str | None) -> list[str] | None:
    from .data.classes import read_class_file

    return read_class_file(path) if path else None


def print_label_mapping(names: list[str] | None, counts: list[int] | None, file=None) -> None:
    """The label order used, so a wrong one is visible: `label 0 = zero (20 images), ...`."""
    if not counts:
        return
    shown = [f"{i}={names[i] if names else i} ({c})" for i, c in enumerate(counts)]
    print(f"  labels (label=class (clean images)): {', '.join(shown[:20])}{', ...' if len(shown) > 20 else ''}",
          file=file or sys.stdout)


def cmd_evaluate(args) -> int:
    from .checkpoint import load_model
    from .data.formats import load_dataset_file
    from .device import pick_device, prepare_model, seed_everything
    from .metrics import attack_success_rate, clean_accuracy, robust_accuracy
    from .pipeline import resolve_spec

    seed_everything(0)
    from .hf_pipeline import fit_to_input, is_hf_model_path

    if args.spec is None and is_hf_model_path(args.model):  # describes itself; test images resized to its input
        from .models.hf import load_hf_model

        loaded = load_hf_model(args.model)
        spec, net = loaded.spec, loaded.module

        def load_dataset_file(path, *, num_classes, expect_shape, class_names=None):  # noqa: F811 - HF: resize
            from .data.formats import load_dataset_file as load

            return fit_to_input(load(path, num_classes=num_classes, class_names=class_names), spec.in_channels,
                                spec.input_size)[0]
    else:
        spec = resolve_spec(args.spec, args.model)
        net = load_model(args.model, spec)
    names = _class_list(args.classes) or getattr(spec, "class_names", None)
    shape = (spec.in_channels, *spec.input_size)
    model = prepare_model(net, pick_device(args.device))
    result: dict = {}
    if args.clean:
        clean = load_dataset_file(args.clean, num_classes=spec.num_classes, expect_shape=shape, class_names=names)
        result["clean_accuracy"] = clean_accuracy(model, clean.x, clean.y)
        result["clean_size"] = len(clean)
    if args.triggered:
        if args.target is None:
            raise NBAError(INVALID_PARAMS, "--triggered needs --target")
        trig = load_dataset_file(args.triggered, num_classes=spec.num_classes, expect_shape=shape, class_names=names)
        result["attack_success_rate"] = attack_success_rate(model, trig.x, trig.y, args.target)
        result["robust_accuracy"] = robust_accuracy(model, trig.x, trig.y, args.target)
        result["triggered_size"] = int((trig.y != args.target).sum())
    if not result:
        raise NBAError(INVALID_PARAMS, "give --clean and/or --triggered")
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<22} {100 * v:7.2f} %" if isinstance(v, float) else f"{k:<22} {v}")
    return EXIT_OK


def cmd_methods(args) -> int:
    from .defenses import METHODS, defense_class

    chosen = [args.method.strip().lower()] if args.method else list(METHODS)
    described = {m: defense_class(m).describe() for m in chosen}
    if args.json:
        print(json.dumps(described, indent=2, default=list))
        return EXIT_OK
    for method, params in described.items():
        doc = (defense_class(method).__doc__ or "").strip()
        print(f"{method}: {doc.splitlines()[0] if doc else METHOD_TITLES.get(method, '')}")
        for name, p in params.items():
            default = json.dumps(p["default"], default=list)
            print(f"  {name:<20} {default:>12}  {p['help']}")
        print(f"  (override: nba sanitize --method {method} --param NAME=VALUE, or --params '{{...}}')\n")
    return EXIT_OK


COMMAND_GROUP = "nba.commands"


def command_groups(extra=()) -> list:
    """`register(subparsers)` callables adding commands to `nba`: `extra` first, then those other installed
    distributions advertise in the `nba.commands` entry-point group (the service registers serve, keys, submit,
    ...). The library never imports the layers above it; they announce themselves."""
    groups = list(extra)
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            register = ep.load()
        except Exception as e:  # a broken add-on must not take the library's own commands down with it
            print(f"nba: commands from {ep.value} are unavailable ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        if register not in groups:  # the same function given in `extra` and advertised: add it once
            groups.append(register)
    return groups


def build_parser(extra_groups=()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nba",
        description="Remove backdoors from neural networks with NBA (neural behavioral alignment, as reconstructed "
                    "from the published abstract) or a baseline defense.",
        epilog="Typical use:\n"
               "  nba attack --dataset mnist5k --attack badnets --arch small_cnn --seed 0 --out runs/bd\n"
               "  nba sanitize --model runs/bd/model.safetensors --spec runs/bd/model.json \\\n"
               "      --data runs/bd/clean.npz --method nba --out runs/nba/cleaned.safetensors --report runs/nba/report.json\n"
               "  nba evaluate --model runs/nba/cleaned.safetensors --spec runs/bd/model.json \\\n"
               "      --clean runs/bd/test.npz --triggered runs/bd/test_triggered.npz --target 0 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    a = sub.add_parser("attack", help="train a backdoored model on a built-in dataset (for evaluation and demos)")
    a.add_argument("--dataset", default="mnist5k", help="mnist5k (default), digits, shapes32, fmnist (needs the Debian package dataset-fashion-mnist)")
    a.add_argument("--attack", default="badnets", help="badnets, blended, trojan, sig, cl, wanet")
    a.add_argument("--arch", default="small_cnn", help="small_cnn, preact_resnet18, wrn16, vgg11_bn, mobilenetv2")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--target", type=int, default=0, help="the attack's target class (default 0)")
    a.add_argument("--poison-rate", type=float, default=0.1)
    a.add_argument("--clean-fraction", type=float, default=0.05, help="share of the training set given to the defender")
    a.add_argument("--epochs", type=int, default=None, help="training epochs (default: per dataset/arch)")
    a.add_argument("--all-to-all", action="store_true",
                   help="label-shift backdoor: the trigger sends class y to y+1 mod K (dirty-label attacks only)")
    a.add_argument("--hf-config", help="a transformers config.json (e.g. bench/configs/hf_vit_tiny.json): train that "
                   "Hugging Face architecture instead of --arch; the model is written to OUT/model/ as "
                   "save_pretrained does")
    a.add_argument("--device", default="auto")
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--json", action="store_true", help="print a JSON summary")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=cmd_attack)

    s = sub.add_parser("sanitize", help="remove a backdoor from a model using a small clean data subset")
    s.add_argument("--model", required=True, help="suspect model: .safetensors, or a .pt state_dict (loaded with "
                   "weights_only), or a Hugging Face folder/zip (config.json + model.safetensors)")
    s.add_argument("--spec", help="model spec JSON (architecture, classes, input size, normalisation); default: the "
                   "spec a .safetensors written by nba carries; not needed for a Hugging Face model")
    s.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                   help="HF models: input size when preprocessor_config.json does not give it")
    s.add_argument("--mean", help="HF models: per-channel mean, e.g. 0.485,0.456,0.406 (default: preprocessor config)")
    s.add_argument("--std", help="HF models: per-channel std (default: preprocessor config)")
    s.add_argument("--data", required=True, help="clean subset: a folder of class folders, a zip/tar of them, or .npz "
                   "(x, y[, classes])")
    s.add_argument("--classes", metavar="FILE", help="class names in label order, one per line (maps folder names "
                   "and string labels; default: the spec's class_names, else integer or sorted folder names)")
    s.add_argument("--allow-low-accuracy", action="store_true", help="clean even if the model is near chance on the "
                   "clean data (normally a label-order or mean/std mistake, refused)")
    s.add_argument("--method", default="nba", help=METHOD_HELP)
    s.add_argument("--params", help='hyperparameter overrides as JSON, e.g. \'{"epochs": 10}\' (see `nba methods`)')
    s.add_argument("--param", action="append", metavar="KEY=VALUE", help="one override; repeatable")
    s.add_argument("--out", required=True, help="where to write the cleaned .safetensors (HF models: a folder)")
    s.add_argument("--report", help="where to write the JSON report")
    s.add_argument("--probe", help="optional: triggered images you suspect (npz with true labels) to measure ASR")
    s.add_argument("--probe-target", type=int, help="the class the suspected trigger maps to")
    s.add_argument("--holdout", type=float, default=0.0,
                   help="share of the clean subset kept out of the defense to measure accuracy on (default 0: the "
                        "defense trains on all of it, as the benchmark does; see --crossfit / --eval-data)")
    s.add_argument("--eval-data", help="optional separate labelled clean set on which clean accuracy is measured")
    s.add_argument("--crossfit", type=int, default=0, metavar="K",
                   help="estimate the clean-accuracy change by K-fold cross-fitting (K extra defense runs; 0 = off)")
    s.add_argument("--no-evidence", action="store_true",
                   help="skip the trigger-free verdict (faster; no verdict in the report)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    s.add_argument("--json", action="store_true", help="print a JSON summary")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sanitize)

    c = sub.add_parser("scan", help="detect only: is this model suspected of a backdoor? (trigger-free verdict; "
                                    "exit code 5 when suspected)")
    c.add_argument("--model", required=True, help="suspect model: .safetensors, a .pt state_dict, or a Hugging Face "
                                                  "folder or zip (config.json + weights)")
    c.add_argument("--spec", help="model spec JSON (default: the one the .safetensors carries; not needed for a "
                                  "Hugging Face folder)")
    c.add_argument("--data", required=True, help="clean labelled images: .npz (x, y) or zip/tar of class folders")
    c.add_argument("--report", help="where to write the JSON report")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="auto")
    c.add_argument("--json", action="store_true", help="print the verdict as JSON")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_scan)

    e = sub.add_parser("evaluate", help="clean accuracy and attack success rate of a model on labelled test sets")
    e.add_argument("--model", required=True, help="model file, or a Hugging Face folder/zip")
    e.add_argument("--spec", help="model spec JSON (default: the one the .safetensors carries; not needed for a "
                   "Hugging Face folder/zip)")
    e.add_argument("--classes", metavar="FILE", help="class names in label order, one per line")
    e.add_argument("--clean", help="clean test set (folder of class folders, archive or .npz)")
    e.add_argument("--triggered", help="triggered non-target test images labelled with their true classes")
    e.add_argument("--target", type=int, help="the attack's target class")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print a JSON object (fractions in [0, 1])")
    e.set_defaults(func=cmd_evaluate)

    m = sub.add_parser("methods", help="list defenses and their hyperparameters (default and what each does)")
    m.add_argument("method", nargs="?", help="one defense (default: all)")
    m.add_argument("--json", action="store_true", help='print {method: {param: {"default", "type", "help"}}}')
    m.set_defaults(func=cmd_methods)

    for register in command_groups(extra_groups):
        register(sub)
    return p


def main(argv: list[str] | None = None, extra_groups=()) -> int:
    parser = build_parser(extra_groups)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Cancelled as e:
        print(f"nba: cancelled: {e.message}", file=sys.stderr)
        return EXIT_CANCELLED
    except NBAError as e:
        print(f"nba: error [{e.code}]: {e.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("nba: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
