"""`vitlens train` end to end, with its defaults, against this machine's bf16 matrix-product FLOP/s.

Issue 13's CPU bars: on the embedded subset at batch 128, the epoch img/s that summary.json reports,
times the training FLOPs per image (3 x the forward FLOPs, also in summary.json), must reach 50%
(``resnet8_cifar``) and 30% (``vit_micro_patch4_32``) of a bf16 matrix product's FLOP/s measured in
the same process, before and after each run (the best of the sizes tried is the ceiling). The
process CPU time of each run is reported too, since wall time on a shared machine is noisy.

    python benchmarks/bench_train_mfu.py                           # both models, 3 epochs each
    python benchmarks/bench_train_mfu.py --models resnet8_cifar --epochs 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vitlens.train import TrainConfig, train
from vitlens.train.precision import matmul_flops

BARS = {"resnet8_cifar": 0.50, "vit_micro_patch4_32": 0.30}


def gemm_peak(sizes=(512, 1024, 2048)) -> dict[int, float]:
    return {n: matmul_flops(torch.bfloat16, "cpu", n=n) for n in sizes}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(BARS))
    p.add_argument("--epochs", type=int, default=3, help="the last epoch's img/s is the figure")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "runs": {}}
    for model in args.models:
        before = gemm_peak()
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(
                model=model,
                batch_size=args.batch_size,
                epochs=args.epochs,
                eval_every=args.epochs,
                out=str(Path(tmp) / "run"),
                progress=False,
            )
            wall, cpu = time.perf_counter(), time.process_time()
            summary = train(cfg)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            records = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        after = gemm_peak()
        peak = max(*before.values(), *after.values())
        train_flops = 3 * summary["flops_per_image"] * summary["img_per_s"]
        images = summary["train_images"] * args.epochs
        row = {
            "img_per_s": summary["img_per_s"],
            "img_per_s_by_epoch": [r["img_per_s"] for r in records],
            "train_gflops_per_s": train_flops / 1e9,
            "bf16_gemm_gflops_per_s": {str(n): v / 1e9 for n, v in before.items()},
            "bf16_gemm_gflops_per_s_after": {str(n): v / 1e9 for n, v in after.items()},
            "fraction_of_gemm": train_flops / peak,
            "bar": BARS.get(model),
            "met": BARS.get(model) is not None and train_flops / peak >= BARS[model],
            "test_top1": summary["test_top1"],
            "wall_s": wall,
            "process_cpu_s": cpu,
            "cpu_ms_per_image": 1000 * cpu / images,
        }
        results["runs"][model] = row
        print(
            f"{model}: {row['img_per_s']:.0f} img/s = {row['train_gflops_per_s']:.0f} GFLOP/s training = "
            f"{100 * row['fraction_of_gemm']:.1f}% of the bf16 GEMM peak {peak / 1e9:.0f} GFLOP/s "
            f"(bar {BARS.get(model)}), {row['cpu_ms_per_image']:.2f} CPU-ms/image, "
            f"top-1 {row['test_top1']:.1f}%"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
