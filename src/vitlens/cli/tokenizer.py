"""``vitlens train-tokenizer``: fit an image tokenizer (VQ-VAE or k-means palette) on a dataset.

    vitlens train-tokenizer --data cifar10 --data-dir ../shared/data/cifar10 --out runs/vq --epochs 5
    vitlens train-tokenizer --kind palette --data cifar10 --data-dir ../shared/data/cifar10 --out runs/palette

then ``vitlens train --tokenizer vq`` with ``tokenizer_args={"checkpoint": "runs/vq/tokenizer.safetensors"}``
(or ``{"palette": "runs/palette/palette.safetensors"}`` for ``--tokenizer pixel``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields


def register(sub) -> None:
    from ..train.tokenizer import TokenizerTrainConfig

    p = sub.add_parser(
        "train-tokenizer",
        help="train a VQ-VAE image tokenizer or fit a colour palette",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = TokenizerTrainConfig()
    for f in fields(TokenizerTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif f.name == "kind":
            p.add_argument(
                flag,
                choices=["vq", "palette"],
                default=value,
                help="vq: train a VQ-VAE (tokenizer.safetensors); "
                "palette: k-means colours (palette.safetensors)",
            )
        else:
            # f.type is the annotation as text ("float | None"): int, float, or a string
            typ = int if f.type.startswith("int") else float if f.type.startswith("float") else str
            p.add_argument(flag, type=typ, default=value, help=f"(default: {value})")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.tokenizer import TokenizerTrainConfig, train_tokenizer

    values = {f.name: getattr(args, f.name) for f in fields(TokenizerTrainConfig)}
    summary = train_tokenizer(TokenizerTrainConfig(**values))
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0
