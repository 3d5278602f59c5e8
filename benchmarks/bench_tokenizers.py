"""Four ways to tokenize an image, one ViT, one training budget: accuracy and cost on CIFAR-10.

The same ViT (``vit_micro_patch4_32``: 4 blocks, 128 wide) is trained by vitlens' own trainer
with each tokenizer - patch (4x4), pixel (iGPT, 16x16 palette indices), vq (a trained VQ-VAE's
8x8 codes), hybrid (a 3-stage CIFAR ResNet's 8x8 feature map) - for the same epochs on the
same class-balanced fraction of the training split, then evaluated on the whole test split.

    python benchmarks/bench_tokenizers.py --vq-checkpoint runs/vq/tokenizer.safetensors \
        --data-dir ../shared/data/cifar10 --fraction 0.1 --epochs 3 --out /tmp/bench_tok

The pixel tokenizer's palette is fitted (k-means, 512 colours) on the same training fraction
unless ``--palette`` names one. FLOPs are one forward pass on one image as counted by
``torch.utils.flop_counter`` (matmuls and convolutions; the frozen VQ encoder counts, the
palette's nearest-colour search does not). Throughputs are wall-clock on whatever machine
runs this and move with its load.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch

from vitlens import create_model
from vitlens.tokenizers.train_vq import TokenizerTrainConfig, train_tokenizer
from vitlens.train import TrainConfig, train

MODEL = "vit_micro_patch4_32"


@torch.inference_mode()
def inference_throughput(model: torch.nn.Module, batch: int = 256, reps: int = 3) -> float:
    model.eval()
    x = torch.randn(batch, 3, 32, 32)
    model(x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        model(x)
    return batch * reps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data/cifar10")
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
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

    rows = []
    for name in names:
        margs = {"tokenizer_args": tok_args[name]} if name != "patch" else {}
        cfg = TrainConfig(
            model=MODEL,
            tokenizer=name,
            model_args=margs,
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
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # the trainer's config probe builds the model without tokenizer_args
            done = out / name / "summary.json"  # a finished row is reused, so an interrupted run can go on
            s = json.loads(done.read_text()) if done.exists() else train(cfg)
            model = create_model(MODEL, tokenizer=name, **margs)
        rows.append(
            {
                "tokenizer": name,
                "tokens": model.patch_embed.num_patches,
                "params_M": sum(q.numel() for q in model.parameters()) / 1e6,
                "trainable_M": sum(q.numel() for q in model.parameters() if q.requires_grad) / 1e6,
                "gflops": s["flops_per_image"] / 1e9,
                "train_img_s": s["img_per_s"],
                "infer_img_s": inference_throughput(model),
                "top1": s["test_top1"],
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
