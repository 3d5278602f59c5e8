"""``vitlens train-tokenizer``: fit an image tokenizer (VQ-VAE or k-means palette) on a dataset.

    vitlens train-tokenizer --data cifar10 --data-dir ../shared/data/cifar10 --out runs/vq --epochs 5
    vitlens train-tokenizer --kind palette --data cifar10 --data-dir ../shared/data/cifar10 --out runs/palette

then ``vitlens train --tokenizer vq`` with ``tokenizer_args={"checkpoint": "runs/vq/tokenizer.safetensors"}``
(or ``{"palette": "runs/palette/palette.safetensors"}`` for ``--tokenizer pixel``).
"""

from __future__ import annotations

import argparse

from . import add_run_arguments, run_training

_HELP = {
    "kind": "vq: train a VQ-VAE (tokenizer.safetensors); palette: k-means colours (palette.safetensors)",
    "data": "cifar10-mini | cifar10 | cifar100 | imagefolder",
    "init": "start from this tokenizer file (same model options), with a fresh schedule",
    "time_budget_min": "stop after the epoch that exceeds this many minutes",
}


def register(sub) -> None:
    from ..train.tokenizer import TokenizerTrainConfig

    p = sub.add_parser(
        "train-tokenizer",
        help="train a VQ-VAE image tokenizer or fit a colour palette",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(p, TokenizerTrainConfig, _HELP, choices={"kind": ["vq", "palette"]})
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.tokenizer import TokenizerTrainConfig, train_tokenizer

    without_config = lambda summary: {k: v for k, v in summary.items() if k != "config"}
    return run_training(TokenizerTrainConfig, train_tokenizer, args, show=without_config)
