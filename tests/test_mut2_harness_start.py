"""start_run's resume contract and the process-group helpers, message by message and field by field
(issue 15). Expectations are the run folder a user made (config.json, a checkpoint), the exact
refusal a user reads, and the calls a process group would receive (spies; no second process)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pytest
import torch
from _runs import TRAIN_SAFE, made_run

from vitlens.errors import ConfigError, ResumeError
from vitlens.train import distributed as dist_mod
from vitlens.train import harness
from vitlens.train.config import TrainConfig
from vitlens.train.distributed import DistInfo

# the keys of a TrainConfig a resume may change on purpose, as the messages list them



def _message(call) -> str:
    with pytest.raises((ConfigError, ResumeError)) as err:
        call()
    return str(err.value)


def test_overrides_outside_the_safe_keys_are_named_with_the_safe_ones(tmp_path):
    cfg = made_run(tmp_path)
    assert _message(lambda: harness.start_run(cfg, resume=True, overrides={"seed": 1, "lr": 0.5})) == (
        f"--override lr, seed: only {TRAIN_SAFE} can change when a run is resumed; start a new run "
        "(another --out) to change anything else"
    )


def test_a_resume_that_changes_the_run_lists_each_difference_in_order(tmp_path):
    cfg = made_run(tmp_path, lr=0.25, seed=3)
    changed = TrainConfig(**{**asdict(cfg), "seed": 4, "lr": 0.5, "mixup": 0.2})
    assert _message(lambda: harness.start_run(changed, resume=True)) == (
        f"--resume would change the run in {tmp_path / 'run'} "
        "(lr: 0.25 -> 0.5, mixup: 0.0 -> 0.2, seed: 3 -> 4); "
        "its config.json is the truth: resume with the same settings, start a new run with another --out, "
        f"or change one of {TRAIN_SAFE} on purpose with --override KEY=VALUE"
    )


def test_a_resume_may_change_how_it_runs_and_where_the_folder_is_spelt(tmp_path):
    cfg = made_run(tmp_path, progress=True, num_workers=0, epochs=4)
    same = TrainConfig(
        **{**asdict(cfg), "out": str(tmp_path / "." / "run") + "/", "progress": False, "num_workers": 2}
    )
    run = harness.start_run(same, resume=True, overrides={"epochs": 6, "eval_every": 1})
    assert run.resume and run.cfg.epochs == 6 and run.cfg.progress is False and run.cfg.num_workers == 2
    assert run.overrides == {"epochs": (4, 6)}  # eval_every was 1 already: not a change
    assert run.dir == tmp_path / "run" and run.counter == "epoch" and run.amp_dtype is None
    assert run.dist == DistInfo() and run.device == torch.device("cpu")
    # an override the config itself refuses names the override and the reason
    assert _message(lambda: harness.start_run(same, resume=True, overrides={"epochs": 0})) == (
        "--override {'epochs': 0}: epochs must be at least 1, got 0"
    )


def test_a_new_run_takes_the_task_counter_and_precision(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "new"), device="cpu", amp="bf16")
    run = harness.start_run(cfg, counter="step")
    assert (run.counter, run.resume, run.overrides, run.amp_dtype) == ("step", False, {}, torch.bfloat16)
    assert run.cfg is cfg and run.log is None and run.resumed_at == 0
    assert not (tmp_path / "new").exists()  # nothing is written before the task has built


def test_a_task_config_without_device_or_amp_runs_on_the_cpu_in_fp32(tmp_path):
    @dataclass
    class Bare:
        out: str

    run = harness.start_run(Bare(out=str(tmp_path / "bare")))
    assert run.device == torch.device("cpu") and run.amp_dtype is None and run.amp_name == "fp32"


def test_each_launched_process_on_a_gpu_uses_its_local_rank(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "resolve_device", lambda name: torch.device(name))
    monkeypatch.setattr(harness, "init_distributed", lambda kind: DistInfo(3, 4, 2))
    monkeypatch.setattr(harness, "resolve_amp", lambda amp, device: None)

    @dataclass
    class OnGpu:
        out: str
        device: str = "cuda"

    assert harness.start_run(OnGpu(str(tmp_path / "g"))).device == torch.device("cuda", 2)
    assert harness.start_run(OnGpu(str(tmp_path / "c"), "cpu")).device == torch.device("cpu")


# ------------------------------------------------------------------------------ process-group helpers
def test_all_reduce_sum_builds_its_tensor_on_the_given_device(monkeypatch):
    seen = []
    monkeypatch.setattr(dist_mod.dist, "all_reduce", lambda t, op: seen.append((t.device, t.dtype, op)))
    with torch.device("meta"):  # a user's default device must not capture the counts
        out = dist_mod.all_reduce_sum([1.0, 2.5], DistInfo(0, 2, 0), torch.device("cpu"))
    assert out == [1.0, 2.5] and seen == [(torch.device("cpu"), torch.float64, dist_mod.dist.ReduceOp.SUM)]


def test_init_distributed_joins_the_group_of_the_launch(monkeypatch):
    calls = []
    for key, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dist_mod.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist_mod.dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(dist_mod.torch.cuda, "set_device", lambda i: calls.append(("cuda", i)))
    assert dist_mod.init_distributed("cpu") == DistInfo(1, 2, 1)
    assert dist_mod.init_distributed("cuda") == DistInfo(1, 2, 1)
    assert calls == ["gloo", "nccl", ("cuda", 1)]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist_mod.init_distributed("cuda") == DistInfo() and len(calls) == 3
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.delenv("RANK")
    assert dist_mod.init_distributed("cpu") == DistInfo() and len(calls) == 3  # no RANK: one process


def test_dist_info_roles():
    assert DistInfo() == DistInfo(0, 1, 0) and DistInfo().is_main and not DistInfo().enabled
    assert DistInfo(0, 2, 0).is_main and DistInfo(0, 2, 0).enabled and not DistInfo(1, 2, 1).is_main
