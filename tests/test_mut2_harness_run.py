"""The harness's Run object, method by method (issue 15): what each one writes, prints, loads and
wraps, on the main process and on the others, checked against the exact files, lines and calls a
user or a task relies on (spies stand in for DDP, the process-group barrier and TensorBoard)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pytest
import torch
from torch import nn

from vitlens.io import load_checkpoint
from vitlens.train import harness
from vitlens.train.distributed import DistInfo


@dataclass
class _Cfg:
    epochs: int = 3
    max_steps: int = 9
    lr: float = 0.1
    progress: bool = False


@pytest.fixture
def collectives(monkeypatch):
    """The barrier and the group's cleanup, recorded instead of run (no process group in a test)."""
    calls = []
    monkeypatch.setattr(harness, "barrier", lambda info: calls.append(("barrier", info)))
    monkeypatch.setattr(harness, "cleanup", lambda info: calls.append(("cleanup", info)))
    return calls


def _run(tmp_path, *, counter="step", resume=False, rank=0, world=1, amp=None, cfg=None, **kw):
    return harness.Run(
        cfg=cfg or _Cfg(), dir=tmp_path / "runs" / "r", device=torch.device("cpu"),
        dist=DistInfo(rank, world, 0), amp_dtype=amp, counter=counter, resume=resume, **kw,
    )  # fmt: skip


# ------------------------------------------------------------------------------ open: the folder's files
def test_open_on_the_main_process_writes_the_folder(tmp_path, collectives):
    run = _run(tmp_path)
    run.dir.joinpath("checkpoints").mkdir(parents=True)
    stale = [run.dir / ".config.json.k3j.tmp", run.dir / "checkpoints" / ".last.safetensors.q.tmp"]
    for p in stale:
        p.write_text("a write a kill interrupted")
    (run.dir / "metrics.jsonl").write_text('{"step": 0, "a": 1}\n{"step": 3, "a": 2}\n')
    written = []
    run.open({"model": "m", "n": 2}, files={"vocab.json": lambda p: written.append(p) or p.write_text("v")})
    assert (run.dir / "config.json").read_text() == json.dumps(asdict(_Cfg()), indent=2) + "\n"
    assert (run.dir / "model.json").read_text() == '{\n  "model": "m",\n  "n": 2\n}\n'
    assert written == [run.dir / "vocab.json"] and (run.dir / "vocab.json").read_text() == "v"
    assert not any(p.exists() for p in stale)
    assert collectives == [("barrier", run.dist)]
    # the metrics log is open, cut back to the checkpoint's step (0 for a new run)
    assert run.log.enabled and (run.dir / "metrics.jsonl").read_text() == '{"step": 0, "a": 1}\n'
    run.log.write({"step": 1, "b": 2.0})
    run.close()
    assert (run.dir / "metrics.jsonl").read_text().splitlines()[-1] == '{"step": 1, "b": 2.0}'
    assert collectives[-1] == ("cleanup", run.dist)


def test_open_without_meta_writes_no_model_json(tmp_path, collectives):
    run = _run(tmp_path, counter="epoch")
    run.open()
    assert sorted(p.name for p in run.dir.iterdir()) == ["config.json", "metrics.jsonl", "tb"]
    run.close()


def test_open_on_another_process_writes_nothing_but_waits_at_the_barrier(tmp_path, collectives):
    run = _run(tmp_path, rank=1, world=2)
    run.open({"model": "m"}, files={"x": lambda p: pytest.fail("only the main process writes files")})
    assert not run.dir.exists() and collectives == [("barrier", run.dist)]
    assert run.log is not None and not run.log.enabled
    run.log_record({"step": 1, "loss": 0.5})
    assert run.finish({"finished": True}) == {"finished": True}
    assert not run.dir.exists()


