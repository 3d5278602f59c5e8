"""Behaviour of the training tasks (image classification, GPT/BERT, VQ-VAE/palette, translation)
that a one-line bug would change unnoticed: the loss the optimiser sees, the loader's options, the
exact result dictionaries and files a user reads. Expectations are computed here, independently
(sacreBLEU for BLEU, torch's ``cross_entropy``, losses and updates by hand); tiny stubs, well
under a second each.
"""

from __future__ import annotations

import io
import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vitlens.train import TrainConfig
from vitlens.train import tokenizer as tok_mod
from vitlens.train import trainer as trainer_mod
from vitlens.train import translate as tr_mod
from vitlens.train.distributed import DistInfo

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------- image classification
@pytest.mark.parametrize(
    "device, workers, pin, persistent",
    [("cpu", 0, False, False), ("cpu", 2, False, True), ("cuda", 1, True, True), ("cuda", 0, True, False)],
)
def test_train_loader_pins_memory_for_cuda_and_keeps_its_workers_between_epochs(
    device, workers, pin, persistent
):
    from torch.utils.data import TensorDataset

    ds = TensorDataset(torch.arange(12).float(), torch.zeros(12, dtype=torch.long))
    cfg = TrainConfig(data_path="dataloader", num_workers=workers)
    loader = trainer_mod.build_train_loader(ds, cfg, DistInfo(), torch.device(device), 4)  # not iterated
    assert loader.loader.pin_memory is pin  # page-locked host memory only helps copies to a GPU
    assert loader.loader.persistent_workers is persistent  # no worker restart at each epoch
    assert loader.loader.num_workers == workers and loader.loader.batch_size == 4


# ------------------------------------------------------------------------------- translation: test BLEU
def _parallel_files(folder, split, src_lang, tgt_lang, src, tgt):
    folder.mkdir(exist_ok=True)
    (folder / f"{split}.{src_lang}").write_text("\n".join(src) + "\n")
    (folder / f"{split}.{tgt_lang}").write_text("\n".join(tgt) + "\n")


SRC = ["ein hund rennt im park .", "eine katze schläft .", "zwei hunde spielen im schnee .", "ein vogel ."]
REF = [
    "a dog runs in the park .",
    "a cat sleeps on the sofa .",
    "two dogs play in the snow .",
    "a bird sits on a branch .",
]


def _fake_decoder(monkeypatch, ticks):
    """``translate`` replaced: greedy drops each reference's last word, beam search gets the first
    two right; the clock reads ``ticks`` in turn."""
    calls = []

    def fake_translate(model, tok, sentences, *, beam_size, alpha, device):
        calls.append({"src": list(sentences), "beam_size": beam_size, "alpha": alpha, "device": device})
        n = len(sentences)
        if beam_size == 1:
            return [" ".join(r.split()[:-2] + ["."]) for r in REF[:n]]
        return REF[:2] + ["a man ."] * (n - 2)

    clock = iter(ticks)
    monkeypatch.setattr(tr_mod, "translate", fake_translate)
    monkeypatch.setattr(tr_mod, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    return calls


def test_evaluate_bleu_scores_greedy_and_beam_with_sacrebleu_and_writes_the_hypotheses(tmp_path, monkeypatch):
    import sacrebleu

    _parallel_files(tmp_path / "data", "dev2", "xx", "yy", SRC, REF)
    calls = _fake_decoder(monkeypatch, [10.0, 10.5, 20.0, 22.0])
    cfg = tr_mod.TranslateTrainConfig(
        data_dir=str(tmp_path / "data"), test_split="dev2", src_lang="xx", tgt_lang="yy", limit_eval=3,
        beam_size=3, length_penalty=0.7,
    )  # fmt: skip
    out = tmp_path / "run"
    out.mkdir()
    model = nn.Linear(1, 1)
    result = tr_mod.evaluate_bleu(model, "TOK", cfg, device="meta", out_dir=out)
    greedy = [" ".join(r.split()[:-2] + ["."]) for r in REF[:3]]
    beam = REF[:2] + ["a man ."]
    assert result == {
        "test_split": "dev2",
        "test_bleu_greedy": pytest.approx(sacrebleu.corpus_bleu(greedy, [REF[:3]]).score, rel=1e-12),
        "decode_time_s_greedy": 0.5,
        "test_bleu_beam3": pytest.approx(sacrebleu.corpus_bleu(beam, [REF[:3]]).score, rel=1e-12),
        "decode_time_s_beam3": 2.0,
    }
    assert 0 < result["test_bleu_greedy"] < result["test_bleu_beam3"] < 100
    assert calls == [
        {"src": SRC[:3], "beam_size": 1, "alpha": 0.7, "device": "meta"},
        {"src": SRC[:3], "beam_size": 3, "alpha": 0.7, "device": "meta"},
    ]
    assert (out / "dev2.greedy.yy").read_text() == "\n".join(greedy) + "\n"
    assert (out / "dev2.beam3.yy").read_text() == "\n".join(beam) + "\n"
    assert sorted(p.name for p in out.iterdir()) == ["dev2.beam3.yy", "dev2.greedy.yy"]


def test_evaluate_bleu_with_a_beam_of_one_decodes_once_on_the_cpu_and_writes_nothing(tmp_path, monkeypatch):
    import sacrebleu

    _parallel_files(tmp_path / "data", "test_2016_flickr", "de", "en", SRC, REF)
    calls = _fake_decoder(monkeypatch, [1.0, 4.0])
    cfg = tr_mod.TranslateTrainConfig(data_dir=str(tmp_path / "data"), beam_size=1)
    result = tr_mod.evaluate_bleu(nn.Linear(1, 1), None, cfg)
    greedy = [" ".join(r.split()[:-2] + ["."]) for r in REF]
    assert result == {
        "test_split": "test_2016_flickr",
        "test_bleu_greedy": pytest.approx(sacrebleu.corpus_bleu(greedy, [REF]).score, rel=1e-12),
        "decode_time_s_greedy": 3.0,
    }
    assert [(c["beam_size"], c["alpha"], c["device"], len(c["src"])) for c in calls] == [(1, 0.6, "cpu", 4)]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "test_2016_flickr.de",
        "test_2016_flickr.en",
    ]


