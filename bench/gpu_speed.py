"""What the GPU-resident training loop and the batched class scan buy, step by step, on one device in one run.

Training ladder (PreAct-ResNet18, 2,500 random 32×32 images, batch 128, SGD): a plain reference loop (host
tensors through a DataLoader, fp32, NCHW), then the same loop with the data resident on the device, + bf16
autocast, + channels_last, and finally the library's own `train_classifier` (all of that plus on-device
augmentation). Class-scan ladder: the trigger search for every class one class at a time, against all classes in
one batched optimisation. Throughput is reported as images/s and, from the counted FLOPs, as a share of the
device's dense bf16 peak where that peak is known.

Run: python -m bench.gpu_speed            (needs CUDA; writes docs/benchmarks/gpu_speed.{json,md})
     python -m bench.gpu_speed --device cpu --images 256 --epochs 1   (a CPU smoke run of the same code)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import OUT_DIR, provenance, timed
from .pipeline_speed import time_class_scan

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def _peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def _plain_loop(model, x, y, dev, *, epochs: int, batch_size: int, on_device: bool, bf16: bool,
                channels_last: bool, generator) -> None:
    """A textbook loop whose speed-ups can be switched on one at a time (no augmentation)."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    cast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    if on_device:
        xd, yd = x.to(dev).contiguous(memory_format=fmt), y.to(dev)
        batches = lambda: (torch.randperm(len(y), generator=generator).to(dev).split(batch_size))
        fetch = lambda idx: (xd[idx], yd[idx])
    else:
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=generator)
        batches = lambda: loader
        fetch = lambda b: (b[0].to(dev).contiguous(memory_format=fmt), b[1].to(dev))
    model.train()
    for _ in range(epochs):
        for b in batches():
            xb, yb = fetch(b)
            with cast:
                loss = F.cross_entropy(model(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def training_ladder(device: str = "cuda", arch: str = "preact_resnet18", n_images: int = 2500, epochs: int = 3,
                    batch_size: int = 128) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from nba_core.device import pick_device, prepare_model, seed_everything, to_device
    from nba_core.experiment import default_spec
    from nba_core.models import build_model
    from nba_core.train import TrainConfig, train_classifier

    dev = pick_device(device)
    gen = seed_everything(0)
    x = torch.rand(n_images, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n_images,), generator=gen)
    spec = default_spec("shapes32", arch)
    steps = [("reference: DataLoader, fp32, NCHW", dict(on_device=False, bf16=False, channels_last=False)),
             ("+ data resident on the device", dict(on_device=True, bf16=False, channels_last=False)),
             ("+ bf16 autocast", dict(on_device=True, bf16=True, channels_last=False)),
             ("+ channels_last", dict(on_device=True, bf16=True, channels_last=True))]
    rows = []
    for name, flags in steps:
        model = build_model(spec).to(dev)
        # One untimed epoch first: CUDA context, cuDNN autotuning and allocator warm-up are not throughput.
        _plain_loop(model, x, y, dev, epochs=1, batch_size=batch_size, generator=gen, **flags)
        seconds = timed(lambda: _plain_loop(model, x, y, dev, epochs=epochs, batch_size=batch_size,
                                             generator=gen, **flags), dev)
        rows.append({"step": name, "images_per_s": epochs * n_images / seconds, **flags})
    model = prepare_model(build_model(spec), dev)
    xd, yd = to_device(x, dev), to_device(y, dev)
    cfg = TrainConfig(epochs=epochs, lr=0.01, batch_size=batch_size, shift=2, hflip=True)
    train_classifier(model, xd, yd, TrainConfig(epochs=1, lr=0.01, batch_size=batch_size), generator=gen)
    seconds = timed(lambda: train_classifier(model, xd, yd, cfg, generator=gen), dev)
    rows.append({"step": "nba_core train_classifier (+ on-device shift/flip augmentation)",
                 "images_per_s": epochs * n_images / seconds})

    model.train()
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(xd[:batch_size]).float(), yd[:batch_size]).backward()
    flops_per_image = fc.get_total_flops() / batch_size
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = _peak_tflops(name)
    for r in rows:
        r["tflops"] = r["images_per_s"] * flops_per_image / 1e12
        r["share_of_peak"] = r["tflops"] / peak if peak else None
        r["speedup_vs_reference"] = r["images_per_s"] / rows[0]["images_per_s"]
    return {"device": name, "arch": arch, "images": n_images, "epochs": epochs, "batch_size": batch_size,
            "train_flops_per_image": flops_per_image, "peak_bf16_tflops": peak, "steps": rows}


def scan_ladder(device: str = "cuda", arch: str = "preact_resnet18", n_images: int = 250, steps: int = 60,
                batch_size: int = 8) -> dict:
    """The same trigger search for all ten classes: one class at a time vs one batched optimisation."""
    import torch

    from nba_core.device import pick_device, prepare_model, seed_everything, to_device
    from nba_core.experiment import default_spec
    from nba_core.models import build_model

    dev = pick_device(device)
    gen = seed_everything(0)
    model = prepare_model(build_model(default_spec("shapes32", arch)), dev).eval()
    x = to_device(torch.rand(n_images, 3, 32, 32, generator=gen), dev)
    y = to_device(torch.arange(n_images) % 10, dev)
    return time_class_scan(model, x, y, list(range(10)), steps=steps, batch_size=batch_size)


def markdown(result: dict, prov: dict) -> str:
    t, s = result["training"], result["class_scan"]
    lines = ["# GPU speed: what the device-resident loop and the batched scan buy", "",
             f"Commit `{prov['commit']}`{' (dirty tree)' if prov.get('dirty') else ''}; {t['device']}; {prov['when']}. "
             f"{t['arch']}, {t['images']} random 32×32 images, batch {t['batch_size']}, {t['epochs']} timed epochs "
             f"after one warm-up epoch; {t['train_flops_per_image'] / 1e9:.2f} GFLOP per image (forward + backward, "
             f"counted)." + (f" Peak: {t['peak_bf16_tflops']:.0f} TFLOP/s dense bf16." if t["peak_bf16_tflops"] else ""),
             "", "| step | images/s | × reference | TFLOP/s | share of peak |", "|---|---|---|---|---|"]
    for r in t["steps"]:
        share = f"{100 * r['share_of_peak']:.1f} %" if r["share_of_peak"] is not None else "–"
        lines.append(f"| {r['step']} | {r['images_per_s']:.0f} | {r['speedup_vs_reference']:.2f} | "
                     f"{r['tflops']:.2f} | {share} |")
    lines += ["", f"Class scan ({s['classes']} classes × {s['steps']} steps × {s['batch_per_class']} images): one class "
              f"at a time {s['per_class_loop_seconds']:.2f} s, all classes batched {s['batched_seconds']:.2f} s "
              f"(×{s['speedup']:.1f})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--arch", default="preact_resnet18")
    p.add_argument("--images", type=int, default=2500)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_speed: no CUDA device here; nothing measured (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    prov = provenance()
    result = {"provenance": prov,
              "training": training_ladder(args.device, args.arch, args.images, args.epochs),
              "class_scan": scan_ladder(args.device, args.arch)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_speed" if args.device == "cuda" else f"gpu_speed_{args.device}_smoke"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result, prov))
    print(markdown(result, prov))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
