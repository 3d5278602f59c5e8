"""Small helpers every floor may use (they import nothing of vitlens)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from .errors import ConfigError


def to_2tuple(x) -> tuple[int, int]:
    """``7 -> (7, 7)``; a pair stays a pair (image sizes, patch sizes, grids)."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected one number or a pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode for the block and give each its own mode back afterwards."""
    was_training = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, training in zip(models, was_training):
            m.train(training)


def check_out_folder(run_dir: str | Path) -> None:
    """A ConfigError now, before any work, if ``--out`` cannot become a folder (a file, under a
    file, not writable), instead of an OSError after minutes of computing."""
    run_dir = Path(run_dir)
    if run_dir.exists():
        if not run_dir.is_dir():
            raise ConfigError(f"--out {run_dir} is a file, not a folder; choose another --out")
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {run_dir} is not writable; choose another --out")
        return
    parent = run_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {run_dir} lies under {parent}, which is a file; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--out {run_dir} cannot be created ({parent} is not writable); choose another --out"
        )
