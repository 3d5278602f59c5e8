"""Precision choices and the run folder, pinned where mutation testing found them loose (issue 15).

Each test states what a user relies on against an independent expectation: the flags the kernel
writes in /proc/cpuinfo, the torch probes a machine answers, the exact line printed when bf16 is
refused, FLOP/s worked out from a fake clock, the exact text of the files a run folder holds and
the TensorBoard calls its metrics log makes (a spy SummaryWriter).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from vitlens.errors import ConfigError, ResumeError
from vitlens.train import precision
from vitlens.train import run_folder as rf
from vitlens.train.config import TrainConfig


# ------------------------------------------------------------------------------ reading the machine
@pytest.fixture
def probes(monkeypatch):
    """torch's CPU probes and CUDA answers under the test's control (default: nothing native)."""
    answers = {"amx": False, "avx512_bf16": False, "cuda": False, "cuda_bf16": False, "bf16_kwargs": []}
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: answers["amx"], raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: answers["avx512_bf16"], raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: answers["cuda"])

    def is_bf16_supported(**kwargs):
        answers["bf16_kwargs"].append(kwargs)
        # emulated bf16 (pre-Ampere GPUs) must not count as native
        return answers["cuda_bf16"] or kwargs.get("including_emulation", True) is not False

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    return answers


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(
        f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 {flags}\nbugs\t\t: spectre_v1\n"
    )
    return path


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("", precision.Capability()),
        ("amx_bf16 amx_tile", precision.Capability(cpu_amx_bf16=True)),
        ("avx512f avx512_bf16", precision.Capability(cpu_avx512_bf16=True)),
        ("amx_bf16 avx512_bf16", precision.Capability(cpu_amx_bf16=True, cpu_avx512_bf16=True)),
    ],
)
def test_cpuinfo_flags_alone_decide_when_the_probes_say_no(tmp_path, probes, flags, expected):
    assert precision.detect_capability(_cpuinfo(tmp_path, flags)) == expected


@pytest.mark.parametrize(
    ("amx", "avx", "expected"),
    [
        (True, False, precision.Capability(cpu_amx_bf16=True)),
        (False, True, precision.Capability(cpu_avx512_bf16=True)),
    ],
)
def test_torch_probes_find_what_cpuinfo_does_not_show(tmp_path, probes, amx, avx, expected):
    probes.update(amx=amx, avx512_bf16=avx)
    assert precision.detect_capability(tmp_path / "no-cpuinfo") == expected


def test_without_torch_probes_cpuinfo_is_the_answer(tmp_path, probes, monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert precision.detect_capability(_cpuinfo(tmp_path, "avx512_bf16")) == precision.Capability(
        cpu_avx512_bf16=True
    )
    assert precision.detect_capability(tmp_path / "none") == precision.Capability()
    monkeypatch.delattr(torch, "cpu")  # a torch without the torch.cpu module at all
    assert precision.detect_capability(_cpuinfo(tmp_path, "amx_bf16")) == precision.Capability(
        cpu_amx_bf16=True
    )


def test_cuda_bf16_counts_only_when_native(tmp_path, probes):
    assert precision.detect_capability(tmp_path / "x").cuda_bf16 is False  # no GPU: not even asked
    assert probes["bf16_kwargs"] == []
    probes["cuda"] = True
    assert precision.detect_capability(tmp_path / "x").cuda_bf16 is False  # emulated only (e.g. a T4)
    probes["cuda_bf16"] = True
    assert precision.detect_capability(tmp_path / "x").cuda_bf16 is True  # an A100
    assert probes["bf16_kwargs"] == [{"including_emulation": False}] * 2


def test_capability_is_read_once_per_process(monkeypatch):
    reads = []
    monkeypatch.setattr(precision, "_DETECTED", None)
    monkeypatch.setattr(precision, "detect_capability", lambda: reads.append(1) or precision.Capability(True))
    first = precision.capability()
    assert first == precision.Capability(cpu_amx_bf16=True) and precision.capability() is first
    assert reads == [1]


# ------------------------------------------------------------------------------ the amp decision
CPU_FALLBACK = (
    "amp=auto: this CPU has no native bf16 matrix units (AMX or AVX-512-BF16), where bf16 would be "
    "slower than fp32; training in fp32"
)
GPU_FALLBACK = "amp=auto: this GPU has no native bf16; training in fp32 (pass --amp fp16 for half precision)"


@pytest.mark.parametrize(
    ("device", "cap", "dtype", "lines"),
    [
        ("cpu", precision.Capability(), None, [CPU_FALLBACK]),
        (torch.device("cpu"), precision.Capability(cpu_amx_bf16=True), torch.bfloat16, []),
        ("cuda:1", precision.Capability(cpu_amx_bf16=True), None, [GPU_FALLBACK]),
        ("cuda", precision.Capability(cuda_bf16=True), torch.bfloat16, []),
        (
            "mps",
            precision.Capability(True, True, True),
            None,
            ["amp=auto: no bf16 rule for device type 'mps'; training in fp32"],
        ),
    ],
)
def test_auto_amp_says_exactly_why_it_stays_in_fp32(device, cap, dtype, lines):
    said: list[str] = []
    assert precision.resolve_amp("auto", device, cap, log=said.append) == dtype
    assert said == lines


def test_auto_amp_asks_the_machine_when_given_no_capability(monkeypatch):
    monkeypatch.setattr(precision, "_DETECTED", precision.Capability(cpu_avx512_bf16=True))
    assert precision.resolve_amp("auto", "cpu", log=pytest.fail) == torch.bfloat16
    monkeypatch.setattr(precision, "_DETECTED", precision.Capability())
    said: list[str] = []
    assert precision.resolve_amp("auto", "cpu", log=said.append) is None and said == [CPU_FALLBACK]


def test_resolve_amp_default_log_prints_the_fallback(capsys):
    assert precision.resolve_amp("auto", "cpu", precision.Capability()) is None
    assert capsys.readouterr().out == CPU_FALLBACK + "\n"


def test_unknown_amp_message_lists_the_modes():
    with pytest.raises(ConfigError) as err:
        precision.resolve_amp("half", "cpu", precision.Capability())
    assert str(err.value) == "amp must be one of auto, bf16, fp16, fp32; got 'half'"


# ------------------------------------------------------------------------------ optimiser state layout
def test_moments_get_the_parameters_channels_last_layout():
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    p = conv.weight
    opt = torch.optim.AdamW(conv.parameters(), lr=0.1)
    moment = torch.arange(p.numel(), dtype=torch.float64).view(p.shape)  # contiguous, as a file gives it
    same = torch.ones_like(p)  # already in the parameter's layout: left as it is
    opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": moment.clone(), "kept": same, "note": "x"}
    precision.match_param_layout(opt)
    state = opt.state[p]
    assert state["exp_avg"].stride() == p.stride() and state["exp_avg"].dtype == torch.float64
    assert torch.equal(state["exp_avg"], moment)  # the same values, element by element
    assert state["kept"] is same and state["note"] == "x" and state["step"].item() == 3.0


# ------------------------------------------------------------------------------ matmul FLOP/s
class _FakeRandn:
    """torch.randn stand-in: records its shape and device, and the dtype it is cast to (meta tensors,
    so the products cost nothing)."""

    def __init__(self):
        self.shapes, self.devices, self.dtypes = [], [], []

    def __call__(self, *shape, device=None):
        self.shapes.append(shape)
        self.devices.append(torch.device(device))
        fake = self

        class T:
            def to(self, dtype):
                fake.dtypes.append(dtype)
                return torch.empty(*shape, device="meta", dtype=dtype)

        return T()


def _clock(monkeypatch, durations):
    """perf_counter readings: the warm-up product's start, then counted product i takes durations[i] s
    (the warm-up's end is never read)."""
    readings, now = [50.0], 100.0
    for d in durations:
        readings += [now, now + d]
        now += d + 7.0
    it = iter(readings)
    monkeypatch.setattr(precision.time, "perf_counter", lambda: next(it))
    return it


def test_matmul_flops_defaults_bf16_1024_on_the_cpu_best_of_five_after_a_warmup(monkeypatch):
    randn = _FakeRandn()
    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("no CUDA sync on the CPU"))
    left = _clock(monkeypatch, [4.0, 2.0, 3.0, 5.0, 6.0])
    assert precision.matmul_flops() == 2 * 1024**3 / 2.0
    assert next(left, None) is None  # six products: the warm-up (started, not timed) and five timed
    assert randn.shapes == [(1024, 1024)] * 2 and randn.devices == [torch.device("cpu")] * 2
    assert randn.dtypes == [torch.bfloat16] * 2


