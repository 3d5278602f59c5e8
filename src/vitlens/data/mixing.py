"""Batch-level MixUp / CutMix (torchvision.transforms.v2), always returning soft labels.

They act on a whole batch - (B, C, H, W) images and (B,) int labels - so they run after the
DataLoader, in the training loop. When ``prob < 1`` a batch may pass through unmixed; its labels
are still returned one-hot, so the loss always sees (B, num_classes) soft targets.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from ..errors import ConfigError


class BatchMixer:
    """``(images, labels) -> (images, soft_labels)``: with probability ``prob`` apply one of ``mixers``."""

    def __init__(self, num_classes: int, mixers: list, prob: float = 1.0):
        self.num_classes, self.prob = num_classes, prob
        self.mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if labels.ndim != 1:
            raise ValueError(
                f"labels must be a (B,) tensor of class indices, got shape {tuple(labels.shape)}"
            )
        labels = labels.long()
        if self.prob >= 1.0 or torch.rand(()).item() < self.prob:
            return self.mix(images, labels)
        return images, torch.nn.functional.one_hot(labels, self.num_classes).to(images.dtype)

    def __repr__(self) -> str:
        return f"BatchMixer(prob={self.prob}, {self.mix})"


def build_batch_mixer(
    num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0
) -> BatchMixer | None:
    """MixUp and/or CutMix (chosen at random per batch when both alphas are > 0); ``None`` when both are 0."""
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ConfigError(
            f"mixup_alpha and cutmix_alpha must be >= 0 (0 disables), got {mixup_alpha}, {cutmix_alpha}"
        )
    if not 0.0 <= prob <= 1.0:
        raise ConfigError(f"prob is the chance a batch gets mixed, in [0, 1]; got {prob}")
    mixers = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers or prob == 0.0:
        return None
    return BatchMixer(num_classes, mixers, prob)
