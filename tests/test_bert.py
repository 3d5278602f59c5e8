"""BERT: 80/10/10 masking statistics, padding never attended, the [CLS] head, MLM training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vitlens import create_model
from vitlens.analysis.text_attention import head_distance, head_entropy, text_attention
from vitlens.cli import main as cli
from vitlens.models.bert import mask_tokens
from vitlens.train.lm import LMTrainConfig, train_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def test_masking_follows_80_10_10():
    V, MASK, low = 100, 1, 4  # ids 0..3 are specials, 4..99 characters
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(low, V, (400, 500), generator=g)
    ids[:, 0] = 2  # a [CLS] column that must never be chosen
    special = ids == 2
    inputs, labels = mask_tokens(
        ids, vocab_size=V, mask_id=MASK, special_mask=special, random_low=low, generator=g
    )
    chosen = labels != -100
    n_real = (~special).sum().item()
    n = chosen.sum().item()
    # 200k candidate tokens: binomial standard errors are ~0.0008 (15%) and ~0.002 (80/10/10 of 30k)
    assert abs(n / n_real - 0.15) < 0.005
    assert not chosen[special].any()
    assert torch.equal(labels[chosen], ids[chosen])  # labels are the original tokens
    assert torch.equal(inputs[~chosen], ids[~chosen])  # unchosen tokens are untouched
    masked = (inputs == MASK) & chosen
    changed = (inputs != MASK) & (inputs != ids) & chosen
    kept = (inputs == ids) & chosen
    assert abs(masked.sum().item() / n - 0.80) < 0.01
    # a random draw equals the original 1 time in 96, which then counts as "kept"
    p_same = 1 / (V - low)
    assert abs(changed.sum().item() / n - 0.10 * (1 - p_same)) < 0.007
    assert abs(kept.sum().item() / n - (0.10 + 0.10 * p_same)) < 0.007
    assert inputs[changed].min() >= low and inputs[changed].max() < V


def _bert(**kw):
    model = create_model("bert_nano", vocab_size=30, **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def test_no_position_attends_to_padding():
    model = _bert()
    ids = torch.randint(4, 30, (2, 12))
    ids[:, 0] = 2
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)  # pad_id 0
    # real positions give the same states with or without trailing padding
    torch.testing.assert_close(
        model.forward_features(padded)[:, :12], model.forward_features(ids), atol=1e-5, rtol=1e-5
    )
    # whatever the padded positions hold, once marked as padding they change nothing
    garbage = padded.clone()
    garbage[:, 12:] = torch.randint(4, 30, (2, 5))
    mask = torch.zeros(2, 17, dtype=torch.bool)
    mask[:, 12:] = True
    torch.testing.assert_close(
        model.forward_features(garbage, mask)[:, :12], model.forward_features(ids), atol=1e-5, rtol=1e-5
    )
    probs = text_attention(model, padded)
    for p in probs.values():  # (B, heads, L, S)
        assert p[..., 12:].abs().max() == 0
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 17))
    # per-head entropy and distance over the real queries equal those of the unpadded sentence
    plain = text_attention(model, ids)
    for name in probs:
        torch.testing.assert_close(head_entropy(probs[name], mask), head_entropy(plain[name]))
        torch.testing.assert_close(head_distance(probs[name], mask), head_distance(plain[name]))


def test_bidirectional():
    model = _bert()
    ids = torch.randint(4, 30, (1, 10))
    changed = ids.clone()
    changed[0, -1] = 4 if ids[0, -1] != 4 else 5
    # unlike GPT, a change at the end reaches the first position
    assert not torch.allclose(model.forward_features(ids)[:, 0], model.forward_features(changed)[:, 0])


def test_cls_head_learns_a_sequence_task():
    """Label = does token 7 occur anywhere? Only attention can carry that to [CLS]."""
    torch.manual_seed(0)
    model = create_model("bert_nano", vocab_size=16, num_classes=2, norm_first=True)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        ids = torch.randint(8, 16, (n, 12), generator=g)
        y = torch.randint(0, 2, (n,), generator=g)
        pos = torch.randint(1, 12, (n,), generator=g)
        ids[y == 1, pos[y == 1]] = 7
        ids[:, 0] = 2  # [CLS]
        return ids, y

    assert model(batch(4)[0]).shape == (4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        ids, y = batch(32)
        loss = torch.nn.functional.cross_entropy(model(ids), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids, y = batch(512)
    model.eval()
    acc = (model(ids).argmax(-1) == y).float().mean().item()
    assert acc > 0.95
    # the head reads position 0 only: perturbing nothing but the [CLS] state changes the output
    h = model.forward_features(ids[:2])
    h2 = h.clone()
    h2[:, 1:] += 1.0
    torch.testing.assert_close(model.forward_head(h), model.forward_head(h2))


def test_mlm_head_is_tied():
    model = create_model("bert_nano")
    x = model.forward_features(torch.randint(4, 69, (1, 8)))
    assert model.forward_mlm(x).shape == (1, 8, 69)
    with torch.no_grad():
        model.tok_embed.weight[10] += 1.0
    assert model.forward_mlm(x)[0, :, 10].sub(model.forward_mlm(x)[0, :, 11]).abs().sum() > 0


def test_mlm_pretraining_on_shakespeare(shared_data, tmp_path, capsys):
    cfg = LMTrainConfig(
        model="bert_nano",
        data=str(shared_data / "tinyshakespeare"),
        out=str(tmp_path / "bert"),
        max_steps=60,
        batch_size=16,
        block_size=32,
        lr=3e-3,
        warmup_steps=5,
        eval_every=30,
        eval_iters=2,
        max_chars=50_000,
        progress=False,
    )
    summary = train_lm(cfg)
    assert summary["task"] == "mlm" and summary["finished"]
    records = [json.loads(line) for line in (tmp_path / "bert" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_loss"] < math.log(65) - 0.5  # masked characters, well below chance
    meta = json.loads((tmp_path / "bert" / "model.json").read_text())
    assert meta["model_args"]["vocab_size"] == 69  # 65 characters + [PAD] [MASK] [CLS] [SEP]
    assert cli(["lm", "sample", str(tmp_path / "bert")]) == 2
    assert "masked LM" in capsys.readouterr().err
    assert cli(["lm", "attention", str(tmp_path / "bert"), "To be, or not"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.attn" in out and "blocks.1.attn" in out
