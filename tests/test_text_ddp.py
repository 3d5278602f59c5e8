"""The text tasks under DDP: 2 gloo processes, each with its share of every batch, train the same
model as 1 process with the whole batch (the image task's equivalent is in test_train.py)."""

from __future__ import annotations

import json

import pytest
import torch
from _dist import torchrun

from vitlens.io import load_checkpoint
from vitlens.train.lm import LMTrainConfig, train_lm
from vitlens.train.translate import TranslateTrainConfig, train_translate


def _flags(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        else:
            out += [flag, json.dumps(v) if isinstance(v, dict) else str(v)]
    return out


def _key_bias(name: str, size: int) -> slice:
    """The key part of an attention bias (empty for any other tensor): qkv.bias is [q | k | v],
    the cross-attention's kv.bias is [k | v]."""
    if name.endswith(".qkv.bias"):
        return slice(size // 3, 2 * size // 3)
    if name.endswith(".kv.bias"):
        return slice(0, size // 2)
    return slice(0, 0)


def _assert_same_training(one, two, max_lr: float, steps: int) -> None:
    a, _, _ = load_checkpoint(one / "checkpoints" / "last.safetensors")
    b, _, _ = load_checkpoint(two / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        # A key bias has a true gradient of 0 (softmax ignores a constant added to every score), so
        # Adam, which rescales every gradient to unit size, moves it by up to lr per step on the
        # rounding noise of sums taken in another order: bounded by steps * lr, not float epsilon.
        keys = _key_bias(k, a[k].numel())
        noise = (a[k][keys] - b[k][keys]).abs()
        assert noise.numel() == 0 or noise.max() <= steps * max_lr, k
        x, y = a[k].clone(), b[k].clone()
        x[keys] = y[keys] = 0
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4, msg=k)
    va, vb = (
        [json.loads(x)["val_loss"] for x in (r / "metrics.jsonl").read_text().splitlines()]
        for r in (one, two)
    )
    assert len(va) == len(vb) == 2
    assert va == pytest.approx(vb, abs=1e-4)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"]


def test_lm_two_processes_equal_one(shared_data, tmp_path):
    values = dict(
        model="gpt_nano",
        data=str(shared_data / "tinyshakespeare"),
        max_steps=6,
        batch_size=8,
        block_size=16,
        lr=3e-3,
        warmup_steps=2,
        eval_every=3,
        eval_iters=2,
        max_chars=20_000,
        device="cpu",
        amp="fp32",  # compared to 1e-4: bf16 (amp=auto on AMX CPUs) rounds more
        progress=False,
    )
    train_lm(LMTrainConfig(**values, out=str(tmp_path / "one")))
    torchrun(["lm", "train", *_flags(values), "--out", str(tmp_path / "two")])
    _assert_same_training(tmp_path / "one", tmp_path / "two", max_lr=3e-3, steps=6)


def test_translation_two_processes_equal_one(shared_data, tmp_path):
    values = dict(
        model="transformer_nano",
        model_args={"max_len": 96},
        data_dir=str(shared_data / "multi30k"),
        vocab_size=300,
        max_steps=4,
        max_tokens=600,
        warmup_steps=2,
        lr_factor=0.05,  # peak lr ~3e-3
        eval_every=2,
        eval_bleu=False,
        limit_train=400,
        limit_eval=8,
        beam_size=1,
        device="cpu",
        amp="fp32",  # compared to 1e-4: bf16 (amp=auto on AMX CPUs) rounds more
        progress=False,
    )
    train_translate(TranslateTrainConfig(**values, out=str(tmp_path / "one")))
    torchrun(["translate", "train", *_flags(values), "--out", str(tmp_path / "two")])
    peak_lr = 0.05 * 32**-0.5 * 2**-0.5  # Noam at the end of warmup: factor * d^-0.5 * warmup^-0.5
    _assert_same_training(tmp_path / "one", tmp_path / "two", max_lr=peak_lr, steps=4)
