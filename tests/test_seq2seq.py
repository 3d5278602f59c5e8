"""Encoder-decoder: masks, cached decoding, greedy vs beam search, BPE, the training loop and CLI."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from vitlens import create_model
from vitlens.analysis.text_attention import head_distance, text_attention, translation_attention_report
from vitlens.cli import main as cli
from vitlens.text.data import BOS, EOS, PAD, load_parallel, read_lines, token_batches, train_bpe
from vitlens.text.decode import beam_search, greedy_decode, length_penalty, strip_ids
from vitlens.train.translate import TranslateTrainConfig, noam, train_translate

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(vocab=64, std=0.2, **kw):
    # Untied: a random tied model keeps repeating its last token. Larger weights than the init
    # give peaked, varied distributions, so greedy and beam search have real choices to make.
    model = create_model(
        "transformer_nano",
        src_vocab_size=vocab,
        tgt_vocab_size=vocab,
        tie_embeddings=False,
        share_src_tgt_embed=False,
        **kw,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    return model


def _src(B=4, S=9, vocab=64):
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, vocab, (B, S), generator=g)
    for b in range(B):  # different lengths: right padding
        src[b, S - b :] = PAD
        src[b, S - b - 1] = EOS
    return src


def test_tied_embeddings_and_sinusoids():
    model = create_model("transformer_nano")
    assert model.head.weight is model.tgt_embed.weight is model.src_embed.weight
    d = model.cfg.d_model
    p, i = 7, 3
    assert model.pos_table[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / d)), abs=1e-6)
    assert model.pos_table[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / d)), abs=1e-6)
    with pytest.raises(ValueError, match="joint vocabulary"):
        create_model("transformer_nano", src_vocab_size=50)
    assert (
        create_model(
            "transformer_nano", src_vocab_size=50, share_src_tgt_embed=False
        ).src_embed.num_embeddings
        == 50
    )


def test_no_attention_to_future_or_padding():
    model = _model()
    src = _src()
    tgt = torch.randint(4, 64, (4, 7))
    probs = text_attention(model, src, tgt)
    src_pad = src == PAD
    upper = torch.triu(torch.ones(7, 7, dtype=torch.bool), diagonal=1)
    for name, p in probs.items():
        if name.startswith("encoder"):  # (B, H, S, S): no query looks at source padding
            assert p.masked_select(src_pad[:, None, None, :].expand_as(p)).abs().max() == 0
        elif name.endswith("cross_attn"):  # (B, H, T, S)
            assert p.masked_select(src_pad[:, None, None, :].expand_as(p)).abs().max() == 0
        else:  # decoder self-attention (B, H, T, T)
            assert p[..., upper].abs().max() == 0
    assert {n.split(".")[0] for n in probs} == {"encoder", "decoder"} and len(probs) == 3
    # outputs: a target prefix ignores later target tokens; real source tokens ignore extra padding
    changed = tgt.clone()
    changed[:, 4:] = 5
    torch.testing.assert_close(model(src, tgt)[:, :4], model(src, changed)[:, :4])
    more_pad = torch.cat([src, torch.zeros(4, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(more_pad, tgt), model(src, tgt), atol=1e-5, rtol=1e-5)
    assert head_distance(probs["decoder.0.attn"]).shape == (2,)


def test_translation_attention_report(shared_data):
    src, tgt = load_parallel(shared_data / "multi30k", "train", limit=300)
    tok = train_bpe(src + tgt, vocab_size=300)
    model = _model(vocab=tok.get_vocab_size())
    report = translation_attention_report(model, tok, "Ein Mann fährt Fahrrad.", "A man rides a bike.")
    S, T = len(report["src_tokens"]), len(report["tgt_tokens"])
    assert report["src_tokens"][-1] == "</s>" and report["tgt_tokens"][0] == "<s>"
    assert report["maps"]["encoder.0.attn"].shape == (2, S, S)
    assert report["maps"]["decoder.0.attn"].shape == (2, T, T)
    assert report["maps"]["decoder.0.cross_attn"].shape == (2, T, S)
    cross = report["layers"].index("decoder.0.cross_attn")
    assert report["distance"][cross] is None and len(report["entropy"][cross]) == 2
    assert all(0 <= e <= math.log(S) + 1e-9 for e in report["entropy"][cross])


def test_cached_decoder_equals_full_decoder():
    model = _model()
    src = _src()
    tgt = torch.randint(4, 64, (4, 6))
    mask = model.padding_mask(src)
    memory = model.encode(src, mask)
    full = model.decode(tgt, memory, mask)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, t : t + 1], memory, mask, kv_cache=cache, start_pos=t) for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def _uncached_greedy(model, src, steps):
    """Reference: recompute the whole target prefix every step (no cache)."""
    mask = model.padding_mask(src)
    memory = model.encode(src, mask)
    ys = torch.full((src.shape[0], 1), BOS)
    for _ in range(steps):
        ys = torch.cat(
            [ys, model.forward_head(model.decode(ys, memory, mask))[:, -1].argmax(-1, keepdim=True)], 1
        )
    return ys[:, 1:]


def test_greedy_with_cache_equals_recomputation():
    model = _model()
    src = _src()
    out = greedy_decode(model, src, max_len=12)
    ref = _uncached_greedy(model, src, 12)
    for row, ref_row in zip(out.tolist(), ref.tolist()):
        assert strip_ids(row) == strip_ids(ref_row)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_one_equals_greedy(alpha):
    for seed in range(3):
        torch.manual_seed(seed)
        model = _model()
        src = _src()
        greedy = greedy_decode(model, src, max_len=15)
        assert len(greedy.unique()) > 5  # a real sequence, not one token repeated
        assert torch.equal(beam_search(model, src, beam_size=1, alpha=alpha, max_len=15), greedy)
    assert not torch.equal(beam_search(model, src, beam_size=4, alpha=alpha, max_len=15), greedy)


def _sequence_scores(model, src, V, T, alpha):
    """Brute force: every target of up to T tokens (stopping at </s>), scored like beam search."""
    best = {}
    mask = model.padding_mask(src)
    memory = model.encode(src, mask)
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)))  # (V^T, T)
    tgt = torch.cat([torch.full((len(seqs), 1), BOS), seqs], dim=1)
    logp = model.forward_head(
        model.decode(
            tgt[:, :-1],
            memory.expand(len(seqs), -1, -1),
            None if mask is None else mask.expand(len(seqs), -1),
        )
    )
    logp = logp.float().log_softmax(-1).gather(-1, seqs[..., None])[..., 0]  # (V^T, T)
    for s, lp in zip(seqs.tolist(), logp.tolist()):
        n = s.index(EOS) + 1 if EOS in s else T  # tokens up to and including </s>
        key = tuple(s[:n])
        best[key] = sum(lp[:n]) / ((5 + n) / 6) ** alpha
    return best


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_finds_the_exhaustive_optimum(alpha):
    """With beam >= V^(T-1) nothing is ever pruned, so beam search must return the best sequence."""
    V, T = 6, 3
    src = torch.tensor([[4, 5, 4, EOS]])
    beats_greedy = 0
    for seed in range(20):
        torch.manual_seed(seed)
        model = _model(vocab=V, std=0.3)
        scores = _sequence_scores(model, src, V, T, alpha)
        best = max(scores, key=scores.get)
        out = beam_search(model, src, beam_size=V ** (T - 1), alpha=alpha, max_len=T)[0].tolist()
        assert tuple(out[: len(best)]) == best
        assert all(t == PAD for t in out[len(best) :])
        greedy = tuple(greedy_decode(model, src, max_len=T)[0].tolist())
        beats_greedy += greedy[: len(best)] != best
    assert beats_greedy >= 3  # the search is not trivial: greedy misses the optimum in several cases


def test_length_penalty_and_noam():
    assert length_penalty(torch.tensor(1), 0.6).item() == pytest.approx(1.0)
    assert length_penalty(torch.tensor(7), 1.0).item() == pytest.approx(2.0)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = noam(opt, d_model=256, warmup=100)
    lrs = []
    for _ in range(400):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    peak = max(range(400), key=lambda i: lrs[i])
    assert peak == 99  # step 100 (1-based): the end of warmup
    assert lrs[99] == pytest.approx(256**-0.5 * 100**-0.5)
    assert lrs[49] == pytest.approx(lrs[99] / 2)  # linear warmup
    assert lrs[399] == pytest.approx(lrs[99] / 2)  # inverse square root decay


def test_bpe_roundtrip_and_batches(shared_data):
    src, tgt = load_parallel(shared_data / "multi30k", "train", limit=2000)
    tok = train_bpe(src + tgt, vocab_size=600)
    assert [tok.token_to_id(s) for s in ("<pad>", "<s>", "</s>", "<unk>")] == [PAD, BOS, EOS, 3]
    val_src, val_tgt = load_parallel(shared_data / "multi30k", "val", limit=200)
    for line in val_src + val_tgt:
        ids = tok.encode(line).ids
        if 3 not in ids:  # no unknown characters: detokenisation restores the text exactly
            assert tok.decode(ids) == line
    lengths = [len(tok.encode(s).ids) for s in src]
    batches = token_batches(lengths, 256, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(src)))
    assert all(max(lengths[i] for i in b) * len(b) <= 256 or len(b) == 1 for b in batches)


def test_train_translate_cli_and_resume(shared_data, tmp_path, capsys):
    data = str(shared_data / "multi30k")
    args = [
        "translate",
        "train",
        "--model",
        "transformer_nano",
        "--model-args",
        '{"max_len": 96}',
        "--data-dir",
        data,
        "--vocab-size",
        "400",
        "--max-steps",
        "30",
        "--max-tokens",
        "800",
        "--warmup-steps",
        "10",
        "--lr-factor",
        "2",
        "--eval-every",
        "15",
        "--limit-train",
        "1500",
        "--limit-eval",
        "20",
        "--beam-size",
        "2",
        "--no-progress",
    ]
    assert cli(args + ["--out", str(tmp_path / "full")]) == 0
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 30
    assert {"test_bleu_greedy", "test_bleu_beam2"} <= set(summary)
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_loss"] < records[0]["val_loss"] < math.log(400)
    assert (tmp_path / "full" / "tokenizer.json").is_file()

    # stop early, resume: identical weights to the uninterrupted run
    cfg = TranslateTrainConfig(
        model="transformer_nano",
        model_args={"max_len": 96},
        data_dir=data,
        vocab_size=400,
        max_steps=30,
        max_tokens=800,
        warmup_steps=10,
        lr_factor=2.0,
        eval_every=15,
        limit_train=1500,
        limit_eval=20,
        beam_size=2,
        progress=False,
        out=str(tmp_path / "part"),
        eval_bleu=False,
        time_budget_min=0.0,
    )
    assert not train_translate(cfg)["finished"]
    cfg.time_budget_min = None
    assert train_translate(cfg, resume=True)["finished"]
    from vitlens.models.loading import load_run_model

    a, _ = load_run_model(tmp_path / "full")
    b, _ = load_run_model(tmp_path / "part")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=n)

    # decoding from the command line: sentences, and a file with references (BLEU on stderr)
    capsys.readouterr()
    assert cli(["translate", str(tmp_path / "full"), "Ein Mann fährt Fahrrad.", "Zwei Hunde spielen."]) == 0
    assert len(capsys.readouterr().out.strip("\n").split("\n")) == 2
    src_file, ref_file = tmp_path / "src.de", tmp_path / "ref.en"
    src_file.write_text("\n".join(read_lines(shared_data / "multi30k" / "val.de.gz")[:5]) + "\n")
    ref_file.write_text("\n".join(read_lines(shared_data / "multi30k" / "val.en.gz")[:5]) + "\n")
    out_file = tmp_path / "hyp.en"
    assert (
        cli(
            [
                "translate",
                str(tmp_path / "full"),
                "--file",
                str(src_file),
                "--ref",
                str(ref_file),
                "--out",
                str(out_file),
                "--beam",
                "2",
            ]
        )
        == 0
    )
    assert len(out_file.read_text().splitlines()) == 5
    assert "BLEU = " in capsys.readouterr().err
    png = tmp_path / "cross.png"
    assert (
        cli(["translate", str(tmp_path / "full"), "Ein Hund.", "--beam", "1", "--attention", str(png)]) == 0
    )
    assert png.stat().st_size > 0 and "decoder.0.cross_attn" in capsys.readouterr().err
    assert cli(["translate", str(tmp_path / "full")]) == 2
    assert "nothing to translate" in capsys.readouterr().err
    assert cli(["translate", str(tmp_path / "nope"), "Hallo"]) == 2
