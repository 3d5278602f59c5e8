"""Turn what a user names on the command line into a model to analyse.

A *spec* is one of:

* a run directory written by ``vitlens train`` (``model.json`` + ``checkpoints/{last,best}.safetensors``);
* a vitlens ``.safetensors`` file: a training checkpoint (metadata ``model`` + ``model_args``)
  or a ``save_pretrained`` file (metadata ``model`` + ``config``);
* a foreign checkpoint (timm / torchvision / Hugging Face layout, ``.safetensors`` or
  ``.pt/.pth``) together with ``model_name``, loaded through ``create_model(name, checkpoint=...)``;
* a registered vitlens model name, random init unless ``checkpoint`` is given;
* ``timm:NAME`` or ``torchvision:NAME``: that library's model, random init (no downloads)
  unless ``checkpoint`` is given.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..models import create_model, list_models


def load_model_and_meta(
    spec: str,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    checkpoint: str | None = None,
    which: str = "last",
) -> tuple[nn.Module, str, dict]:
    """Like :func:`load_model_for_analysis`, also returning the run's metadata (``data``, ``img_size``,
    ``mean``/``std`` where known; ``{}`` otherwise)."""
    from ..models.convert import load_state_dict_file
    from ..io import FORMAT
    from ..models.loading import find_checkpoint

    spec = str(spec)
    extra = {} if num_classes is None else {"num_classes": num_classes}
    path = Path(spec).expanduser()

    if spec.startswith(("timm:", "torchvision:")):
        lib, name = spec.split(":", 1)
        model = _external(lib, name, extra)
        if checkpoint is not None:
            state, _ = load_state_dict_file(checkpoint)
            model.load_state_dict(state)
        return model.eval(), spec, {}

    if path.is_dir() or path.is_file():
        if checkpoint is not None:
            raise ValueError(
                f"a checkpoint ({checkpoint}) was given for {spec}, which is a run directory or file and "
                "brings its own weights; give the checkpoint with a model name (NAME, timm:NAME, "
                "torchvision:NAME), or the file itself with --model NAME"
            )
        ckpt = find_checkpoint(path, which)
        state, meta = load_state_dict_file(ckpt)
        label = path.name if path.is_dir() else _file_label(ckpt)
        if meta.get("format") == FORMAT and meta.get("model") and ("model_args" in meta or "config" in meta):
            model = create_model(meta["model"], **(meta.get("model_args") or meta.get("config") or {}))
            model.load_state_dict(state)
            return model.eval(), label, meta
        if model_name is None:
            raise ValueError(
                f"{ckpt} does not record its architecture (not a vitlens checkpoint); name it: "
                "--model NAME (e.g. vit_small_patch16_224) with this file as the checkpoint"
            )
        return create_model(model_name, checkpoint=str(ckpt), **extra).eval(), label, {}

    if spec in list_models():
        model = create_model(spec, checkpoint=checkpoint, **extra)
        return model.eval(), spec, {}
    if model_name is not None:  # spec was meant as a checkpoint path
        raise FileNotFoundError(f"checkpoint {spec} does not exist")
    raise ValueError(
        f"{spec!r} is neither a run directory, a checkpoint file, a registered model "
        "(`vitlens models`) nor timm:NAME / torchvision:NAME"
    )


def load_model_for_analysis(
    spec: str,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    checkpoint: str | None = None,
    which: str = "last",
) -> tuple[nn.Module, str]:
    """``(model.eval(), label)`` for a run directory, checkpoint, model name or ``timm:``/``torchvision:``.

    ``model_name``: the architecture of a foreign checkpoint ``spec``; ``num_classes``: head size
    for models built from a name; ``checkpoint``: weights for a model given by name; ``which``:
    ``"last"`` or ``"best"`` checkpoint of a run directory. The label is the run directory's
    name, the checkpoint's name, or the model name, for legends and file names.
    """
    model, label, _ = load_model_and_meta(
        spec, model_name=model_name, num_classes=num_classes, checkpoint=checkpoint, which=which
    )
    return model, label


def _file_label(ckpt: Path) -> str:
    # run/checkpoints/last.safetensors -> "run"; anything else -> its stem
    if ckpt.parent.name == "checkpoints" and ckpt.stem in ("last", "best"):
        return ckpt.parent.parent.name
    return ckpt.stem


def _external(lib: str, name: str, extra: dict) -> nn.Module:
    if lib == "timm":
        import timm

        if name not in timm.list_models():
            raise ValueError(f"timm has no model {name!r}; see timm.list_models('{name[:3]}*')")
        return timm.create_model(name, pretrained=False, **extra)
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None, **extra)
    except ValueError as e:
        raise ValueError(f"torchvision has no model {name!r}; see torchvision.models.list_models()") from e
