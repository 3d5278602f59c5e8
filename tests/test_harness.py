"""The training harness: resume is a contract, kill -9 leaves nothing inconsistent, a failed start
leaves nothing behind, devices that are not there are a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from _runs import TINY_RUN

from vitlens.errors import ConfigError, DeviceError, ModelError, ResumeError, VitlensError
from vitlens.io import load_checkpoint
from vitlens.train import TrainConfig, train
from vitlens.train.harness import resolve_device
from vitlens.train.lm import LMTrainConfig, train_lm
from vitlens.train.run_folder import parse_overrides, resume_config
from vitlens.train.tokenizer import TokenizerTrainConfig, train_tokenizer

TINY = TINY_RUN


def _records(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """An image run stopped after its first of two epochs (the state every resume test starts from)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert train(TrainConfig(**TINY, out=str(out), stop_after_epochs=1)) == {"finished": False, "epoch": 1}
    return out


def _copy(run_dir, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def test_resume_with_other_settings_is_refused_and_changes_nothing(stopped_run, tmp_path):
    run = _copy(stopped_run, tmp_path)
    before = _files(run)
    changed = TrainConfig(**{**TINY, "lr": 1e-3, "fraction": 0.08}, out=str(run))
    with pytest.raises(ResumeError) as err:
        train(changed, resume=True)
    assert "lr: 0.002 -> 0.001" in str(err.value) and "fraction: 0.04 -> 0.08" in str(err.value)
    assert "--override" in str(err.value)
    # Only safe keys may change on purpose; the learning rate is not one of them.
    with pytest.raises(ResumeError, match="only .*epochs"):
        train(TrainConfig(**TINY, out=str(run)), resume=True, overrides={"lr": 1e-3})
    # The command line builds the config from the run folder and checks what the user gave.
    with pytest.raises(ResumeError, match="model: 'vit_micro_patch4_32' -> 'resnet8_cifar'"):
        resume_config(TrainConfig, run, {"model": "resnet8_cifar", "out": str(run)})
    assert resume_config(TrainConfig, run, {"progress": True}).model_args == TINY["model_args"]
    assert _files(run) == before


def test_override_lengthens_the_run_and_is_recorded(stopped_run, tmp_path, capsys):
    run = _copy(stopped_run, tmp_path)
    summary = train(TrainConfig(**TINY, out=str(run)), resume=True, overrides=parse_overrides(["epochs=3"]))
    assert summary["finished"] and summary["epochs"] == 3
    err = capsys.readouterr().err
    assert "resuming" in err and "epoch 1/3" in err
    assert [r["epoch"] for r in _records(run)] == [1, 2, 3]
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 3
    assert config["overrides"] == [{"at_epoch": 1, "changes": {"epochs": [2, 3]}}]
    # the recorded run is the truth from now on: a plain resume of the finished run agrees with it
    assert resume_config(TrainConfig, run, {}).epochs == 3


def test_resume_needs_a_run_with_a_checkpoint(tmp_path):
    with pytest.raises(ResumeError, match="does not exist"):
        train(TrainConfig(**TINY, out=str(tmp_path / "nothing")), resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResumeError, match="no checkpoint"):
        train(TrainConfig(**TINY, out=str(tmp_path / "empty")), resume=True)
    assert not (tmp_path / "nothing").exists() and list((tmp_path / "empty").iterdir()) == []


def test_kill_leftovers_are_cleaned_on_resume(stopped_run, tmp_path):
    """A kill after epoch 2's metrics line but before its checkpoint, and one inside a checkpoint
    write: the resume logs epoch 2 once and removes the temp file."""
    run = _copy(stopped_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "step": 20, "train_loss": -1.0}) + "\n")
        f.write('{"epoch": 3, "trunc')  # a line cut short
    tmp = run / "checkpoints" / ".last.safetensors.x1y2z3.tmp"
    tmp.write_bytes(b"half a checkpoint")
    train(TrainConfig(**TINY, out=str(run)), resume=True)
    records = _records(run)
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["train_loss"] > 0
    assert not tmp.exists()
    assert not [p for p in run.rglob("*.tmp")]


