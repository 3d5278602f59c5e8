"""``vitlens train`` and ``vitlens eval``."""

from __future__ import annotations

import json

from ..errors import DataError, ModelError
from ..train.config import TrainConfig
from . import add_run_arguments, run_training

_HELP = {
    "model": "registered model name (see `vitlens models`)",
    "model_args": 'JSON overrides of the model config, e.g. \'{"pool": "gap"}\'',
    "pretrained": "fine-tune from the hub's weights of --model (its timm/torchvision namesake; cache first)",
    "data": "cifar10-mini (embedded, default) | cifar10 | cifar100 | imagefolder",
    "data_dir": "where the dataset lives (a directory or a .tar/.tar.gz of an ImageFolder)",
    "fraction": "class-balanced, nested fraction of the training split (0.1 contains 0.05)",
    "out": "run directory (metrics, checkpoints, config)",
    "amp": "auto (bf16 where the GPU or CPU has native bf16 matrix units, else fp32) | bf16 | fp16 | fp32",
    "data_path": "auto (decoded data on the training device, batched augmentation) | device | dataloader",
    "channels_last": "NHWC memory format (default: on for CNNs, off for ViTs)",
    "tta": "evaluation with test-time augmentation: none | flip",
    "checkpoint_every": "epochs between checkpoints (the last epoch and an early stop always save one)",
    "tokenizer": "ViT tokenizer: patch | pixel | vq | hybrid",
    "device": "auto | cpu | cuda | cuda:N",
    "time_budget_min": "stop cleanly after this many minutes (continue with --resume)",
}
_CHOICES = {
    "amp": ["auto", "bf16", "fp16", "fp32"],
    "optimizer": ["adamw", "sgd"],
    "on_corrupt": ["warn", "error"],
    "data_path": ["auto", "device", "dataloader"],
}


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model", description="Train a model; every flag overrides --config."
    )
    add_run_arguments(p, TrainConfig, _HELP, choices=_CHOICES)
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="evaluate a run directory or checkpoint on a test split")
    e.add_argument("run", help="run directory or .safetensors checkpoint (or a model name with --pretrained)")
    e.add_argument("--data", default=None, help="dataset (default: the one the run trained on)")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--which", default="last", choices=["last", "best"])
    e.add_argument("--pretrained", action="store_true", help="RUN is a model name: load the hub's weights")
    e.add_argument("--batch-size", type=_positive_int, default=256)
    e.add_argument("--device", default="auto")
    e.add_argument(
        "--allow-class-mismatch",
        action="store_true",
        help="evaluate even when the data's classes differ from the run's (labels are compared by index)",
    )
    e.set_defaults(func=run_eval)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


_positive_int.__name__ = "positive int"  # argparse: "invalid positive int value: '0'"


def run_train(args) -> int:
    from ..train import train

    return run_training(TrainConfig, train, args)


def run_eval(args) -> int:
    from ..data import build_data
    from ..data.build import run_stats
    from ..models.loading import load_model
    from ..train.harness import resolve_device
    from ..train.trainer import evaluate

    device = resolve_device(args.device)
    model, meta = load_model(args.run, which=args.which, pretrained=args.pretrained)
    if meta.get("task"):  # image classifiers record none; the text tasks do
        verb = (
            "vitlens translate RUN --file SRC --ref REF"
            if meta["task"] == "translation"
            else "vitlens lm sample"
        )
        raise ModelError(f"{args.run} is a {meta['task']} run, not an image classifier; try `{verb}`")
    # a hub model sees images through its own resize, crop, interpolation and mean/std
    # (meta["preprocess"]); a vitlens run at its recorded size
    _, test_ds, info = build_data(
        args.data or meta.get("data", "cifar10-mini"),
        args.data_dir,
        img_size=meta.get("img_size"),
        preprocess=meta.get("preprocess"),
        **run_stats(meta),  # a fine-tune from pretrained weights: their mean/std, as it trained
    )
    check_classes(meta.get("classes"), info.classes, allow=args.allow_class_mismatch)
    result = evaluate(model.to(device), test_ds, batch_size=args.batch_size, device=device, progress=True)
    print(json.dumps(result, indent=2))
    return 0


def check_classes(run_classes: list[str] | None, data_classes: list[str], *, allow: bool) -> None:
    """A model scored on data whose labels mean something else reports a meaningless accuracy."""
    if run_classes is None or list(run_classes) == list(data_classes):
        return
    if len(run_classes) != len(data_classes):
        problem = f"the run has {len(run_classes)} classes but the data has {len(data_classes)}"
    else:
        diff = [(i, r, d) for i, (r, d) in enumerate(zip(run_classes, data_classes)) if r != d]
        shown = ", ".join(f"#{i}: {r!r} vs {d!r}" for i, r, d in diff[:3])
        problem = f"the run's class names differ from the data's ({shown}{', ...' if len(diff) > 3 else ''})"
    if allow:
        import sys

        print(f"warning: {problem}; evaluating anyway (--allow-class-mismatch)", file=sys.stderr)
        return
    raise DataError(f"{problem}; evaluate on the dataset the run trained on, or pass --allow-class-mismatch")
