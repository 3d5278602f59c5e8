"""Training configuration: one small dataclass, loadable from YAML/JSON, overridable from the CLI.

Experiments are small config files (big_vision style); every field has a CLI flag of the
same name (``--batch-size`` for ``batch_size``); loading, flags and the unknown-key check come
from :mod:`vitlens.config`. The resolved config is written to ``RUN_DIR/config.json`` so a run
can be reproduced and analysed later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Config
from ..errors import ConfigError


@dataclass
class TrainConfig(Config):
    # what to train, on what
    model: str = "vit_micro_patch4_32"
    model_args: dict = field(default_factory=dict)  # overrides of the model config (pool='gap', ...)
    pretrained: bool = False  # fine-tune from the hub's weights of `model` (a timm/torchvision name)
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
    amp: str = "auto"  # 'auto' (bf16 where the GPU or CPU has it natively, else fp32) | 'bf16' | ...
    # torch.compile. Off by default: on the CPU it loses at the Quickstart's run lengths (vit_micro, bf16,
    # batch 64: ~200 s to the first step, then 1.1x a step; benchmarks/RESULTS.md). Rule: turn it on only for
    # runs whose steady-state saving exceeds the compile time (long GPU runs).
    compile: bool = False
    ema_decay: float | None = None  # e.g. 0.9999; evaluation then reports the EMA weights too
    num_workers: int = 0
    device: str = "auto"
    channels_last: bool | None = None  # None: yes for CNNs, no for ViTs (train/precision.py)
    data_path: str = "auto"  # 'auto' (on the device if decoded and it fits) | 'device' | 'dataloader'
    tta: str | None = None  # evaluation: None | 'flip' (mean of the image's and its mirror's logits)
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch and a stop always save)
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
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.amp not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"amp must be one of auto, bf16, fp16, fp32; got {self.amp!r}")
        if self.data_path not in ("auto", "device", "dataloader"):
            raise ConfigError(f"data_path must be auto, device or dataloader; got {self.data_path!r}")
        if self.tta not in (None, "flip"):
            raise ConfigError(f"tta must be none or 'flip', got {self.tta!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.on_corrupt not in ("warn", "error"):
            raise ConfigError(f"on_corrupt must be 'warn' or 'error', got {self.on_corrupt!r}")
        for name in ("epochs", "batch_size", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.img_size is not None and self.img_size < 1:
            raise ConfigError(f"img_size must be positive, got {self.img_size}")
        if self.stop_after_epochs is not None and self.stop_after_epochs < 1:
            raise ConfigError(f"stop_after_epochs must be at least 1, got {self.stop_after_epochs}")
        if not self.lr > 0 or self.min_lr < 0:
            raise ConfigError(f"lr must be positive and min_lr non-negative; got {self.lr}, {self.min_lr}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in (0, 1) (or none), got {self.ema_decay}")
        for name in ("weight_decay", "warmup_epochs", "mixup", "cutmix", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)}")
        for name in ("label_smoothing", "random_erasing"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be positive (or none), got {self.grad_clip}")
        if self.time_budget_min is not None and not self.time_budget_min > 0:
            raise ConfigError(f"time_budget_min must be positive (or none), got {self.time_budget_min}")