def test_resumed_at_decides_where_the_metrics_are_cut(tmp_path, collectives):
    run = _run(tmp_path, counter="epoch", resume=True, resumed_at=2)
    run.dir.mkdir(parents=True)
    lines = [{"epoch": e, "step": 10 * e} for e in (1, 2, 3)]
    (run.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run.open()
    assert [json.loads(x)["epoch"] for x in (run.dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    run.close()


# ----------------------------------------------------------------------------- config.json's override history
def test_config_record_keeps_the_override_history_and_adds_this_resume(tmp_path, collectives):
    before = {"at_step": 4, "changes": {"max_steps": [8, 12]}}
    run = _run(tmp_path, resume=True, resumed_at=12, overrides={"max_steps": (12, 20), "lr": (0.1, 0.2)})
    run.dir.mkdir(parents=True)
    (run.dir / "config.json").write_text(json.dumps({**asdict(_Cfg()), "overrides": [before]}))
    assert run._config_record() == {
        **asdict(_Cfg()),
        "overrides": [before, {"at_step": 12, "changes": {"max_steps": [12, 20], "lr": [0.1, 0.2]}}],
    }
    plain = _run(tmp_path, resume=True, resumed_at=12)  # a resume without overrides keeps the history
    assert plain._config_record() == {**asdict(_Cfg()), "overrides": [before]}
    first = _run(tmp_path, counter="epoch", resume=True, resumed_at=1, overrides={"epochs": (3, 5)})
    (run.dir / "config.json").unlink()  # (a config.json lost: the history starts again)
    assert first._config_record() == {
        **asdict(_Cfg()),
        "overrides": [{"at_epoch": 1, "changes": {"epochs": [3, 5]}}],
    }


def test_a_new_run_does_not_inherit_an_override_history(tmp_path):
    run = _run(tmp_path)
    run.dir.mkdir(parents=True)
    (run.dir / "config.json").write_text(json.dumps({"overrides": [{"at_step": 1, "changes": {}}]}))
    assert run._config_record() == asdict(_Cfg())


# ------------------------------------------------------------------------------ log_record and finish
def test_log_record_prints_rounded_floats_only_when_showing_progress(tmp_path, collectives, capsys):
    run = _run(tmp_path, cfg=_Cfg(progress=True))
    run.open()
    run.log_record({"step": 7, "loss": 1.234567, "lr": 3e-05, "name": "x", "n": 12345})
    assert capsys.readouterr().out == '{"step": 7, "loss": 1.2346, "lr": 0.0, "name": "x", "n": 12345}\n'
    assert (run.dir / "metrics.jsonl").read_text() == (
        '{"step": 7, "loss": 1.234567, "lr": 3e-05, "name": "x", "n": 12345}\n'  # the file keeps them all
    )
    quiet = _run(tmp_path / "q")
    quiet.open()
    quiet.log_record({"step": 1, "loss": 0.5})
    assert capsys.readouterr().out == "" and (quiet.dir / "metrics.jsonl").read_text() == (
        '{"step": 1, "loss": 0.5}\n'
    )
    other = _run(tmp_path / "o", rank=1, world=2, cfg=_Cfg(progress=True))
    other.open()
    other.log_record({"step": 1, "loss": 0.5})
    assert capsys.readouterr().out == ""


def test_finish_writes_the_summary_of_a_finished_run_and_closes(tmp_path, collectives):
    run = _run(tmp_path)
    run.open()
    summary = {"finished": True, "steps": 9, "best": 0.5}
    assert run.finish(summary) is summary
    assert (
        run.dir / "summary.json"
    ).read_text() == '{\n  "finished": true,\n  "steps": 9,\n  "best": 0.5\n}\n'
    assert collectives[-1] == ("cleanup", run.dist)
    unfinished = _run(tmp_path / "u")
    unfinished.open()
    assert unfinished.finish({"steps": 3}) == {"steps": 3}  # no "finished" key: not finished
    assert not (unfinished.dir / "summary.json").exists()
    _run(tmp_path / "never").close()  # closing a run that never opened only closes the group
    assert collectives[-1][0] == "cleanup"


# ------------------------------------------------------------------------------ checkpoints
def _objects(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    return model, opt, sched, scaler


def test_save_checkpoint_holds_counter_meta_state_and_extras(tmp_path):
    model, opt, sched, scaler = _objects()
    model(torch.ones(1, 2)).sum().backward()
    opt.step(), sched.step()
    run = _run(tmp_path, counter="epoch")
    run.save_checkpoint(model, opt, sched, meta={"model": "lin"}, count=4, scaler=scaler, extra={"best": 0.5})
    weights, meta, state = load_checkpoint(run.dir / "checkpoints" / "last.safetensors")
    assert meta == {"model": "lin", "epoch": 4}
    assert sorted(state) == ["best", "epoch", "optimizer", "scaler", "scheduler"]
    assert state["epoch"] == 4 and state["best"] == 0.5 and state["scaler"]["scale"] == 256.0
    assert state["scheduler"]["last_epoch"] == 1 and torch.equal(weights["weight"], model.weight)
    run.save_checkpoint(model, opt, sched, meta={}, count=5)  # without a scaler: no scaler state
    _, meta, state = load_checkpoint(run.dir / "checkpoints" / "last.safetensors")
    assert meta == {"epoch": 5} and sorted(state) == ["epoch", "optimizer", "scheduler"]
    other = _run(tmp_path / "o", counter="epoch", rank=1, world=2)
    other.save_checkpoint(model, opt, sched, meta={}, count=5)
    assert not other.dir.exists()  # only the main process writes


def test_restore_brings_back_the_loss_scaler_and_says_where_it_resumes(tmp_path, capsys):
    model, opt, sched, _ = _objects()
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    _run(tmp_path).save_checkpoint(model, opt, sched, meta={}, count=6, scaler=scaler)
    fresh = _objects(seed=1)
    run = _run(tmp_path, resume=True, cfg=_Cfg(max_steps=10))
    state = run.restore(*fresh)
    assert fresh[3].get_scale() == 64.0 and state["step"] == 6 and run.resumed_at == 6
    assert torch.equal(fresh[0].weight, model.weight)
    assert capsys.readouterr().err == f"resuming {run.dir} at step 6/10\n"
    # a config without the run length says "?"; other processes stay quiet
    _run(tmp_path, resume=True, counter="step", cfg=object()).restore(_objects()[0])
    assert capsys.readouterr().err == f"resuming {run.dir} at step 6/?\n"
    quiet = _run(tmp_path, resume=True, rank=1, world=2)
    quiet.restore(_objects()[0])
    assert capsys.readouterr().err == "" and quiet.resumed_at == 6


def test_restore_of_an_epoch_run_reads_the_epoch_total(tmp_path, capsys):
    model, opt, sched, _ = _objects()
    _run(tmp_path, counter="epoch").save_checkpoint(model, opt, sched, meta={}, count=2)
    _run(tmp_path, counter="epoch", resume=True, cfg=_Cfg(epochs=7)).restore(model, opt, sched)
    assert capsys.readouterr().err == f"resuming {tmp_path / 'runs' / 'r'} at epoch 2/7\n"


def test_restore_gives_channels_last_parameters_moments_in_their_layout(tmp_path):
    conv = nn.Conv2d(2, 3, 3).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(conv.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    conv(torch.randn(1, 2, 5, 5)).sum().backward()
    opt.step()
    _run(tmp_path).save_checkpoint(conv, opt, sched, meta={}, count=1)
    conv2 = nn.Conv2d(2, 3, 3).to(memory_format=torch.channels_last)
    opt2 = torch.optim.AdamW(conv2.parameters(), lr=0.1)
    _run(tmp_path, resume=True).restore(conv2, opt2, None)
    moments = opt2.state[conv2.weight]["exp_avg"]
    assert moments.stride() == conv2.weight.stride()
    assert torch.equal(moments, opt.state[conv.weight]["exp_avg"])


# ------------------------------------------------------------------------------ numerics, wrapping, progress
def test_autocast_follows_the_runs_precision(tmp_path):
    run = _run(tmp_path, amp=torch.bfloat16)
    with run.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with _run(tmp_path, amp=torch.float16).autocast():  # not the CPU's default autocast dtype (bf16)
        assert torch.get_autocast_dtype("cpu") == torch.float16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    with _run(tmp_path).autocast():
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_wrap_puts_the_model_in_distributed_data_parallel_only_with_several_processes(tmp_path, monkeypatch):
    made = []

    class SpyDDP(nn.Module):
        def __init__(self, module, device_ids, find_unused_parameters):
            super().__init__()
            made.append((module, device_ids, find_unused_parameters))

    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", SpyDDP)
    model = nn.Linear(1, 1)
    assert _run(tmp_path).wrap(model) is model
    assert isinstance(_run(tmp_path, world=2).wrap(model), SpyDDP)
    run = _run(tmp_path, world=4, rank=2)
    run.device = torch.device("cuda", 3)
    run.wrap(model, find_unused=True)
    assert made == [(model, None, False), (model, [3], True)]


def test_progress_bar_shows_on_the_main_process_when_asked(tmp_path):
    bar = _run(tmp_path, cfg=_Cfg(progress=True)).progress(range(4), total=4, desc="m", initial=1)
    assert not bar.disable and (bar.total, bar.desc, bar.n) == (4, "m", 1)
    assert _run(tmp_path, cfg=_Cfg(progress=True), rank=1, world=2).progress(range(4)).disable
    assert _run(tmp_path, cfg=_Cfg(progress=False)).progress(range(4)).disable
    assert not _run(tmp_path, cfg=object()).progress(range(4)).disable  # no such setting: shown


def test_out_of_time_compares_minutes_with_the_clock(tmp_path, monkeypatch):
    @dataclass
    class Budget:
        time_budget_min: float | None = 0.5

    now = [1000.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: now[0])
    run = _run(tmp_path, cfg=Budget(), started=1000.0)
    now[0] = 1030.0  # exactly the budget: not over it yet
    assert not run.out_of_time()
    now[0] = 1030.5
    assert run.out_of_time()
    assert not _run(tmp_path, cfg=Budget(None), started=0.0).out_of_time()
    assert not _run(tmp_path, cfg=object(), started=0.0).out_of_time()


def test_amp_name_and_scaler(tmp_path):
    assert _run(tmp_path).amp_name == "fp32"
    assert _run(tmp_path, amp=torch.bfloat16).amp_name == "bfloat16"
    assert _run(tmp_path, amp=torch.float16).grad_scaler().is_enabled()
    assert not _run(tmp_path, amp=torch.bfloat16).grad_scaler().is_enabled()


def test_log_record_of_a_task_config_without_a_progress_setting_prints(tmp_path, capsys):
    from vitlens.train.run_folder import MetricsLog

    run = _run(tmp_path, cfg=object())
    run.log = MetricsLog(tmp_path, enabled=False)
    run.log_record({"step": 2, "loss": 0.5})
    assert capsys.readouterr().out == '{"step": 2, "loss": 0.5}\n'


def test_a_torn_line_anywhere_in_the_metrics_is_skipped_and_the_rest_read(tmp_path):
    from vitlens.train.run_folder import read_records

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n\n{"step": 4}\n')
    assert read_records(path) == [{"step": 1}, {"step": 3}, {"step": 4}]
