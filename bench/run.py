"""Regenerate every benchmark in docs/benchmarks/ (or a chosen subset) with one command.

    python -m bench.run                      # MNIST-5k quality table, NBA ablation, pipeline speed, service speed
    python -m bench.run --only quality       # just the MNIST-5k small-CNN quality table (time: the table header)
    python -m bench.run --only quality --suite shapes-preact   # larger tables: want a GPU
    python -m bench.run --only gpu           # the GPU ladder (bench/gpu_speed.py); skipped without CUDA
"""

from __future__ import annotations

import argparse

from . import ablation, gpu_speed, pipeline_speed, quality, service_speed

STEPS = ("quality", "ablation", "pipeline", "gpu", "service")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS))
    p.add_argument("--suite", default="mnist", choices=sorted(quality.SUITES), help="quality-table suite")
    p.add_argument("--fresh", action="store_true", help="discard rows of an earlier, interrupted run")
    args = p.parse_args(argv)
    fresh = ["--fresh"] if args.fresh else []
    if "quality" in args.only:
        quality.main(["--suite", args.suite, *fresh])
    if "ablation" in args.only:
        ablation.main(fresh)
    if "pipeline" in args.only:
        pipeline_speed.main([])
    if "gpu" in args.only:
        import torch

        if torch.cuda.is_available():
            gpu_speed.main([])
        else:
            print("bench: no CUDA device, the GPU ladder (bench/gpu_speed.py) is skipped")
    if "service" in args.only:
        service_speed.main([])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