# ------------------------------------------------------------------------------- VQ-VAE: one epoch
class _SpyVQ(nn.Module):
    """A "VQ-VAE" of one weight w: recon = w * x, quantiser loss 3 w^2, perplexity 2; records its inputs."""

    def __init__(self, w=0.5):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.w * x, None, 3 * self.w**2, {"perplexity": 2.0}


def _vq_run(bar_text, **cfg):
    def progress(iterable=None, **kw):
        return tqdm(iterable, file=bar_text, mininterval=0, **kw)

    return SimpleNamespace(
        cfg=SimpleNamespace(**{"batch_size": 4, "hflip": False, "epochs": 3, **cfg}),
        progress=progress,
        autocast=nullcontext,
    )


def _images(n=10):
    """uint8 images (n, 3, 2, 3), image i holding 10 i + its column index (each differs from its mirror)."""
    cols = torch.arange(3).view(1, 1, 1, 3)
    return (torch.arange(n).view(n, 1, 1, 1) * 10 + cols).expand(n, 3, 2, 3).to(torch.uint8).contiguous()


def test_vq_epoch_steps_on_reconstruction_plus_quantiser_loss(monkeypatch):
    seen = []
    real = tok_mod.train_step

    def spy(run, forward, opt, sched, **kw):
        w = opt.param_groups[0]["params"][0].detach().clone()
        loss, out = real(run, forward, opt, sched, **kw)
        seen.append({"w": w, "loss": loss.detach(), "recon": out[0].detach(), "kw": kw})
        return loss, out

    monkeypatch.setattr(tok_mod, "train_step", spy)
    model = _SpyVQ()
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    bar = io.StringIO()
    train = _images(10)
    sums, seconds = tok_mod._vq_epoch(_vq_run(bar), model, opt, sched, train, 1, 2)
    assert model.training  # the epoch trains
    assert len(seen) == len(model.inputs) == 2 and seconds > 0
    for rec, x in zip(seen, model.inputs):
        w = rec["w"]
        recon = F.mse_loss(w * x, x)
        torch.testing.assert_close(rec["recon"], recon)
        torch.testing.assert_close(rec["loss"], recon + 3 * w**2)  # what the optimiser minimises
        assert rec["kw"]["where"] == "epoch 2" and rec["kw"]["grad_clip"] is None
    # the update is SGD on d/dw [mean((w x - x)^2) + 3 w^2] = 2 (w - 1) mean(x^2) + 6 w
    w0, x0 = seen[0]["w"], model.inputs[0]
    torch.testing.assert_close(seen[1]["w"], w0 - 0.1 * (2 * (w0 - 1) * x0.pow(2).mean() + 6 * w0))
    assert sums == {
        "loss": pytest.approx(sum(r["loss"].item() for r in seen), rel=1e-6),
        "recon": pytest.approx(sum(r["recon"].item() for r in seen), rel=1e-6),
        "perplexity": 4.0,
    }
    text = bar.getvalue()
    assert "epoch 2/3" in text and "\n" not in text and text.endswith("\r")  # the bar wipes itself at the end
    last = seen[-1]["recon"].item()
    assert f"psnr={10 * math.log10(1 / last):.2f}" in text and "ppl=2" in text


def test_vq_epoch_draws_a_shuffled_pass_of_full_batches_in_0_1_and_flips_only_when_asked():
    train = _images(10)
    pixels = train.float() / 255
    for hflip in (False, True):
        model = _SpyVQ()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        torch.manual_seed(3)
        tok_mod._vq_epoch(_vq_run(io.StringIO(), hflip=hflip), model, opt, sched, train, 0, 2)
        assert [len(x) for x in model.inputs] == [4, 4]  # 2 full batches; 2 images left over
        got = torch.cat(model.inputs)
        which = (got[:, 0, 0, 0] * 255 / 10).round().long()  # the image each row came from
        assert len(set(which.tolist())) == 8 and which.tolist() != sorted(which.tolist())
        flipped = []
        for row, i in zip(got, which):
            if torch.equal(row, pixels[i]):
                flipped.append(False)
            else:
                torch.testing.assert_close(row, pixels[i].flip(-1), rtol=0, atol=0)  # a mirror image
                flipped.append(True)
        assert any(flipped) == hflip and not all(flipped)


