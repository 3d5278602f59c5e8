"""``vitlens train`` and ``vitlens eval``."""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields

from ..train.config import TrainConfig

_HELP = {
    "model": "registered model name (see `vitlens models`)",
    "model_args": 'JSON overrides of the model config, e.g. \'{"pool": "gap"}\'',
    "data": "cifar10-mini (embedded, default) | cifar10 | cifar100 | imagefolder",
    "data_dir": "where the dataset lives (a directory or a .tar/.tar.gz of an ImageFolder)",
    "fraction": "class-balanced, nested fraction of the training split (0.1 contains 0.05)",
    "out": "run directory (metrics, checkpoints, config)",
    "amp": "auto | bf16 | fp16 | fp32",
    "tokenizer": "ViT tokenizer: patch | pixel | vq | hybrid",
}


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; unset flags keep the config file's (or default) value."""
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        kw = {"default": argparse.SUPPRESS, "help": f"{_HELP.get(f.name, '')} (default: {default})".strip()}
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "model_args":
            p.add_argument(flag, type=json.loads, **kw)
        else:
            p.add_argument(flag, type=_parse_type(f.type), **kw)


def _parse_type(t):
    t = str(t)
    if t.startswith("int"):
        return int
    if t.startswith("float"):
        return float
    if "float" in t:  # float | None
        return float
    if "int" in t:
        return int
    return str


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model", description="Train a model; every flag overrides --config."
    )
    p.add_argument("--config", help="YAML/JSON TrainConfig file")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_config_arguments(p)
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="evaluate a run directory or checkpoint on a test split")
    e.add_argument("run", help="run directory or .safetensors checkpoint")
    e.add_argument("--data", default=None, help="dataset (default: the one the run trained on)")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--which", default="last", choices=["last", "best"])
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="auto")
    e.set_defaults(func=run_eval)


def run_train(args) -> int:
    from ..train import train

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    cfg = TrainConfig.from_file(args.config, **overrides) if args.config else TrainConfig.from_dict(overrides)
    summary = train(cfg, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0


def run_eval(args) -> int:
    from ..data import build_data
    from ..models.loading import load_run_model
    from ..train.trainer import evaluate, resolve_device

    model, meta = load_run_model(args.run, args.which)
    device = resolve_device(args.device)
    _, test_ds, _ = build_data(
        args.data or meta.get("data", "cifar10-mini"), args.data_dir, img_size=meta.get("img_size")
    )
    result = evaluate(model.to(device), test_ds, batch_size=args.batch_size, device=device, progress=True)
    print(json.dumps(result, indent=2))
    return 0
