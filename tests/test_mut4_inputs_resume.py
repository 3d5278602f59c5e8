"""Mutation round 4: the model entry checks (models/inputs.py and the models that call it), resume on
other hardware (EXECUTION_KEYS, the moved-keys line, config.json's history) and keep_freed_memory.

Each test states a behaviour a user relies on, against an independent expectation: the whole message
a user reads, the models' own output shapes, the config.json a user opens, what glibc answers.
Equivalent survivors are listed with reasons in benchmarks/equivalent/inputs_resume.txt.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import platform
import sys
from dataclasses import asdict, replace

import pytest
import torch

import vitlens
from vitlens.errors import ModelError, ResumeError
from vitlens.models.gpt import GPT, GPTConfig
from vitlens.train import TrainConfig, harness
from vitlens.train.precision import keep_freed_memory
from vitlens.train.run_folder import resume_config

_MODELS: dict[str, torch.nn.Module] = {}


def model(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        _MODELS[name] = vitlens.create_model(name).eval()
    return _MODELS[name]


def _message(call) -> str:
    with pytest.raises(ModelError) as err, torch.no_grad():
        call()
    return str(err.value)


VOCAB = (
    "is outside the vocabulary of gpt_nano (ids 0..64); encode the text with the tokenizer the model was "
    "trained with"
)


# ------------------------------------------------------------------------------ model entry checks
def test_a_model_built_without_the_registry_is_named_by_its_class():
    gpt = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8)).eval()
    assert _message(lambda: gpt(torch.tensor([[3, 10]]))) == (
        "token id 10 is outside the vocabulary of GPT (ids 0..9); encode the text with the tokenizer the "
        "model was trained with"
    )
    assert _message(lambda: gpt(torch.tensor([1, 2]))) == (
        "GPT expects token ids of shape (B, T), got (2,); add the batch dimension with ids.unsqueeze(0)"
    )
    with torch.no_grad():
        assert gpt(torch.tensor([[0, 9]])).shape == (1, 2, 10)


def test_token_ids_with_an_extra_dimension_get_no_unsqueeze_advice():
    assert _message(lambda: model("gpt_nano")(torch.ones(2, 3, 4, dtype=torch.long))) == (
        "gpt_nano expects token ids of shape (B, T), got (2, 3, 4)"
    )


def test_an_empty_sequence_passes_the_vocabulary_check():
    with torch.no_grad():
        assert model("gpt_nano")(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 65)


@pytest.mark.parametrize(
    "ids, bad",
    [([[0, 65]], 65), ([[64, 70, 3]], 70), ([[64, -2, 0]], -2), ([[-5, 12]], -5)],
    ids=["too-high-next-to-0", "too-high-next-to-the-last", "negative-next-to-the-last", "negative-alone"],
)
def test_the_message_names_the_id_outside_the_vocabulary(ids, bad):
    assert _message(lambda: model("gpt_nano")(torch.tensor(ids))) == f"token id {bad} {VOCAB}"


@pytest.mark.filterwarnings("ignore:vq tokenizer. no tokenizer_args")
@pytest.mark.parametrize("hw", [(32, 30), (30, 32)], ids=["width-off-grid", "height-off-grid"])
def test_a_vq_vit_names_an_image_off_its_token_grid_in_one_dimension(hw):
    H, W = hw
    assert _message(lambda: model("vit_micro_vq_32")(torch.zeros(1, 3, H, W))) == (
        f"vit_micro_vq_32 was built for 32x32 images, got {H}x{W}; resize the images to 32x32 ({H}x{W} is "
        "not a multiple of its 4x4 tokens)"
    )


# ------------------------------------------------------------------------------ keep_freed_memory
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc is what is tuned")
def test_glibc_takes_the_settings_in_this_process():
    # start_run calls it in every training process; glibc takes both mallopt settings
    assert keep_freed_memory() is True


@pytest.mark.skipif(not GLIBC, reason="glibc's soname")
def test_without_ldconfig_glibc_is_found_by_its_soname(monkeypatch):
    # find_library needs ldconfig/gcc, which slim containers lack; glibc's soname still loads
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert keep_freed_memory() is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the C library is looked up on Linux")
def test_a_c_library_that_cannot_be_loaded_changes_nothing(monkeypatch):
    asked = []
    monkeypatch.setattr(
        ctypes.util, "find_library", lambda name: asked.append(name) or "/nonexistent/libc.so"
    )
    assert keep_freed_memory() is False
    assert asked == ["c"]


def test_other_platforms_are_left_alone(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("no C library is loaded off Linux")

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(ctypes, "CDLL", no_loading)
    assert keep_freed_memory() is False


# ------------------------------------------------------------------------------ resume history
def _made_run(tmp_path, history=None, **values) -> TrainConfig:
    """A run folder with a checkpoint and the config.json of TrainConfig(**values) (+ its history)."""
    cfg = TrainConfig(**{"out": str(tmp_path / "run"), "device": "cpu", "amp": "fp32", **values})
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.safetensors").write_bytes(b"x")
    record = {**asdict(cfg), **({"overrides": history} if history else {})}
    (tmp_path / "run" / "config.json").write_text(json.dumps(record))
    return cfg


def _resume_and_open(cfg, at_epoch: int, **kw) -> dict:
    """start_run + open as a task does after restore() read the checkpoint's epoch; config.json after."""
    run = harness.start_run(cfg, resume=True, **kw)
    run.resumed_at = at_epoch
    run.open()
    run.close()
    return json.loads((run.dir / "config.json").read_text())