# ------------------------------------------------------------------------------- palette
def test_fit_palette_summary_file_and_log_by_hand(tmp_path, monkeypatch):
    from vitlens.io import load_checkpoint

    palette = torch.tensor([[0.0, 0.0, 0.0], [100.0, 100.0, 100.0], [250.0, 0.0, 0.0]])
    fits = []

    def fake_fit(images, *, k, seed, iters, sample):
        fits.append({"n": len(images), "k": k, "seed": seed, "iters": iters, "sample": sample})
        return palette

    monkeypatch.setattr(tok_mod, "fit_palette", fake_fit)
    clock = iter([5.0, 7.25])
    monkeypatch.setattr(tok_mod, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    # 5 test images of one colour each; eval_images=3 takes images 0, 2 and 4
    colours = torch.tensor([[10, 0, 0], [90, 90, 90], [100, 110, 100], [0, 0, 0], [240, 10, 0]])
    test = colours.view(5, 3, 1, 1).expand(5, 3, 2, 2).to(torch.uint8)
    cfg = tok_mod.TokenizerTrainConfig(
        kind="palette", k=3, seed=4, palette_iters=6, palette_sample=777, eval_images=3, data="mydata"
    )
    log, opened = [], []
    run = SimpleNamespace(
        cfg=cfg, dir=tmp_path, open=lambda: opened.append(True), log=SimpleNamespace(write=log.append)
    )
    summary = tok_mod._fit_palette(run, torch.zeros(7, 3, 2, 2, dtype=torch.uint8), test)
    # nearest colours: (10,0,0) -> black, (100,110,100) -> grey, (240,10,0) -> red
    sq = (
        torch.tensor([10.0**2, 10.0**2, 10.0**2 + 10.0**2]) / 255**2
    )  # squared error per image, summed over RGB
    mse = (sq / 3).mean().item()
    assert summary == {
        "kind": "palette",
        "k": 3,
        "psnr": pytest.approx(10 * math.log10(1 / mse), rel=1e-6),
        "colors_used_test": 3,
        "fit_time_s": 2.25,
        "train_images": 7,
        "file": "palette.safetensors",
    }
    assert fits == [{"n": 7, "k": 3, "seed": 4, "iters": 6, "sample": 777}]
    assert opened == [True] and log == [summary]
    weights, meta, _ = load_checkpoint(tmp_path / "palette.safetensors")
    assert torch.equal(weights["palette"], palette)
    assert meta == {"kind": "palette", "k": 3, "data": "mydata", "psnr": summary["psnr"]}


def test_train_tokenizer_reads_both_splits_from_the_data_dir_and_writes_the_summary(tmp_path, monkeypatch):
    import json

    calls = []
    colours = torch.tensor([[0, 0, 0], [200, 0, 0], [0, 200, 0], [0, 0, 200]], dtype=torch.uint8)

    def fake_load(data, split, data_dir=None, fraction=1.0, seed=0):
        calls.append((data, split, data_dir, fraction, seed))
        n = 8 if split == "train" else 4
        return colours[torch.arange(n) % 4].view(n, 3, 1, 1).expand(n, 3, 4, 4).contiguous()

    monkeypatch.setattr(tok_mod, "load_images", fake_load)
    cfg = tok_mod.TokenizerTrainConfig(
        kind="palette", data="folder", data_dir=str(tmp_path / "imgs"), fraction=0.5, seed=7, k=4,
        palette_iters=2, palette_sample=100, out=str(tmp_path / "p"), progress=False,
    )  # fmt: skip
    summary = tok_mod.train_tokenizer(cfg)
    assert calls == [
        ("folder", "train", str(tmp_path / "imgs"), 0.5, 7),  # the training fraction
        ("folder", "test", str(tmp_path / "imgs"), 1.0, 0),  # the whole test split, same folder
    ]
    assert summary["colors_used_test"] == 4 and summary["train_images"] == 8
    # four exact colours: the palette finds them, and a perfect match is 100 dB (MSE floor 1e-10), not a crash
    assert summary["psnr"] == pytest.approx(100.0)
    assert json.loads((tmp_path / "p" / "summary.json").read_text()) == summary


# ------------------------------------------------------------------------------- translation data
TRAIN_SRC = [
    "ein hund rennt .", "eine katze schläft .", "zwei hunde spielen .", "ein mann läuft .",
    "eine frau singt .", "ein sehr langer satz mit sehr vielen wörtern und noch mehr wörtern .",
]  # fmt: skip
TRAIN_TGT = [
    "a dog runs .", "a cat sleeps .", "two dogs play .", "a man walks .", "a woman sings .",
    "a very long sentence with very many words and yet more words .",
]  # fmt: skip


def test_translation_data_trains_its_own_bpe_unless_resuming_and_cuts_long_pairs(tmp_path):
    from vitlens.text.data import encode_pairs, train_bpe

    data_dir = tmp_path / "data"
    _parallel_files(data_dir, "train", "xx", "yy", TRAIN_SRC + ["ignored ."], TRAIN_TGT + ["ignored ."])
    _parallel_files(data_dir, "val", "xx", "yy", SRC, REF)
    cfg = tr_mod.TranslateTrainConfig(
        data_dir=str(data_dir), src_lang="xx", tgt_lang="yy", vocab_size=120, limit_train=6, limit_eval=3
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # a run that crashed before its first checkpoint left the tokenizer of other text behind
    stale = train_bpe(["qqq zzz www"] * 4, 100)
    stale.save(str(run_dir / "tokenizer.json"))
    expected = train_bpe(TRAIN_SRC + TRAIN_TGT, 120)
    assert expected.get_vocab() != stale.get_vocab()
    data = tr_mod.load_translation_data(cfg, SimpleNamespace(resume=False, dir=run_dir), max_len=24)
    assert data.tok.get_vocab() == expected.get_vocab()  # a new run trains on its training split
    assert data.train_pairs == encode_pairs(expected, TRAIN_SRC, TRAIN_TGT, 24)
    assert len(data.train_pairs) == 5  # the long pair does not fit 24 tokens
    assert data.val_pairs == encode_pairs(expected, SRC[:3], REF[:3], 24) and len(data.val_pairs) == 1
    assert (data.val_src, data.val_tgt) == (SRC[:3], REF[:3])
    resumed = tr_mod.load_translation_data(cfg, SimpleNamespace(resume=True, dir=run_dir), max_len=24)
    assert resumed.tok.get_vocab() == stale.get_vocab()  # a resumed run keeps the run's own BPE
    fresh = tr_mod.load_translation_data(cfg, SimpleNamespace(resume=True, dir=tmp_path), max_len=24)
    assert fresh.tok.get_vocab() == expected.get_vocab()  # none saved yet: trained again


# ------------------------------------------------------------------------------- language models
class _Stop(Exception):
    pass


@pytest.mark.parametrize("device, fused", [("cpu", False), ("cuda", True)])
def test_lm_adamw_is_fused_on_a_gpu_only(tmp_path, monkeypatch, device, fused):
    from vitlens.train import lm as lm_mod

    (tmp_path / "input.txt").write_text("the quick brown fox jumps over the lazy dog. " * 4)
    real_start, real_create = lm_mod.start_run, lm_mod.create_model
    seen = {}

    def start_on_device(cfg, **kw):
        run = real_start(cfg, **kw)
        run.device = torch.device(device)
        return run

    def create_on_cpu(name, **kw):
        model = real_create(name, **kw)
        return SimpleNamespace(to=lambda dev: model)  # the weights stay on the CPU

    def adamw_spy(params, **kw):
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(lm_mod, "start_run", start_on_device)
    monkeypatch.setattr(lm_mod, "create_model", create_on_cpu)
    monkeypatch.setattr(torch.optim, "AdamW", adamw_spy)
    cfg = lm_mod.LMTrainConfig(
        model="gpt_nano", model_args={"n_layer": 1}, block_size=8, batch_size=2, device="cpu", amp="fp32",
        data=str(tmp_path / "input.txt"), out=str(tmp_path / "lm"), progress=False,
    )  # fmt: skip
    with pytest.raises(_Stop):
        lm_mod.train_lm(cfg)
    assert seen["fused"] is fused  # one kernel for all tensors on a GPU


class _PerfectVQ(nn.Module):
    """Reconstructs every image exactly, with code 0 everywhere."""

    cfg = SimpleNamespace(codebook_size=4)

    def forward(self, x):
        return x.clone(), torch.zeros(len(x), 2, 2, dtype=torch.long), torch.tensor(0.0), {}


def test_evaluate_vq_of_a_perfect_reconstruction_is_100_db_with_one_code():
    images = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    out = tok_mod.evaluate_vq(_PerfectVQ(), images)
    assert out == {"psnr": 100.0, "psnr_per_image": pytest.approx(100.0), "mse": 0.0, "codebook_usage": 25.0,
                   "perplexity": pytest.approx(1.0)}  # fmt: skip


def test_translation_model_is_moved_to_the_runs_device_before_the_optimiser_sees_it(tmp_path, monkeypatch):
    # The run's device is "meta" here (a stand-in for a GPU on this CPU machine): the parameters
    # Adam gets must live there, not where the model was built.
    _parallel_files(tmp_path / "data", "train", "de", "en", TRAIN_SRC, TRAIN_TGT)
    _parallel_files(tmp_path / "data", "val", "de", "en", SRC, REF)
    real_start = tr_mod.start_run
    seen = {}

    def start_on_meta(cfg, **kw):
        run = real_start(cfg, **kw)
        run.device = torch.device("meta")
        return run

    def adam_spy(params, **kw):
        seen["devices"] = {p.device.type for p in params}
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(tr_mod, "start_run", start_on_meta)
    monkeypatch.setattr(torch.optim, "Adam", adam_spy)
    cfg = tr_mod.TranslateTrainConfig(
        model="transformer_nano", vocab_size=100, data_dir=str(tmp_path / "data"), weight_decay=0.01,
        device="cpu", amp="fp32", out=str(tmp_path / "tr"), progress=False,
    )  # fmt: skip
    with pytest.raises(_Stop):
        tr_mod.train_translate(cfg)
    assert seen == {"devices": {"meta"}, "lr": 1.0, "betas": (0.9, 0.98), "eps": 1e-9, "weight_decay": 0.01}


# ------------------------------------------------------------------------------- a whole tiny VQ-VAE run
VQ_TINY = dict(
    kind="vq", data="synthetic", batch_size=4, epochs=2, hidden=8, res_hidden=4, num_res_blocks=1, code_dim=4,
    codebook_size=8, downsample=2, lr=0.01, warmup_steps=1, eval_images=3, progress=False,
)  # fmt: skip


def _synthetic_images(monkeypatch):
    """12 training and 6 test images of 8 x 8 pixels (seeded), in place of a dataset on disk."""
    g = torch.Generator().manual_seed(0)
    splits = {s: torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8) for s, n in
              (("train", 12), ("test", 6))}  # fmt: skip
    monkeypatch.setattr(tok_mod, "load_images", lambda data, split, *a, **k: splits[split])
    return splits


def test_vq_run_files_hold_the_config_the_data_the_init_and_the_whole_test_split(tmp_path, monkeypatch):
    import json

    from PIL import Image

    from vitlens.io import load_checkpoint
    from vitlens.models.tokenizers.vqvae import load_vqvae

    splits = _synthetic_images(monkeypatch)
    first = tok_mod.train_tokenizer(tok_mod.TokenizerTrainConfig(**VQ_TINY, out=str(tmp_path / "a")))
    init = str(tmp_path / "a" / "tokenizer.safetensors")
    cfg = tok_mod.TokenizerTrainConfig(**{**VQ_TINY, "epochs": 1}, init=init, out=str(tmp_path / "b"))
    summary = tok_mod.train_tokenizer(cfg)
    out = tmp_path / "b"
    model, meta = load_vqvae(out / "tokenizer.safetensors")
    config = {
        "in_chans": 3, "hidden": 8, "res_hidden": 4, "num_res_blocks": 1, "downsample": 2, "code_dim": 4,
        "codebook_size": 8, "ema": True, "decay": 0.99, "commitment": 0.25, "dead_threshold": 1.0,
    }  # fmt: skip
    common = {"data": "synthetic", "train_images": 12, "init": init}
    assert json.loads((out / "model.json").read_text()) == {"kind": "vqvae", "config": config, **common}
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert meta == {"kind": "vqvae", "config": config, **common, "epoch": 1, "metrics": pytest.approx(record)}
    _, last_meta, state = load_checkpoint(out / "checkpoints" / "last.safetensors")
    assert last_meta == {**common, "epoch": 1} and state["epoch"] == 1
    # the per-epoch figures use eval_images=3 test images; the summary uses all 6
    whole = {f"test_{k}": v for k, v in tok_mod.evaluate_vq(model, splits["test"]).items()}
    part = {f"test_{k}": v for k, v in tok_mod.evaluate_vq(model, tok_mod.spread(splits["test"], 3)).items()}
    assert {k: v for k, v in record.items() if k.startswith("test_")} == pytest.approx(part, rel=1e-6)
    assert summary == {
        "kind": "vq", "finished": True, "params": sum(p.numel() for p in model.parameters()),
        "epochs_done": 1, "train_images": 12, "train_time_s": pytest.approx(record["epoch_time_s"]),
        "test_images": 6, **{k: pytest.approx(v, rel=1e-6) for k, v in whole.items()},
        "file": "tokenizer.safetensors", "config": config,
    }  # fmt: skip
    assert first["finished"] and first["epochs_done"] == 2
    # recon.png: the 6 test images over their reconstructions, 8 x 8 each with torchvision's 2-pixel grid
    assert Image.open(out / "recon.png").size == (6 * 8 + 7 * 2, 2 * 8 + 3 * 2)


def test_vq_resuming_a_finished_fit_reports_what_its_file_holds(tmp_path, monkeypatch):
    splits = _synthetic_images(monkeypatch)
    cfg = tok_mod.TokenizerTrainConfig(
        **{**VQ_TINY, "epochs": 1, "eval_images": None}, out=str(tmp_path / "a")
    )
    done = tok_mod.train_tokenizer(cfg)
    again = tok_mod.train_tokenizer(cfg, resume=True)
    from vitlens.models.tokenizers.vqvae import load_vqvae

    model, _ = load_vqvae(tmp_path / "a" / "tokenizer.safetensors")
    whole = {f"test_{k}": v for k, v in tok_mod.evaluate_vq(model, splits["test"]).items()}
    assert again["finished"] and again["epochs_done"] == 1
    for summary in (done, again):
        assert {k: summary[k] for k in whole} == pytest.approx(whole, rel=1e-6)
        assert summary["test_images"] == 6
    assert again["train_time_s"] == pytest.approx(done["train_time_s"], rel=1e-9)


# ------------------------------------------------------------------------------- more of the pieces
@pytest.mark.parametrize("masked", [False, True])
def test_lm_batches_come_from_their_generator_alone(tmp_path, masked):
    from vitlens.text.data import BERT_SPECIALS, load_char_corpus
    from vitlens.train import lm as lm_mod

    (tmp_path / "input.txt").write_text("".join(f"line {i}: a quick brown fox.\n" for i in range(30)))
    train, _, tok = load_char_corpus(tmp_path / "input.txt", specials=BERT_SPECIALS if masked else ())
    batches = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # dropout's stream must not change the data
        batches.append(lm_mod.lm_batch(train, tok, masked, 0.3, 12, 6, torch.Generator().manual_seed(5)))
    other = lm_mod.lm_batch(train, tok, masked, 0.3, 12, 6, torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(*batches))
    assert not torch.equal(batches[0][0], other[0])


def test_counting_flops_prints_nothing(capsys):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 5))
    assert trainer_mod.count_flops(model, 2, 3, torch.device("cpu")) == 2 * 12 * 5
    assert capsys.readouterr() == ("", "")


