"""Registered ViTs with the non-patch tokenizers (the CIFAR micro config, 128 wide, 4 blocks).

``vit_micro_pixel16_32`` (16x16 pixels -> 256 tokens), ``vit_micro_vq_32`` (8x8 VQ codes -> 64
tokens; pass ``tokenizer_args={"checkpoint": ...}``), ``vit_micro_hybrid_32`` (3-stage CIFAR
ResNet -> 8x8 feature map -> 64 tokens). Equal to
``create_model("vit_micro_patch4_32", tokenizer=..., tokenizer_args=...)``.
"""

from __future__ import annotations

from ..registry import register_model
from ..vit import _CIFAR, _vit

_MICRO = dict(_CIFAR, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0)


def _with_tokenizer(tokenizer: str, defaults: dict, kw: dict):
    args = {**defaults, **kw.pop("tokenizer_args", {})}
    return _vit(dict(_MICRO, tokenizer=tokenizer, tokenizer_args=args), kw)


@register_model
def vit_micro_pixel16_32(**kw):
    """iGPT-style: 32 px images box-downsampled to 16x16, each pixel one of 512 palette colours."""
    return _with_tokenizer("pixel", {"resolution": 16, "k": 512}, kw)


@register_model
def vit_micro_vq_32(**kw):
    """BEiT-style: the 8x8 code indices of a VQ-VAE (downsample 4) trained by `vitlens train-tokenizer`."""
    return _with_tokenizer("vq", {}, kw)


@register_model
def vit_micro_hybrid_32(**kw):
    """ViT-paper hybrid: CIFAR ResNet stem + 3 stages (32/64/128 wide, 1 block each) -> 8x8 tokens."""
    return _with_tokenizer("hybrid", {"layers": (1, 1, 1), "widths": (32, 64, 128)}, kw)