def test_matmul_flops_on_a_gpu_is_8192_and_synchronises_around_each_product(monkeypatch):
    randn, syncs = _FakeRandn(), []
    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: syncs.append(device))
    _clock(monkeypatch, [0.5, 0.25])
    assert precision.matmul_flops(torch.float16, "cuda:0", repeats=2) == 2 * 8192**3 / 0.25
    assert randn.shapes == [(8192, 8192)] * 2 and randn.dtypes == [torch.float16] * 2
    assert syncs == [torch.device("cuda:0")] * 6
    _clock(monkeypatch, [2.0])
    assert precision.matmul_flops(torch.float32, "cuda", n=64, repeats=1) == 2 * 64**3 / 2.0
    assert randn.shapes[-1] == (64, 64)


# ------------------------------------------------------------------------------ the run folder's files
def test_write_json_is_indented_ends_with_a_newline_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "config.json"
    path.parent.mkdir()
    path.write_text("old")
    rf.write_json(path, {"lr": 0.5, "tags": [1, 2]})
    assert path.read_text() == '{\n  "lr": 0.5,\n  "tags": [\n    1,\n    2\n  ]\n}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json"]


class _SpyWriter:
    """Stands in for TensorBoard's SummaryWriter: records what the metrics log asks of it."""

    made: list = []

    def __init__(self, logdir, purge_step=None):
        self.logdir, self.purge_step, self.calls = logdir, purge_step, []
        _SpyWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.calls.append(("add_scalar", tag, value, step))

    def flush(self):
        self.calls.append(("flush",))

    def close(self):
        self.calls.append(("close",))


