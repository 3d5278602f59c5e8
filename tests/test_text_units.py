"""Unit tests of the text tasks' training code (lm.py, translate.py) and of text batching and
decoding helpers: the objective, the batches, the evaluation, the schedule and what a run writes,
each against an expectation computed here (torch's ``cross_entropy``, counts by hand, the paper's
formula). Tiny models and a synthetic corpus: each test takes well under a second or two.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitlens.errors import ConfigError, DataError, ModelError
from vitlens.text.data import BERT_SPECIALS, PAD, CharTokenizer, load_char_corpus
from vitlens.train import harness
from vitlens.train import lm as lm_mod
from vitlens.train import translate as tr_mod
from vitlens.train.distributed import DistInfo

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT)
    return path


def _fake_run(world=1, rank=0):
    return SimpleNamespace(
        dist=DistInfo(rank=rank, world_size=world),
        autocast=nullcontext,
        device=torch.device("cpu"),
        is_main=True,
    )


# ------------------------------------------------------------------------------- language-model batches
def test_causal_batches_are_windows_with_next_character_targets(corpus):
    train, _, tok = load_char_corpus(corpus, val_fraction=0.1)
    g = torch.Generator().manual_seed(0)
    x, y = lm_mod.lm_batch(train, tok, False, 0.15, 16, 8, g)
    assert x.shape == y.shape == (8, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x moved on by one character
    text = tok.decode(train.tolist())
    for row_x, row_y in zip(x, y):
        window = tok.decode(row_x.tolist()) + tok.decode(row_y[-1:].tolist())
        assert window in text  # a real window of the training text


def test_masked_batches_start_with_cls_and_never_corrupt_into_specials(corpus):
    train, _, tok = load_char_corpus(corpus, val_fraction=0.1, specials=BERT_SPECIALS)
    cls, mask = tok.token_id("[CLS]"), tok.token_id("[MASK]")
    g = torch.Generator().manual_seed(0)
    x, y = lm_mod.lm_batch(train, tok, True, 0.3, 24, 512, g)
    assert x.shape == y.shape == (512, 24)
    assert (x[:, 0] == cls).all() and (y[:, 0] == -100).all()  # [CLS] is never a target
    chosen = y != -100
    assert 0.27 < chosen[:, 1:].float().mean().item() < 0.33  # mlm_prob of the characters
    assert (y[chosen] >= len(BERT_SPECIALS)).all()  # targets are characters
    masked = x[chosen] == mask
    assert 0.75 < masked.float().mean().item() < 0.85  # 80% become [MASK] ...
    others = x[chosen][~masked]
    assert (others >= len(BERT_SPECIALS)).all()  # ... and the rest are characters, never [PAD]/[CLS]/[SEP]
    assert (x[:, 1:][~chosen[:, 1:]] >= len(BERT_SPECIALS)).all()  # untouched positions hold characters


def test_lm_objective_is_cross_entropy_of_the_right_head():
    torch.manual_seed(0)
    gpt = lm_mod.create_model("gpt_nano", vocab_size=11)
    x, y = torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 5))
    obj = lm_mod.LMObjective(gpt)
    assert not obj.masked
    torch.testing.assert_close(obj(x, y), F.cross_entropy(gpt(x).flatten(0, 1), y.flatten()))
    bert = lm_mod.create_model("bert_nano", vocab_size=11)
    obj = lm_mod.LMObjective(bert)
    assert obj.masked
    y = torch.full((2, 5), -100)
    y[0, 1], y[1, 3] = 4, 7
    logits = bert.forward_mlm(bert.forward_features(x))
    expected = -(logits[0, 1].log_softmax(-1)[4] + logits[1, 3].log_softmax(-1)[7]) / 2  # 2 targets only
    torch.testing.assert_close(obj(x, y), expected)


def test_language_model_config_refuses_other_models():
    assert lm_mod.language_model_config("gpt_nano", {"n_layer": 1}).n_layer == 1
    with pytest.raises(ModelError, match="not a language model"):
        lm_mod.language_model_config("vit_micro_patch4_32", {})


class _ScriptedObjective(nn.Module):
    """Returns the losses 1, 2, 3, ... in turn and records its mode and inputs."""

    masked = False

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, y):
        self.calls.append((self.training, x.clone()))
        return torch.tensor(float(len(self.calls)))


def test_evaluate_lm_is_the_mean_over_eval_iters_fixed_batches_in_eval_mode(corpus):
    train, val, tok = load_char_corpus(corpus)
    cfg = lm_mod.LMTrainConfig(eval_iters=4, batch_size=3)
    obj = _ScriptedObjective()
    assert lm_mod.evaluate_lm(obj, val, tok, cfg, 8, _fake_run()) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert len(obj.calls) == 4 and not any(training for training, _ in obj.calls) and obj.training
    lm_mod.evaluate_lm(obj, val, tok, cfg, 8, _fake_run())
    first, second = [x for _, x in obj.calls[:4]], [x for _, x in obj.calls[4:]]
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # the same windows every time
    assert not all(torch.equal(first[0], b) for b in first[1:])  # but not one window four times


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_steps=0),
        dict(batch_size=0),
        dict(eval_every=0),
        dict(eval_iters=0),
        dict(block_size=1),
        dict(val_fraction=0.0),
        dict(val_fraction=1.0),
        dict(mlm_prob=0.0),
        dict(mlm_prob=1.0),
        dict(amp="fp8"),
    ],
)
def test_lm_config_refuses_values_that_cannot_train(bad):
    with pytest.raises(ConfigError):
        lm_mod.LMTrainConfig(**bad)


def test_lm_config_takes_the_edge_values_that_can():
    lm_mod.LMTrainConfig(
        max_steps=1, batch_size=1, eval_every=1, eval_iters=1, block_size=2, val_fraction=0.01
    )


# ------------------------------------------------------------------------------- a whole tiny LM run
LM_RUN = dict(
    model="gpt_nano", model_args={"n_layer": 1}, max_steps=4, batch_size=4, block_size=8, lr=0.01,
    min_lr=0.002, warmup_steps=2, weight_decay=0.3, beta2=0.95, eval_every=2, eval_iters=2, amp="fp32",
    device="cpu", progress=False,
)  # fmt: skip


def _train_lm(tmp_path, corpus, monkeypatch, **kw):
    seen = []
    real = harness.train_step

    def spy(run, forward, optimizer, scheduler, **k):
        seen.append({"groups": [dict(g) for g in optimizer.param_groups], "optimizer": optimizer})
        return real(run, forward, optimizer, scheduler, **k)

    monkeypatch.setattr(harness, "train_step", spy)
    cfg = lm_mod.LMTrainConfig(**{**LM_RUN, **kw}, data=str(corpus), out=str(tmp_path / "lm"))
    return lm_mod.train_lm(cfg), seen, tmp_path / "lm"


def test_lm_run_follows_its_schedule_optimiser_and_writes_its_folder(tmp_path, corpus, monkeypatch):
    summary, steps, out = _train_lm(tmp_path, corpus, monkeypatch)
    lr, min_lr, warmup, total = 0.01, 0.002, 2, 4
    expected = [lr * (s + 1) / warmup if s < warmup else
                min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
                for s in range(total)]  # fmt: skip
    assert [s["groups"][0]["lr"] for s in steps] == pytest.approx(expected, rel=1e-9)
    g = steps[0]["groups"]
    assert [x["weight_decay"] for x in g] == [0.3, 0.0] and g[0]["betas"] == (0.9, 0.95)
    assert isinstance(steps[0]["optimizer"], torch.optim.AdamW)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(r["val_loss"] > 0 for r in records)
    meta = json.loads((out / "model.json").read_text())
    tok = CharTokenizer.load(out / "chars.json")
    assert tok.chars == sorted(set(TEXT)) and tok.specials == []
    assert meta == {
        "model": "gpt_nano", "model_args": {"n_layer": 1, "vocab_size": len(set(TEXT))}, "task": "causal_lm",
        "tokenizer": "chars.json", "block_size": 8,
    }  # fmt: skip
    assert summary["finished"] and summary["steps"] == 4 and summary["task"] == "causal_lm"
    assert (
        summary["val_loss"] == records[-1]["val_loss"] and summary["train_loss"] == records[-1]["train_loss"]
    )
    assert summary["block_size"] == 8 and summary["batch_size"] == 4 and summary["amp"] == "fp32"
    assert summary["train_time_s"] == records[-1]["train_time_s"] and summary["world_size"] == 1


def test_masked_lm_run_uses_the_bert_specials(tmp_path, corpus, monkeypatch):
    summary, _, out = _train_lm(tmp_path, corpus, monkeypatch, model="bert_nano", model_args={"depth": 1})
    assert summary["task"] == "mlm" and json.loads((out / "model.json").read_text())["task"] == "mlm"
    assert CharTokenizer.load(out / "chars.json").specials == list(BERT_SPECIALS)


def test_lm_run_refuses_a_window_larger_than_the_context_or_the_text(tmp_path, corpus, monkeypatch):
    with pytest.raises(ConfigError, match="block_size 65 exceeds the model's context 64"):
        _train_lm(tmp_path, corpus, monkeypatch, block_size=65)
    with pytest.raises(DataError, match="the validation text has .* too few for windows of 64"):
        _train_lm(tmp_path, corpus, monkeypatch, block_size=64, max_chars=600)
    # 80 characters: 72 train, 8 validate. A GPT window of 8 needs 8 + 1 characters ...
    with pytest.raises(
        DataError, match=r"the validation text has 8 characters, too few for windows of 8 \+ 1"
    ):
        _train_lm(tmp_path, corpus, monkeypatch, block_size=8, max_chars=80)
    assert not (tmp_path / "lm").exists()  # refused before anything was written
    # ... a BERT window of 8 is [CLS] + 7 characters, so 8 are enough
    summary, _, _ = _train_lm(
        tmp_path, corpus, monkeypatch, model="bert_nano", model_args={"depth": 1}, block_size=8, max_chars=80,
        max_steps=1, eval_every=1, eval_iters=1,
    )  # fmt: skip
    assert summary["finished"] and summary["block_size"] == 8


# ------------------------------------------------------------------------------- translation
def test_noam_by_hand_with_its_factor():
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = tr_mod.noam(opt, d_model=16, warmup=4, factor=2.0)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # 2 * 16^-0.5 * min(s^-0.5, s * 4^-1.5) at s = 1..8: warmup s/16, then s^-0.5
    expected = [2 * 0.25 * min(s**-0.5, s / 8) for s in range(1, 9)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[0] == pytest.approx(0.0625)  # the first step already learns


def test_translate_config_refuses_values_that_cannot_train():
    for bad in (dict(max_steps=0), dict(max_tokens=0), dict(warmup_steps=0), dict(beam_size=0),
                dict(vocab_size=99), dict(eval_every=0), dict(amp="half")):  # fmt: skip
        with pytest.raises(ConfigError):
            tr_mod.TranslateTrainConfig(**bad)
    tr_mod.TranslateTrainConfig(vocab_size=100, max_steps=1, max_tokens=1, warmup_steps=1, beam_size=1)
    with pytest.raises(ModelError, match="not an encoder-decoder"):
        tr_mod.translation_model_config(tr_mod.TranslateTrainConfig(model="gpt_nano"))


class _TableModel(nn.Module):
    """A "translation model" whose logits at target position t are row t of a fixed table."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.modes = []

    def forward(self, src, tgt_in):
        self.modes.append(self.training)
        return self.table[: tgt_in.shape[1]].expand(tgt_in.shape[0], -1, -1)


