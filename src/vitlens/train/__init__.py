"""Training: config, checkpoints, the loop."""

from ..io import atomic_write, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .trainer import evaluate, is_finished, train

__all__ = [
    "atomic_write",
    "load_checkpoint",
    "save_checkpoint",
    "TrainConfig",
    "evaluate",
    "is_finished",
    "train",
]
