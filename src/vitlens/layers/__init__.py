"""Reusable building blocks shared by every vitlens model."""

from .attention import Attention, build_attention_mask
from .block import Block, CrossBlock, LayerNorm, LayerScale
from .hooks import HookPoint
from .mlp import Mlp
from .patch_embed import PatchEmbed, check_divisible
from .pos_embed import resample_pos_embed, sincos_1d, sincos_2d

__all__ = [
    "Attention", "build_attention_mask", "Block", "CrossBlock", "LayerNorm", "LayerScale", "HookPoint", "Mlp",
    "PatchEmbed", "check_divisible", "resample_pos_embed", "sincos_1d", "sincos_2d",
]
