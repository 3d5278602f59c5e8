"""One loader: whatever a user names (a run, a file, a model name) -> ``(model, meta)``.

A *spec* is one of:

* a run directory written by ``vitlens train``: ``model.json`` + ``checkpoints/{last,best}.safetensors``
  (``which`` picks one);
* a vitlens ``.safetensors`` file: a training checkpoint (metadata ``model`` + ``model_args``) or a
  ``save_pretrained`` file (metadata ``model``/``arch`` + ``config``): the file alone rebuilds the model;
* a foreign weights file (timm / torchvision / Hugging Face layout, ``.safetensors`` or ``.pt/.pth``)
  together with ``model_name``, the registered architecture it fits;
* a registered name (``vitlens models``), random init unless ``checkpoint`` or ``pretrained``;
* ``timm:NAME``, ``torchvision:NAME`` or ``hf:REPO_OR_FOLDER``: that library's model (see
  :mod:`vitlens.models.hub`), random init unless ``pretrained`` or ``checkpoint``.

``meta`` is the run's or file's metadata where there is some (``model``, ``model_args``, ``data``,
``img_size``, ``mean``/``std``, ...) plus ``label``: the run directory's name, the checkpoint's
name or the model name, for legends and file names; pretrained models add ``preprocess``.

RUN_DIR layout (written by ``train``):
    config.json                   the resolved TrainConfig
    model.json                    model name, create_model arguments, classes, img_size, mean/std
    metrics.jsonl, tb/            per-epoch metrics (JSON lines, TensorBoard)
    checkpoints/last.safetensors  weights + optimiser/schedule state (resume)
    checkpoints/best.safetensors  weights of the best test accuracy
    summary.json                  written when the run finished
"""

from __future__ import annotations

import difflib
from pathlib import Path

from torch import nn

from ..errors import CheckpointError, MissingFileError, ModelError
from ..io import FORMAT, load_state_dict_file, save_checkpoint
from . import hub
from .convert import load_checkpoint_into
from .registry import build_model, is_registered, list_models
from .resnet import ResNet, ResNetConfig
from .vit import VisionTransformer, ViTConfig

# Models saved from a config object rather than by registered name record their class.
_ARCHS = {"VisionTransformer": (VisionTransformer, ViTConfig), "ResNet": (ResNet, ResNetConfig)}


def load_model(
    spec: str | Path,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool | str = False,
    which: str = "last",
    **overrides,
) -> tuple[nn.Module, dict]:
    """``(model.eval(), meta)`` for any spec (see the module docstring).

    ``model_name``: the architecture of a foreign weights file ``spec``; ``num_classes`` and
    ``overrides``: config fields of a model built from a name; ``checkpoint``: weights for a
    model given by name; ``pretrained``: the hub's weights (True, or a tag / weights name);
    ``which``: ``"last"`` or ``"best"`` checkpoint of a run directory.
    """
    model, meta = _load(str(spec), model_name=model_name, num_classes=num_classes, checkpoint=checkpoint,
                        pretrained=pretrained, which=which, overrides=overrides)
    return model.eval(), meta


def create_model(
    name: str, checkpoint: str | Path | None = None, pretrained: bool | str = False, **overrides
) -> nn.Module:
    """Build a model by name (registered, ``timm:``, ``torchvision:``, ``hf:``), in training mode.

    ``overrides`` replace fields of its config (e.g. ``num_classes=10``). ``checkpoint``: a vitlens,
    timm, torchvision or Hugging Face state dict (``.safetensors``, or ``.pt/.pth`` read with
    ``weights_only=True``); the layout is recognised from its keys. ``pretrained``: the weights
    of the model's own hub (timm, torchvision, Hugging Face), read from their cache.
    """
    model, _ = _load(str(name), checkpoint=checkpoint, pretrained=pretrained, overrides=overrides)
    return model


def load_run_model(path: str | Path, which: str = "last") -> tuple[nn.Module, dict]:
    """The model of a run directory or vitlens checkpoint, with its weights: ``(model.eval(), meta)``."""
    path = Path(path)
    if not (path.is_dir() or path.is_file()):
        raise MissingFileError(
            f"{path} does not exist (expected a run directory or a .safetensors checkpoint)"
        )
    model, meta = _from_local(path, which, model_name=None, extra={})
    return model.eval(), meta


def find_checkpoint(path: str | Path, which: str = "last") -> Path:
    """A run directory or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    if path.is_dir():
        ckpt = path / "checkpoints" / f"{which}.safetensors"
        if not ckpt.exists():
            raise MissingFileError(
                f"{path} has no checkpoints/{which}.safetensors; is it a vitlens run directory?"
            )
        return ckpt
    if not path.exists():
        raise MissingFileError(
            f"{path} does not exist (expected a run directory or a .safetensors checkpoint)"
        )
    return path


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """Write weights + ``{format: vitlens, model, arch, config}`` metadata to one ``.safetensors`` file;
    ``load_model(path)`` rebuilds the model from the file alone."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"save_pretrained writes safetensors; give a path ending in .safetensors, not {path.name}"
        )
    if not hasattr(model, "config_dict"):
        raise ModelError(f"{type(model).__name__} is not a vitlens model (it has no config_dict())")
    meta = {
        "model": getattr(model, "model_name", None),
        "arch": type(model).__name__,
        "config": model.config_dict(),
    }
    save_checkpoint(path, model.state_dict(), meta=meta)
    return path


