"""Model registry: every architecture variant is a small named function (timm style)."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style pattern (``'vit_*'``)."""
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} `vitlens models` (or vitlens.list_models()) lists them all."
        )
    return _MODELS[name]


def create_model(name: str, checkpoint: str | None = None, **overrides) -> nn.Module:
    """Build a registered model; ``overrides`` replace fields of its config (e.g. num_classes=10).

    ``checkpoint``: a vitlens, timm or torchvision state dict (.safetensors, or .pt/.pth loaded
    with ``weights_only=True``); the layout is recognised from its keys.
    """
    model = model_entrypoint(name)(**overrides)
    model.model_name = name
    if checkpoint is not None:
        from .convert import load_checkpoint_into

        load_checkpoint_into(model, checkpoint)
    return model
