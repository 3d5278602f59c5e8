"""Transformer blocks: the one block library behind ViT, BERT, GPT and the translation model.

``Block`` is the encoder/decoder-only block (self-attention + MLP); ``CrossBlock`` adds the
cross-attention sub-layer of the original encoder-decoder's decoder. Both are pre-norm by
default (ViT, GPT-2); ``norm_first=False`` gives the post-norm of Vaswani et al. 2017 / BERT.
Names follow timm (norm1, attn, ls1, drop_path1, norm2, mlp, ...) for checkpoint interop.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from .attention import Attention
from .hooks import HookPoint
from .mlp import Mlp

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT, Touvron et al. 2021)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


def _drop_path(p: float) -> nn.Module:
    # Stochastic depth drops the whole residual branch per sample ("row" mode).
    return StochasticDepth(p, "row") if p > 0 else nn.Identity()


class Block(nn.Module):
    """x + attn(norm1(x)); x + mlp(norm2(x)) (pre-norm), or the post-norm variant.

    Hook points: ``attn`` and ``mlp`` module outputs are each branch's contribution, ``hook_resid_mid``
    the residual stream between the two sub-layers; the block's own output is the stream after it.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        norm_layer=LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        norm_first: bool = True,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = _drop_path(drop_path)
        self.hook_resid_mid = HookPoint()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = _drop_path(drop_path)

    def forward(self, x, *, attn_mask=None, key_padding_mask=None, is_causal=False, kv_cache=None):
        attn_kw = dict(
            attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal, kv_cache=kv_cache
        )
        if self.norm_first:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), **attn_kw)))
            x = self.hook_resid_mid(x)
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        x = self.norm1(x + self.drop_path1(self.ls1(self.attn(x, **attn_kw))))
        x = self.hook_resid_mid(x)
        return self.norm2(x + self.drop_path2(self.ls2(self.mlp(x))))


class CrossBlock(nn.Module):
    """Decoder block of the encoder-decoder: masked self-attention, cross-attention, MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer=LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        norm_first: bool = True,
        context_dim: int | None = None,
    ):
        super().__init__()
        self.norm_first = norm_first
        attn_kw = dict(qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, **attn_kw)
        self.norm2 = norm_layer(dim)
        self.cross_attn = Attention(dim, num_heads, cross=True, context_dim=context_dim, **attn_kw)
        self.norm3 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path = _drop_path(drop_path)

    def forward(
        self, x, context, *, key_padding_mask=None, context_padding_mask=None, is_causal=True, kv_cache=None
    ):
        self_kw = dict(key_padding_mask=key_padding_mask, is_causal=is_causal, kv_cache=kv_cache)
        sublayers = (
            (self.norm1, lambda h: self.attn(h, **self_kw)),
            (self.norm2, lambda h: self.cross_attn(h, context, key_padding_mask=context_padding_mask)),
            (self.norm3, self.mlp),
        )
        for norm, fn in sublayers:
            x = x + self.drop_path(fn(norm(x))) if self.norm_first else norm(x + self.drop_path(fn(x)))
        return x
