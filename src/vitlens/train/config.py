"""Training configuration: one small dataclass, loadable from YAML/JSON, overridable from the CLI.

Experiments are small config files (big_vision style); every field has a CLI flag of the
same name (``--batch-size`` for ``batch_size``). The resolved config is written to
``RUN_DIR/config.json`` so a run can be reproduced and analysed later.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class TrainConfig:
    # what to train, on what
    model: str = "vit_micro_patch4_32"
    model_args: dict = field(default_factory=dict)  # overrides of the model config (pool='gap', ...)
    tokenizer: str | None = None  # ViT only: 'patch' | 'pixel' | 'vq' | 'hybrid'
    data: str = "cifar10-mini"
    data_dir: str | None = None
    fraction: float = 1.0  # class-balanced, nested subset of the training split
    img_size: int | None = None  # None: the dataset's native size
    out: str = "runs/default"
    seed: int = 0
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3  # peak learning rate for a batch of `batch_size` (no hidden scaling)
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    optimizer: str = "adamw"  # 'adamw' | 'sgd' (SGD with Nesterov momentum 0.9, the ResNet classic)
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    # augmentation
    augment: bool = True  # random crop + flip
    randaugment: str | None = None  # e.g. 'rand-m9-n2'
    mixup: float = 0.0
    cutmix: float = 0.0
    random_erasing: float = 0.0
    # speed and numerics
    amp: str = "auto"  # 'auto' (bf16 on capable GPUs, fp32 on CPU) | 'bf16' | 'fp16' | 'fp32'
    compile: bool = False
    ema_decay: float | None = None  # e.g. 0.9999; evaluation then reports the EMA weights too
    num_workers: int = 0
    device: str = "auto"
    channels_last: bool = False
    # bookkeeping
    eval_every: int = 1  # epochs
    on_corrupt: str = "warn"  # corrupt image files: 'warn' (skip) | 'error'
    stop_after_epochs: int | None = None  # leave after this many epochs of this invocation (resume later)
    time_budget_min: float | None = None  # leave cleanly once this much time is spent (resume later)
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.randaugment, str) and self.randaugment.lower() in ("", "none", "off"):
            self.randaugment = None
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.amp not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"amp must be one of auto, bf16, fp16, fp32; got {self.amp!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> TrainConfig:
        """Load a YAML or JSON config; ``overrides`` (e.g. from the command line) win."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        return cls.from_dict({**values, **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
