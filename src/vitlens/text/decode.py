"""Decoding for the encoder-decoder: greedy search and beam search with a length penalty.

Both encode the source once and then run the decoder one token at a time against a
per-layer key/value cache (``Seq2SeqTransformer.decode(..., kv_cache=, start_pos=)``), so a
step costs one token's worth of decoder work instead of re-running the whole prefix.

Beam search (batched: B sentences x K beams as B*K rows) ranks hypotheses by
``log p(y | x) / lp(y)`` with the GNMT length penalty ``lp = ((5 + |y|) / 6) ** alpha``
(Wu et al. 2016; alpha = 0 is plain log-probability). A finished hypothesis (it produced
</s>) keeps its slot and score and can only be extended by </s> at no cost, so it competes
with the live ones until something better appears. With one beam this is exactly greedy
decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError, DataError
from .data import BOS, EOS, PAD, pad_batch


def length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    return ((5.0 + length.float()) / 6.0) ** alpha


def _max_steps(model, src: torch.Tensor, max_len: int | None) -> int:
    if max_len is None:  # outputs rarely exceed 1.5x the source in Multi30k; leave room
        max_len = int(src.shape[1] * 1.5) + 10
    return min(max_len, model.cfg.max_len - 1)


@torch.no_grad()
def greedy_decode(
    model, src: torch.Tensor, *, max_len: int | None = None, bos: int = BOS, eos: int = EOS, pad: int = PAD
) -> torch.Tensor:
    """Source ids (B, S) -> output ids (B, T) without <s>; </s> then padding after each sentence ends."""
    src_mask = model.padding_mask(src)
    memory = model.encode(src, src_mask)
    B = src.shape[0]
    ys = torch.full((B, 1), bos, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    cache = model.new_cache()
    for t in range(_max_steps(model, src, max_len)):
        h = model.decode(ys[:, -1:], memory, src_mask, kv_cache=cache, start_pos=t)
        nxt = model.forward_head(h[:, -1]).float().argmax(-1)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        ys = torch.cat([ys, nxt[:, None]], dim=1)
        done |= nxt == eos
        if done.all():
            break
    return ys[:, 1:]


@torch.no_grad()
def beam_search(
    model,
    src: torch.Tensor,
    *,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_len: int | None = None,
    bos: int = BOS,
    eos: int = EOS,
    pad: int = PAD,
) -> torch.Tensor:
    """Source ids (B, S) -> the best hypothesis per sentence (B, T), same layout as ``greedy_decode``."""
    if beam_size < 1:
        raise ConfigError(f"beam_size must be >= 1, got {beam_size}")
    B, K, dev = src.shape[0], beam_size, src.device
    src_mask = model.padding_mask(src)
    memory = model.encode(src, src_mask)
    memory = memory.repeat_interleave(K, dim=0)  # (B*K, S, D): row b*K + k is beam k of sentence b
    if src_mask is not None:
        src_mask = src_mask.repeat_interleave(K, dim=0)
    tokens = torch.full((B * K, 1), bos, dtype=torch.long, device=dev)
    scores = torch.zeros(B, K, device=dev)  # summed log-probabilities
    scores[:, 1:] = float("-inf")  # all beams start identical: keep only the first alive
    lengths = torch.zeros(B * K, dtype=torch.long, device=dev)  # tokens after <s>, </s> included
    finished = torch.zeros(B * K, dtype=torch.bool, device=dev)
    cache = model.new_cache()
    for t in range(_max_steps(model, src, max_len)):
        h = model.decode(tokens[:, -1:], memory, src_mask, kv_cache=cache, start_pos=t)
        logp = model.forward_head(h[:, -1]).float().log_softmax(-1)  # (B*K, V)
        V = logp.shape[-1]
        # A finished hypothesis may only be followed by </s>, which costs nothing and adds no length.
        ended = torch.full_like(logp, float("-inf"))
        ended[:, eos] = 0.0
        logp = torch.where(finished[:, None], ended, logp)
        cand_len = torch.where(finished, lengths, lengths + 1)  # (B*K,)
        cand = scores.view(B * K, 1) + logp  # (B*K, V)
        ranked = cand / length_penalty(cand_len, alpha)[:, None]
        top, flat_idx = ranked.view(B, K * V).topk(K, dim=-1)  # (B, K)
        beam = flat_idx // V
        tok = flat_idx % V
        rows = (torch.arange(B, device=dev)[:, None] * K + beam).view(-1)  # source row of each new beam
        scores = cand.view(B, K * V).gather(1, flat_idx)
        was_finished = finished[rows]
        tokens = torch.cat([tokens[rows], torch.where(was_finished, pad, tok.view(-1))[:, None]], dim=1)
        lengths = cand_len[rows]
        finished = was_finished | (tok.view(-1) == eos)
        for layer in cache:  # the kept beams inherit their parents' keys and values
            layer["k"], layer["v"] = layer["k"][rows], layer["v"][rows]
        if finished.all():
            break
    final = (scores.view(-1) / length_penalty(lengths, alpha)).view(B, K)
    best = final.argmax(-1) + torch.arange(B, device=dev) * K
    return tokens[best, 1:]


def strip_ids(ids: Sequence[int], eos: int = EOS, pad: int = PAD) -> list[int]:
    """Cut a decoded row at its first </s> and drop padding."""
    out = []
    for i in ids:
        if i == eos:
            break
        if i != pad:
            out.append(i)
    return out


@torch.no_grad()
def translate(
    model,
    tokenizer,
    sentences: Sequence[str],
    *,
    beam_size: int = 1,
    alpha: float = 0.6,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    max_len: int | None = None,
) -> list[str]:
    """Translate raw sentences to detokenized text (beam_size 1: greedy). Batches by length, keeps order."""
    model.eval()
    encoded = [e.ids[: model.cfg.max_len - 1] + [EOS] for e in tokenizer.encode_batch(list(sentences))]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        src = pad_batch([encoded[i] for i in idx]).to(device)
        if beam_size == 1:
            ys = greedy_decode(model, src, max_len=max_len)
        else:
            ys = beam_search(model, src, beam_size=beam_size, alpha=alpha, max_len=max_len)
        for i, row in zip(idx, ys.tolist()):
            out[i] = tokenizer.decode(strip_ids(row), skip_special_tokens=True)
    return out


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Detokenized corpus BLEU (sacreBLEU defaults: 13a tokenisation, cased)."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise DataError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
