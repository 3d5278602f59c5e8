"""Attention of the language models, read per head: maps, entropy, distance in tokens.

Recording goes through :func:`vitlens.analysis.attention.attention_probs`, the same path as the
image analyses (each vitlens ``Attention`` switched to its explicit-softmax path, probabilities
hooked at ``attn_probs``), so GPT, BERT and the encoder-decoder need nothing of their own. What
differs from images is the geometry: tokens sit on a line, so the distance between query i and
key j is |i - j| tokens, and some positions are padding.

* entropy of head h: mean over real (non-padding) queries of ``-sum_j a_ij log a_ij``, in nats.
  Masked keys have probability 0 and add nothing. For comparison, uniform attention over the
  visible keys gives ``log(#visible)``: log(L) for BERT, log(i + 1) for query i of a GPT.
* mean distance of head h: mean over real queries of ``sum_j a_ij |i - j|``. Padding keys get
  no attention (probability 0), so they never count. Self-attention only: a decoder's
  cross-attention relates positions of two different sentences.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from .attention import attention_entropy, attention_layers, attention_probs

# Run ``model(*inputs, **kwargs)`` in eval mode -> {layer name: probabilities (B, heads, L, S)}.
text_attention = attention_probs


def token_distances(q_len: int, k_len: int, query_offset: int | None = None) -> torch.Tensor:
    """(q_len, k_len) |i - j| in tokens. Query i sits at position ``query_offset + i``; the default
    ``k_len - q_len`` is the cached-decoding layout (the queries are the last positions)."""
    offset = k_len - q_len if query_offset is None else query_offset
    qpos = torch.arange(q_len, dtype=torch.float64)[:, None] + offset
    kpos = torch.arange(k_len, dtype=torch.float64)[None, :]
    return (qpos - kpos).abs()


def _query_weights(probs: torch.Tensor, query_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, L) weights: 1 for real queries, 0 for padding."""
    B, _, L, _ = probs.shape
    if query_padding_mask is None:
        return torch.ones(B, 1, L, dtype=torch.float64, device=probs.device)
    if query_padding_mask.shape != (B, L):
        raise ValueError(
            f"query_padding_mask must be (B, L) = {(B, L)}, got {tuple(query_padding_mask.shape)}"
        )
    return (~query_padding_mask).double()[:, None, :].to(probs.device)


