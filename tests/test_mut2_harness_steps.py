"""The step loop of the text tasks (harness.run_steps) under a fake clock (issue 15): every figure
of its records and progress bar worked out by hand, the seeds, the checkpoint extras, the barrier
and the loss scaler's calls seen through spies."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from vitlens.errors import TrainingError
from vitlens.train import harness
from vitlens.train.distributed import DistInfo


@dataclass
class _StepCfg:
    max_steps: int = 5
    eval_every: int = 2
    grad_clip: float | None = None
    seed: int = 7
    model: str = "toy"
    progress: bool = False


class _Bar:
    def __init__(self, kw):
        self.kw, self.updates, self.postfix, self.closed = kw, [], [], False

    def update(self, n):
        self.updates.append(n)

    def set_postfix(self, **kw):
        self.postfix.append(kw)

    def close(self):
        self.closed = True


class _Scaler:
    def __init__(self):
        self.calls = []

    def scale(self, loss):
        self.calls.append("scale")
        return loss

    def unscale_(self, opt):
        self.calls.append("unscale_")

    def step(self, opt):
        self.calls.append("step")
        opt.step()

    def update(self):
        self.calls.append("update")


@dataclass
class _Loop:
    """What run_steps was given and what it did."""

    run: harness.Run
    model: nn.Module
    asked: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    records: list = field(default_factory=list)
    saves: list = field(default_factory=list)
    barriers: list = field(default_factory=list)
    bars: list = field(default_factory=list)


def _loop(
    tmp_path, monkeypatch, *, rank=0, world=1, state=None, scaler=None, tokens_name=None, nan_at=None, **cfg
):
    ticks = iter(0.5 * k for k in range(1000))  # each reading of the clock is half a second later
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(ticks))
    run = harness.Run(
        cfg=_StepCfg(**cfg), dir=tmp_path, device=torch.device("cpu"), dist=DistInfo(rank, world, 0),
        amp_dtype=None, counter="step", resume=False,
    )  # fmt: skip
    model = nn.Linear(2, 1, bias=False).double()  # float64: the clipped updates show exactly
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.25]]))
    out = _Loop(run, model)
    run.progress = lambda **kw: out.bars.append(_Bar(kw)) or out.bars[-1]
    run.log_record = out.records.append
    run.save_checkpoint = lambda *a, **kw: out.saves.append((a, kw))
    monkeypatch.setattr(harness, "barrier", lambda info: out.barriers.append(info))

    def next_batch(step):
        out.asked.append((step, torch.initial_seed()))
        return torch.full((3, 2), float(step + 1), dtype=torch.float64)

    def loss(batch):
        value = (model(batch) - 1).pow(2).mean()
        out.losses.append(value.item())
        return value * float("nan") if len(out.asked) == nan_at else value

    evals = iter(range(1, 100))
    task = harness.StepLoop(
        next_batch=next_batch, loss=loss, tokens=lambda b: b.numel(),
        evaluate=lambda: {"val": float(next(evals))}, position=lambda: {"pos": len(out.asked)},
        **({"tokens_name": tokens_name} if tokens_name else {}),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    result = harness.run_steps(
        run, task, model, opt, sched, meta={"m": 1}, state=dict(state or {}), scaler=scaler
    )
    return out, result


def test_records_figures_follow_the_clock_the_tokens_and_the_schedule(tmp_path, monkeypatch):
    out, (step, last, train_time) = _loop(tmp_path, monkeypatch)
    assert [s for s, _ in out.asked] == [0, 1, 2, 3, 4]
    assert [seed for _, seed in out.asked] == [harness.run_seed(7, s, 0) for s in range(5)]

    # the clock: start 0; steps end at 0.5, 1.0 | eval, restart 1.5; 2.0, 2.5 | restart 3.0; 3.5 | end
    def record(step, loss, tokens_per_s, val, train_time):
        keys = ("step", "lr", "train_loss", "tokens_per_s", "val", "train_time_s")
        return dict(zip(keys, (step, 0.01 * 0.5**step, loss, tokens_per_s, val, train_time)))

    assert out.records == [
        record(2, out.losses[1], 12 / 1.0, 1.0, 1.0),
        record(4, out.losses[3], 12 / 1.0, 2.0, 2.0),
        record(5, out.losses[4], 6 / 0.5, 3.0, 2.5),
    ]
    assert list(out.records[0]) == ["step", "lr", "train_loss", "tokens_per_s", "val", "train_time_s"]
    assert (step, last, train_time) == (5, out.records[-1], 2.5)
    assert [kw["count"] for _, kw in out.saves] == [2, 4, 5]
    assert [kw["extra"] for _, kw in out.saves] == [
        {"train_time": 1.0, "pos": 2},
        {"train_time": 2.0, "pos": 4},
        {"train_time": 2.5, "pos": 5},
    ]
    assert all(kw["meta"] == {"m": 1} and kw["scaler"] is None for _, kw in out.saves)
    assert all(a[0] is out.model for a, _ in out.saves)
    assert out.barriers == [out.run.dist] * 3
    (bar,) = out.bars
    assert bar.kw == {"total": 5, "initial": 0, "desc": "toy"} and bar.updates == [1] * 5 and bar.closed
    assert bar.postfix[0] == {"loss": f"{out.losses[0]:.3f}", "tok_s": "12", "lr": "5.0e-03"}
    assert [p["tok_s"] for p in bar.postfix] == ["12", "12", "12", "12", "12"]


def test_a_resumed_loop_starts_its_bar_clock_and_seeds_at_the_checkpoint(tmp_path, monkeypatch):
    out, (step, last, train_time) = _loop(
        tmp_path,
        monkeypatch,
        rank=1,
        world=2,
        state={"step": 3, "train_time": 10.0},
        tokens_name="pairs_per_s",
    )
    assert [s for s, _ in out.asked] == [3, 4] and step == 5
    assert [seed for _, seed in out.asked] == [harness.run_seed(7, s, 1) for s in (3, 4)]
    assert out.bars[0].kw == {"total": 5, "initial": 3, "desc": "toy"}
    # two processes: each counts its own tokens, the rate is the world's
    assert [(r["step"], r["pairs_per_s"], r["train_time_s"]) for r in out.records] == [
        (4, 12 / 0.5, 10.5),
        (5, 12 / 0.5, 11.0),
    ]
    assert "tokens_per_s" not in out.records[0] and train_time == 11.0


def test_the_loss_scaler_and_clipping_reach_every_step(tmp_path, monkeypatch):
    scaler = _Scaler()
    out, _ = _loop(tmp_path, monkeypatch, scaler=scaler, grad_clip=1e-3, max_steps=2)
    assert scaler.calls == ["scale", "unscale_", "step", "update"] * 2
    assert all(kw["scaler"] is scaler for _, kw in out.saves)
    # clipped to 1e-3 and SGD lr 0.01, then 0.005: the weight moved 1e-5 + 5e-6 in norm at most
    moved = (out.model.weight.detach() - torch.tensor([[0.5, -0.25]], dtype=torch.float64)).norm().item()
    assert moved == pytest.approx(1.5e-5, rel=1e-5)  # (clip_grad_norm_ divides by norm + 1e-6)


def test_a_diverging_loop_names_the_step_and_skips_the_clip_hint_when_clipping(tmp_path, monkeypatch):
    with pytest.raises(TrainingError) as err:
        _loop(tmp_path, monkeypatch, grad_clip=1.0, nan_at=3)
    assert (
        str(err.value)
        == "training diverged: the loss became NaN at step 3; lower the learning rate or use --amp fp32"
    )


def test_a_spent_budget_ends_the_loop_after_the_steps_record(tmp_path, monkeypatch):
    monkeypatch.setattr(harness.Run, "out_of_time", lambda self: True)
    out, (step, last, train_time) = _loop(tmp_path, monkeypatch, eval_every=10)
    assert (
        step == 1 and [r["step"] for r in out.records] == [1] and [kw["count"] for _, kw in out.saves] == [1]
    )
    assert out.bars[0].closed and last == out.records[0] and train_time == 0.5


def test_a_loop_resumed_at_its_last_step_runs_nothing_and_returns_an_empty_record(tmp_path, monkeypatch):
    out, (step, last, train_time) = _loop(tmp_path, monkeypatch, state={"step": 5, "train_time": 4.0})
    assert (step, last, train_time) == (5, {}, 4.0)  # a dict the task can read and spread as it is
    assert out.asked == [] and out.records == [] and out.saves == [] and out.bars[0].closed
