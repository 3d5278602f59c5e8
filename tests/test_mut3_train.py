"""vitlens.train behaviours the third mutation sample showed no test pinned (issue 15).

Each test states what a user relies on: a tokenizer run is one process whatever the launcher's
variables say, and a custom builder registered without a config class still trains.
"""

from __future__ import annotations

import json

import pytest
from torch import nn

from vitlens.errors import ModelError
from vitlens.models import registry
from vitlens.train import distributed as dist_mod
from vitlens.train.config import TrainConfig
from vitlens.train.trainer import model_fields, model_overrides


# ------------------------------------------------------------------------------ tokenizer run
def test_tokenizer_run_ignores_launcher_variables_and_starts_no_process_group(tmp_path, monkeypatch):
    """Fitting a tokenizer is a one-process job: launched with RANK/WORLD_SIZE set (say, by a shell
    script shared with the classifier runs), it must neither join a process group nor act as a
    non-main rank that writes nothing."""
    from vitlens.train.tokenizer import TokenizerTrainConfig, train_tokenizer

    started = []
    monkeypatch.setattr(dist_mod.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist_mod.dist, "init_process_group", lambda backend: started.append(backend))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = TokenizerTrainConfig(
        kind="palette",
        data="cifar10-mini",
        fraction=0.05,
        k=4,
        palette_iters=2,
        palette_sample=2000,
        eval_images=4,
        progress=False,
        out=str(tmp_path / "pal"),
    )
    summary = train_tokenizer(cfg)
    assert started == []
    assert (tmp_path / "pal" / "palette.safetensors").is_file()
    assert json.loads((tmp_path / "pal" / "summary.json").read_text())["k"] == summary["k"] == 4


# ------------------------------------------------------------------------------ model fields
def test_a_builder_registered_without_a_config_class_has_no_known_fields(monkeypatch):
    """``register_model`` without ``config_class`` is documented to work: such a model takes no
    img_size/in_chans from the data (its fields are unknown), only num_classes; an unregistered
    name is still refused."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))  # leave the real table untouched

    @registry.register_model
    def my_linear_probe(num_classes=10):
        return nn.Linear(3, num_classes)

    assert model_fields("my_linear_probe") == set()
    assert model_fields("vit_micro_patch4_32") >= {"img_size", "in_chans", "num_classes"}
    cfg = TrainConfig(model="my_linear_probe")
    assert model_overrides(cfg, 7, 32, 1, (0.5,), (0.25,)) == {"num_classes": 7}
    with pytest.raises(ModelError):
        model_fields("no_such_model_anywhere")
