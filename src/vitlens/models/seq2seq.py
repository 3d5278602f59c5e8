"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017).

Reading order: config -> embeddings scaled by sqrt(d) plus fixed sinusoidal positions ->
encoder (``Block``: self-attention that ignores source padding) -> decoder (``CrossBlock``:
masked self-attention, cross-attention over the encoder output, MLP) -> output projection,
tied to the target embedding (and, with a joint subword vocabulary, to the source one too:
the three-way tying of the paper).

Pre-norm by default (more forgiving of short schedules); ``norm_first=False`` is the
paper's post-norm. Decoding (greedy, beam search) lives in ``vitlens.text.decode`` and uses
``encode`` once and ``decode`` step by step with a per-layer key/value cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import ModelError
from ..layers import Block, CrossBlock, HookPoint, LayerNorm, sincos_1d
from .inputs import check_token_ids, model_label
from .registry import register_models


@dataclass
class Seq2SeqConfig:
    src_vocab_size: int = 8000
    tgt_vocab_size: int = 8000
    d_model: int = 256
    num_heads: int = 8
    enc_layers: int = 3
    dec_layers: int = 3
    mlp_dim: int = 512
    dropout: float = 0.1
    max_len: int = 256
    norm_first: bool = True
    tie_embeddings: bool = True  # output projection = target embedding
    share_src_tgt_embed: bool = True  # one embedding for both languages (needs a joint vocabulary)
    pad_id: int = 0

    def __post_init__(self):
        if self.share_src_tgt_embed and self.src_vocab_size != self.tgt_vocab_size:
            raise ModelError(
                "share_src_tgt_embed needs one joint vocabulary (src_vocab_size == tgt_vocab_size); "
                "set share_src_tgt_embed=False for separate vocabularies"
            )


class Seq2SeqTransformer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab_size, D, padding_idx=cfg.pad_id)
        self.src_embed = (
            self.tgt_embed
            if cfg.share_src_tgt_embed
            else nn.Embedding(cfg.src_vocab_size, D, padding_idx=cfg.pad_id)
        )
        self.register_buffer("pos_table", sincos_1d(cfg.max_len, D), persistent=False)  # (max_len, D)
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_src_embed = HookPoint()
        self.hook_tgt_embed = HookPoint()
        mlp_ratio = cfg.mlp_dim / D
        kw = dict(proj_drop=cfg.dropout, attn_drop=cfg.dropout, norm_first=cfg.norm_first)
        self.encoder = nn.ModuleList(Block(D, cfg.num_heads, mlp_ratio, **kw) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(
            CrossBlock(D, cfg.num_heads, mlp_ratio, **kw) for _ in range(cfg.dec_layers)
        )
        # Pre-norm stacks need a final norm; post-norm blocks already end in one.
        self.enc_norm = LayerNorm(D) if cfg.norm_first else nn.Identity()
        self.dec_norm = LayerNorm(D) if cfg.norm_first else nn.Identity()
        self.head = nn.Linear(D, cfg.tgt_vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.tgt_embed.weight

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Embeddings N(0, d^-1/2): after the sqrt(d) scale they have unit variance like the
        # sinusoids, and as the tied output matrix they give unit-scale logits.
        for emb in {id(self.src_embed): self.src_embed, id(self.tgt_embed): self.tgt_embed}.values():
            nn.init.normal_(emb.weight, std=self.cfg.d_model**-0.5)
            with torch.no_grad():
                emb.weight[self.cfg.pad_id].zero_()

    def _embed(self, emb: nn.Embedding, ids: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        check_token_ids(ids, emb.num_embeddings, model_label(self))
        T = ids.shape[1]
        if start_pos + T > self.cfg.max_len:
            raise ModelError(
                f"sequence of {start_pos + T} tokens exceeds max_len {self.cfg.max_len}; "
                "truncate the input or build the model with a larger max_len (its sinusoidal positions "
                "need no training)"
            )
        pos = self.pos_table[start_pos : start_pos + T]  # (T, D)
        return self.drop(emb(ids) * math.sqrt(self.cfg.d_model) + pos)

    def padding_mask(self, ids: torch.Tensor) -> torch.Tensor | None:
        mask = ids == self.cfg.pad_id  # (B, T) True = padding
        return mask if mask.any() else None  # None keeps the fused kernel

    def encode(self, src: torch.Tensor, src_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids (B, S) -> memory (B, S, D)."""
        x = self.hook_src_embed(self._embed(self.src_embed, src))
        for blk in self.encoder:
            x = blk(x, key_padding_mask=src_padding_mask)
        return self.enc_norm(x)

    def decode(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        src_padding_mask: torch.Tensor | None = None,
        *,
        tgt_padding_mask: torch.Tensor | None = None,
        kv_cache: list[dict] | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """Target ids (B, T) (shifted right: <s> first) -> decoder states (B, T, D).

        With ``kv_cache`` (one dict per decoder block) ``tgt`` holds only the new tokens and
        ``start_pos`` how many came before. Target padding needs no mask: padding sits after
        every real token, so the causal mask already hides it from them.
        """
        if memory is None:
            raise ModelError("decode needs the encoder's output as memory; compute it with model.encode(src)")
        x = self.hook_tgt_embed(self._embed(self.tgt_embed, tgt, start_pos))
        if memory.shape[0] not in (1, tgt.shape[0]):  # one memory broadcasts to every target
            raise ModelError(
                f"{tgt.shape[0]} target sequence(s) but {memory.shape[0]} source sequence(s) in memory; "
                "give one target per source"
            )
        for i, blk in enumerate(self.decoder):
            x = blk(
                x,
                memory,
                key_padding_mask=tgt_padding_mask,
                context_padding_mask=src_padding_mask,
                is_causal=True,
                kv_cache=None if kv_cache is None else kv_cache[i],
            )
        return self.dec_norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)  # (B, T, tgt_vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits (B, T, vocab) for every position of the shifted target."""
        src_mask = self.padding_mask(src)
        return self.forward_head(self.decode(tgt, self.encode(src, src_mask), src_mask))

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.decoder]

    def config_dict(self) -> dict:
        return asdict(self.cfg)


register_models(Seq2SeqTransformer, Seq2SeqConfig, {
    # 3 + 3 layers, d=256, MLP 512, 8 heads: the small Multi30k model (~6M parameters with a joint,
    # three-way-tied 8k BPE vocabulary; ~9M with separate 10k source and target embeddings)
    "transformer_multi30k": dict(d_model=256, mlp_dim=512, num_heads=8, enc_layers=3, dec_layers=3),
    # the paper's base model: 6 + 6 layers, d=512, MLP 2048, 8 heads
    "transformer_base": dict(d_model=512, mlp_dim=2048, num_heads=8, enc_layers=6, dec_layers=6,
                             src_vocab_size=37000, tgt_vocab_size=37000),
    # 1 + 1 layers, d=32, 2 heads, vocab 64: for tests
    "transformer_nano": dict(d_model=32, mlp_dim=64, num_heads=2, enc_layers=1, dec_layers=1,
                             src_vocab_size=64, tgt_vocab_size=64, dropout=0.0, max_len=64),
})
