"""Training throughput of the vitlens ViT against timm's, measured in one process.

One training step = forward + cross-entropy + backward + AdamW step, on a fixed random batch.
Both models are the same timm architecture (default ViT-Tiny: 192 wide, 12 blocks, 3 heads, at
CIFAR scale: img_size=32, patch_size=4 -> 64 patches + [CLS], 10 classes) and start from the
*same* weights (vitlens exported to timm). Runs alternate vitlens / timm / timm / vitlens / ...,
each after its own warm-up, so load from other processes on the machine hits both models alike.
Every step is timed on its own (on CUDA between synchronisations); reported are the median and the
best step over all runs as img/s, the process CPU time per step, and the model FLOP utilisation
(MFU: 3 x forward FLOPs x img/s over this machine's measured matrix-product FLOP/s in that
precision, measured in the same process).

    python benchmarks/bench_throughput.py                      # fp32 and bf16 autocast, batch 128, CPU
    python benchmarks/bench_throughput.py --modes fp32 --repeats 3 --steps 2
    python benchmarks/bench_throughput.py --device cuda --modes bf16 --compile \\
        --model vit_small_patch16_224 --img-size 224 --patch-size 16 --batch-size 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import vitlens
from vitlens.models.convert import export_timm_state_dict
from vitlens.train.precision import keep_freed_memory, matmul_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_pair(model: str, overrides: dict, device: torch.device) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    ours = vitlens.create_model(model, **overrides)
    ref = timm.create_model(model, pretrained=False, **overrides)
    ref.load_state_dict(export_timm_state_dict(ours))  # identical weights: identical work
    return {"vitlens": ours.to(device), "timm": ref.to(device)}


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass on one image (a multiply-add is 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    return int(counter.get_total_flops())


def autocast(mode: str, device: torch.device):
    if mode == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_steps(step, device: torch.device, steps: int, warmup: int) -> list[tuple[float, float]]:
    """(wall s, process CPU s) of each of ``steps`` calls of ``step`` after ``warmup`` untimed ones."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def make_step(model, opt, x, y, mode: str, device: torch.device):
    model.train()

    def step():
        with autocast(mode, device):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny_patch16_224", help="a name both timm and vitlens know")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before each run")
    p.add_argument("--repeats", type=int, default=5, help="runs per model and mode (alternating)")
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (compile time untimed)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # process-wide, so both models get it; `vitlens train` runs with it
    device = torch.device(args.device)
    overrides = dict(img_size=args.img_size, patch_size=args.patch_size, num_classes=args.num_classes)

    models = build_pair(args.model, overrides, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    flops = forward_flops(models["vitlens"], x)
    opt_kw = {"fused": True} if device.type == "cuda" else {}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, **opt_kw) for k, m in models.items()}
    runners = {k: (torch.compile(m) if args.compile else m) for k, m in models.items()}
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()} {platform.processor() or ''} {device}".strip()
    )
    print(
        f"{args.model} {overrides}, batch {args.batch_size}, {flops / 1e9:.3f} GFLOPs/image forward: "
        f"{args.repeats} alternating runs of {args.warmup} warm-up + {args.steps} timed steps "
        f"(forward + backward + AdamW){' compiled' if args.compile else ''}"
    )

    n = args.batch_size
    results: dict = {
        "config": vars(args) | {"overrides": overrides},
        "forward_flops_per_image": flops,
        "modes": {},
    }
    for mode in args.modes:
        peak = matmul_flops(DTYPES[mode], device)
        steps: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
        step_fns = {k: make_step(runners[k], opts[k], x, y, mode, device) for k in models}
        for k in models:  # compilation (and autotuning) happens here, untimed
            time_steps(step_fns[k], device, 0, 2 if args.compile else 0)
        for r in range(args.repeats):
            order = list(models) if r % 2 == 0 else list(models)[::-1]  # alternate who goes first, too
            for k in order:
                steps[k] += time_steps(step_fns[k], device, args.steps, args.warmup)
        stats = {}
        for k, v in steps.items():
            median, best = n / statistics.median(w for w, _ in v), n / min(w for w, _ in v)
            stats[k] = {
                "median_img_per_s": median,
                "best_img_per_s": best,
                "median_mfu": 3 * flops * median / peak,
                "median_cpu_s_per_step": statistics.median(c for _, c in v),
                "step_wall_s": [round(w, 4) for w, _ in v],
            }
        ratios = {
            f"{q}_ratio": stats["vitlens"][f"{q}_img_per_s"] / stats["timm"][f"{q}_img_per_s"]
            for q in ("median", "best")
        }
        results["modes"][mode] = {**stats, **ratios, "matmul_flops": peak}
        print(f"  {mode:4s} measured {mode} matrix-product peak: {peak / 1e12:.2f} TFLOP/s")
        for k, st in stats.items():
            print(
                f"  {mode:4s} {k:8s} median {st['median_img_per_s']:8.1f} img/s  "
                f"best {st['best_img_per_s']:8.1f} img/s  MFU {100 * st['median_mfu']:5.1f}%  "
                f"CPU {st['median_cpu_s_per_step']:5.2f} s/step  ({len(steps[k])} steps)"
            )
        print(
            f"  {mode:4s} vitlens/timm: median {ratios['median_ratio']:.3f}, best {ratios['best_ratio']:.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
