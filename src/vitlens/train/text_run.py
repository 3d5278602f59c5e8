"""The run machinery both text loops share, built from the image trainer's pieces.

Nothing here is a second trainer: devices, autocast, torchrun/DDP, the metrics log (JSON
lines + TensorBoard), parameter groups and atomic safetensors checkpoints all come from
``vitlens.train``; this module only arranges them for iteration-based loops (a step counter
instead of epochs) and keeps the run directory in the layout ``vitlens.models.loading`` reads:

    config.json, model.json, metrics.jsonl, tb/, checkpoints/last.safetensors, summary.json
    + the tokenizer (chars.json for characters, tokenizer.json for subwords)

Exact resume: every step re-seeds the global RNG (dropout) and draws its batch from seeds
derived from (seed, step, rank) (:func:`step_seed`), so a checkpoint needs only weights,
optimiser, schedule and the step; a resumed run continues exactly as an unbroken one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ..io import load_checkpoint, save_checkpoint
from .distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from .trainer import MetricsLog, autocast_dtype, param_groups, resolve_device

__all__ = [
    "LAST",
    "Run",
    "start_run",
    "save_state",
    "restore_state",
    "all_reduce_sum",
    "barrier",
    "cleanup",
    "param_groups",
    "config_from_dict",
    "count_params",
    "step_seed",
]

LAST = "checkpoints/last.safetensors"


@dataclass
class Run:
    dir: Path
    device: torch.device
    dist: DistInfo
    amp_dtype: torch.dtype | None
    log: MetricsLog
    started: float

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def out_of_time(self, budget_min: float | None) -> bool:
        return budget_min is not None and time.perf_counter() - self.started > 60 * budget_min

    def wrap(self, module: nn.Module, find_unused: bool = False) -> nn.Module:
        """DDP under torchrun (gradients all-reduced), the module itself otherwise."""
        if not self.dist.enabled:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


def start_run(cfg, *, resume: bool) -> Run:
    """Device, process group, autocast dtype, run directory with config.json, metrics log."""
    run_dir = Path(cfg.out)
    device = resolve_device(cfg.device)
    dinfo = init_distributed(device.type)
    if dinfo.enabled and device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)
    if (run_dir / LAST).exists() and not resume:
        raise ValueError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    if dinfo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    barrier(dinfo)
    return Run(
        run_dir,
        device,
        dinfo,
        autocast_dtype(cfg.amp, device),
        MetricsLog(run_dir, dinfo.is_main),
        time.perf_counter(),
    )


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + step * 9_973 + rank * 101) % (2**31)


def save_state(
    run: Run, model: nn.Module, optimizer, scheduler, *, meta: dict, step: int, extra: dict | None = None
) -> None:
    """Atomic checkpoint of everything needed to continue (main process only)."""
    if not run.dist.is_main:
        return
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        **(extra or {}),
    }
    save_checkpoint(run.dir / LAST, model.state_dict(), meta={**meta, "step": step}, state=state)


def restore_state(run: Run, model: nn.Module, optimizer, scheduler) -> dict:
    """Load ``checkpoints/last.safetensors`` into the objects; returns the state dict (step, extras)."""
    weights, _, state = load_checkpoint(run.dir / LAST)
    model.load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def config_from_dict(cls, values: dict):
    """Build a config dataclass, naming unknown keys (typos) instead of a TypeError."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
    return cls(**values)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights count once
