"""The study's sweep, described by a small config file (YAML), overridable from the command line.

A study trains every model spec on every (fraction, seed) with one shared recipe, then runs
the analysis engine. Presets live in ``vitlens/configs/study_<name>.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..config import Config, from_dict, read_config_file
from ..errors import ConfigError


@dataclass
class ModelSpec:
    label: str  # how the report names it: 'ViT-CLS', 'ViT-GAP', 'ResNet'
    model: str
    model_args: dict = field(default_factory=dict)
    train: dict = field(
        default_factory=dict
    )  # recipe overrides for this model only (avoid: one shared recipe)


@dataclass
class StudyConfig(Config):
    title: str = "Do ViTs see like CNNs, and how much data do they need?"
    data: str = "cifar10-mini"
    data_dir: str | None = None
    out: str = "runs/study"
    fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    models: list[ModelSpec] = field(default_factory=list)
    train: dict = field(default_factory=dict)  # the shared recipe: TrainConfig fields
    min_steps: int = 0  # small fractions train at least this many steps (epochs are raised to reach it)
    analysis: dict = field(default_factory=dict)  # cka_images, attention_images, probe_*_images, batch_size
    tokenizers: list[str] = field(
        default_factory=list
    )  # optional tokenizer comparison at the largest fraction
    tokenizer_model: str | None = None  # the ViT label whose recipe the tokenizer comparison reuses
    pretrained: bool = False  # compare the hubs' pretrained models, no training (study/pretrained.py)

    def __post_init__(self):
        self.models = [m if isinstance(m, ModelSpec) else from_dict(ModelSpec, m) for m in self.models]
        if not self.models:
            raise ConfigError("a study needs at least one model spec under 'models:'")
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"model labels must be unique, got {labels}")
        bad = [f for f in self.fractions if not 0 < f <= 1]
        if bad or not self.fractions:
            raise ConfigError(f"fractions must be in (0, 1], got {self.fractions}")
        self.fractions = sorted(float(f) for f in self.fractions)
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed, e.g. [0]")
        if self.min_steps < 0:
            raise ConfigError(f"min_steps must be non-negative, got {self.min_steps}")
        epochs = self.train.get("epochs")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
            raise ConfigError(f"train.epochs must be a positive integer, got {epochs!r}")

    @classmethod
    def load(cls, path: str | Path | None = None, preset: str | None = None, **overrides) -> StudyConfig:
        """A preset, then a config file, then command-line overrides (later wins)."""
        values: dict = {}
        if preset:
            values.update(load_preset(preset))
        if path:
            values.update(read_config_file(path))
        if not values:
            values = load_preset("default")
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "train":  # merge recipe overrides field by field
                values["train"] = {**values.get("train", {}), **value}
            else:
                values[key] = value
        return from_dict(cls, values, source=str(path) if path else None)


def list_presets() -> list[str]:
    files = resources.files("vitlens") / "configs"
    return sorted(
        p.name[len("study_") : -len(".yaml")] for p in files.iterdir() if p.name.startswith("study_")
    )


def load_preset(name: str) -> dict:
    path = resources.files("vitlens") / "configs" / f"study_{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown study preset {name!r}; available: {', '.join(list_presets())}")
    return yaml.safe_load(path.read_text()) or {}