def test_epoch_progress_bars_clear_themselves_and_the_records_stay(tmp_path, capsys):
    from test_train_units import _train

    _train(tmp_path, epochs=2, progress=True)
    captured = capsys.readouterr()
    bars = captured.err
    assert "epoch 1/2" in bars and "epoch 2/2" in bars
    assert "\n" not in bars and bars.endswith("\r")  # each epoch's bar is wiped when it ends
    assert len([line for line in captured.out.splitlines() if line.startswith('{"epoch": ')]) == 2


def test_translation_fp16_steps_use_the_loss_scaler_that_is_restored_and_saved(tmp_path, monkeypatch):
    from vitlens.train import harness

    _parallel_files(tmp_path / "data", "train", "de", "en", TRAIN_SRC, TRAIN_TGT)
    _parallel_files(tmp_path / "data", "val", "de", "en", SRC, REF)
    seen = {}
    real_restore = harness.Run.restore

    def restore_spy(self, model, optimizer=None, scheduler=None, scaler=None):
        seen["restored"] = scaler
        return real_restore(self, model, optimizer, scheduler, scaler)

    def steps_spy(*a, **k):
        seen["stepped"] = k["scaler"]
        raise _Stop

    monkeypatch.setattr(harness.Run, "restore", restore_spy)
    monkeypatch.setattr(tr_mod, "run_steps", steps_spy)
    cfg = tr_mod.TranslateTrainConfig(
        model="transformer_nano", vocab_size=100, data_dir=str(tmp_path / "data"), device="cpu", amp="fp16",
        out=str(tmp_path / "tr"), progress=False,
    )  # fmt: skip
    with pytest.raises(_Stop):
        tr_mod.train_translate(cfg)
    assert isinstance(seen["stepped"], torch.amp.GradScaler) and seen["stepped"].is_enabled()
    assert seen["restored"] is seen["stepped"]


