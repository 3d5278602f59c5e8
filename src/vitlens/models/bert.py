"""BERT: an encoder-only Transformer pretrained as a masked language model (Devlin et al. 2019).

Reading order: config -> token + learned position embeddings, LayerNorm -> bidirectional
blocks (``vitlens.layers.Block``; post-norm as in the paper, ``norm_first=True`` for
pre-norm) that never attend to padding -> two heads:

* the MLM head (dense, GELU, LayerNorm, then a decoder tied to the token embeddings) predicts
  the tokens hidden by :func:`mask_tokens` — 15% of the tokens, of which 80% become [MASK],
  10% a random token and 10% stay as they are;
* the classification head reads the [CLS] token (position 0) through BERT's tanh "pooler".

``forward`` is ``forward_head(forward_features(ids))`` like the vision models: class logits
(or the pooled [CLS] vector when ``num_classes=0``). Pretraining calls ``forward_mlm``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import ModelError
from ..layers import Block, HookPoint, LayerNorm
from .inputs import check_token_ids, model_label
from .registry import register_models


@dataclass
class BertConfig:
    vocab_size: int = 69  # Tiny Shakespeare's 65 characters + [PAD] [MASK] [CLS] [SEP]
    max_len: int = 256
    depth: int = 4
    num_heads: int = 4
    embed_dim: int = 256
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    norm_first: bool = False  # BERT is post-norm
    num_classes: int = 0  # size of the [CLS] classifier; 0: forward returns the pooled vector
    pad_id: int = 0


class Bert(nn.Module):
    """Token ids (B, T) -> contextual vectors; heads for masked tokens and for the class of [CLS]."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.tok_embed = nn.Embedding(cfg.vocab_size, D, padding_idx=cfg.pad_id)
        self.pos_embed = nn.Embedding(cfg.max_len, D)
        self.embed_norm = LayerNorm(D)
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(
            Block(
                D,
                cfg.num_heads,
                cfg.mlp_ratio,
                proj_drop=cfg.dropout,
                attn_drop=cfg.dropout,
                norm_first=cfg.norm_first,
            )
            for _ in range(cfg.depth)
        )
        self.norm = LayerNorm(D) if cfg.norm_first else nn.Identity()  # post-norm blocks end normalised
        # MLM head ("transform" + tied decoder with its own bias).
        self.mlm_dense = nn.Linear(D, D)
        self.mlm_act = nn.GELU()
        self.mlm_norm = LayerNorm(D)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        # [CLS] classification head.
        self.pooler = nn.Linear(D, D)
        self.hook_pre_logits = HookPoint()
        self.head_drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.tok_embed.weight[self.cfg.pad_id].zero_()

    def padding_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return ids == self.cfg.pad_id  # (B, T) True = padding

    def forward_features(
        self, ids: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token ids (B, T) -> contextual states (B, T, D). Padding (``pad_id`` unless a mask is given)
        is never attended to."""
        who = model_label(self)
        check_token_ids(ids, self.cfg.vocab_size, who)
        T = ids.shape[1]
        if T > self.cfg.max_len:
            raise ModelError(
                f"sequence of {T} tokens exceeds the max_len of {who} ({self.cfg.max_len}, its learned "
                f"position table); truncate it to {self.cfg.max_len} tokens"
            )
        if key_padding_mask is None:
            key_padding_mask = self.padding_mask(ids)
        if not key_padding_mask.any():
            key_padding_mask = None  # no padding: keep the fused attention kernel
        pos = torch.arange(T, device=ids.device)
        x = self.hook_embed(self.drop(self.embed_norm(self.tok_embed(ids) + self.pos_embed(pos))))
        for blk in self.blocks:
            x = blk(x, key_padding_mask=key_padding_mask)
        return self.norm(x)

    def forward_mlm(self, x: torch.Tensor) -> torch.Tensor:
        """States (B, T, D) -> vocabulary logits (B, T, vocab) through the tied decoder."""
        h = self.mlm_norm(self.mlm_act(self.mlm_dense(x)))
        return h @ self.tok_embed.weight.t() + self.mlm_bias

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.hook_pre_logits(torch.tanh(self.pooler(x[:, 0])))  # the [CLS] state
        pooled = self.head_drop(pooled)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, ids: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(ids, key_padding_mask))

    def config_dict(self) -> dict:
        return asdict(self.cfg)


def mask_tokens(
    ids: torch.Tensor,
    *,
    vocab_size: int,
    mask_id: int,
    special_mask: torch.Tensor | None = None,
    mlm_prob: float = 0.15,
    random_low: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: returns ``(inputs, labels)``; labels are -100 except at chosen positions.

    ``mlm_prob`` of the non-special tokens are chosen; of those 80% become ``mask_id``, 10% a
    token drawn uniformly from ``[random_low, vocab_size)`` (pass the first non-special id so
    no [PAD]/[CLS] appears), and 10% are left unchanged (so the model cannot tell which
    visible tokens it will be asked about).
    """
    g = dict(generator=generator, device=ids.device)
    chosen = torch.rand(ids.shape, **g) < mlm_prob
    if special_mask is not None:
        chosen &= ~special_mask
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, **g)
    to_mask = chosen & (r < 0.8)
    to_random = chosen & (r >= 0.8) & (r < 0.9)
    inputs = ids.clone()
    inputs[to_mask] = mask_id
    random_tokens = torch.randint(random_low, vocab_size, ids.shape, **g)
    inputs[to_random] = random_tokens[to_random]
    return inputs, labels


register_models(Bert, BertConfig, {
    # 4 layers, 4 heads, 256 wide (the size of Turc et al.'s BERT-Mini), context 256
    "bert_mini": dict(depth=4, num_heads=4, embed_dim=256, max_len=256),
    # 2 layers, 2 heads, 32 wide, context 64: for tests
    "bert_nano": dict(depth=2, num_heads=2, embed_dim=32, max_len=64, dropout=0.0),
})
