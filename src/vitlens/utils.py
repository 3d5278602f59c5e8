"""Small helpers every floor may use (they import nothing of vitlens)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


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