def head_entropy(probs: torch.Tensor, query_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(heads,) mean attention entropy in nats over real queries; probs (B, heads, L, S)."""
    if probs.dim() != 4:
        raise ValueError(f"expected probabilities (B, heads, L, S), got {tuple(probs.shape)}")
    ent = attention_entropy(probs, reduce=False)  # (B, H, L); 0 log 0 = 0
    w = _query_weights(probs, query_padding_mask)  # (B, 1, L)
    return (ent * w).sum(dim=(0, 2)) / w.sum().clamp_min(1.0)


def head_distance(
    probs: torch.Tensor, query_padding_mask: torch.Tensor | None = None, query_offset: int | None = None
) -> torch.Tensor:
    """(heads,) mean attention distance in tokens over real queries; self-attention probs (B, heads, L, S)."""
    if probs.dim() != 4:
        raise ValueError(f"expected probabilities (B, heads, L, S), got {tuple(probs.shape)}")
    d = token_distances(probs.shape[-2], probs.shape[-1], query_offset).to(probs.device)
    per_query = (probs.double() * d).sum(-1)  # (B, H, L)
    w = _query_weights(probs, query_padding_mask)
    return (per_query * w).sum(dim=(0, 2)) / w.sum().clamp_min(1.0)


def self_attention_layers(model: nn.Module) -> list[str]:
    """Attention layers whose queries and keys are the same sequence (no ``cross_attn``)."""
    return [n for n in attention_layers(model) if not n.endswith("cross_attn")]


def _ids_for(model: nn.Module, tok, text: str) -> torch.Tensor:
    from ..models.bert import Bert

    ids = tok.encode(text)
    if isinstance(model, Bert):
        ids = [tok.token_id("[CLS]")] + ids
    return torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)


def text_attention_report(model: nn.Module, tok, text: str) -> dict:
    """Per-layer, per-head entropy and distance of a GPT or BERT on one sentence, plus the maps.

    Returns ``tokens`` (strings), ``layers`` (names), ``entropy`` and ``distance`` (layers x heads
    lists), ``maps`` {layer: (heads, L, L) numpy}, ``uniform_entropy`` (the entropy uniform
    attention over the visible keys would give, averaged over queries).
    """
    from ..models.bert import Bert
    from ..models.gpt import GPT

    if not isinstance(model, (GPT, Bert)):
        raise ModelError(
            f"{type(model).__name__} is not a GPT or BERT; for other models use text_attention "
            "with head_entropy / head_distance"
        )
    ids = _ids_for(model, tok, text)
    L = ids.shape[1]
    probs = text_attention(model, ids)
    layers = self_attention_layers(model)
    causal = isinstance(model, GPT)
    keys = torch.arange(1, L + 1) if causal else torch.full((L,), L)  # visible keys of each query
    visible = keys.double()
    return {
        "tokens": [tok.itos[i] for i in ids[0].tolist()],
        "layers": layers,
        "entropy": [head_entropy(probs[n]).tolist() for n in layers],
        "distance": [head_distance(probs[n]).tolist() for n in layers],
        "maps": {n: probs[n][0].float().cpu().numpy() for n in layers},
        "uniform_entropy": float(visible.log().mean()),
    }


def translation_attention_report(model: nn.Module, tok, source: str, target: str) -> dict:
    """Attention of the encoder-decoder while it reads ``source`` and writes ``target``.

    The decoder is teacher-forced with ``<s> target`` (pass the model's own translation to see
    how it produced it). Returns ``src_tokens``, ``tgt_tokens`` (subword strings, the target with
    ``<s>`` first), ``layers``, ``maps`` {layer: (heads, queries, keys) numpy} for every layer
    (encoder self-attention: source x source; decoder self-attention: target x target;
    cross-attention: target x source), and ``entropy`` / ``distance`` for the self-attention
    layers (``None`` distance for cross-attention, where |i - j| compares two sentences).
    """
    from ..models.seq2seq import Seq2SeqTransformer
    from ..text.data import BOS, EOS

    if not isinstance(model, Seq2SeqTransformer):
        raise ModelError(f"{type(model).__name__} is not an encoder-decoder; use text_attention_report")
    dev = next(model.parameters()).device
    src_ids = tok.encode(source).ids + [EOS]
    tgt_ids = [BOS] + tok.encode(target).ids
    src = torch.tensor([src_ids], device=dev)
    tgt = torch.tensor([tgt_ids], device=dev)
    probs = text_attention(model, src, tgt)
    layers = list(probs)
    return {
        "src_tokens": [tok.id_to_token(i) for i in src_ids],
        "tgt_tokens": [tok.id_to_token(i) for i in tgt_ids],
        "layers": layers,
        "maps": {n: probs[n][0].float().cpu().numpy() for n in layers},
        "entropy": [head_entropy(probs[n]).tolist() for n in layers],
        "distance": [None if n.endswith("cross_attn") else head_distance(probs[n]).tolist() for n in layers],
    }


def _axis_labels(report: dict, name: str) -> tuple[list[str], list[str]]:
    """(query labels, key labels) of one layer's map."""
    if "tokens" in report:  # GPT / BERT: one sequence
        return report["tokens"], report["tokens"]
    src, tgt = report["src_tokens"], report["tgt_tokens"]
    if name.endswith("cross_attn"):
        return tgt, src
    return (src, src) if name.startswith("encoder") else (tgt, tgt)


def plot_text_attention(report: dict, layer: int | str, path: str, max_heads: int = 8) -> None:
    """A row of per-head heatmaps (query rows, key columns) with the tokens on the axes; takes the
    output of :func:`text_attention_report` or :func:`translation_attention_report`."""
    # The object-oriented API on an Agg canvas, as in vitlens.analysis.plots: pyplot plus
    # matplotlib.use("Agg") would switch the global backend of a notebook that calls this.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    name = report["layers"][layer] if isinstance(layer, int) else layer
    if name not in report["maps"]:
        raise ConfigError(f"no layer {name!r}; layers: {report['layers']}")
    maps = report["maps"][name][:max_heads]
    q_labels, k_labels = ([repr(t)[1:-1] for t in labels] for labels in _axis_labels(report, name))
    H = maps.shape[0]
    fig = Figure(figsize=(3.2 * H, 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, H, squeeze=False)
    show_labels = max(len(q_labels), len(k_labels)) <= 64
    for h, ax in enumerate(axes[0]):
        ax.imshow(maps[h], cmap="viridis", vmin=0.0)
        ax.set_title(f"{name} h{h}", fontsize=8)
        if show_labels:
            ax.set_xticks(range(len(k_labels)), k_labels, fontsize=5, rotation=90)
            ax.set_yticks(range(len(q_labels)), q_labels, fontsize=5)
        else:
            ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=150)


__all__ = [
    "text_attention",
    "token_distances",
    "head_entropy",
    "head_distance",
    "self_attention_layers",
    "text_attention_report",
    "translation_attention_report",
    "plot_text_attention",
]
