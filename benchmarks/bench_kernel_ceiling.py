"""How far can MFU go on this machine? The matrix kernels' own speed inside one training step.

Issue 13 asks `vitlens train` to reach 50% (resnet8_cifar) and 30% (vit_micro_patch4_32) of a bf16
matrix product's FLOP/s. This script bounds what any amount of work on *our* code can reach: it
profiles the training step exactly as `vitlens train` builds it (same model, bf16 autocast by
`amp=auto`, channels_last for CNNs, fused AdamW, batch 128) and sums the self time of the
matrix kernels (mm, addmm, bmm, oneDNN convolution forward and backward). Even if every other op -
norms, activations, casts, copies, the optimiser, Python - took no time at all, the step could not be
faster than those kernels, so

    ceiling MFU = training FLOPs of a step / matrix-kernel time / bf16 GEMM peak

is an upper bound for the step's MFU with PyTorch's kernels at these shapes. The GEMM peak is the
best of n = 512, 1024, 2048 square products, as in bench_train_mfu.py. Also printed: the achieved
MFU of the step (timed without the profiler), and where the rest of the step goes.

    python benchmarks/bench_kernel_ceiling.py                       # both models, torch's threads
    OMP_NUM_THREADS=1 python benchmarks/bench_kernel_ceiling.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from vitlens.models import create_model
from vitlens.train import TrainConfig
from vitlens.train.precision import keep_freed_memory, matmul_flops, resolve_amp, want_channels_last
from vitlens.train.trainer import build_optimizer, count_flops

# Self time of these ops is the matrix arithmetic (oneDNN/MKL kernels); everything else is overhead.
MATRIX_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::matmul",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_convolution",
    "aten::mkldnn_linear",
    "aten::_mkldnn_linear_backward_weights",
}
GROUPS = {  # the rest of the step, grouped for the printout
    "casts and copies": (
        "aten::copy_",
        "aten::_to_copy",
        "aten::to",
        "aten::clone",
        "aten::contiguous",
        "aten::cat",
    ),
    "norms": ("layer_norm", "batch_norm"),
    "activations and softmax": ("gelu", "relu", "softmax", "threshold"),
    "optimizer": ("adam", "sgd", "Optimizer", "_fused"),
}


def step_fn(model, optimizer, x, y, dtype):
    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(model_name: str, batch_size: int, steps: int, peak: float) -> dict:
    cfg = TrainConfig(model=model_name, batch_size=batch_size)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, **({"img_size": 32} if "vit" in model_name else {}))
    channels_last = want_channels_last(cfg.channels_last, model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = resolve_amp(cfg.amp, "cpu")
    optimizer = build_optimizer(model, cfg)
    x = torch.randn(batch_size, 3, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))
    step = step_fn(model.train(), optimizer, x, y, dtype)
    train_flops = 3 * count_flops(model, 32, 3, torch.device("cpu")) * batch_size

    for _ in range(3):  # warm-up: oneDNN primitive creation, allocator
        step()
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
    step_s = sorted(walls)[len(walls) // 2]

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    self_us: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        self_us[e.key] += e.self_cpu_time_total
    total_us = sum(self_us.values())
    matrix_us = sum(v for k, v in self_us.items() if k in MATRIX_OPS)
    # scale the profiled split onto the unprofiled step time (the profiler's own overhead is excluded)
    matrix_s = step_s * matrix_us / total_us
    split = {}
    rest = {k: v for k, v in self_us.items() if k not in MATRIX_OPS}
    for group, keys in GROUPS.items():
        names = [k for k in rest if any(s in k for s in keys)]
        split[group] = sum(rest.pop(k) for k in names) / total_us
    split["other"] = sum(rest.values()) / total_us
    return {
        "dtype": str(dtype),
        "channels_last": channels_last,
        "train_gflop_per_step": train_flops / 1e9,
        "step_ms": 1000 * step_s,
        "img_per_s": batch_size / step_s,
        "achieved_mfu": train_flops / step_s / peak,
        "matrix_fraction_of_step": matrix_us / total_us,
        "matrix_kernel_gflops_per_s": train_flops / matrix_s / 1e9,
        "ceiling_mfu": train_flops / matrix_s / peak,
        "rest_of_step": split,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet8_cifar", "vit_micro_patch4_32"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    keep_freed_memory()  # as `vitlens train` does (train/harness.py)
    sizes = (512, 1024, 2048)
    gemm = {n: matmul_flops(torch.bfloat16, "cpu", n=n) for n in sizes}
    peak = max(gemm.values())
    results = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bf16_gemm_gflops_per_s": {str(n): v / 1e9 for n, v in gemm.items()},
        "runs": {},
    }
    sizes_text = ", ".join(f"n={n}: {v / 1e9:.0f}" for n, v in gemm.items())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"bf16 GEMM peak {peak / 1e9:.0f} GFLOP/s ({sizes_text})"
    )
    for name in args.models:
        r = measure(name, args.batch_size, args.steps, peak)
        results["runs"][name] = r
        rest = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["rest_of_step"].items())
        print(
            f"{name} ({r['dtype']}, batch {args.batch_size}): step {r['step_ms']:.0f} ms = "
            f"{r['img_per_s']:.0f} img/s, achieved MFU {100 * r['achieved_mfu']:.1f}%; "
            f"matrix kernels {100 * r['matrix_fraction_of_step']:.0f}% "
            f"of the step at {r['matrix_kernel_gflops_per_s']:.0f} GFLOP/s -> ceiling MFU "
            f"{100 * r['ceiling_mfu']:.1f}%; rest: {rest}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