# ------------------------------------------------------------------------------- text runs: wiring
def _text_files(tmp_path):
    _parallel_files(tmp_path / "data", "train", "de", "en", TRAIN_SRC, TRAIN_TGT)
    _parallel_files(tmp_path / "data", "val", "de", "en", SRC, REF)
    _parallel_files(tmp_path / "data", "test_2016_flickr", "de", "en", SRC[:2], REF[:2])
    return str(tmp_path / "data")


TR_TINY = dict(
    model="transformer_nano", vocab_size=100, max_steps=2, max_tokens=200, warmup_steps=1, eval_every=2,
    beam_size=1, amp="fp32", device="cpu", progress=False,
)  # fmt: skip


def test_translation_run_writes_model_json_tokenizer_and_target_token_rate(tmp_path):
    import json

    from vitlens.text.data import load_subword_tokenizer

    cfg = tr_mod.TranslateTrainConfig(**TR_TINY, data_dir=_text_files(tmp_path), out=str(tmp_path / "tr"))
    summary = tr_mod.train_translate(cfg)
    out = tmp_path / "tr"
    vocab = load_subword_tokenizer(out / "tokenizer.json").get_vocab_size()
    assert vocab == summary["vocab_size"]
    assert json.loads((out / "model.json").read_text()) == {
        "model": "transformer_nano",
        "model_args": {"src_vocab_size": vocab, "tgt_vocab_size": vocab, "pad_id": 0},
        "task": "translation",
        "tokenizer": "tokenizer.json",
        "src_lang": "de",
        "tgt_lang": "en",
    }
    (record,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(record) == {"step", "lr", "train_loss", "tgt_tokens_per_s", "epoch", "val_loss",
                           "val_bleu_greedy", "train_time_s"}  # fmt: skip
    assert record["tgt_tokens_per_s"] > 0 and record["step"] == 2
    assert summary["finished"] and {"test_split", "test_bleu_greedy"} <= set(summary)


@pytest.mark.parametrize("grad_clip, fix", [
    (1.0, "lower --lr-factor or use --amp fp32"),
    (None, "lower --lr-factor or use --amp fp32, or clip the gradients (--grad-clip 1.0)"),
])  # fmt: skip
def test_a_diverging_translation_run_names_the_step_and_the_fix(tmp_path, monkeypatch, grad_clip, fix):
    from vitlens.errors import TrainingError

    monkeypatch.setattr(
        tr_mod, "seq2seq_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True)
    )
    cfg = tr_mod.TranslateTrainConfig(
        **TR_TINY, grad_clip=grad_clip, data_dir=_text_files(tmp_path), out=str(tmp_path / "tr")
    )
    with pytest.raises(TrainingError) as err:
        tr_mod.train_translate(cfg)
    assert str(err.value) == f"training diverged: the loss became NaN at step 1; {fix}"


def _first_loss_on_meta(monkeypatch, module, task_name):
    """Run the task's first loss with the run's device set to "meta" (a stand-in for a GPU) and a
    recording module in place of the (DDP-)wrapped model; returns the devices of what it got."""
    from vitlens.train import harness

    seen = {}

    class Recorder(nn.Module):
        def forward(self, *tensors):
            seen["devices"] = [t.device.type for t in tensors]
            seen["shapes"] = [tuple(t.shape) for t in tensors]
            raise _Stop

    real_start = module.start_run

    def start_on_meta(cfg, **kw):
        run = real_start(cfg, **kw)
        run.device = torch.device("meta")
        return run

    def steps_spy(run, task, *a, **k):
        seen["tokens"] = task.tokens
        seen["batch"] = batch = task.next_batch(0)
        task.loss(batch)

    monkeypatch.setattr(module, "start_run", start_on_meta)
    monkeypatch.setattr(harness.Run, "wrap", lambda self, m, find_unused=False: Recorder())
    monkeypatch.setattr(module, "run_steps", steps_spy)
    return seen


def test_lm_batches_go_to_the_runs_device(tmp_path, monkeypatch):
    from vitlens.train import lm as lm_mod

    (tmp_path / "input.txt").write_text("the quick brown fox jumps over the lazy dog. " * 4)
    seen = _first_loss_on_meta(monkeypatch, lm_mod, "lm")
    cfg = lm_mod.LMTrainConfig(
        model="gpt_nano", model_args={"n_layer": 1}, block_size=8, batch_size=2, device="cpu", amp="fp32",
        data=str(tmp_path / "input.txt"), out=str(tmp_path / "lm"), progress=False,
    )  # fmt: skip
    with pytest.raises(_Stop):
        lm_mod.train_lm(cfg)
    assert seen["devices"] == ["meta", "meta"] and seen["shapes"] == [(2, 8), (2, 8)]
    x, y, weight = seen["batch"]
    assert seen["tokens"](seen["batch"]) == 16 and weight == 1.0


def test_translation_batches_go_to_the_runs_device_and_count_target_tokens(tmp_path, monkeypatch):
    from vitlens.text.data import PAD

    seen = _first_loss_on_meta(monkeypatch, tr_mod, "translate")
    cfg = tr_mod.TranslateTrainConfig(**TR_TINY, data_dir=_text_files(tmp_path), out=str(tmp_path / "tr"))
    with pytest.raises(_Stop):
        tr_mod.train_translate(cfg)
    src, tgt, _ = seen["batch"]
    assert seen["devices"] == ["meta", "meta"]  # the model gets (src, tgt[:, :-1]) on the run's device
    assert seen["shapes"] == [tuple(src.shape), (tgt.shape[0], tgt.shape[1] - 1)]
    # tokens: the targets predicted after <s>, padding not counted
    assert seen["tokens"](seen["batch"]) == tgt.shape[1] - 1 == int((tgt != PAD).sum()) - 1
    padded = torch.tensor([[1, 5, 6, 2, PAD], [1, 7, 2, PAD, PAD]])  # 3 + 2 targets after <s>
    assert seen["tokens"]((src, padded, 1.0)) == 5


def test_load_images_takes_decoded_images_as_they_are_and_a_seeded_class_balanced_fraction(monkeypatch):
    import vitlens.data as data_mod
    from vitlens.data import nested_fraction_indices

    images = torch.arange(12, dtype=torch.uint8).view(12, 1, 1, 1).expand(12, 3, 2, 2)
    targets = [0, 1, 2] * 4

    class Decoded:  # decoded in memory: the tensor is used as it is, no item is read
        def __init__(self):
            self.images, self.targets = images, targets

        def __len__(self):
            return 12

        def __getitem__(self, i):
            raise AssertionError("a decoded dataset is not read item by item")

    class Files(Decoded):  # decoded on access: its items are stacked
        def __init__(self):
            self.targets = targets

        def __getitem__(self, i):
            return images[i], targets[i]

    calls = []

    def fake_build(data, split, data_dir):
        calls.append((data, split, data_dir))
        return Decoded() if data == "decoded" else Files()

    monkeypatch.setattr(data_mod, "build_dataset", fake_build)
    for data in ("decoded", "files"):
        assert torch.equal(tok_mod.load_images(data, "test", "/d"), images)
        half = tok_mod.load_images(data, "train", "/d", fraction=0.5, seed=3)
        assert torch.equal(half, images[torch.as_tensor(nested_fraction_indices(targets, 0.5, 3))])
        assert len(half) == 6 and sorted(half[:, 0, 0, 0].remainder(3).tolist()) == [0, 0, 1, 1, 2, 2]
    # another seed, another half of each class
    assert not torch.equal(tok_mod.load_images("decoded", "train", fraction=0.5, seed=0), half)
    assert calls[:2] == [("decoded", "test", "/d"), ("decoded", "train", "/d")]


def test_a_resumed_fp16_image_run_restores_the_loss_scaler_its_steps_use(tmp_path, monkeypatch):
    from test_train_units import _train

    from vitlens.train import harness

    restored = []
    real_restore = harness.Run.restore

    def restore_spy(self, model, optimizer=None, scheduler=None, scaler=None):
        restored.append(scaler)
        return real_restore(self, model, optimizer, scheduler, scaler)

    monkeypatch.setattr(harness.Run, "restore", restore_spy)
    run = _train(tmp_path, mp=monkeypatch, amp="fp16", epochs=1)
    assert restored[0] is run["steps"][0]["scaler"] and restored[0].is_enabled()


def test_train_epoch_moves_each_batch_to_the_runs_device():
    seen = {}

    def mixer(images, labels):
        seen["mixer"] = (images.device.type, labels.device.type)
        return images, labels

    class Recorder(nn.Module):
        def forward(self, images):
            seen["model"] = images.device.type
            raise _Stop

    run = SimpleNamespace(
        cfg=SimpleNamespace(channels_last=False, grad_clip=None, epochs=1, label_smoothing=0.0),
        device=torch.device("meta"),  # a stand-in for a GPU: the batch must arrive there
        progress=lambda it, **kw: tqdm(it, disable=True, **kw),
        autocast=nullcontext,
        dist=DistInfo(),
    )
    loader = [(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))]
    with pytest.raises(_Stop):
        trainer_mod.train_epoch(run, Recorder(), nn.Linear(1, 1), loader, None, None, None, None, mixer, 0)
    assert seen == {"mixer": ("meta", "meta"), "model": "meta"}


