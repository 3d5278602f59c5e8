"""Checks at a model's entry (``forward_features``, ``encode``/``decode``): a wrong input is a
:class:`~vitlens.errors.ModelError` that names the problem and the fix, instead of a torch error
from deep inside (an embedding's "index out of range in self", a convolution's dtype clash)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError


def model_label(model: nn.Module) -> str:
    """The name a model was built under (``create_model`` records it), else its class name."""
    return getattr(model, "model_name", None) or type(model).__name__


def check_image_batch(x: torch.Tensor, in_chans: int, who: str) -> None:
    """A float batch (B, in_chans, H, W); the image size is the model's own business."""
    if x.dim() != 4:
        fix = "; add the batch dimension with x.unsqueeze(0)" if x.dim() == 3 else ""
        raise ModelError(
            f"{who} expects a batch of images (B, {in_chans}, H, W), got shape {tuple(x.shape)}{fix}"
        )
    if not x.is_floating_point():
        raise ModelError(
            f"{who} expects float images normalised like its training data, got {x.dtype}; convert them "
            "(x.float() / 255, then subtract the mean and divide by the std of the model's transforms)"
        )
    if x.shape[1] != in_chans:
        raise ModelError(
            f"{who} was built for {in_chans}-channel images, got {x.shape[1]}-channel images (shape "
            f"{tuple(x.shape)}); convert the images (e.g. grayscale to RGB) or build the model with "
            f"in_chans={x.shape[1]}"
        )


def check_token_ids(ids: torch.Tensor, vocab_size: int, who: str) -> None:
    """Integer ids (B, T) inside the vocabulary.

    The vocabulary check reads the ids' values, so it runs only on CPU tensors outside
    torch.compile: on an accelerator it would make every step wait for the device (there a bad id
    is a device-side assert), and under compile it would break the graph.
    """
    if ids.dim() != 2:
        fix = "; add the batch dimension with ids.unsqueeze(0)" if ids.dim() == 1 else ""
        raise ModelError(f"{who} expects token ids of shape (B, T), got {tuple(ids.shape)}{fix}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ModelError(
            f"{who} expects integer token ids, got {ids.dtype}; pass the ids its tokenizer gives as a "
            "torch.long tensor (ids.long())"
        )
    if ids.device.type == "cpu" and ids.numel() and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < 0 or high >= vocab_size:
            bad = high if high >= vocab_size else low
            raise ModelError(
                f"token id {bad} is outside the vocabulary of {who} (ids 0..{vocab_size - 1}); encode "
                "the text with the tokenizer the model was trained with"
            )