def test_failed_start_leaves_no_run_folder(tmp_path, shared_data):
    with pytest.raises(ModelError):
        train(TrainConfig(**{**TINY, "model": "vit_nonexistent"}, out=str(tmp_path / "a")))
    with pytest.raises(VitlensError, match="nope"):
        train(
            TrainConfig(
                **{**TINY, "data": "imagefolder", "data_dir": str(tmp_path / "nope")}, out=str(tmp_path / "b")
            )
        )
    with pytest.raises(ModelError, match="not a language model"):
        train_lm(
            LMTrainConfig(
                model="resnet8_cifar", data=str(shared_data / "tinyshakespeare"), out=str(tmp_path / "c")
            )
        )
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        lm = dict(model="gpt_nano", data=str(shared_data / "tinyshakespeare"), block_size=512, max_chars=5000)
        train_lm(LMTrainConfig(**lm, out=str(tmp_path / "d")))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_out_that_cannot_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(ConfigError, match="--out"):
            train(TrainConfig(**TINY, out=str(out)))
    assert (tmp_path / "file").read_text() == "x"


def test_devices_that_are_not_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="only 1 CUDA device"):
        resolve_device("cuda:3")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("gpu")


def test_parse_overrides():
    assert parse_overrides(["epochs=20", "time-budget-min=null", "eval_every=5"]) == {
        "epochs": 20,
        "time_budget_min": None,
        "eval_every": 5,
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["epochs"])


def test_lm_resume_contract_and_metrics_cut_back(shared_data, tmp_path):
    base = dict(
        model="gpt_nano",
        data=str(shared_data / "tinyshakespeare"),
        batch_size=8,
        block_size=16,
        eval_every=4,
        eval_iters=1,
        warmup_steps=2,
        max_chars=20_000,
        progress=False,
    )
    part = tmp_path / "part"
    train_lm(LMTrainConfig(**base, max_steps=8, out=str(part)))
    logged = _records(part)
    with pytest.raises(ResumeError, match="lr: 0.001 -> 0.002"):
        train_lm(LMTrainConfig(**base, max_steps=8, lr=2e-3, out=str(part)), resume=True)
    with open(part / "metrics.jsonl", "a") as f:  # killed after logging step 12, before its checkpoint
        f.write(json.dumps({"step": 12, "val_loss": -1.0}) + "\n")
    summary = train_lm(
        LMTrainConfig(**base, max_steps=8, out=str(part)), resume=True, overrides={"max_steps": 12}
    )
    assert summary["finished"] and summary["steps"] == 12
    records = _records(part)
    assert [r["step"] for r in records] == [4, 8, 12] and records[-1]["val_loss"] > 0
    assert records[:2] == logged  # the steps before the resume stay as they were logged
    assert json.loads((part / "config.json").read_text())["overrides"] == [
        {"at_step": 8, "changes": {"max_steps": [8, 12]}}
    ]


def test_vq_tokenizer_resume_equals_uninterrupted_fit(tmp_path):
    base = dict(
        kind="vq",
        data="cifar10-mini",
        fraction=0.1,
        epochs=2,
        batch_size=50,
        codebook_size=16,
        code_dim=8,
        hidden=16,
        res_hidden=8,
        num_res_blocks=1,
        warmup_steps=2,
        eval_images=40,
        progress=False,
    )
    full, part = tmp_path / "full", tmp_path / "part"
    train_tokenizer(TokenizerTrainConfig(**base, out=str(full)))
    first = train_tokenizer(TokenizerTrainConfig(**base, out=str(part), time_budget_min=1e-6))
    assert first["epochs_done"] == 1 and not first["finished"]
    with pytest.raises(ResumeError, match="--resume"):
        train_tokenizer(TokenizerTrainConfig(**base, out=str(part)))
    assert train_tokenizer(TokenizerTrainConfig(**base, out=str(part)), resume=True)["finished"]
    a, _, _ = load_checkpoint(full / "tokenizer.safetensors")
    b, _, _ = load_checkpoint(part / "tokenizer.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["epoch"] for r in _records(part)] == [1, 2]
    assert [r["train_loss"] for r in _records(part)] == [r["train_loss"] for r in _records(full)]
