"""bf16 against fp32 on the CPU: one run twice, its curves side by side (issue 13: accuracy must not drop).

Trains one model on the embedded CIFAR-10 subset with ``--amp bf16`` and with ``--amp fp32`` (same
seed, data order and initial weights), then draws train loss and test top-1 per epoch of both runs
into one figure, and prints them as a table with each run's img/s.

    python benchmarks/bench_precision_curves.py --out docs/figures/bf16_vs_fp32.png
    python benchmarks/bench_precision_curves.py --model resnet8_cifar --epochs 6
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vitlens.train import TrainConfig, train  # noqa: E402


def run(model: str, amp: str, epochs: int, batch_size: int, root: Path) -> list[dict]:
    cfg = TrainConfig(
        model=model,
        amp=amp,
        epochs=epochs,
        batch_size=batch_size,
        eval_every=1,
        out=str(root / amp),
        progress=False,
    )
    train(cfg)
    return [json.loads(line) for line in (root / amp / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_micro_patch4_32")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default="bf16_vs_fp32.png", help="the figure (a .json of the numbers beside it)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        curves = {
            amp: run(args.model, amp, args.epochs, args.batch_size, Path(tmp)) for amp in ("bf16", "fp32")
        }

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for amp, records in curves.items():
        epochs = [r["epoch"] for r in records]
        ax_loss.plot(epochs, [r["train_loss"] for r in records], marker="o", label=amp)
        ax_acc.plot(epochs, [r["test_top1"] for r in records], marker="o", label=amp)
    ax_loss.set(xlabel="epoch", ylabel="train loss", title=f"{args.model}: train loss")
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="test top-1 (embedded CIFAR-10, 500 images)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    numbers = {
        amp: {k: [r[k] for r in records] for k in ("epoch", "train_loss", "test_top1", "img_per_s")}
        for amp, records in curves.items()
    }
    out.with_suffix(".json").write_text(json.dumps({"model": args.model, **numbers}, indent=2) + "\n")
    print(f"{'epoch':>5} | {'loss bf16':>9} {'loss fp32':>9} | {'top1 bf16':>9} {'top1 fp32':>9}")
    for i, epoch in enumerate(numbers["bf16"]["epoch"]):
        b, f = numbers["bf16"], numbers["fp32"]
        print(
            f"{epoch:5d} | {b['train_loss'][i]:9.4f} {f['train_loss'][i]:9.4f} | "
            f"{b['test_top1'][i]:9.1f} {f['test_top1'][i]:9.1f}"
        )
    for amp, n in numbers.items():
        print(f"{amp}: median img/s {sorted(n['img_per_s'])[len(n['img_per_s']) // 2]:.0f}")
    print(f"figure: {out}")
    return numbers


if __name__ == "__main__":
    main()
