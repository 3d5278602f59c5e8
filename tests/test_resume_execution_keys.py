"""Resume on other hardware: where a run executes (device, torch.compile, memory layout, data path)
may change on --resume, is said on stderr and recorded in config.json; what it computes still may not.

Expectations: the uninterrupted run (bit-exact weights and losses), the run folder a user made, and
the exact lines a user reads."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from _runs import TINY_RUN, TRAIN_SAFE, made_run

from vitlens.errors import DeviceError, ResumeError
from vitlens.io import load_checkpoint
from vitlens.train import TrainConfig, harness, train
from vitlens.train.lm import LMTrainConfig
from vitlens.train.run_folder import EXECUTION_KEYS, OVERRIDABLE_KEYS, resume_config

TINY = {**TINY_RUN, "randaugment": None}


@pytest.fixture
def no_cuda(monkeypatch):
    """'auto' means the CPU here, whatever machine runs the tests."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)



def _refusal(run, diffs: str) -> str:
    return (
        f"--resume would change the run in {run} ({diffs}); its config.json is the truth: resume with the "
        "same settings, start a new run with another --out, or change one of "
        f"{TRAIN_SAFE} on purpose with --override KEY=VALUE"
    )


def test_the_execution_keys_are_where_a_run_runs_and_not_the_precision():
    assert EXECUTION_KEYS == {"device", "compile", "channels_last", "data_path"}
    assert not EXECUTION_KEYS & OVERRIDABLE_KEYS  # they need no --override
    assert "amp" not in EXECUTION_KEYS and "tta" not in EXECUTION_KEYS


