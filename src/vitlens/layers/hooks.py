"""Named hook points (TransformerLens-style).

A ``HookPoint`` is an identity module placed where an activation that is not already the
output of some module should be reachable by name (e.g. the residual stream after the
position embedding, or the pooled vector fed to the head). Analysis code attaches ordinary
``register_forward_hook`` callbacks by module name, so the same capture code works on any
``torch.nn.Module`` (timm, torchvision, Hugging Face) as well as on vitlens models.
"""

from __future__ import annotations

import torch
from torch import nn


class HookPoint(nn.Identity):
    """Identity whose output is an activation worth naming."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - identity
        return x
