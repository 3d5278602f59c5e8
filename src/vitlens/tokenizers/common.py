"""What the tokenizers share: the input convention (dataset-normalised images) and its inverse."""

from __future__ import annotations

import torch

from ..data.transforms import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "input_stats", "unnormalize"]


def input_stats(args: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the ViT's inputs were normalised with: ``tokenizer_args`` 'mean'/'std',
    CIFAR-10's by default (what ``build_data`` uses for cifar10 and cifar10-mini)."""
    mean = tuple(float(v) for v in args.get("mean", CIFAR10_MEAN))
    std = tuple(float(v) for v in args.get("std", CIFAR10_STD))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"tokenizer_args mean/std need 3 values (RGB), got mean={mean} std={std}")
    return mean, std


def unnormalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std  ->  x, clamped to [0, 1]. ``mean``/``std`` are (1, 3, 1, 1) buffers."""
    return (x.float() * std + mean).clamp(0, 1)