def test_evaluate_loss_is_the_mean_over_real_target_tokens_without_smoothing():
    V = 7
    table = torch.randn(6, V, generator=torch.Generator().manual_seed(0))
    pairs = [([5, 2], [1, 4, 2]), ([6, 6, 2], [1, 5, 6, 3, 2]), ([4, 2], [1, 2])]  # 2 + 4 + 1 targets
    model = _TableModel(table)
    got = tr_mod.evaluate_loss(model, pairs, _fake_run(), max_tokens=10)
    logp = table.log_softmax(-1)
    nll = [-logp[t, y] for _, tgt in pairs for t, y in enumerate(tgt[1:])]
    assert got == pytest.approx(sum(nll).item() / 7, rel=1e-6)
    assert model.modes and not any(model.modes) and model.training


def _pairs(n):
    return [([5 + i % 3] * (1 + i % 4) + [2], [1] + [6] * (1 + i % 5) + [2]) for i in range(n)]


def test_epoch_batches_cover_each_epoch_and_continue_from_their_position():
    pairs = _pairs(23)
    run = _fake_run()
    a = tr_mod.EpochBatches(pairs, 12, seed=3, run=run)
    n = len(a.batches)
    seen, weights = [], []
    for _ in range(n):
        src, tgt, w = a.next()
        seen += [(tuple(s[s != PAD].tolist()), tuple(t[t != PAD].tolist())) for s, t in zip(src, tgt)]
        weights.append(w)
    assert sorted(seen) == sorted((tuple(s), tuple(t)) for s, t in pairs)  # every pair once an epoch
    assert weights == [1.0] * n and a.state() == {"epoch": 0, "pos": n} and a.progress == 1.0
    a.next()
    assert a.state() == {"epoch": 1, "pos": 1} and a.progress == pytest.approx(1 + 1 / len(a.batches))
    b = tr_mod.EpochBatches(pairs, 12, seed=3, run=run, **a.state())
    for _ in range(n + 2):  # a copy started from the position draws what the original draws
        (sa, ta, _), (sb, tb, _) = a.next(), b.next()
        assert torch.equal(sa, sb) and torch.equal(ta, tb)


