"""Model registry: a plain table of named variants (timm's names where timm has the model).

Each row records the class that builds the model, the config dataclass it takes and the
defaults that make this variant, so the fields a model accepts are known without building it
(``model_config_fields``). A custom builder function can still be registered with
``@register_model``; it has no config class unless one is given.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..config import check_values
from ..errors import ConfigError, ModelError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[..., nn.Module]  # model_class(config), or fn(**overrides) without a config class
    config_class: type | None = None
    defaults: dict = field(default_factory=dict)

    def create(self, **overrides) -> nn.Module:
        if self.config_class is None:
            return self.build(**overrides)
        fields = config_fields(self.config_class)
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(
                f"{self.name} has no config field(s) {', '.join(unknown)}; "
                f"valid fields: {', '.join(sorted(fields))}"
            )
        args = dict(self.defaults)
        for key, value in overrides.items():
            # Dict-valued fields (tokenizer_args) keep the variant's defaults the user did not set.
            both_dicts = isinstance(args.get(key), dict) and isinstance(value, dict)
            args[key] = {**args[key], **value} if both_dicts else value
        return self.build(self.config_class(**check_values(self.config_class, args, what=self.name)))


_MODELS: dict[str, ModelEntry] = {}


def _add(entry: ModelEntry) -> None:
    if entry.name in _MODELS:
        raise ModelError(f"model {entry.name!r} registered twice")
    _MODELS[entry.name] = entry


def register_models(model_class: type[nn.Module], config_class: type, table: dict[str, dict]) -> None:
    """Add one row per variant: ``{name: defaults}``, built as ``model_class(config_class(**defaults))``."""
    for name, defaults in table.items():
        _add(ModelEntry(name, model_class, config_class, dict(defaults)))


def register_model(fn: Callable[..., nn.Module] | None = None, *, config_class: type | None = None):
    """Decorator: register the builder ``fn(**overrides)`` under its function name.

    Give ``config_class`` when ``fn`` accepts exactly the fields of that dataclass, so callers can
    ask which fields the model takes without building it.
    """

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _add(ModelEntry(f.__name__, f, config_class))
        return f

    return wrap(fn) if fn is not None else wrap


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style pattern (``'vit_*'``)."""
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def is_registered(name: str) -> bool:
    return name in _MODELS


def model_entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown model {name!r}.{hint} `vitlens models` (or vitlens.list_models()) lists them all."
        )
    return _MODELS[name]


def config_fields(config_class: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def model_config_class(name: str) -> type:
    """The config dataclass of a registered model (``ViTConfig``, ``ResNetConfig``, ...)."""
    entry = model_entry(name)
    if entry.config_class is None or not dataclasses.is_dataclass(entry.config_class):
        raise ModelError(
            f"model {name!r} was registered without a config dataclass, so its fields are unknown; "
            f"register it with register_model(config_class=...)"
        )
    return entry.config_class


def model_config_fields(name: str) -> set[str]:
    """The config field names a registered model accepts, known without building it."""
    return config_fields(model_config_class(name))


def model_defaults(name: str) -> dict:
    """The config values this variant sets on top of its config class' defaults."""
    return dict(model_entry(name).defaults)


def build_model(name: str, **overrides) -> nn.Module:
    """A registered model with fresh weights; ``overrides`` replace fields of its config."""
    model = model_entry(name).create(**overrides)
    model.model_name = name
    return model