def test_device_resident_training_batches_follow_the_runs_seed_and_shard_like_the_dataloader():
    from vitlens.data import build_data
    from vitlens.data.device_loader import DeviceLoader

    train_ds, _, _ = build_data("cifar10-mini", augment=False, fraction=0.05, seed=5)

    def labels(path, world=1, rank=0):
        cfg = TrainConfig(data_path=path, seed=5)
        loader = trainer_mod.build_train_loader(train_ds, cfg, DistInfo(rank, world), torch.device("cpu"), 8)
        assert isinstance(loader, DeviceLoader) == (path == "device")
        loader.set_epoch(1)
        return [y.tolist() for _, y in loader]

    for world, rank in ((1, 0), (2, 1)):
        assert labels("device", world, rank) == labels("dataloader", world, rank)


def test_flops_are_counted_with_an_input_on_the_models_device():
    with torch.device("meta"):  # a stand-in for a GPU model: a CPU input would not reach it
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 5))
    assert trainer_mod.count_flops(model, 2, 3, torch.device("meta")) == 2 * 12 * 5


def _compile_spy(monkeypatch):
    compiled = {"modules": [], "calls": 0}

    def fake_compile(module):
        compiled["modules"].append(module)

        def run(*a, **k):
            compiled["calls"] += 1
            return module(*a, **k)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    return compiled


