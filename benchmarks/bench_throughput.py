"""Training throughput of the vitlens ViT against timm's, measured in one process.

One training step = forward + cross-entropy + backward + AdamW step, on a fixed random
batch. Both models are ViT-Tiny (192 wide, 12 blocks, 3 heads) at CIFAR scale (img_size=32,
patch_size=4 -> 64 patches + [CLS], 10 classes) and start from the *same* weights (vitlens
exported to timm). Runs alternate vitlens / timm / vitlens / ..., each after its own warm-up,
and the median over repeats is reported, so load from other processes on the machine hits
both models alike.

    python benchmarks/bench_throughput.py                      # fp32 and bf16 autocast, batch 128
    python benchmarks/bench_throughput.py --modes fp32 --repeats 3 --steps 2
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

OVERRIDES = dict(img_size=32, patch_size=4, num_classes=10)


def build_pair() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    ours = vitlens.create_model("vit_tiny_patch16_224", **OVERRIDES)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **OVERRIDES)
    ref.load_state_dict(export_timm_state_dict(ours))  # identical weights: identical work
    return {"vitlens": ours, "timm": ref}


def autocast(mode: str):
    if mode == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_steps(model, opt, x, y, mode: str, steps: int, warmup: int) -> float:
    """img/s over ``steps`` training steps after ``warmup`` untimed ones."""
    model.train()

    def step():
        with autocast(mode):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(x) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before each run")
    p.add_argument("--repeats", type=int, default=5, help="runs per model and mode (alternating)")
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    models = build_pair()
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()} {platform.processor() or ''}".strip())
    print(f"ViT-Tiny {OVERRIDES}, batch {args.batch_size}: {args.repeats} alternating runs of "
          f"{args.warmup} warm-up + {args.steps} timed steps (forward + backward + AdamW)")

    results: dict = {"config": vars(args) | {"overrides": OVERRIDES}, "modes": {}}
    for mode in args.modes:
        runs: dict[str, list[float]] = {k: [] for k in models}
        for r in range(args.repeats):
            order = list(models) if r % 2 == 0 else list(models)[::-1]  # alternate who goes first, too
            for k in order:
                runs[k].append(time_steps(models[k], opts[k], x, y, mode, args.steps, args.warmup))
        med = {k: statistics.median(v) for k, v in runs.items()}
        ratio = med["vitlens"] / med["timm"]
        results["modes"][mode] = {"img_per_s": runs, "median": med, "ratio_vitlens_over_timm": ratio}
        for k in models:
            print(f"  {mode:4s} {k:8s} median {med[k]:7.1f} img/s   runs: "
                  + " ".join(f"{v:.1f}" for v in runs[k]))
        print(f"  {mode:4s} vitlens/timm = {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