def test_config_json_keeps_every_resume_in_its_history(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    first = {"at_epoch": 1, "changes": {"epochs": [2, 3]}}
    cfg = _made_run(tmp_path, history=[first], device="auto", epochs=3)
    moved = replace(cfg, device="cpu")
    config = _resume_and_open(moved, 2)
    second = {"at_epoch": 2, "changes": {"device": ["auto", "cpu"]}}
    assert config == {**json.loads(json.dumps(asdict(moved))), "overrides": [first, second]}
    # a resume that changes nothing leaves the history as it was
    assert _resume_and_open(moved, 3)["overrides"] == [first, second]
    # and the next move is added after both
    config = _resume_and_open(moved, 3, overrides={"epochs": 5})
    assert config["overrides"] == [first, second, {"at_epoch": 3, "changes": {"epochs": [3, 5]}}]


def test_a_new_runs_config_json_is_its_config_and_no_history(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "new"), device="cpu", amp="fp32", epochs=2)
    run = harness.start_run(cfg)
    run.open()
    run.close()
    assert json.loads((tmp_path / "new" / "config.json").read_text()) == json.loads(json.dumps(asdict(cfg)))


def test_a_run_made_before_a_config_field_existed_reads_it_as_its_default(tmp_path):
    # config.json of an older vitlens, without the "mixup" field TrainConfig has now (default 0.0)
    _made_run(tmp_path, epochs=3)
    run_dir = tmp_path / "run"
    old = json.loads((run_dir / "config.json").read_text())
    del old["mixup"]
    (run_dir / "config.json").write_text(json.dumps(old))
    # the default given on the command line is no change; the run resumes with it
    assert resume_config(TrainConfig, run_dir, {"mixup": 0.0, "epochs": 3}).mixup == 0.0
    # another value is a change from the default, named as such
    with pytest.raises(ResumeError) as err:
        resume_config(TrainConfig, run_dir, {"mixup": 0.2})
    assert str(err.value) == (
        f"--resume would change the run in {run_dir} (mixup: 0.0 -> 0.2); its config.json is the truth: "
        "resume with the same settings, start a new run with another --out, or change one of "
        "checkpoint_every, epochs, eval_every, num_workers, progress, stop_after_epochs, time_budget_min on "
        "purpose with --override KEY=VALUE"
    )
    # start_run reads it the same way
    with pytest.raises(ResumeError) as err2:
        harness.start_run(TrainConfig(**{**old, "mixup": 0.2}), resume=True)
    assert str(err2.value) == str(err.value)


def test_set_image_size_keeps_a_sincos_vit_on_its_device():
    # the meta device stands in for a GPU: the new fixed table goes where the model is
    vit = vitlens.create_model("vit_micro_patch4_32", pos_embed="sincos2d").to("meta")
    vit.set_image_size(64)
    assert vit.pos_embed.device == torch.device("meta") and vit.pos_embed.shape == (1, 1 + 16 * 16, 128)
    assert vit(torch.zeros(2, 3, 64, 64, device="meta")).shape == (2, 10)
