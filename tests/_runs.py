"""Run folders fabricated by tests of the resume contract (no training)."""

from __future__ import annotations

import json
from dataclasses import asdict

from vitlens.train.config import TrainConfig

# a one-block micro ViT on 80 embedded images: a whole training run in about a second
TINY_RUN = dict(
    model="vit_micro_patch4_32",
    model_args={"depth": 1, "embed_dim": 32, "num_heads": 2},
    data="cifar10-mini",
    fraction=0.04,
    batch_size=20,
    lr=2e-3,
    warmup_epochs=0.5,
    epochs=2,
    progress=False,
)
# the keys of a TrainConfig a resume may change on purpose, as the refusal lists them
TRAIN_SAFE = "checkpoint_every, epochs, eval_every, num_workers, progress, stop_after_epochs, time_budget_min"


def made_run(tmp_path, **values) -> TrainConfig:
    """A run folder with a checkpoint and the config.json of TrainConfig(**values)."""
    cfg = TrainConfig(**{"out": str(tmp_path / "run"), "device": "cpu", "amp": "fp32", **values})
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.safetensors").write_bytes(b"x")
    (tmp_path / "run" / "config.json").write_text(json.dumps(asdict(cfg)))
    return cfg
