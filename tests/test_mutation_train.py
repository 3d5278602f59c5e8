"""Small behaviours of vitlens.train that mutation testing showed no test pinned (issue 15).

Each test states its expectation independently: the torchrun environment contract, the file the
kernel keeps CPU flags in, the keys a user reads from a run's files, the text of an error message.
"""

from __future__ import annotations

import json
import pathlib
import re
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from vitlens.errors import ConfigError, DeviceError, ResumeError
from vitlens.train import distributed as dist_mod
from vitlens.train import harness, precision
from vitlens.train import lm as lm_mod
from vitlens.train import translate as tr_mod
from vitlens.train.config import TrainConfig
from vitlens.train.distributed import DistInfo, init_distributed
from vitlens.train.trainer import model_overrides


# ------------------------------------------------------------------------------ torchrun environment
@pytest.fixture
def torchrun_env(monkeypatch):
    """A clean torchrun environment and a process group that records how it would be started."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    calls = {"backend": [], "cuda_device": []}
    monkeypatch.setattr(dist_mod.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist_mod.dist, "init_process_group", lambda backend: calls["backend"].append(backend))
    monkeypatch.setattr(dist_mod.torch.cuda, "set_device", lambda i: calls["cuda_device"].append(i))
    return calls


def test_init_distributed_reads_the_launcher_variables(torchrun_env, monkeypatch):
    assert init_distributed("cpu") == DistInfo(0, 1, 0)  # no RANK: one process
    monkeypatch.setenv("RANK", "0")
    assert init_distributed("cpu") == DistInfo(0, 1, 0)  # RANK without WORLD_SIZE: still one process
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("cpu") == DistInfo(0, 1, 0)  # a world of one needs no process group
    assert torchrun_env["backend"] == []
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert init_distributed("cpu") == DistInfo(3, 4, 0)  # LOCAL_RANK absent: 0
    assert torchrun_env["backend"] == ["gloo"] and torchrun_env["cuda_device"] == []
    monkeypatch.setenv("LOCAL_RANK", "2")
    info = init_distributed("cuda")
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 2)
    assert info.enabled and not info.is_main
    assert torchrun_env["backend"] == ["gloo", "nccl"] and torchrun_env["cuda_device"] == [2]


def test_one_process_collectives_are_no_ops_and_a_group_is_closed_once(monkeypatch):
    calls = []
    monkeypatch.setattr(
        dist_mod.dist, "all_reduce", lambda t, op: calls.append(("all_reduce", op)) or t.mul_(2)
    )
    monkeypatch.setattr(dist_mod.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist_mod.dist, "destroy_process_group", lambda: calls.append("destroy"))
    one, two = DistInfo(), DistInfo(1, 2, 0)
    values = [1.5, 2.0]
    assert dist_mod.all_reduce_sum(values, one, torch.device("cpu")) is values
    dist_mod.barrier(one)
    monkeypatch.setattr(dist_mod.dist, "is_initialized", lambda: True)
    dist_mod.cleanup(one)
    assert calls == []
    # Counts past 2**24 stay exact: the sum is taken in float64, not float32.
    out = dist_mod.all_reduce_sum([16_777_217.0, 1.5], two, torch.device("cpu"))
    assert out == [33_554_434.0, 3.0] and calls == [("all_reduce", dist_mod.dist.ReduceOp.SUM)]
    dist_mod.barrier(two)
    dist_mod.cleanup(two)
    assert calls[1:] == ["barrier", "destroy"]
    monkeypatch.setattr(dist_mod.dist, "is_initialized", lambda: False)
    dist_mod.cleanup(two)  # already closed: nothing to destroy
    assert calls[1:] == ["barrier", "destroy"]


def test_init_distributed_keeps_an_existing_process_group(torchrun_env, monkeypatch):
    monkeypatch.setattr(dist_mod.dist, "is_initialized", lambda: True)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert init_distributed("cpu") == DistInfo(1, 2, 0)
    assert torchrun_env["backend"] == []


@dataclass
class _RunCfg:
    out: str
    device: str = "cuda"
    amp: str = "fp32"


def test_start_run_puts_each_launched_process_on_its_local_gpu(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(harness, "resolve_device", lambda name: torch.device(name))

    def fake_init(kind):
        seen["kind"] = kind
        return DistInfo(5, 8, 1)

    def fake_amp(amp, device):
        seen["amp_device"] = device

    monkeypatch.setattr(harness, "init_distributed", fake_init)
    monkeypatch.setattr(harness, "resolve_amp", fake_amp)
    run = harness.start_run(_RunCfg(out=str(tmp_path / "r")))
    assert seen["kind"] == "cuda"
    assert run.device == torch.device("cuda", 1) and seen["amp_device"] == torch.device("cuda", 1)
    assert run.dist == DistInfo(5, 8, 1) and not run.is_main
    # On the CPU there is no device index to choose.
    seen.clear()
    run = harness.start_run(_RunCfg(out=str(tmp_path / "c"), device="cpu"))
    assert run.device == torch.device("cpu") and seen["kind"] == "cpu"
    # distributed=False: one process whatever torchrun says.
    seen.clear()
    run = harness.start_run(_RunCfg(out=str(tmp_path / "one")), distributed=False)
    assert "kind" not in seen and run.dist == DistInfo() and run.device == torch.device("cuda")


# ------------------------------------------------------------------------------ CPU flags
def test_cpu_flags_are_read_from_proc_cpuinfo_by_default(monkeypatch):
    read = []

    def fake_read_text(self, *a, **k):
        read.append(str(self))
        return "processor\t: 0\nflags\t\t: fpu avx512_bf16 amx_bf16\n"

    monkeypatch.setattr(pathlib.Path, "read_text", fake_read_text)
    assert precision._cpu_flags() == {"fpu", "avx512_bf16", "amx_bf16"}
    assert read == ["/proc/cpuinfo"]
    read.clear()
    cap = precision.detect_capability()
    assert read == ["/proc/cpuinfo"] and cap.cpu_amx_bf16 and cap.cpu_avx512_bf16


# ------------------------------------------------------------------------------ model overrides
def test_model_overrides_pass_the_data_statistics_to_pixel_and_vq_tokenizers():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    for tok in ("pixel", "vq"):
        cfg = TrainConfig(model="vit_micro_patch4_32", tokenizer=tok)
        args = model_overrides(cfg, 10, 32, 3, mean, std)
        assert args["tokenizer"] == tok
        assert args["tokenizer_args"] == {"mean": mean, "std": std}
        assert args["num_classes"] == 10 and args["img_size"] == 32 and "in_chans" not in args
        # Only one of the two statistics: nothing to un-normalise with.
        assert "tokenizer_args" not in model_overrides(cfg, 10, 32, 3, None, std)
        assert "tokenizer_args" not in model_overrides(cfg, 10, 32, 3, mean, None)
        assert "tokenizer_args" not in model_overrides(cfg, 10, 32, 3)
    # The user's own values win over the data's.
    cfg = TrainConfig(
        model="vit_micro_patch4_32",
        tokenizer="pixel",
        model_args={"tokenizer_args": {"mean": (0.0, 0.0, 0.0)}},
    )
    args = model_overrides(cfg, 10, 32, 3, mean, std)
    assert args["tokenizer_args"] == {"mean": (0.0, 0.0, 0.0), "std": std}
    # Other tokenizers take no statistics; no tokenizer: no tokenizer keys at all.
    args = model_overrides(
        TrainConfig(model="vit_micro_patch4_32", tokenizer="palette"), 10, 32, 3, mean, std
    )
    assert args["tokenizer"] == "palette" and "tokenizer_args" not in args
    args = model_overrides(TrainConfig(model="vit_micro_patch4_32"), 10, 32, 3, mean, std)
    assert "tokenizer" not in args and "tokenizer_args" not in args


def test_model_overrides_size_and_channels():
    cfg = TrainConfig(model="vit_micro_patch4_32", model_args={"img_size": 48})
    args = model_overrides(cfg, 7, 32, 1)
    assert args == {"num_classes": 7, "img_size": 48, "in_chans": 1}  # the user's img_size wins
    args = model_overrides(TrainConfig(model="resnet18"), 100, 64, 1)
    assert args == {"num_classes": 100, "in_chans": 1}  # a CNN has no img_size


# ------------------------------------------------------------------------------ translation
def test_translate_config_messages_name_the_flag_and_the_fix():
    with pytest.raises(
        ConfigError,
        match=r"--vocab-size 99 is smaller than the characters of any real corpus; "
        r"give at least 100 \(8000 is the default for Multi30k\)",
    ):
        tr_mod.TranslateTrainConfig(vocab_size=99)
    assert tr_mod.TranslateTrainConfig(vocab_size=100).vocab_size == 100  # the smallest that is allowed
    for flag, name in (
        ("--max-steps", "max_steps"),
        ("--max-tokens", "max_tokens"),
        ("--eval-every", "eval_every"),
        ("--warmup-steps", "warmup_steps"),
        ("--beam-size", "beam_size"),
    ):
        with pytest.raises(ConfigError, match=rf"^{flag} must be at least 1, got 0$"):
            tr_mod.TranslateTrainConfig(**{name: 0})
    with pytest.raises(ConfigError, match=r"^--amp must be one of auto, bf16, fp16, fp32; got 'half'$"):
        tr_mod.TranslateTrainConfig(amp="half")


def _fake_translation_run(eval_bleu=True, rank=0):
    return SimpleNamespace(
        cfg=SimpleNamespace(eval_bleu=eval_bleu),
        is_main=rank == 0,
        device=torch.device("cpu"),
        autocast=lambda: torch.autocast("cpu", enabled=False),
        dist=DistInfo(rank, 2 if rank else 1),
        amp_name="fp32",
        dir=None,
    )


def test_validation_figures_report_greedy_bleu_on_the_main_process(monkeypatch):
    seen = {}
    monkeypatch.setattr(tr_mod, "evaluate_loss", lambda model, pairs, run, tokens: 2.5)

    def fake_translate(model, tok, src, beam_size, device):
        seen["beam_size"] = beam_size
        return [s.upper() for s in src]

    monkeypatch.setattr(tr_mod, "translate", fake_translate)
    monkeypatch.setattr(
        tr_mod, "corpus_bleu", lambda hyps, refs: 100.0 * sum(h == r for h, r in zip(hyps, refs)) / len(refs)
    )
    data = SimpleNamespace(tok=None, val_pairs=[], val_src=["a", "b"], val_tgt=["A", "x"])
    model = torch.nn.Linear(1, 1)
    batches = SimpleNamespace(progress=1.25)
    out = tr_mod.validation_figures(model, data, _fake_translation_run(), 100, batches)
    assert out == {"epoch": 1.25, "val_loss": 2.5, "val_bleu_greedy": 50.0} and seen["beam_size"] == 1
    assert tr_mod.validation_figures(model, data, _fake_translation_run(rank=1), 100, batches) == {
        "epoch": 1.25,
        "val_loss": 2.5,
    }
    assert "val_bleu_greedy" not in tr_mod.validation_figures(
        model, data, _fake_translation_run(False), 100, batches
    )


def test_translation_summary_copies_the_last_validation_figures(monkeypatch):
    monkeypatch.setattr(tr_mod, "evaluate_bleu", lambda *a, **k: {"test_bleu_greedy": 12.0})
    cfg = SimpleNamespace(max_steps=10, model="transformer_nano", max_tokens=300)
    data = SimpleNamespace(tok=SimpleNamespace(get_vocab_size=lambda: 123))
    model = torch.nn.Linear(2, 3)  # 9 parameters
    record = {"epoch": 0.5, "val_loss": 1.75, "val_bleu_greedy": 33.0}
    s = tr_mod.translation_summary(_fake_translation_run(), model, data, cfg, 4, record, 9.5)
    assert s == {
        "finished": False,
        "model": "transformer_nano",
        "params": 9,
        "vocab_size": 123,
        "steps": 4,
        "epochs": 0.5,
        "max_tokens": 300,
        "train_time_s": 9.5,
        "val_loss": 1.75,
        "val_bleu_greedy": 33.0,
        "device": "cpu",
        "amp": "fp32",
        "world_size": 1,
    }
    done = tr_mod.translation_summary(_fake_translation_run(), model, data, cfg, 10, record, 9.5)
    assert done["finished"] and done["test_bleu_greedy"] == 12.0


# ------------------------------------------------------------------------------ LM run: scaler restored
def test_lm_run_restores_the_loss_scaler_it_checkpoints(tmp_path, monkeypatch):
    text = "the quick brown fox jumps over the lazy dog. " * 12
    (tmp_path / "input.txt").write_text(text)
    seen = {}
    real_restore, real_steps = harness.Run.restore, lm_mod.run_steps

    def restore_spy(self, model, optimizer=None, scheduler=None, scaler=None):
        seen["restored"] = scaler
        return real_restore(self, model, optimizer, scheduler, scaler)

    def steps_spy(*a, **k):
        seen["saved"] = k["scaler"]
        return real_steps(*a, **k)

    monkeypatch.setattr(harness.Run, "restore", restore_spy)
    monkeypatch.setattr(lm_mod, "run_steps", steps_spy)
    cfg = lm_mod.LMTrainConfig(
        model="gpt_nano",
        model_args={"n_layer": 1},
        max_steps=1,
        batch_size=2,
        block_size=8,
        eval_every=1,
        eval_iters=1,
        amp="fp32",
        device="cpu",
        progress=False,
        data=str(tmp_path / "input.txt"),
        out=str(tmp_path / "lm"),
    )
    summary = lm_mod.train_lm(cfg)
    assert isinstance(seen["restored"], torch.amp.GradScaler) and seen["restored"] is seen["saved"]
    fresh = lm_mod.create_model("gpt_nano", n_layer=1, vocab_size=len(set(text)))
    assert summary["model"] == "gpt_nano" and summary["device"] == "cpu"
    assert summary["params"] == sum(p.numel() for p in fresh.parameters())
    assert json.loads((tmp_path / "lm" / "summary.json").read_text()) == summary


# ------------------------------------------------------------------------------ VQ tokenizer run
def test_vq_run_records_the_tokenizer_config_in_model_json(tmp_path):
    from vitlens.train.tokenizer import TokenizerTrainConfig, train_tokenizer

    cfg = TokenizerTrainConfig(
        kind="vq",
        data="cifar10-mini",
        fraction=0.05,
        epochs=1,
        batch_size=50,
        codebook_size=16,
        code_dim=8,
        hidden=16,
        res_hidden=8,
        num_res_blocks=1,
        warmup_steps=1,
        eval_images=20,
        progress=False,
        out=str(tmp_path / "vq"),
    )
    train_tokenizer(cfg)
    meta = json.loads((tmp_path / "vq" / "model.json").read_text())
    assert meta["kind"] == "vqvae" and meta["data"] == "cifar10-mini" and meta["train_images"] > 0
    c = meta["config"]
    assert (c["codebook_size"], c["code_dim"], c["hidden"], c["res_hidden"], c["num_res_blocks"]) == (
        16,
        8,
        16,
        8,
        1,
    )


# ------------------------------------------------------------------------------ messages users read
def _exactly(message):
    return "^" + re.escape(message) + "$"


def _refuses(make, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        make()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (dict(fraction=0.0), "fraction must be in (0, 1], got 0.0"),
        (dict(amp="half"), "amp must be one of auto, bf16, fp16, fp32; got 'half'"),
        (dict(data_path="gpu"), "data_path must be auto, device or dataloader; got 'gpu'"),
        (dict(tta="crop"), "tta must be none or 'flip', got 'crop'"),
        (dict(optimizer="lamb"), "optimizer must be 'adamw' or 'sgd', got 'lamb'"),
        (dict(on_corrupt="skip"), "on_corrupt must be 'warn' or 'error', got 'skip'"),
        (dict(epochs=0), "epochs must be at least 1, got 0"),
        (dict(batch_size=0), "batch_size must be at least 1, got 0"),
        (dict(eval_every=0), "eval_every must be at least 1, got 0"),
        (dict(checkpoint_every=0), "checkpoint_every must be at least 1, got 0"),
        (dict(img_size=0), "img_size must be positive, got 0"),
        (dict(stop_after_epochs=0), "stop_after_epochs must be at least 1, got 0"),
        (dict(lr=0.0, min_lr=0.0), "lr must be positive and min_lr non-negative; got 0.0, 0.0"),
        (dict(lr=0.1, min_lr=-0.5), "lr must be positive and min_lr non-negative; got 0.1, -0.5"),
        (dict(ema_decay=1.0), "ema_decay must be in (0, 1) (or none), got 1.0"),
        (dict(weight_decay=-1.0), "weight_decay must be non-negative, got -1.0"),
        (dict(warmup_epochs=-1.0), "warmup_epochs must be non-negative, got -1.0"),
        (dict(mixup=-0.5), "mixup must be non-negative, got -0.5"),
        (dict(cutmix=-0.5), "cutmix must be non-negative, got -0.5"),
        (dict(num_workers=-1), "num_workers must be non-negative, got -1"),
        (dict(label_smoothing=1.0), "label_smoothing must be in [0, 1), got 1.0"),
        (dict(random_erasing=1.0), "random_erasing must be in [0, 1), got 1.0"),
        (dict(grad_clip=0.0), "grad_clip must be positive (or none), got 0.0"),
        (dict(time_budget_min=0.0), "time_budget_min must be positive (or none), got 0.0"),
    ],
)
def test_train_config_messages_name_the_field_and_the_value(bad, message):
    _refuses(lambda: TrainConfig(**bad), message)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (dict(max_steps=0), "--max-steps must be at least 1, got 0"),
        (dict(batch_size=0), "--batch-size must be at least 1, got 0"),
        (dict(eval_every=0), "--eval-every must be at least 1, got 0"),
        (dict(eval_iters=0), "--eval-iters must be at least 1, got 0"),
        (dict(block_size=1), "--block-size must be at least 2, got 1"),
        (dict(val_fraction=1.0), "--val-fraction must be in (0, 1), got 1.0"),
        (dict(mlm_prob=0.0), "--mlm-prob must be in (0, 1), got 0.0"),
        (dict(amp="half"), "--amp must be one of auto, bf16, fp16, fp32; got 'half'"),
    ],
)
def test_lm_config_messages_name_the_flag_and_the_value(bad, message):
    _refuses(lambda: lm_mod.LMTrainConfig(**bad), message)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (dict(kind="pixel"), "kind must be 'vq' or 'palette', got 'pixel'"),
        (dict(fraction=1.5), "fraction must be in (0, 1], got 1.5"),
        (dict(epochs=0), "epochs must be at least 1, got 0"),
        (dict(batch_size=0), "batch_size must be at least 1, got 0"),
        (dict(k=0), "k must be at least 1, got 0"),
        (dict(palette_iters=0), "palette_iters must be at least 1, got 0"),
        (dict(palette_sample=0), "palette_sample must be at least 1, got 0"),
        (dict(codebook_size=0), "codebook_size must be at least 1, got 0"),
        (dict(lr=0.0), "lr must be positive, warmup_steps and weight_decay non-negative"),
        (dict(warmup_steps=-1), "lr must be positive, warmup_steps and weight_decay non-negative"),
        (dict(weight_decay=-0.1), "lr must be positive, warmup_steps and weight_decay non-negative"),
    ],
)
def test_tokenizer_config_messages_name_the_field_and_the_value(bad, message):
    from vitlens.train.tokenizer import TokenizerTrainConfig

    _refuses(lambda: TokenizerTrainConfig(**bad), message)


def test_device_messages_say_what_is_missing_and_what_to_use(monkeypatch):
    def refuses(name, message):
        with pytest.raises(DeviceError, match="^" + re.escape(message) + "$"):
            harness.resolve_device(name)

    refuses("tpu0", "unknown device 'tpu0'; use auto, cpu, cuda or cuda:N")
    refuses("meta", "--device meta: vitlens trains on cpu, cuda or mps")
    monkeypatch.setattr(harness.torch.backends.mps, "is_available", lambda: False)
    refuses("mps", "--device mps: MPS is not available here; use --device cpu (or auto)")
    monkeypatch.setattr(harness.torch.cuda, "is_available", lambda: False)
    refuses("cuda", "--device cuda: this machine has no CUDA device; use --device cpu (or auto)")
    assert harness.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(harness.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(harness.torch.cuda, "device_count", lambda: 2)
    refuses("cuda:2", "--device cuda:2: only 2 CUDA device(s) here; use cuda:0 .. cuda:1")
    assert harness.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert harness.resolve_device("auto") == torch.device("cuda")


def test_start_run_messages_for_a_folder_that_cannot_take_the_run(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), device="cpu")
    with pytest.raises(
        ConfigError,
        match=_exactly("--override changes a run being resumed; for a new run set the values directly"),
    ):
        harness.start_run(cfg, overrides={"epochs": 3})
    with pytest.raises(
        ResumeError,
        match=_exactly(f"--resume: {tmp_path / 'run'} does not exist; start the run without --resume"),
    ):
        harness.start_run(cfg, resume=True)
    last = tmp_path / "run" / "checkpoints" / "last.safetensors"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    with pytest.raises(
        ResumeError,
        match=_exactly(
            f"{tmp_path / 'run'} already holds a run; pass --resume to continue it or choose another --out"
        ),
    ):
        harness.start_run(cfg)
    with pytest.raises(
        ResumeError,
        match=r"^--override lr: only .*epochs.* can change when a run is resumed; "
        r"start a new run \(another --out\) to change anything else$",
    ):
        harness.start_run(cfg, resume=True, overrides={"lr": 0.5})
    with pytest.raises(
        ResumeError,
        match=_exactly(
            f"{tmp_path / 'run'} has a checkpoint but no config.json; it cannot be resumed safely"
        ),
    ):
        harness.start_run(cfg, resume=True)


def test_resume_refusals_say_what_differs_and_how_to_go_on(tmp_path):
    from vitlens.train.run_folder import parse_overrides, require_checkpoint, stored_config

    with pytest.raises(
        ConfigError, match=_exactly("--override 'epochs': write KEY=VALUE, e.g. --override epochs=20")
    ):
        parse_overrides(["epochs"])
    with pytest.raises(
        ConfigError, match=_exactly("--override '=3': write KEY=VALUE, e.g. --override epochs=20")
    ):
        parse_overrides(["=3"])
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(
        ResumeError,
        match=_exactly(
            f"--resume: {run} holds no checkpoint (checkpoints/last.safetensors) to continue from; "
            "start it again without --resume"
        ),
    ):
        require_checkpoint(run)
    (run / "config.json").write_text("{not json")
    damaged = re.escape(str(run / "config.json"))
    with pytest.raises(
        ResumeError, match=rf"^{damaged} is not valid JSON \(.+\); the run folder is damaged$"
    ):
        stored_config(run)
    # A resume that would change what the run computes names the change and the ways out.
    cfg = TrainConfig(out=str(run), device="cpu", lr=0.5)
    (run / "config.json").write_text(
        json.dumps({**json.loads(json.dumps(TrainConfig().__dict__)), "device": "cpu", "lr": 0.25})
    )
    last = run / "checkpoints" / "last.safetensors"
    last.parent.mkdir()
    last.write_bytes(b"")
    with pytest.raises(
        ResumeError,
        match=rf"^--resume would change the run in {re.escape(str(run))} \(lr: 0\.25 -> 0\.5\); "
        r"its config\.json is the truth: resume with the same settings, start a new run with another --out, "
        r"or change one of .*epochs.* on purpose with --override KEY=VALUE$",
    ):
        harness.start_run(cfg, resume=True)


def test_split_batch_and_language_model_messages():
    from vitlens.errors import ModelError

    run = SimpleNamespace(dist=DistInfo(0, 3, 0))
    assert harness.split_batch(12, run) == 4 and isinstance(harness.split_batch(12, run), int)
    with pytest.raises(
        ConfigError, match=_exactly("batch size 10 is not divisible by 3 processes; use a multiple of 3")
    ):
        harness.split_batch(10, run)
    with pytest.raises(
        ModelError,
        match=_exactly(
            "vit_micro_patch4_32 is not a language model; `vitlens lm train` takes gpt_* or bert_* models"
        ),
    ):
        lm_mod.language_model_config("vit_micro_patch4_32", {})


def test_restore_loads_what_was_saved_and_refuses_another_model(tmp_path, capsys):
    from vitlens.errors import CheckpointError

    def make_run(counter="step", resume=True):
        return harness.Run(
            cfg=SimpleNamespace(max_steps=9, epochs=4), dir=tmp_path, device=torch.device("cpu"),
            dist=DistInfo(), amp_dtype=None, counter=counter, resume=resume,
        )  # fmt: skip

    def objects(n_in=2):
        model = torch.nn.Linear(n_in, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return model, opt, sched

    torch.manual_seed(0)
    model, opt, sched = objects()
    model(torch.randn(4, 2)).sum().backward()
    opt.step()
    sched.step()
    make_run(resume=False).save_checkpoint(model, opt, sched, meta={}, count=3, extra={"note": 7})
    assert make_run(resume=False).restore(*objects()) == {}  # a new run starts from nothing
    fresh, fresh_opt, fresh_sched = objects()
    run = make_run()
    state = run.restore(fresh, fresh_opt, fresh_sched)
    assert run.resumed_at == 3 and state["step"] == 3 and state["note"] == 7
    torch.testing.assert_close(fresh.weight, model.weight, rtol=0, atol=0)
    torch.testing.assert_close(
        fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    assert fresh_sched.last_epoch == 1 and fresh_opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert f"resuming {tmp_path} at step 3/9" in capsys.readouterr().err.splitlines()
    path = re.escape(str(tmp_path / "checkpoints" / "last.safetensors"))
    with pytest.raises(
        ResumeError, match=rf"^{path} does not fit this model \(.+\); was the run made with another model\?$"
    ):
        make_run().restore(torch.nn.Linear(3, 2))
    with pytest.raises(
        CheckpointError, match=rf"^{path} holds no epoch counter: it is not a checkpoint of this kind of run$"
    ):
        make_run(counter="epoch").restore(torch.nn.Linear(2, 2))


def test_data_too_small_messages_say_what_to_change(tmp_path):
    from vitlens.errors import DataError, ResumeError
    from vitlens.train.tokenizer import TokenizerTrainConfig, train_tokenizer

    pairs = [([5, 6], [7, 8]), ([5], [7])]
    run = SimpleNamespace(dist=DistInfo(0, 3, 0))
    with pytest.raises(
        DataError,
        match=_exactly(
            "no training batches: 2 pairs for max_tokens 100; raise --max-tokens or --limit-train"
        ),
    ):
        tr_mod.EpochBatches(pairs, 100, seed=0, run=run)
    for world in (1, 2):  # a batch with one pair per process is enough
        two = tr_mod.EpochBatches(pairs, 100, seed=0, run=SimpleNamespace(dist=DistInfo(0, world, 0)))
        assert sorted(sum(two.batches, [])) == [0, 1]
    with pytest.raises(
        ResumeError,
        match=_exactly(
            "a palette is fitted in one go; there is nothing to resume (run it again without --resume)"
        ),
    ):
        train_tokenizer(TokenizerTrainConfig(kind="palette", out=str(tmp_path / "p")), resume=True)
    text = tmp_path / "input.txt"
    text.write_text("abcdefghij" * 10)  # 100 characters
    base = dict(model="gpt_nano", model_args={"n_layer": 1}, block_size=8, device="cpu", data=str(text))
    bert = dict(base, model="bert_nano", model_args={"depth": 1})
    # A split of exactly one window is refused too: a window needs one more character for its target.
    cases = (
        (base, 0.05, "validation", 5, 8),
        (base, 0.915, "training", 8, 8),
        (base, 0.08, "validation", 8, 8),
        (bert, 0.07, "validation", 7, 7),  # BERT windows: [CLS] + 7 characters
    )
    for i, (args, fraction, split, n, window) in enumerate(cases):
        with pytest.raises(
            DataError,
            match=_exactly(
                f"the {split} text has {n} characters, too few for windows of {window} + 1; "
                "give more text (--max-chars) or a smaller --block-size"
            ),
        ):
            lm_mod.train_lm(lm_mod.LMTrainConfig(**args, val_fraction=fraction, out=str(tmp_path / f"lm{i}")))


def test_vq_init_must_match_the_model_options(tmp_path):
    from vitlens.models.tokenizers.vqvae import VQVAE, VQVAEConfig, save_vqvae
    from vitlens.train.tokenizer import TokenizerTrainConfig, _vq_model

    small = dict(code_dim=4, hidden=8, res_hidden=4, num_res_blocks=1)
    start = VQVAE(VQVAEConfig(codebook_size=8, **small))
    save_vqvae(tmp_path / "start.safetensors", start, meta={})
    init = str(tmp_path / "start.safetensors")
    model = _vq_model(TokenizerTrainConfig(init=init, codebook_size=8, **small))
    for k, v in start.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k  # --init starts from those weights
    with pytest.raises(
        ConfigError,
        match=rf"^--init {re.escape(init)} was trained with VQVAEConfig\(.*codebook_size=8.*\), "
        r"not this run's VQVAEConfig\(.*codebook_size=16.*\); pass the same model options$",
    ):
        _vq_model(TokenizerTrainConfig(init=init, codebook_size=16, **small))


def test_vq_run_refuses_a_batch_larger_than_the_data(tmp_path):
    from vitlens.errors import DataError
    from vitlens.train.tokenizer import TokenizerTrainConfig, train_tokenizer

    vq = TokenizerTrainConfig(
        kind="vq",
        data="cifar10-mini",
        fraction=0.05,
        batch_size=100_000,
        progress=False,
        out=str(tmp_path / "vq"),
    )
    with pytest.raises(
        DataError, match=r"^\d+ training images are fewer than one batch of 100000; lower --batch-size$"
    ):
        train_tokenizer(vq)
