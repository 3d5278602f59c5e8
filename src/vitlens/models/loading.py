"""Reading a run directory back: the model it trained and how its data was normalised.

RUN_DIR layout (written by ``train``):
    config.json                   the resolved TrainConfig
    model.json                    model name, create_model arguments, classes, img_size, mean/std
    metrics.jsonl, tb/            per-epoch metrics (JSON lines, TensorBoard)
    checkpoints/last.safetensors  weights + optimiser/schedule state (resume)
    checkpoints/best.safetensors  weights of the best test accuracy
    summary.json                  written when the run finished
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .registry import create_model
from ..io import load_checkpoint


def find_checkpoint(path: str | Path, which: str = "last") -> Path:
    """A run directory or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    if path.is_dir():
        ckpt = path / "checkpoints" / f"{which}.safetensors"
        if not ckpt.exists():
            raise FileNotFoundError(
                f"{path} has no checkpoints/{which}.safetensors; is it a vitlens run directory?"
            )
        return ckpt
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist (expected a run directory or a .safetensors checkpoint)"
        )
    return path


def load_run_model(path: str | Path, which: str = "last") -> tuple[nn.Module, dict]:
    """Rebuild the model of a run directory or vitlens checkpoint, with its weights; returns (model, meta)."""
    weights, meta, _ = load_checkpoint(find_checkpoint(path, which))
    if "model" not in meta:
        raise ValueError(f"{path} has no model name in its metadata; use create_model(name, checkpoint=...)")
    model = create_model(meta["model"], **meta.get("model_args", {}))
    model.load_state_dict(weights)
    return model.eval(), meta
