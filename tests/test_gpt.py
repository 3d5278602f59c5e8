"""GPT: KV-cache generation, causality, weight tying, the char-level training loop and its CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vitlens import create_model
from vitlens.analysis.text_attention import (
    head_distance,
    head_entropy,
    text_attention,
    text_attention_report,
    token_distances,
)
from vitlens.cli import main as cli
from vitlens.layers import build_attention_mask
from vitlens.text import load_lm, sample
from vitlens.text.data import CharTokenizer, load_char_corpus, random_windows
from vitlens.train.lm import LMTrainConfig, train_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def _gpt(**kw):
    model = create_model("gpt_nano", vocab_size=20, **kw).eval()
    with torch.no_grad():  # larger weights than the 0.02 init: peaked, position-dependent attention
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def test_causal_mask_with_query_offset():
    # cached decoding: one query against t keys sees all of them
    assert build_attention_mask(1, 7, is_causal=True).all()
    # 2 new queries at positions 3, 4 of 5 keys
    m = build_attention_mask(2, 5, is_causal=True)[0, 0]
    assert m.tolist() == [[True] * 4 + [False], [True] * 5]


def test_kv_cache_step_logits_equal_full_recomputation():
    model = _gpt()
    idx = torch.randint(0, 20, (3, 12))
    full = model(idx)  # (B, T, V)
    cache = model.new_cache()
    prefill = model.forward_head(model.forward_features(idx[:, :5], kv_cache=cache))
    steps = [prefill]
    for t in range(5, 12):
        steps.append(
            model.forward_head(model.forward_features(idx[:, t : t + 1], kv_cache=cache, start_pos=t))
        )
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache[0]["k"].shape == (3, 2, 12, 16)  # (B, heads, t, head_dim)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_with_cache_equals_full_recomputation(temperature):
    model = _gpt(block_size=16)
    prompt = torch.randint(0, 20, (2, 4))
    kw = dict(temperature=temperature, top_k=10)
    # 30 new tokens: past the 16-token context, so the sliding-window path is exercised too
    with_cache = model.generate(prompt, 30, use_cache=True, generator=torch.Generator().manual_seed(1), **kw)
    without = model.generate(prompt, 30, use_cache=False, generator=torch.Generator().manual_seed(1), **kw)
    assert with_cache.shape == (2, 34)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache[:, :4], prompt)


def test_no_position_attends_to_the_future():
    model = _gpt()
    idx = torch.randint(0, 20, (2, 10))
    probs = text_attention(model, idx)
    assert len(probs) == 2
    for p in probs.values():  # (B, heads, L, L)
        upper = torch.triu(torch.ones(10, 10, dtype=torch.bool), diagonal=1)
        assert p[..., upper].abs().max() == 0
        torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 10))
    # and the logits of a prefix do not depend on what follows it
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 20
    torch.testing.assert_close(model(idx)[:, :6], model(changed)[:, :6])
    assert not torch.allclose(model(idx)[:, 6:], model(changed)[:, 6:])


def test_weight_tying_and_context_error():
    model = create_model("gpt_nano")
    assert model.lm_head.weight is model.wte.weight
    untied = create_model("gpt_nano", tie_weights=False)
    n_tied = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + model.wte.weight.numel()
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_baby_config():
    cfg = create_model("gpt_char_baby").cfg
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (6, 6, 384, 256)


def test_attention_distance_and_entropy_in_tokens():
    # previous-token head: distance exactly 1 (query 0 can only look at itself: 0), entropy 0
    L = 6
    prev = torch.zeros(1, 1, L, L)
    prev[0, 0, 0, 0] = 1
    for i in range(1, L):
        prev[0, 0, i, i - 1] = 1
    assert head_distance(prev).item() == pytest.approx((L - 1) / L)
    assert head_entropy(prev).item() == pytest.approx(0.0)
    # uniform causal attention: query i averages |i - j| over j <= i -> i / 2; entropy log(i + 1)
    uni = torch.tril(torch.ones(L, L)) / torch.arange(1, L + 1)[:, None]
    uni = uni[None, None]
    assert head_distance(uni).item() == pytest.approx(sum(i / 2 for i in range(L)) / L)
    assert head_entropy(uni).item() == pytest.approx(sum(math.log(i + 1) for i in range(L)) / L)
    assert token_distances(1, 4).tolist() == [[3.0, 2.0, 1.0, 0.0]]  # cached query at the last position


# ------------------------------------------------------------------------------- data + training
def test_char_corpus_split(shared_data):
    train, val, tok = load_char_corpus(shared_data / "tinyshakespeare", max_chars=10_000)
    assert len(train) == 9_000 and len(val) == 1_000
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:10_000]
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == text
    x, y = random_windows(train, 32, 4, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        CharTokenizer.from_text("abc").encode("abz")


def _cfg(shared_data, out, **kw):
    base = dict(
        model="gpt_nano",
        data=str(shared_data / "tinyshakespeare"),
        out=str(out),
        max_steps=40,
        batch_size=16,
        block_size=32,
        lr=3e-3,
        warmup_steps=5,
        eval_every=20,
        eval_iters=2,
        max_chars=50_000,
        progress=False,
    )
    return LMTrainConfig(**{**base, **kw})


def test_train_resume_and_sample(shared_data, tmp_path):
    summary = train_lm(_cfg(shared_data, tmp_path / "full"))
    assert summary["finished"] and summary["steps"] == 40
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_loss"] < math.log(65) - 0.5  # well below chance (uniform over characters)
    assert (tmp_path / "full" / "config.json").exists() and (tmp_path / "full" / "tb").is_dir()

    # stop after 20 steps, then resume: the same weights as the run that never stopped
    part = train_lm(_cfg(shared_data, tmp_path / "part", max_steps=40, time_budget_min=0.0))
    assert not part["finished"] and part["steps"] == 1
    with pytest.raises(ValueError, match="--resume"):
        train_lm(_cfg(shared_data, tmp_path / "part"))
    resumed = train_lm(_cfg(shared_data, tmp_path / "part"), resume=True)
    assert resumed["finished"]
    a, _, _ = load_lm(tmp_path / "full")
    b, tok, _ = load_lm(tmp_path / "part")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=n)

    text = sample(tmp_path / "full", "ROMEO:", max_new_tokens=20, temperature=0.0)
    assert text.startswith("ROMEO:") and len(text) == 26
    report = text_attention_report(a, tok, "To be, or not")
    assert len(report["layers"]) == 2 and len(report["entropy"][0]) == 2


def test_cli_sample_and_errors(shared_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        cli(
            [
                "lm",
                "train",
                "--model",
                "gpt_nano",
                "--data",
                str(shared_data / "tinyshakespeare"),
                "--out",
                str(run),
                "--max-steps",
                "3",
                "--batch-size",
                "4",
                "--block-size",
                "16",
                "--eval-every",
                "3",
                "--eval-iters",
                "1",
                "--max-chars",
                "20000",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli(["lm", "sample", str(run), "--prompt", "KING:", "--max-new-tokens", "10", "--top-k", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("KING:") and len(out.rstrip("\n")) >= 15
    assert cli(["lm", "sample", str(run), "--prompt", "Ω"]) == 2
    assert "not in the model's vocabulary" in capsys.readouterr().err
    assert cli(["lm", "sample", str(tmp_path / "nothing")]) == 2
    assert (
        cli(
            [
                "lm",
                "train",
                "--model",
                "resnet18",
                "--data",
                str(shared_data / "tinyshakespeare"),
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "not a language model" in capsys.readouterr().err
