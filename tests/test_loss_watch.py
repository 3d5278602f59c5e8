"""The divergence check on an accelerator: no host read per step, the same error at the next record.

The GPU path is exercised on the CPU by forcing ``LossWatch(defer=True)``; on a real accelerator it
is the default (``defer=None``: any device but the CPU)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vitlens.errors import TrainingError
from vitlens.train import harness
from vitlens.train.harness import LossWatch
from vitlens.train.lm import LMTrainConfig


def _steps(losses, *, where="epoch 1", lr=0.5):
    """train_step over scripted losses (a loss of w * value); returns the run, the weight, the schedule."""
    w = nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([w], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run = SimpleNamespace(autocast=nullcontext, device=torch.device("cpu"), losses=LossWatch(defer=True))
    for value in losses:
        harness.train_step(
            run, lambda v=value: ((w * v).sum(), None), opt, sched, params=[w], grad_clip=None, where=where,
            fix="fix it",
        )
    return run, w, sched


def test_a_nan_step_is_not_read_at_once_but_named_at_the_check():
    run, w, sched = _steps([1.0, float("nan"), 1.0])
    assert sched.last_epoch == 3  # no read, no raise: all three steps were taken
    assert torch.isnan(w).item()  # (the update of the NaN step was applied)
    with pytest.raises(TrainingError) as err:
        run.losses.check()
    assert str(err.value) == "training diverged: the loss became NaN at step 2 (epoch 1); fix it"


def test_the_first_bad_loss_is_named_and_its_kind():
    run, _, _ = _steps([1.0, 1.0, float("inf"), float("nan")], where="", lr=0.0)  # w stays 1
    with pytest.raises(TrainingError) as err:
        run.losses.check()
    assert str(err.value) == "training diverged: the loss became infinite at step 3; fix it"
    run, _, _ = _steps([float("-inf")], where="", lr=0.0)
    with pytest.raises(TrainingError) as err:
        run.losses.check()
    assert str(err.value) == "training diverged: the loss became infinite at step 1; fix it"
    run, _, _ = _steps([float("nan"), float("inf")], where="", lr=0.0)  # the very first step
    with pytest.raises(TrainingError) as err:
        run.losses.check()
    assert str(err.value) == "training diverged: the loss became NaN at step 1; fix it"


def test_a_clean_check_starts_over_and_later_steps_keep_their_numbers():
    w = nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([w], lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run = SimpleNamespace(autocast=nullcontext, device=torch.device("cpu"), losses=LossWatch(defer=True))

    def step(value, where):
        harness.train_step(run, lambda: ((w * value).sum(), None), opt, sched, params=[w], grad_clip=None,
                           where=where, fix="lower it")

    step(1.0, "epoch 1")
    step(2.0, "epoch 1")
    run.losses.check()  # all finite: nothing raised
    run.losses.check()  # and nothing noted since: still nothing
    step(3.0, "epoch 2")
    step(float("nan"), "epoch 2")
    with pytest.raises(TrainingError) as err:
        run.losses.check()
    assert str(err.value) == "training diverged: the loss became NaN at step 4 (epoch 2); lower it"


def test_defer_by_default_on_any_device_but_the_cpu():
    watch = LossWatch()
    assert not watch.deferred(torch.zeros(()))
    assert watch.deferred(torch.zeros((), device="meta"))  # a stand-in for an accelerator's tensor
    assert not LossWatch(defer=False).deferred(torch.zeros((), device="meta"))
    assert LossWatch(defer=True).deferred(torch.zeros(()))


def test_nothing_is_written_after_a_diverged_step(tmp_path):
    cfg = LMTrainConfig(out=str(tmp_path / "run"), device="cpu", amp="fp32", progress=False)
    run = harness.start_run(cfg, counter="step")
    run.open({"model": "x"})
    run.log_record({"step": 1, "loss": 2.0})
    run.losses = LossWatch(defer=True)
    run.losses.note(torch.tensor(float("nan")), "step 2", "fix it")
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    message = "training diverged: the loss became NaN at step 2; fix it"
    with pytest.raises(TrainingError) as err:
        run.log_record({"step": 2, "loss": float("nan")})
    assert str(err.value) == message
    with pytest.raises(TrainingError) as err:
        run.save_checkpoint(model, opt, sched, meta={}, count=2)
    assert str(err.value) == message
    with pytest.raises(TrainingError) as err:
        run.finish({"finished": True})
    assert str(err.value) == message
    lines = (run.dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"step": 1, "loss": 2.0}]
    assert not (run.dir / "checkpoints" / "last.safetensors").exists()
    assert not (run.dir / "summary.json").exists()
    run.close()
