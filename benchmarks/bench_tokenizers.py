"""Four ways to tokenize an image, one ViT, one training budget: accuracy and cost on CIFAR-10.

The same ViT (``vit_micro_patch4_32``: 4 blocks, 128 wide) is trained by vitlens' own trainer
with each tokenizer - patch (4x4), pixel (iGPT, 16x16 palette indices), vq (a trained VQ-VAE's
8x8 codes), hybrid (a 3-stage CIFAR ResNet's 8x8 feature map) - for the same epochs on the
same class-balanced fraction of the training split, then evaluated on the whole test split.

    python benchmarks/bench_tokenizers.py --vq-checkpoint runs/vq/tokenizer.safetensors \
        --data-dir ../shared/data/cifar10 --fraction 0.1 --epochs 2 --out /tmp/bench_tok

The pixel tokenizer's palette is fitted (k-means, 512 colours) on the same training fraction
unless ``--palette`` names one. FLOPs are one forward pass on one image as counted by
``torch.utils.flop_counter`` (matmuls and convolutions; the frozen VQ encoder counts, the
palette's nearest-colour search does not). The table's throughputs (train: forward + backward +
AdamW step, batch 64, no data loading; inference: batch 256) are the fastest of 7 round-robin
passes over the models after all training, so the rows are comparable with each other; they
are wall-clock and still move with the machine's load. A finished row (its run directory holds
summary.json) is reused, so an interrupted benchmark can go on.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from vitlens import create_model
from vitlens.train import TrainConfig, train
from vitlens.train.tokenizer import TokenizerTrainConfig, train_tokenizer

MODEL = "vit_micro_patch4_32"


def measure_throughputs(
    models: dict[str, torch.nn.Module], rounds: int = 7
) -> dict[str, tuple[float, float]]:
    """{name: (train img/s, inference img/s)}: the fastest of ``rounds`` round-robin passes.

    On a machine shared with other jobs the fastest pass is the most repeatable estimate of a
    model's own cost (``timeit``'s reasoning); round-robin spreads load bursts over every row.
    """
    xt, yt, xi = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)), torch.randn(256, 3, 32, 32)
    opts = {
        n: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)
        for n, m in models.items()
    }

    def train_step(name: str) -> None:
        loss = F.cross_entropy(models[name].train()(xt), yt)
        opts[name].zero_grad()
        loss.backward()
        opts[name].step()

    @torch.inference_mode()
    def infer(name: str) -> None:
        models[name].eval()(xi)

    best = {n: [float("inf"), float("inf")] for n in models}
    for r in range(rounds + 1):  # round 0 warms up
        for name in models:
            for k, fn in enumerate((train_step, infer)):
                t0 = time.perf_counter()
                fn(name)
                if r:
                    best[name][k] = min(best[name][k], time.perf_counter() - t0)
    return {n: (64 / t, 256 / i) for n, (t, i) in best.items()}


def model_args(name: str, tok_args: dict) -> dict:
    return {"tokenizer_args": tok_args[name]} if name != "patch" else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data/cifar10")
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vq-checkpoint", help="a `vitlens train-tokenizer` output (needed for the vq row)")
    p.add_argument("--palette", help="a palette file; default: fit one on the training fraction")
    p.add_argument("--tokenizers", default="patch,pixel,vq,hybrid")
    p.add_argument("--out", default="/tmp/bench_tokenizers")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    names = args.tokenizers.split(",")
    if "vq" in names and not args.vq_checkpoint:
        p.error("the vq row needs --vq-checkpoint (train one with `vitlens train-tokenizer`)")

    palette = args.palette
    if "pixel" in names and palette is None:
        summary = train_tokenizer(
            TokenizerTrainConfig(
                kind="palette",
                data="cifar10",
                data_dir=args.data_dir,
                out=str(out / "palette"),
                fraction=args.fraction,
                k=512,
                progress=False,
            )
        )
        palette = str(out / "palette" / "palette.safetensors")
        print(f"palette: 512 colours, full-resolution test PSNR {summary['psnr']:.2f} dB")
    tok_args = {
        "patch": {},
        "pixel": {"palette": palette, "resolution": 16},
        "vq": {"checkpoint": args.vq_checkpoint},
        "hybrid": {"layers": (1, 1, 1), "widths": (32, 64, 128)},
    }

    summaries = {}
    for name in names:  # 1. train each (or reuse a finished run)
        cfg = TrainConfig(
            model=MODEL,
            tokenizer=name,
            model_args=model_args(name, tok_args),
            data="cifar10",
            data_dir=args.data_dir,
            fraction=args.fraction,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_epochs=min(1.0, args.epochs / 5),
            out=str(out / name),
            eval_every=args.epochs,
            device="cpu",
            progress=False,
            seed=0,
        )
        done = out / name / "summary.json"
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # the trainer's config probe builds the model without tokenizer_args
            summaries[name] = json.loads(done.read_text()) if done.exists() else train(cfg)
        print(f"{name}: test top-1 {summaries[name]['test_top1']:.2f}%", flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {name: create_model(MODEL, tokenizer=name, **model_args(name, tok_args)) for name in names}
    speed = measure_throughputs(models)  # 2. cost, every row under the same machine load
    rows = []
    for name, model in models.items():
        s = summaries[name]
        rows.append(
            {
                "tokenizer": name,
                "tokens": model.patch_embed.num_patches,
                "params_M": sum(q.numel() for q in model.parameters()) / 1e6,
                "trainable_M": sum(q.numel() for q in model.parameters() if q.requires_grad) / 1e6,
                "gflops": s["flops_per_image"] / 1e9,
                "train_img_s": speed[name][0],
                "infer_img_s": speed[name][1],
                "top1": s["test_top1"],
                "run_img_s": s["img_per_s"],  # the trainer's, with data loading, under that run's load
                "train_time_s": s["train_time_s"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    print(
        f"\nvit_micro_patch4_32, CIFAR-10 {args.fraction:.0%} of train x {args.epochs} epochs, "
        f"test on all 10,000; {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        "| tokenizer | tokens/img | params (trainable) | GFLOPs/img | train img/s | infer img/s "
        "| test top-1 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['tokenizer']} | {r['tokens']} | {r['params_M']:.2f}M ({r['trainable_M']:.2f}M) | "
            f"{r['gflops']:.3f} | {r['train_img_s']:.0f} | {r['infer_img_s']:.0f} | {r['top1']:.1f}% |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
