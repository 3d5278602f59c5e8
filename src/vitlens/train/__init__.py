"""Training: one harness (run folder, device/DDP, autocast, metrics, checkpoints, exact resume,
time budget, progress) and the tasks on it: image classification, language models, translation,
image tokenizers."""

from ..io import atomic_write, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .run_folder import has_checkpoint, is_finished, parse_overrides, resume_config
from .trainer import evaluate, train

__all__ = [
    "atomic_write",
    "load_checkpoint",
    "save_checkpoint",
    "TrainConfig",
    "evaluate",
    "has_checkpoint",
    "is_finished",
    "parse_overrides",
    "resume_config",
    "train",
]