def test_compile_wraps_the_model_every_image_training_step_runs(tmp_path, monkeypatch):
    from test_train_units import _train

    compiled = _compile_spy(monkeypatch)
    run = _train(tmp_path, mp=monkeypatch, compile=True, epochs=1)
    assert compiled["modules"] == [run["model"]] and compiled["calls"] == len(run["steps"]) == 2


def test_compile_wraps_the_objective_every_lm_step_runs(tmp_path, monkeypatch):
    from vitlens.train import lm as lm_mod

    compiled = _compile_spy(monkeypatch)
    (tmp_path / "input.txt").write_text("the quick brown fox jumps over the lazy dog. " * 4)
    cfg = lm_mod.LMTrainConfig(
        model="gpt_nano", model_args={"n_layer": 1}, block_size=8, batch_size=2, max_steps=3, eval_every=3,
        eval_iters=1, device="cpu", amp="fp32", compile=True, data=str(tmp_path / "input.txt"),
        out=str(tmp_path / "lm"), progress=False,
    )  # fmt: skip
    assert lm_mod.train_lm(cfg)["steps"] == 3
    assert [type(m) for m in compiled["modules"]] == [lm_mod.LMObjective] and compiled["calls"] == 3


def test_compile_wraps_the_model_every_translation_step_runs(tmp_path, monkeypatch):
    compiled = _compile_spy(monkeypatch)
    cfg = tr_mod.TranslateTrainConfig(
        **{**TR_TINY, "eval_bleu": False},
        compile=True,
        data_dir=_text_files(tmp_path),
        out=str(tmp_path / "tr"),
    )
    assert tr_mod.train_translate(cfg)["steps"] == 2
    assert len(compiled["modules"]) == 1 and compiled["calls"] == 2
    assert type(compiled["modules"][0]).__name__ == "Seq2SeqTransformer"


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_bert_batches_of_rank_1_of_2_are_its_share_of_the_steps_global_batch(
    tmp_path, monkeypatch, one_process_group
):
    """Process 1 of 2 (a gloo group of one stands in for the other): its share of the step's global
    batch of BERT-corrupted windows, drawn from the step alone, weighted by the targets it holds."""
    from vitlens.text.data import BERT_SPECIALS, load_char_corpus
    from vitlens.train import harness
    from vitlens.train import lm as lm_mod

    text = "".join(f"line {i}: the quick brown fox.\n" for i in range(20))
    (tmp_path / "input.txt").write_text(text)
    seen = {}
    real_start = lm_mod.start_run

    def start_as_rank_1(cfg, **kw):
        run = real_start(cfg, **kw)
        run.dist = DistInfo(rank=1, world_size=2)
        return run

    def wrap_spy(self, module, find_unused=False):
        seen["find_unused"] = find_unused  # DDP must allow BERT's pooler and head to get no MLM gradient
        return module

    def steps_spy(run, task, *a, **k):
        torch.manual_seed(123)  # whatever the global RNG holds, the batch is the step's
        seen["batch"] = task.next_batch(0)
        raise _Stop

    monkeypatch.setattr(lm_mod, "start_run", start_as_rank_1)
    monkeypatch.setattr(harness.Run, "wrap", wrap_spy)
    monkeypatch.setattr(lm_mod, "run_steps", steps_spy)
    cfg = lm_mod.LMTrainConfig(
        model="bert_nano", model_args={"depth": 1}, block_size=8, batch_size=8, mlm_prob=0.3, device="cpu",
        amp="fp32", data=str(tmp_path / "input.txt"), out=str(tmp_path / "lm"), progress=False, seed=4,
    )  # fmt: skip
    with pytest.raises(_Stop):
        lm_mod.train_lm(cfg)
    train, _, tok = load_char_corpus(
        tmp_path / "input.txt", val_fraction=cfg.val_fraction, specials=BERT_SPECIALS
    )
    g = torch.Generator().manual_seed(harness.run_seed(4, 0))
    x, y = lm_mod.lm_batch(train, tok, True, 0.3, 8, 8, g)
    got_x, got_y, weight = seen["batch"]
    assert (x[:, 0] == tok.token_id("[CLS]")).all()  # BERT windows behind [CLS]
    assert torch.equal(got_x, x[1::2]) and torch.equal(got_y, y[1::2])
    counted = y != -100
    assert weight == pytest.approx(2 * counted[1::2].sum().item() / counted.sum().item())
    assert weight != 1.0 and seen["find_unused"] is True


def test_an_epochs_time_and_image_rate_are_measured_within_the_run(tmp_path):
    import time

    from test_train_units import _records, _train

    t0 = time.perf_counter()
    run = _train(tmp_path, epochs=1)
    wall = time.perf_counter() - t0
    (record,) = _records(run["out"])
    assert 0 < record["epoch_time_s"] < wall  # the epoch's own seconds, not a clock reading
    assert record["img_per_s"] > 20 / wall and run["summary"]["train_time_s"] == record["epoch_time_s"]
