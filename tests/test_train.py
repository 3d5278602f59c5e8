"""The trainer: exact resume, DDP equivalence, run-directory contents, atomic checkpoints, errors."""

from __future__ import annotations

import json

import pytest
import torch
from _dist import torchrun

from vitlens.cli import main as cli_main
from vitlens.models.loading import load_run_model
from vitlens.train import TrainConfig, load_checkpoint, save_checkpoint, train

TINY = dict(
    model="vit_micro_patch4_32",
    model_args={"depth": 2, "embed_dim": 64, "num_heads": 2},
    data="cifar10-mini",
    fraction=0.04,
    batch_size=16,
    lr=2e-3,
    warmup_epochs=0.5,
    progress=False,
)


def _weights(run_dir):
    weights, _, _ = load_checkpoint(run_dir / "checkpoints" / "last.safetensors")
    return weights


def test_run_directory_contents_and_eval(tmp_path, capsys):
    out = tmp_path / "run"
    summary = train(TrainConfig(**TINY, epochs=2, out=str(out), ema_decay=0.9, mixup=0.2, cutmix=0.2))
    assert summary["finished"] and summary["params"] > 0 and summary["flops_per_image"] > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert {"train_loss", "test_top1", "test_top5", "img_per_s", "lr", "ema_test_top1"} <= set(lines[-1])
    assert json.loads((out / "config.json").read_text())["model"] == TINY["model"]
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    # `vitlens eval` on the run directory reproduces the logged test accuracy.
    model, meta = load_run_model(out)
    assert meta["model"] == TINY["model"] and meta["classes"][0] == "airplane"
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_eval_matches_logged_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    train(TrainConfig(**TINY, epochs=1, out=str(out)))
    capsys.readouterr()
    assert cli_main(["eval", str(out), "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert printed["top1"] == pytest.approx(logged["test_top1"])
    assert printed["n"] == 500


def test_resume_equals_uninterrupted_run(tmp_path):
    full, parts = tmp_path / "full", tmp_path / "parts"
    cfg = dict(TINY, epochs=3, randaugment=None)
    train(TrainConfig(**cfg, out=str(full)))
    first = train(TrainConfig(**cfg, out=str(parts), stop_after_epochs=1))
    assert first == {"finished": False, "epoch": 1}
    train(TrainConfig(**cfg, out=str(parts)), resume=True)
    a, b = _weights(full), _weights(parts)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (full / "metrics.jsonl").read_text().count("\n") == 3
    logs_a = [json.loads(x)["train_loss"] for x in (full / "metrics.jsonl").read_text().splitlines()]
    logs_b = [json.loads(x)["train_loss"] for x in (parts / "metrics.jsonl").read_text().splitlines()]
    assert logs_a == logs_b


def test_existing_run_needs_resume_flag(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**TINY, epochs=1, out=str(out)))
    with pytest.raises(ValueError, match="--resume"):
        train(TrainConfig(**TINY, epochs=1, out=str(out)))


def test_ddp_two_processes_equal_one(tmp_path):
    """2 gloo processes with half the batch each == 1 process with the whole batch (160 images)."""
    args = [
        "train",
        "--model",
        "vit_micro_patch4_32",
        "--model-args",
        '{"depth": 2, "embed_dim": 64, "num_heads": 2}',
        "--data",
        "cifar10-mini",
        "--fraction",
        "0.08",
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--no-augment",
        "--no-progress",
        "--amp",  # compared to 1e-4: bf16 (amp=auto on AMX CPUs) rounds more
        "fp32",
        "--lr",
        "0.002",
        "--warmup-epochs",
        "0.5",
    ]
    train(
        TrainConfig(
            **{
                **TINY,
                "fraction": 0.08,
                "batch_size": 32,
                "epochs": 2,
                "augment": False,
                "amp": "fp32",
                "out": str(tmp_path / "one"),
            }
        )
    )
    torchrun([*args, "--out", str(tmp_path / "two")], timeout=300)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    # Float sums run in another order across processes. Adam rescales every gradient to unit size, so
    # the key bias (whose true gradient is 0: softmax ignores a constant added to every score) moves
    # by lr-sized steps of rounding noise; hence atol 1e-4 (lr 2e-3) rather than float epsilon.
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=k)
    losses = [
        [json.loads(x)["train_loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        for r in ("one", "two")
    ]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2


def test_crash_mid_write_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    good = {"w": torch.arange(6.0)}
    save_checkpoint(path, good, meta={"epoch": 1})
    import vitlens.io.checkpoint as ck

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.zeros(6)}, meta={"epoch": 2})
    weights, meta, _ = load_checkpoint(path)
    assert torch.equal(weights["w"], good["w"]) and meta["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temp files left behind


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert cli_main(["train", "--model", "vit_tiny_patch16", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'vit_tiny_patch16'" in err and "Did you mean" in err and "Traceback" not in err
    assert (
        cli_main(
            [
                "train",
                "--data",
                "imagefolder",
                "--data-dir",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path / "r2"),
            ]
        )
        == 2
    )
    assert str(tmp_path / "nope") in capsys.readouterr().err
    assert cli_main(["train", "--fraction", "0", "--out", str(tmp_path / "r3")]) == 2
    assert "fraction" in capsys.readouterr().err


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model: resnet8_cifar\nepochs: 7\nlr: 0.1\n")
    cfg = TrainConfig.from_file(path, lr=0.05)
    assert (cfg.model, cfg.epochs, cfg.lr) == ("resnet8_cifar", 7, 0.05)
    path.write_text("modle: resnet8_cifar\n")
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_file(path)


def test_model_overrides_pass_data_statistics_to_tokenizers(monkeypatch):
    import warnings

    import vitlens.train.trainer as trainer
    from vitlens.train.trainer import model_overrides

    def no_model_please(*args, **kwargs):
        raise AssertionError("model_overrides built a model to read its config fields")

    monkeypatch.setattr(trainer, "create_model", no_model_please)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    cfg = TrainConfig(**{**TINY, "tokenizer": "pixel", "model_args": {"tokenizer_args": {"k": 16}}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is built, so no palette warns either
        args = model_overrides(cfg, 10, 32, 3, mean, std)
    assert args["tokenizer"] == "pixel" and args["img_size"] == 32
    assert args["tokenizer_args"] == {"k": 16, "mean": mean, "std": std}
    # user-given statistics win; the patch tokenizer takes none
    cfg = TrainConfig(**{**TINY, "tokenizer": "vq", "model_args": {"tokenizer_args": {"mean": (0, 0, 0)}}})
    assert model_overrides(cfg, 10, 32, 3, mean, std)["tokenizer_args"]["mean"] == (0, 0, 0)
    assert "tokenizer_args" not in model_overrides(TrainConfig(**TINY), 10, 32, 3, mean, std)
    # a CNN has no img_size field: the data's size is not forced on it
    assert "img_size" not in model_overrides(TrainConfig(**{**TINY, "model": "resnet8_cifar"}), 10, 32, 3)