@pytest.fixture
def spy_writer(monkeypatch):
    import torch.utils.tensorboard

    _SpyWriter.made = []
    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", _SpyWriter)
    return _SpyWriter.made


def test_metrics_log_writes_each_number_to_tensorboard_at_the_records_step(tmp_path, spy_writer):
    log = rf.MetricsLog(tmp_path, enabled=True)
    (tb,) = spy_writer
    assert tb.logdir == str(tmp_path / "tb") and tb.purge_step is None  # a new run purges nothing
    log.write({"epoch": 2, "step": 40, "train_loss": 1.5, "top1": 31, "model": "vit", "flag": None})
    log.write({"val_loss": 0.25})  # a record without a step counts as step 0
    assert tb.calls == [
        ("add_scalar", "train_loss", 1.5, 40),
        ("add_scalar", "top1", 31, 40),
        ("flush",),
        ("add_scalar", "val_loss", 0.25, 0),
        ("flush",),
    ]
    assert (tmp_path / "metrics.jsonl").read_text() == (
        '{"epoch": 2, "step": 40, "train_loss": 1.5, "top1": 31, "model": "vit", "flag": null}\n'
        '{"val_loss": 0.25}\n'
    )
    log.close()
    assert tb.calls[-1] == ("close",)


def test_metrics_log_cut_back_purges_tensorboard_after_the_checkpoint(tmp_path, spy_writer):
    path = tmp_path / "metrics.jsonl"
    lines = [{"epoch": 1, "step": 10}, {"epoch": 2, "step": 20}, {"epoch": 3, "step": 30}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    rf.MetricsLog(tmp_path, enabled=True, keep_upto=("epoch", 2))
    assert path.read_text() == '{"epoch": 1, "step": 10}\n{"epoch": 2, "step": 20}\n'
    assert spy_writer[-1].purge_step == 21  # events after the kept record's step are dropped
    rf.MetricsLog(tmp_path, enabled=True, keep_upto=("epoch", 0))  # nothing kept: purge from step 1
    assert path.read_text() == "" and spy_writer[-1].purge_step == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_metrics_log_cut_back_of_records_without_the_counter_or_a_step(tmp_path, spy_writer):
    """Records lacking the counter count as 0 (kept); a kept record without a step purges from 1."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"note": "start"}\n{"epoch": 1}\n{"epoch": 2, "step": 9}\n')
    rf.MetricsLog(tmp_path, enabled=True, keep_upto=("epoch", 1))
    assert path.read_text() == '{"note": "start"}\n{"epoch": 1}\n'
    assert spy_writer[-1].purge_step == 1
    path.write_text('{"note": "start"}\n{"epoch": 1}\n')
    rf.MetricsLog(tmp_path, enabled=True, keep_upto=("epoch", 0))
    assert path.read_text() == '{"note": "start"}\n'


def test_a_disabled_metrics_log_writes_nothing_and_closes_quietly(tmp_path, spy_writer):
    log = rf.MetricsLog(tmp_path, enabled=False, keep_upto=("epoch", 0))
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert spy_writer == [] and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ resume: config.json rules
def _run_folder(tmp_path, values: dict):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / rf.LAST).write_bytes(b"weights")
    (run / "config.json").write_text(json.dumps(values))
    return run


def _stored(**changes) -> dict:
    return {**rf.as_json(TrainConfig().__dict__), **changes}


def test_resume_of_a_run_made_before_a_field_existed_takes_its_default(tmp_path):
    values = _stored(lr=0.25, out="elsewhere", device="cpu")
    del values["tta"], values["data_path"]  # fields added after this run was made
    run = _run_folder(tmp_path, values)
    # the user repeats the new field's default on the command line: not a change of the run
    cfg = rf.resume_config(TrainConfig, run, {"lr": 0.25, "progress": False, "data_path": "auto"})
    assert (cfg.lr, cfg.tta, cfg.data_path, cfg.progress, cfg.out) == (0.25, None, "auto", False, str(run))
    # the harness agrees: the same run, resumed through start_run
    from vitlens.train.harness import start_run

    started = start_run(TrainConfig(**{**values, "out": str(run)}), resume=True)
    assert started.resume and started.cfg.tta is None and started.overrides == {}


def test_resume_config_takes_invocation_keys_from_the_caller_and_drops_unknown_ones(tmp_path):
    run = _run_folder(tmp_path, _stored(progress=False, num_workers=3, epochs=7, gone_field=1))
    cfg = rf.resume_config(TrainConfig, run)  # nothing given: the stored run, this invocation's defaults
    assert (cfg.epochs, cfg.progress, cfg.num_workers) == (7, True, 0)
    cfg = rf.resume_config(TrainConfig, run, {"num_workers": 2, "out": "another/spelling", "epochs": 7})
    assert (cfg.num_workers, cfg.out) == (2, str(run))


def test_resume_config_names_a_config_json_that_no_longer_fits(tmp_path):
    run = _run_folder(tmp_path, _stored(epochs=None))
    with pytest.raises(ResumeError) as err:
        rf.resume_config(TrainConfig, run)
    assert re.fullmatch(rf"{re.escape(str(run))}/config\.json does not fit TrainConfig: .+", str(err.value))
    (run / "config.json").unlink()
    with pytest.raises(ResumeError) as err:
        rf.resume_config(TrainConfig, run)
    assert str(err.value) == f"{run} has a checkpoint but no config.json; it cannot be resumed safely"


def test_refusal_lists_every_difference_and_the_keys_that_may_change(tmp_path):
    names = {"epochs", "lr", "eval_every", "progress", "seed"}
    text = rf.refusal("runs/a", {"lr": (0.1, 0.2), "seed": (0, 1)}, names)
    assert text == (
        "--resume would change the run in runs/a (lr: 0.1 -> 0.2, seed: 0 -> 1); its config.json is the "
        "truth: resume with the same settings, start a new run with another --out, or change one of "
        "epochs, eval_every, progress on purpose with --override KEY=VALUE"
    )


def test_defaults_of_a_config_class_as_config_json_stores_them():
    @dataclass
    class C:
        a: int
        b: tuple = (1, 2)
        c: dict = None

    import dataclasses

    @dataclass
    class D(C):
        d: list = dataclasses.field(default_factory=lambda: [("x", 1)])

    assert rf._defaults(D) == {"b": [1, 2], "c": None, "d": [["x", 1]]}  # no default for a: absent


def test_parse_overrides_reads_json_values_and_keeps_text():
    assert rf.parse_overrides(None) == {}
    assert rf.parse_overrides([" eval-every =5", "note=plain text", "x=[1, 2]", "tag=a=b"]) == {
        "eval_every": 5,
        "note": "plain text",
        "x": [1, 2],
        "tag": "a=b",
    }
    with pytest.raises(ConfigError) as err:
        rf.parse_overrides([" =1"])
    assert str(err.value) == "--override ' =1': write KEY=VALUE, e.g. --override epochs=20"


def test_remove_interrupted_writes_in_the_folder_and_its_checkpoints(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for p in (tmp_path / ".config.json.ab12.tmp", tmp_path / "checkpoints" / ".last.safetensors.x.tmp"):
        p.write_text("half")
    (tmp_path / "keep.tmp").write_text("not ours")
    rf.remove_interrupted_writes(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["checkpoints", "keep.tmp"]


# ------------------------------------------------------------------------------ the config class
@pytest.mark.parametrize("off", ["", "none", "None", "OFF"])
def test_randaugment_off_spellings_mean_none(off):
    assert TrainConfig(randaugment=off).randaugment is None


def test_resume_config_ignores_invocation_flags_the_task_does_not_have(tmp_path):
    """The CLI may give every verb's invocation flags; a task without one (an LM run has no
    --num-workers) resumes as if it was not given, and takes the ones it has."""
    from vitlens.train.lm import LMTrainConfig

    run = _run_folder(tmp_path, rf.as_json(LMTrainConfig(max_steps=40).__dict__))
    cfg = rf.resume_config(LMTrainConfig, run, {"num_workers": 2, "time_budget_min": 5.0, "max_steps": 40})
    assert isinstance(cfg, LMTrainConfig) and (cfg.max_steps, cfg.time_budget_min) == (40, 5.0)