def architecture_meta(model: nn.Module) -> dict:
    """``{"arch", "config"}``: what rebuilds a vitlens ViT/ResNet without a registered name (a run
    fine-tuned from ``timm:``/``torchvision:`` weights, which the hub converted to a vitlens module,
    as ``save_pretrained`` records it); ``{}`` for any other module (a peer library's own)."""
    if type(model) not in {model_class for model_class, _ in _ARCHS.values()}:
        return {}
    return {"arch": type(model).__name__, "config": model.config_dict()}


# -- the cases -----------------------------------------------------------------------------------
def _load(spec: str, *, model_name=None, num_classes=None, checkpoint=None, pretrained=False, which="last",
          overrides: dict) -> tuple[nn.Module, dict]:
    extra = dict(overrides)
    if num_classes is not None:
        extra["num_classes"] = num_classes
    if pretrained and checkpoint is not None:
        raise ModelError(
            f"both pretrained weights and a checkpoint ({checkpoint}) were given for {spec}; "
            "give one: --pretrained for the hub's weights, or --checkpoint FILE"
        )
    if hub.is_peer_name(spec):
        model, meta = hub.create_peer_model(spec, pretrained=pretrained, **extra)
        if checkpoint is not None:
            load_checkpoint_into(model, checkpoint)
        return model, {"model": spec, "label": spec, **meta}
    path = Path(spec).expanduser()
    if path.is_dir() or path.is_file():
        if checkpoint is not None or pretrained:
            raise ModelError(
                f"{'pretrained weights' if pretrained else f'a checkpoint ({checkpoint})'} were given for "
                f"{spec}, which is a run directory or file and brings its own weights; give the weights "
                "with a model name (NAME, timm:NAME, torchvision:NAME), or the file itself with --model NAME"
            )
        return _from_local(path, which, model_name, extra)
    if is_registered(spec):
        if pretrained:
            model, meta = hub.create_pretrained_registered(spec, pretrained, **extra)
            return model, {"model": spec, "label": spec, **meta}
        model = build_model(spec, **extra)
        if checkpoint is not None:
            load_checkpoint_into(model, checkpoint)
        return model, {"model": spec, "label": spec}
    if model_name is not None or _looks_like_path(spec):
        raise MissingFileError(f"checkpoint {spec} does not exist")
    close = difflib.get_close_matches(spec, list_models(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ModelError(
        f"unknown model {spec!r}.{hint} It is neither a run directory, a checkpoint file, a "
        "registered model (`vitlens models` lists them) nor timm:NAME / torchvision:NAME / hf:REPO"
    )


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or spec.endswith((".safetensors", ".pt", ".pth", ".bin"))


def _from_local(path: Path, which: str, model_name: str | None, extra: dict) -> tuple[nn.Module, dict]:
    """A run directory, a vitlens file, or a foreign file with ``model_name``."""
    if path.is_dir() and hub.is_hf_folder(path):
        model, meta = hub.create_peer_model(f"hf:{path}", pretrained=True, **extra)
        return model, {"model": f"hf:{path}", "label": path.name, **meta}
    ckpt = find_checkpoint(path, which)
    state, meta = load_state_dict_file(ckpt)
    label = path.name if path.is_dir() else _file_label(ckpt)
    if meta.get("format") == FORMAT and (model_name is None or _records_model(meta)):
        model = _from_vitlens_meta(ckpt, meta)
        model.load_state_dict(state)
        return model, {**meta, "label": label}
    if model_name is None:
        raise ModelError(
            f"{ckpt} has no vitlens metadata, so its architecture is unknown; name it: --model NAME "
            "(e.g. vit_small_patch16_224) with this file as the checkpoint, or "
            "create_model(NAME, checkpoint=FILE)"
        )
    model = build_model(model_name, **extra)
    load_checkpoint_into(model, ckpt)
    return model, {"model": model_name, "label": label}


def _records_model(meta: dict) -> bool:
    return bool(meta.get("model") or meta.get("arch")) and ("config" in meta or "model_args" in meta)


def _from_vitlens_meta(path: Path, meta: dict) -> nn.Module:
    name = meta.get("model")
    # save_pretrained records the full config; the trainer records the overrides it passed (model_args).
    config = meta["config"] if "config" in meta else meta.get("model_args")
    if config is None:
        raise CheckpointError(
            f"{path} records no model config; use vitlens.create_model(NAME, checkpoint=path)"
        )
    if name and is_registered(name):
        return build_model(name, **config)
    if name and hub.is_peer_name(name) and meta.get("arch") not in _ARCHS:
        # a run of a timm:/torchvision: model kept as the peer's own module: the same call rebuilds it
        return hub.create_peer_model(name, pretrained=False, **config)[0]
    if meta.get("arch") not in _ARCHS:
        raise CheckpointError(
            f"{path} names neither a registered model ({name!r}) nor a known architecture "
            f"({meta.get('arch')!r}); load it with create_model(NAME, checkpoint=path)"
        )
    model_class, config_class = _ARCHS[meta["arch"]]
    model = model_class(config_class(**config))
    model.model_name = name
    return model


def _file_label(ckpt: Path) -> str:
    # run/checkpoints/last.safetensors -> "run"; anything else -> its stem
    if ckpt.parent.name == "checkpoints" and ckpt.stem in ("last", "best"):
        return ckpt.parent.parent.name
    return ckpt.stem