def test_a_run_started_on_auto_resumes_on_cpu_exactly_and_records_the_move(tmp_path, no_cuda, capsys):
    full, parts = tmp_path / "full", tmp_path / "parts"
    train(TrainConfig(**TINY, device="auto", out=str(full)))
    assert train(TrainConfig(**TINY, device="auto", out=str(parts), stop_after_epochs=1)) == {
        "finished": False,
        "epoch": 1,
    }
    capsys.readouterr()
    summary = train(TrainConfig(**TINY, device="cpu", out=str(parts)), resume=True)
    assert summary["finished"] and summary["epochs"] == 2
    err = capsys.readouterr().err
    line = (
        f"resuming {parts} with device: 'auto' -> 'cpu' (where it runs, not what it computes; recorded in "
        "config.json)"
    )
    assert err.count(line + "\n") == 1
    # the continued run is the uninterrupted one, weight for weight and loss for loss
    a, _, _ = load_checkpoint(full / "checkpoints" / "last.safetensors")
    b, _, _ = load_checkpoint(parts / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = [
        [json.loads(x)["train_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (full, parts)
    ]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    # config.json now says where the run goes on, and when it moved
    config = json.loads((parts / "config.json").read_text())
    assert config["device"] == "cpu"
    assert config["overrides"] == [{"at_epoch": 1, "changes": {"device": ["auto", "cpu"]}}]
    # the next resume reads the new device from config.json: no move, no line
    assert resume_config(TrainConfig, parts, {}).device == "cpu"


def test_a_gpu_run_resumes_on_the_cpu_when_asked_and_says_how_otherwise(tmp_path, no_cuda, capsys):
    cfg = made_run(tmp_path, device="cuda", compile=True, channels_last=True, data_path="device")
    run_dir = tmp_path / "run"
    # the command line without --device: config.json's cuda, which this machine has not
    kept = resume_config(TrainConfig, run_dir, {})
    assert kept.device == "cuda"
    with pytest.raises(DeviceError) as err:
        harness.start_run(kept, resume=True)
    assert str(err.value) == "--device cuda: this machine has no CUDA device; use --device cpu (or auto)"
    # with --device cpu (and the other execution flags): taken from the caller, not refused
    given = {"device": "cpu", "compile": False, "channels_last": None, "data_path": "auto"}
    moved = resume_config(TrainConfig, run_dir, given)
    assert (moved.device, moved.compile, moved.channels_last, moved.data_path) == ("cpu", False, None, "auto")
    assert (moved.lr, moved.out) == (cfg.lr, str(run_dir))
    capsys.readouterr()
    run = harness.start_run(moved, resume=True, overrides={"epochs": 12})
    assert run.device == torch.device("cpu") and run.cfg.epochs == 12
    assert run.overrides == {
        "epochs": (10, 12),
        "channels_last": (True, None),
        "compile": (True, False),
        "data_path": ("device", "auto"),
        "device": ("cuda", "cpu"),
    }
    assert capsys.readouterr().err == (
        f"resuming {run_dir} with channels_last: True -> None, compile: True -> False, data_path: 'device' "
        "-> 'auto', device: 'cuda' -> 'cpu' (where it runs, not what it computes; recorded in config.json)\n"
    )


def test_the_same_device_is_no_move(tmp_path, capsys):
    cfg = made_run(tmp_path)
    capsys.readouterr()
    run = harness.start_run(cfg, resume=True)
    assert run.overrides == {} and capsys.readouterr().err == ""


def test_a_real_change_is_still_refused_and_names_only_the_real_change(tmp_path, no_cuda):
    cfg = made_run(tmp_path, device="auto", lr=0.002)
    run_dir = tmp_path / "run"
    changed = TrainConfig(**{**asdict(cfg), "device": "cpu", "lr": 0.001})
    with pytest.raises(ResumeError) as err:
        harness.start_run(changed, resume=True)
    assert str(err.value) == _refusal(run_dir, "lr: 0.002 -> 0.001")
    # the precision changes the maths: refused, even next to a device change
    with pytest.raises(ResumeError) as err:
        harness.start_run(TrainConfig(**{**asdict(cfg), "device": "cpu", "amp": "bf16"}), resume=True)
    assert str(err.value) == _refusal(run_dir, "amp: 'fp32' -> 'bf16'")
    # the command line's check: another model with another device is refused for the model
    with pytest.raises(ResumeError) as err:
        resume_config(TrainConfig, run_dir, {"model": "resnet8_cifar", "device": "cpu"})
    assert str(err.value) == _refusal(run_dir, "model: 'vit_micro_patch4_32' -> 'resnet8_cifar'")


def test_a_text_run_moves_its_device_too(tmp_path, no_cuda, capsys):
    cfg = LMTrainConfig(out=str(tmp_path / "run"), device="cuda", amp="fp32", max_steps=10)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.safetensors").write_bytes(b"x")
    (tmp_path / "run" / "config.json").write_text(json.dumps(asdict(cfg)))
    moved = resume_config(LMTrainConfig, tmp_path / "run", {"device": "cpu"})
    run = harness.start_run(moved, resume=True, counter="step")
    assert run.device == torch.device("cpu") and run.overrides == {"device": ("cuda", "cpu")}
    with pytest.raises(ResumeError) as err:
        resume_config(LMTrainConfig, tmp_path / "run", {"device": "cpu", "block_size": 64})
    assert str(err.value) == (
        f"--resume would change the run in {tmp_path / 'run'} (block_size: None -> 64); its config.json is "
        "the truth: resume with the same settings, start a new run with another --out, or change one of "
        "eval_every, max_steps, progress, time_budget_min on purpose with --override KEY=VALUE"
    )


def test_the_command_line_resumes_an_auto_run_with_device_cpu(tmp_path, no_cuda, capsys):
    from vitlens.cli import main

    run = tmp_path / "run"
    tiny = ["--model", "vit_micro_patch4_32", "--model-args", '{"depth": 1, "embed_dim": 32, "num_heads": 2}',
            "--fraction", "0.02", "--batch-size", "16", "--no-progress"]  # fmt: skip
    assert main(["train", *tiny, "--epochs", "2", "--stop-after-epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--device", "cpu", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert (
        f"resuming {run} with device: 'auto' -> 'cpu' (where it runs, not what it computes; recorded in "
        "config.json)\n"
    ) in err
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    config = json.loads((run / "config.json").read_text())
    assert (config["device"], config["epochs"], config["fraction"]) == ("cpu", 2, 0.02)
    assert config["overrides"] == [{"at_epoch": 1, "changes": {"device": ["auto", "cpu"]}}]
    # a real change next to the device change is still a one-line refusal (exit 2)
    assert main(["train", "--resume", "--out", str(run), "--lr", "0.5", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "vitlens train: error: " + _refusal(run, "lr: 0.001 -> 0.5") + "\n"
