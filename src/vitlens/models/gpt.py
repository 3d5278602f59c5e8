"""GPT: a decoder-only Transformer language model (Radford et al. 2018/2019; nanoGPT layout).

Reading order: config -> token + learned position embeddings -> causal pre-norm blocks
(the same ``vitlens.layers.Block`` as the ViT, run with ``is_causal=True``) -> final norm ->
LM head whose weight is the token embedding (weight tying, Press & Wolf 2017).

Generation keeps a key/value cache: one ``{"k", "v"}`` dict per block, which each block's
``Attention`` extends with the keys and values of the new tokens. The prompt is encoded once
("prefill"); afterwards every step feeds only the newest token (q_len=1 against k_len=t
cached keys; the causal mask with a query offset lets it see all of them). Once the
sequence outgrows the context window, positions would shift, so each further step
re-encodes the last ``block_size`` tokens exactly as full recomputation does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from ..layers import Block, HookPoint, LayerNorm
from .inputs import check_token_ids, model_label
from .registry import register_models


@dataclass
class GPTConfig:
    vocab_size: int = 65  # Tiny Shakespeare has 65 distinct characters
    block_size: int = 256  # context length
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    mlp_ratio: float = 4.0
    dropout: float = 0.2
    bias: bool = True
    tie_weights: bool = True  # LM head shares the token-embedding matrix

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ModelError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, D)
        self.wpe = nn.Embedding(cfg.block_size, D)  # GPT-2: learned absolute positions
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_embed = HookPoint()  # residual stream entering block 0
        self.blocks = nn.ModuleList(
            Block(
                D, cfg.n_head, cfg.mlp_ratio, qkv_bias=cfg.bias, proj_drop=cfg.dropout, attn_drop=cfg.dropout
            )
            for _ in range(cfg.n_layer)
        )
        self.norm = LayerNorm(D)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight

    def _init_weights(self) -> None:
        # GPT-2: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * n_layer)
        # so the residual stream's variance does not grow with depth.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layer))

    # -- forward ---------------------------------------------------------------------------
    def forward_features(
        self, idx: torch.Tensor, *, kv_cache: list[dict] | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        """Token ids (B, T) -> final-norm hidden states (B, T, D).

        With ``kv_cache`` (one dict per block) the ids are the *new* tokens and ``start_pos``
        the number already in the cache, which is where their positions start.
        """
        who = model_label(self)
        check_token_ids(idx, self.cfg.vocab_size, who)
        T = idx.shape[1]
        if start_pos + T > self.cfg.block_size:
            raise ModelError(
                f"sequence of {start_pos + T} tokens exceeds the context of {who} ({self.cfg.block_size} "
                f"tokens); crop it to the last {self.cfg.block_size} tokens (generate() does this itself)"
            )
        if kv_cache is not None and len(kv_cache) != len(self.blocks):
            raise ModelError(
                f"kv_cache needs one dict per block ({len(self.blocks)}), got {len(kv_cache)}; start it "
                "with model.new_cache()"
            )
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)
        x = self.hook_embed(self.drop(self.wte(idx) + self.wpe(pos)))  # (B, T, D)
        for i, blk in enumerate(self.blocks):
            x = blk(x, is_causal=True, kv_cache=None if kv_cache is None else kv_cache[i])
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)  # (B, T, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (B, T, vocab); with ``targets`` (B, T) returns ``(logits, mean cross-entropy)``."""
        logits = self.forward_head(self.forward_features(idx))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.blocks]

    # -- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` (B, T). ``temperature=0`` is greedy."""
        if temperature < 0:
            raise ModelError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        bs = self.cfg.block_size
        cache, cached = None, 0  # cached: tokens whose keys/values are in the cache
        for _ in range(max_new_tokens):
            if use_cache and cache is not None and idx.shape[1] <= bs:
                x = self.forward_features(idx[:, cached:], kv_cache=cache, start_pos=cached)
            else:
                # Prefill (first step, or every step once past the context window: a sliding window).
                cache = self.new_cache() if use_cache else None
                window = idx[:, -bs:]
                x = self.forward_features(window, kv_cache=cache)
            cached = idx.shape[1]
            logits = self.forward_head(x[:, -1]).float()  # (B, vocab)
            idx = torch.cat([idx, sample_next(logits, temperature, top_k, generator)], dim=1)
        return idx

    def config_dict(self) -> dict:
        return asdict(self.cfg)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, vocab) logits -> (B, 1) next tokens: greedy at temperature 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


register_models(GPT, GPTConfig, {
    # nanoGPT's Shakespeare-char "baby GPT": 6 layers, 6 heads, 384 wide, context 256 (~10.7M params)
    "gpt_char_baby": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
    # 4 layers, 4 heads, 128 wide, context 128: a character model that learns in minutes on a CPU
    "gpt_char_mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0),
    # 2 layers, 2 heads, 32 wide, context 64: for tests
    "gpt_nano": dict(n_layer=2, n_head=2, n_embd=32, block_size=64, dropout=0.0),
})
