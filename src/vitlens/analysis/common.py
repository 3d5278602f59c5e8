"""Small helpers shared by every analysis: images out of a batch, the fixed image subset, "is it a ViT".

The analyses (CKA, attention statistics, probes) and the commands and the study that call them
must agree on these, or two figures of one report would quietly be computed on different images
or call different models transformers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..utils import to_2tuple

__all__ = ["batch_images", "image_subset", "indices_fingerprint", "is_vit", "patch_grid", "subset_indices"]

_IMAGE_KEYS = ("pixel_values", "images", "image", "x")  # Hugging Face, then common dataset dict keys


def batch_images(batch) -> torch.Tensor:
    """Images from a data-loader batch: a tensor, the first item of ``(images, labels, ...)``, or a
    dict's ``pixel_values`` / ``images`` / ``image`` / ``x``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in _IMAGE_KEYS:
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise TypeError(
        f"cannot find images in a batch of type {type(batch).__name__}; data must yield image tensors, "
        f"(images, labels) tuples or dicts with one of the keys {_IMAGE_KEYS}"
    )


# ----------------------------------------------------------------------------- the fixed image subset
def subset_indices(num_items: int, max_images: int | None, seed: int = 0) -> list[int]:
    """Sorted indices of a seeded random subset of ``max_images`` out of ``num_items`` (all if fewer).

    Random rather than the first ``max_images``: image folders are stored class by class, so the
    first images would all be one class (and a class probe trivially right). Sorted, so a loader
    reads the files in storage order. Same arguments, same indices, on every machine and rank.
    """
    if max_images is None or max_images >= num_items:
        return list(range(num_items))
    if max_images < 1:
        raise ConfigError(f"max_images must be >= 1 or None, got {max_images}")
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))[:max_images]
    return sorted(order.tolist())


def image_subset(dataset, max_images: int | None, seed: int = 0):
    """``dataset`` limited to :func:`subset_indices` (a ``torch.utils.data.Subset``; the dataset
    itself when it is not larger than ``max_images``)."""
    from torch.utils.data import Subset

    if max_images is None or max_images >= len(dataset):
        return dataset
    return Subset(dataset, subset_indices(len(dataset), max_images, seed))


def indices_fingerprint(indices: Sequence[int]) -> str:
    """A short, stable hash of an index list: two results with the same fingerprint saw the same images."""
    text = ",".join(str(int(i)) for i in indices)
    return "sha256:" + hashlib.sha256(text.encode("ascii")).hexdigest()[:16]


# ----------------------------------------------------------------------------- what kind of model
def patch_grid(model: nn.Module) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """``(grid_size, token_pixel_size)`` of a model whose tokens sit on a patch grid, else None.

    vitlens/timm ViTs: ``patch_embed.grid_size`` and ``token_pixel_size`` (tokenizers that are not
    a plain patch split) or ``patch_embed.patch_size``; Hugging Face ViTs: ``config.image_size //
    config.patch_size``.
    """
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "grid_size", None) is not None:
        px = (
            getattr(pe, "token_pixel_size", None) or getattr(model, "token_pixel_size", None) or pe.patch_size
        )
        return to_2tuple(pe.grid_size), to_2tuple(px)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "patch_size") and hasattr(cfg, "image_size"):
        img, patch = to_2tuple(cfg.image_size), to_2tuple(cfg.patch_size)
        return (img[0] // patch[0], img[1] // patch[1]), patch
    return None


def is_vit(model: nn.Module) -> bool:
    """A vision transformer, for the analyses: its tokens sit on a patch grid (see :func:`patch_grid`).

    The one test used everywhere (attention statistics, probes, the study's ViT x CNN pairs), so a
    model is never a ViT for one analysis and a CNN for another.
    """
    return patch_grid(model) is not None
