"""What the tokenizers share: the input convention (dataset-normalised images) and its inverse."""

from __future__ import annotations

import torch

from ...errors import ModelError


def input_stats(args: dict | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the ViT's inputs were normalised with: ``tokenizer_args`` 'mean'/'std',
    CIFAR-10's by default (what ``vitlens.data.build_data`` uses for cifar10 and cifar10-mini)."""
    from ...data.transforms import CIFAR10_MEAN, CIFAR10_STD  # lazy: keeps `import vitlens` light

    args = args or {}
    mean = tuple(float(v) for v in (args.get("mean") or CIFAR10_MEAN))
    std = tuple(float(v) for v in (args.get("std") or CIFAR10_STD))
    if len(mean) != 3 or len(std) != 3:
        raise ModelError(f"tokenizer_args mean/std need 3 values (RGB), got mean={mean} std={std}")
    return mean, std


class Unnormalize(torch.nn.Module):
    """(x - mean) / std  ->  x in [0, 1]: undoes the data pipeline's Normalize (non-persistent buffers)."""

    def __init__(self, mean=None, std=None):
        super().__init__()
        mean, std = input_stats({"mean": mean, "std": std})
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.std + self.mean).clamp(0, 1)
