"""Multi-head attention on ``F.scaled_dot_product_attention``.

One module serves self-attention (ViT, GPT, BERT, the encoder of the translation model)
and cross-attention (the decoder's attention over the encoder output). Parameter names
follow timm (``qkv``, ``proj``) so timm ViT checkpoints load without renaming.

Attention probabilities for analysis: the fused kernel never materialises them, so a layer
whose ``record_attn`` flag is set runs the explicit ``softmax(q k^T / sqrt(d))`` path and
passes the probabilities through the ``attn_probs`` hook point. Every other layer, and
every ordinary forward pass, keeps the fused kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .hooks import HookPoint

# Below this many keys, CPU training in bf16/fp16 spells attention out as two matrix products and a
# softmax, all in the reduced precision (the CPU softmax kernel computes in fp32 inside and rounds
# once). PyTorch's CPU flash-attention *backward* is 2-5x slower than that for short sequences, and
# SDPA's math backend first copies q, k, v to fp32 and checks for fully masked rows: a vit_micro
# training step (65 tokens, bf16) is 1.4-1.6x faster spelt out than on the math backend (torch 2.14,
# benchmarks/RESULTS.md); from ~200 keys flash wins. Inference and fp32 keep SDPA's kernels.
CPU_HALF_MATH_MAX_KEYS = 128


def _explicit_half_attention(q: torch.Tensor, num_keys: int) -> bool:
    """Whether this call is CPU training in bf16/fp16 at a short length (see CPU_HALF_MATH_MAX_KEYS)."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.requires_grad
            and num_keys <= CPU_HALF_MATH_MAX_KEYS)


def build_attention_mask(
    q_len: int,
    k_len: int,
    *,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Combine masks into one boolean mask where True means "may attend".

    key_padding_mask: (B, S) bool, True marks padding (PyTorch ``nn.MultiheadAttention``
    convention). attn_mask: (L, S) or (B, L, S) bool with True = allowed, or a float additive
    mask. Returns None when nothing is masked, so SDPA can pick its fastest kernel.
    """
    mask = None
    if is_causal:
        # Causal with a query offset: query i of the last q_len positions sees keys <= its position.
        offset = k_len - q_len
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=offset)
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            attn_mask = attn_mask > float("-inf")  # additive 0/-inf mask -> allowed
        mask = attn_mask if mask is None else mask & attn_mask
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = padding)")
        keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        mask = keep if mask is None else _per_head(mask) & keep
    return None if mask is None else _per_head(mask)


def _per_head(mask: torch.Tensor) -> torch.Tensor:
    """(L, S) -> (1, 1, L, S); (B, L, S) -> (B, 1, L, S): the same mask for every head."""
    if mask.dim() == 2:
        return mask[None, None]
    if mask.dim() == 3:
        return mask[:, None]
    return mask


class Attention(nn.Module):
    """Multi-head attention. ``cross=True`` projects queries from ``x`` and keys/values from ``context``."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        cross: bool = False,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            msg = f"dim {dim} is not divisible by num_heads {num_heads}; pick a head count that divides it"
            raise ModelError(msg)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.cross = cross
        if cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_probs = HookPoint()  # (B, heads, L, S); fires only while record_attn is set
        self.record_attn = False

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        kv_cache: dict | None = None,
    ) -> torch.Tensor:
        B, L, C = x.shape
        if self.cross:
            if context is None:
                raise ModelError(
                    "cross-attention needs a context (the encoder output); pass it as context=..."
                )
            q = self._split_heads(self.q(x))
            k, v = (self._split_heads(t) for t in self.kv(context).split(C, dim=-1))
        else:
            q, k, v = (self._split_heads(t) for t in self.qkv(x).split(C, dim=-1))
        if kv_cache is not None:
            # Generation: append this step's keys/values to the cached ones of earlier steps.
            if "k" in kv_cache:
                k = torch.cat([kv_cache["k"], k], dim=2)
                v = torch.cat([kv_cache["v"], v], dim=2)
            kv_cache["k"], kv_cache["v"] = k, v
        S = k.shape[2]
        mask = build_attention_mask(
            L, S, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal, device=x.device
        )
        drop = self.attn_drop if self.training else 0.0
        if self.record_attn or _explicit_half_attention(q, S):
            # Spelt out, the same maths as the fused kernel: for analysis (probabilities exposed), and
            # for CPU training in bf16/fp16 at short lengths (faster there; see CPU_HALF_MATH_MAX_KEYS).
            scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, nh, L, S)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            if self.record_attn:
                # softmax in fp32 at least (bf16/fp16 scores upcast, fp64 kept); fully masked rows -> 0
                acc = torch.promote_types(scores.dtype, torch.float32)
                probs = scores.to(acc).softmax(dim=-1).nan_to_num(0.0).to(q.dtype)
                probs = self.attn_probs(probs)
            else:  # the CPU kernel computes the softmax of bf16/fp16 scores in fp32 and rounds once
                probs = scores.softmax(dim=-1) if mask is None else scores.softmax(dim=-1).nan_to_num(0.0)
            out = F.dropout(probs, drop, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        out = out.transpose(1, 2).reshape(B, L, C)  # (B, L, nh*hd)
        return self.proj_drop(self.proj(out))