def test_epoch_batches_share_of_two_processes_and_no_batches_error():
    pairs = _pairs(12)
    a = tr_mod.EpochBatches(pairs, 400, seed=0, run=_fake_run(2, 1))
    batch = a.batches[0]
    assert len(batch) == 12  # one batch of every pair: targets of several lengths
    src, tgt, w = a.next()
    mine = batch[1::2]
    assert len(tgt) == len(mine)
    targets = [len(pairs[i][1]) - 1 for i in batch]  # tokens predicted after <s>
    assert w == pytest.approx(sum(targets[1::2]) * 2 / sum(targets))
    with pytest.raises(DataError, match="no training batches"):
        tr_mod.EpochBatches(pairs[:1], 40, seed=0, run=_fake_run(2, 0))  # one pair cannot feed two processes


def test_translation_run_schedule_optimiser_smoothing_and_summary(tmp_path, monkeypatch, shared_data):
    """A two-step run on 60 Multi30k pairs: the Noam schedule each step, Adam's constants, the
    label smoothing handed to the loss, and a summary with test BLEU of greedy decoding only."""
    seen = {"smoothing": [], "lr": []}
    real_loss, real_step = tr_mod.seq2seq_loss, harness.train_step

    def loss_spy(model, src, tgt, label_smoothing=0.0):
        seen["smoothing"].append(label_smoothing)
        return real_loss(model, src, tgt, label_smoothing)

    def step_spy(run, forward, optimizer, scheduler, **k):
        seen["lr"].append(optimizer.param_groups[0]["lr"])
        seen["opt"] = optimizer
        return real_step(run, forward, optimizer, scheduler, **k)

    monkeypatch.setattr(tr_mod, "seq2seq_loss", loss_spy)
    monkeypatch.setattr(harness, "train_step", step_spy)
    cfg = tr_mod.TranslateTrainConfig(
        model="transformer_nano", vocab_size=120, max_steps=2, max_tokens=300, warmup_steps=1, lr_factor=3.0,
        label_smoothing=0.2, weight_decay=0.01, eval_every=2, limit_train=60, limit_eval=3, beam_size=1,
        eval_bleu=False, amp="fp32", device="cpu", progress=False, data_dir=str(shared_data / "multi30k"),
        out=str(tmp_path / "tr"),
    )  # fmt: skip
    summary = tr_mod.train_translate(cfg)
    train_calls = [s for s in seen["smoothing"] if s != 0.0]
    assert train_calls == [0.2] * 2  # training smooths; the validation loss does not
    assert 0.0 in seen["smoothing"]
    assert seen["lr"] == pytest.approx([3.0 * 32**-0.5 * min(s**-0.5, s * 1**-1.5) for s in (1, 2)], rel=1e-9)
    g = seen["opt"].param_groups[0]
    assert g["betas"] == (0.9, 0.98) and g["eps"] == 1e-9 and g["weight_decay"] == 0.01
    records = [json.loads(x) for x in (tmp_path / "tr" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2] and "val_bleu_greedy" not in records[0]
    assert summary["finished"] and summary["steps"] == 2 and summary["epochs"] == records[-1]["epoch"]
    assert summary["val_loss"] == records[-1]["val_loss"] and summary["vocab_size"] <= 120
    assert "test_bleu_greedy" in summary and not any(k.startswith("test_bleu_beam") for k in summary)
    hyps = (tmp_path / "tr" / "test_2016_flickr.greedy.en").read_text().splitlines()
    assert len(hyps) == 3


# ---------------------------------------------------------------------------- text data, decoding helpers
def test_char_tokenizer_specials_first_and_decode_drops_them(tmp_path):
    tok = CharTokenizer.from_text("hello", BERT_SPECIALS)
    assert tok.itos[:4] == list(BERT_SPECIALS) and tok.chars == ["e", "h", "l", "o"]
    assert tok.vocab_size == 8 and tok.encode("hole") == [5, 7, 6, 4]
    assert tok.decode([2, 5, 4, 1, 6, 6, 7, 0]) == "hello"  # [CLS], [MASK], [PAD] are not text
    with pytest.raises(DataError, match=r"characters \['z'\] are not in the model's vocabulary"):
        tok.encode("hez")
    with pytest.raises(DataError):
        CharTokenizer.from_text("ab").token_id("[CLS]")
    tok.save(tmp_path / "c.json")
    back = CharTokenizer.load(tmp_path / "c.json")
    assert back.itos == tok.itos and back.specials == list(BERT_SPECIALS)


def test_char_corpus_split_and_cls_windows(corpus):
    train, val, tok = load_char_corpus(corpus, val_fraction=0.25, max_chars=400)
    assert len(train) == 300 and len(val) == 100  # the first 75% trains, the rest validates
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == TEXT[:400]
    assert tok.chars == sorted(set(TEXT))  # the vocabulary of the whole file, not of the kept start
    from vitlens.text.data import cls_windows

    g = torch.Generator().manual_seed(0)
    x = cls_windows(train, 10, 6, cls_id=99, generator=g)
    assert x.shape == (6, 10) and (x[:, 0] == 99).all()
    for row in x[:, 1:]:
        assert tok.decode(row.tolist()) in TEXT[:300]


def test_pad_collate_and_encode_pairs():
    from vitlens.text.data import BOS, EOS, collate_pairs, encode_pairs, pad_batch

    assert pad_batch([[3, 4], [5], [6, 7, 8]]).tolist() == [[3, 4, PAD], [5, PAD, PAD], [6, 7, 8]]
    pairs = [([1, 2], [3]), ([4], [5, 6, 7])]
    src, tgt = collate_pairs(pairs, [1, 0])
    assert src.tolist() == [[4, PAD], [1, 2]] and tgt.tolist() == [[5, 6, 7], [3, PAD, PAD]]

    class Tok:
        def encode_batch(self, texts):
            return [SimpleNamespace(ids=[10 + len(w) for w in t.split()]) for t in texts]

    out = encode_pairs(Tok(), ["a bb", "a b c d"], ["ccc", "x"], max_len=4)
    assert out == [([11, 12, EOS], [BOS, 13, EOS])]  # the second source (4 words + </s>) is too long


def test_epoch_batch_indices_shard_equally_and_cover_the_epoch():
    from vitlens.text.data import epoch_batch_indices

    pairs = [([5] * (1 + i % 5), [6] * (2 + i % 3)) for i in range(37)]
    whole = epoch_batch_indices(pairs, 12, seed=1, epoch=0)
    assert sorted(sum(whole, [])) == list(range(37))
    assert epoch_batch_indices(pairs, 12, seed=1, epoch=1) != whole  # every epoch its own order
    shards = [epoch_batch_indices(pairs, 12, seed=1, epoch=0, rank=r, world_size=3) for r in range(3)]
    n = len(whole) - len(whole) % 3
    assert [len(s) for s in shards] == [n // 3] * 3  # the same count on every process
    assert sorted(map(tuple, sum(shards, []))) == sorted(map(tuple, whole[:n]))


def test_load_parallel_limits_and_refuses_unaligned_files(tmp_path):
    import gzip

    from vitlens.errors import MissingFileError
    from vitlens.text.data import load_parallel

    with gzip.open(tmp_path / "train.de.gz", "wt", encoding="utf-8") as f:
        f.write("eins\nzwei\ndrei\n")
    (tmp_path / "train.en").write_text("one\ntwo\nthree\n")
    assert load_parallel(tmp_path, "train") == (["eins", "zwei", "drei"], ["one", "two", "three"])
    assert load_parallel(tmp_path, "train", limit=2) == (["eins", "zwei"], ["one", "two"])
    (tmp_path / "val.de").write_text("a\nb\n")
    (tmp_path / "val.en").write_text("a\n")
    with pytest.raises(DataError, match="val: 2 de lines but 1 en lines"):
        load_parallel(tmp_path, "val")
    with pytest.raises(MissingFileError, match="no test.de"):
        load_parallel(tmp_path, "test")
    with pytest.raises(ConfigError, match="--data-dir"):
        load_parallel(None, "train")


def test_decoding_helpers_by_hand():
    from vitlens.text.decode import EOS, _max_steps, corpus_bleu, length_penalty, strip_ids

    model = SimpleNamespace(cfg=SimpleNamespace(max_len=64))
    assert _max_steps(model, torch.zeros(2, 10), None) == 25  # 1.5 x 10 + 10
    assert _max_steps(model, torch.zeros(2, 60), None) == 63  # capped by the context (after <s>)
    assert _max_steps(model, torch.zeros(2, 10), 7) == 7
    assert length_penalty(torch.tensor([1, 7, 13]), 0.5).tolist() == pytest.approx([1.0, 2**0.5, 3**0.5])
    assert length_penalty(torch.tensor([4]), 0.0).item() == 1.0
    assert strip_ids([7, PAD, 8, EOS, 9, PAD]) == [7, 8]  # cut at </s>, padding dropped
    assert strip_ids([7, 8]) == [7, 8]
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    with pytest.raises(DataError, match="2 hypotheses but 1 references"):
        corpus_bleu(["a", "b"], ["a"])
