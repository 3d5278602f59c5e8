"""Peer libraries' models and pretrained weights: ``timm:NAME[.TAG]``, ``torchvision:NAME``, ``hf:REPO``.

Weights come through each ecosystem's own loader and cache; vitlens has no downloader:

* timm: ``timm.create_model(name, pretrained=True)`` (the Hugging Face hub cache, ``HF_HOME``);
* torchvision: its weights enums (``DEFAULT``, or a name such as ``IMAGENET1K_V2``) and
  ``torch.hub``'s ``TORCH_HOME/hub/checkpoints``;
* Hugging Face: transformers' ``from_pretrained`` (repo id or local folder; ``HF_HOME``).

Offline first: with ``HF_HUB_OFFLINE=1`` nothing is fetched; weights that are neither cached
nor reachable are one :class:`CheckpointError` line naming the file, the cache searched and
``--checkpoint FILE``. Where vitlens builds the architecture (ViT, ResNet; see
:mod:`.peer_config`) the pretrained model is returned as a vitlens module with the weights
converted, so hook names, attention recording and ``forward_features`` are the same everywhere;
otherwise the peer's module. Random init (``pretrained=False``) keeps the peer's module.

``meta["preprocess"]``: the model's own evaluation transform (resize, crop, interpolation,
mean/std), read from timm's ``pretrained_cfg``, torchvision's weights transforms or the HF image
processor; :func:`vitlens.data.preprocess.eval_transform` turns it into torchvision transforms.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from torch import nn

from ..data.preprocess import eval_transform  # noqa: F401 - the builder of meta["preprocess"]'s transform
from ..errors import CheckpointError, ModelError
from .convert import convert_state_dict, load_state_dict_into
from .peer_config import HF_VIT_TYPES, hf_vit_config, resnet_config, timm_vit_config, torchvision_vit_config
from .registry import model_config_class
from .resnet import ResNet, ResNetConfig
from .vit import VisionTransformer, ViTConfig

PREFIXES = ("timm:", "torchvision:", "hf:")
_CHECKPOINT_HINT = (
    "or pass the weights file itself with --checkpoint FILE (create_model(NAME, checkpoint=FILE))"
)


def is_peer_name(spec: str) -> bool:
    return spec.startswith(PREFIXES)


def is_hf_folder(path: Path) -> bool:
    """A folder written by transformers' ``save_pretrained`` (config.json + weights)."""
    return (path / "config.json").is_file() and any(
        (path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")
    )


def offline() -> bool:
    """The hubs' offline switch (``HF_HUB_OFFLINE=1``), as huggingface_hub read it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def create_peer_model(spec: str, *, pretrained=False, **overrides) -> tuple[nn.Module, dict]:
    """``(model, meta)`` for ``timm:``/``torchvision:``/``hf:`` names (see the module docstring)."""
    lib, name = spec.split(":", 1)
    if lib == "timm":
        return _timm(name, pretrained, overrides)
    if lib == "torchvision":
        return _torchvision(name, pretrained, overrides)
    return _hf(name, pretrained, overrides)


def create_pretrained_registered(name: str, pretrained, **overrides) -> tuple[nn.Module, dict]:
    """Pretrained weights for a registered name: its timm (ViT) or torchvision (ResNet) namesake's."""
    hub = _registered_hub(name)
    if hub == "torchvision":
        return _torchvision(name, pretrained, overrides)
    if hub == "timm":
        return _timm(name, pretrained, overrides)
    raise ModelError(
        f"{name} is a vitlens-only model with no pretrained weights on a hub; train it "
        "(`vitlens train`) and load the run, or pick an ImageNet model (`vitlens models 'vit_*'`)"
    )


def _registered_hub(name: str) -> str | None:
    """The hub of a registered name's namesake: "torchvision" (ResNets), "timm" (ViTs) or None."""
    import timm
    import torchvision

    config_class = model_config_class(name)
    if config_class is ResNetConfig and name in torchvision.models.list_models():
        return "torchvision"
    if config_class is ViTConfig and timm.is_model(name):
        return "timm"
    return None


def pretrained_stats(spec: str, pretrained=True) -> dict | None:
    """``{"mean", "std", "source"}`` the pretrained weights of ``spec`` (a registered, ``timm:``,
    ``torchvision:`` or ``hf:`` name) were trained with, read from the hub's metadata without loading
    any weights (timm ``pretrained_cfg``, torchvision ``weights.transforms()``, the HF image processor);
    ``None`` when they cannot be known (no pretrained cfg: no such weights, or a vitlens-only model).
    The same lookup as :func:`create_peer_model` / :func:`create_pretrained_registered`, so a model
    fine-tuned from these weights is fed the inputs they expect."""
    if is_peer_name(spec):
        lib, name = spec.split(":", 1)
    else:
        try:
            lib, name = _registered_hub(spec), spec
        except ModelError:  # not registered, or registered without a config class: no hub namesake
            return None
    if lib == "timm":
        import timm

        arch, full = _timm_full_name(name, pretrained)
        if not timm.is_model(arch) or not timm.list_pretrained(f"{arch}.*"):
            return None
        try:
            cfg = timm.models.get_pretrained_cfg(full)
        except RuntimeError:  # timm: "Invalid pretrained tag"
            return None
        if cfg is None or cfg.mean is None or cfg.std is None:
            return None
        return _stats(cfg.mean, cfg.std, f"timm pretrained_cfg of {cfg.architecture}.{cfg.tag}")
    if lib == "torchvision":
        weights = _torchvision_weights(*_torchvision_name(name, pretrained), strict=False)
        if weights is None:
            return None
        t = weights.transforms()
        return _stats(t.mean, t.std, f"torchvision {weights}.transforms()")
    if lib == "hf":
        import transformers

        where = f"{name} (config.json)"
        config = _fetch(lambda: transformers.AutoConfig.from_pretrained(name), spec, where, _hf_cache())
        pre = _hf_preprocess(name, config)
        return _stats(pre["mean"], pre["std"], pre["source"])
    return None


def _stats(mean, std, source: str) -> dict:
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "source": source}


def peer_config_fields(spec: str) -> set[str]:
    """The keyword arguments a ``timm:``/``torchvision:``/``hf:`` model's builder takes, as far as the
    trainer asks (does it take ``img_size``, ``in_chans``?). timm: its model class' signature, from
    the model built on the meta device (no memory, no weights); torchvision and Hugging Face models
    take their size from their own config, so none."""
    lib, name = spec.split(":", 1)
    if lib != "timm":
        return set()
    import inspect

    import timm
    import torch

    arch = name.partition(".")[0]
    if not timm.is_model(arch):
        return set()  # building it says what is wrong
    with torch.device("meta"):
        peer = timm.create_model(arch)
    params = inspect.signature(type(peer).__init__).parameters.values()
    return {p.name for p in params if p.name != "self" and p.kind is not p.VAR_KEYWORD}


# -- timm ------------------------------------------------------------------------------------------
def _timm(name: str, pretrained, overrides: dict) -> tuple[nn.Module, dict]:
    import timm

    arch, full = _timm_full_name(name, pretrained)
    tag = full.partition(".")[2]
    if not timm.is_model(arch):
        close = timm.list_models(f"{arch[:8]}*")[:5]
        raise ModelError(
            f"timm has no model {arch!r}"
            + (f"; similar: {', '.join(close)}" if close else "")
            + f"; see timm.list_models('{arch[:5]}*')"
        )
    if not pretrained:
        peer = timm.create_model(full, pretrained=False, **overrides)
        return peer, {"preprocess": _timm_preprocess(peer)}
    tags = timm.list_pretrained(f"{arch}.*")
    if tag and full not in tags:
        raise ModelError(
            f"timm has no pretrained tag {tag!r} for {arch}; its tags: "
            f"{', '.join(t.split('.', 1)[1] for t in tags) or 'none'}"
        )
    if not tags:
        raise ModelError(f"timm has no pretrained weights for {arch}")
    classes = overrides.pop("num_classes", None)
    # Another resolution: load at the pretrained one, and let our loader resample the position
    # table (with a warning naming both grids) rather than timm's, which does it silently.
    img_size = overrides.pop("img_size", None)
    cfg = timm.models.get_pretrained_cfg(full)
    where = f"{cfg.hf_hub_id or full} (model.safetensors)" if cfg is not None else full

    def load(**kw):
        return _fetch(
            lambda: timm.create_model(full, pretrained=True, **overrides, **kw),
            f"timm:{full}",
            where,
            _hf_cache(),
        )

    peer = load()
    config = timm_vit_config(peer) or resnet_config(peer)
    if img_size is not None and config is not None and "img_size" in config:
        config["img_size"] = img_size
    elif img_size is not None:  # the peer's own module is returned: timm adapts it
        peer = load(img_size=img_size)
    model = _as_vitlens(peer, config, "timm_vit", classes)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return model, _pretrained_meta(_timm_preprocess(peer, size), f"timm:{full}")


def _timm_full_name(name: str, pretrained) -> tuple[str, str]:
    """``(arch, arch[.tag])``: ``pretrained`` given as a string is the tag."""
    arch, _, tag = name.partition(".")
    if isinstance(pretrained, str):
        tag = pretrained
    return arch, f"{arch}.{tag}" if tag else arch


def _timm_preprocess(peer: nn.Module, size=None) -> dict:
    from timm.data import resolve_data_config

    size = size or getattr(getattr(peer, "patch_embed", None), "img_size", None)  # another size?
    cfg = resolve_data_config({"input_size": (3, *size)} if size else {}, model=peer)
    crop = int(cfg["input_size"][-1])
    resize = int(math.floor(crop / cfg["crop_pct"]))  # timm's scale_size, in "squash" mode too
    mode = "squash" if cfg.get("crop_mode") == "squash" else "shorter"  # ("border" is not modelled)
    return _preprocess(resize, crop, cfg["interpolation"], cfg["mean"], cfg["std"], "timm pretrained_cfg",
                       resize_mode=mode)


# -- torchvision ---------------------------------------------------------------------------------------
def _torchvision(name: str, pretrained, overrides: dict) -> tuple[nn.Module, dict]:
    import torchvision

    name, pretrained = _torchvision_name(name, pretrained)
    if name not in torchvision.models.list_models():
        raise ModelError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
    if not pretrained:
        return torchvision.models.get_model(name, weights=None, **overrides), {}
    weights = _torchvision_weights(name, pretrained)
    classes = overrides.pop("num_classes", None)
    file = Path(_torch_cache()) / os.path.basename(weights.url)
    if not file.is_file() and offline():
        raise _missing(
            f"torchvision:{name}", f"{file.name} ({weights})", _torch_cache(), "HF_HUB_OFFLINE=1 is set"
        )
    peer = _fetch(
        lambda: torchvision.models.get_model(name, weights=weights, **overrides),
        f"torchvision:{name}",
        f"{file.name} ({weights})",
        _torch_cache(),
    )
    t = weights.transforms()
    preprocess = _preprocess(
        t.resize_size[0], t.crop_size[0], t.interpolation.value, t.mean, t.std, f"torchvision {weights}"
    )
    meta = _pretrained_meta(preprocess, f"torchvision:{name}.{weights.name}")
    config = resnet_config(peer) or torchvision_vit_config(peer)
    fmt = "torchvision_vit" if hasattr(peer, "conv_proj") else "torchvision_resnet"
    return _as_vitlens(peer, config, fmt, classes), meta


def _torchvision_name(name: str, pretrained) -> tuple[str, object]:
    """``torchvision:resnet50.IMAGENET1K_V2`` names the weights: ``(model name, pretrained)``."""
    name, _, tag = name.partition(".")
    return name, tag if tag and pretrained is True else pretrained


def _torchvision_weights(name: str, pretrained, strict: bool = True):
    """The weights enum member ``pretrained`` (True: ``DEFAULT``) names; ``strict=False``: ``None``
    where there is no such model or weights, instead of the :class:`ModelError`."""
    import torchvision

    if not strict and name not in torchvision.models.list_models():
        return None
    enum = torchvision.models.get_model_weights(name)
    key = "DEFAULT" if pretrained is True else str(pretrained)
    try:
        return enum[key]
    except KeyError:
        if not strict:
            return None
        raise ModelError(
            f"torchvision has no weights {key!r} for {name}; choose one of "
            f"{', '.join(['DEFAULT', *(m for m in enum.__members__ if m != 'DEFAULT')])}"  # DEFAULT once
        ) from None


# -- Hugging Face -------------------------------------------------------------------------------------
def _hf(ref: str, pretrained, overrides: dict) -> tuple[nn.Module, dict]:
    if not pretrained:
        raise ModelError(f"hf:{ref} loads the Hugging Face weights; pass pretrained=True (--pretrained)")
    import transformers

    where = f"{ref} (config.json)"
    config = _fetch(lambda: transformers.AutoConfig.from_pretrained(ref), f"hf:{ref}", where, _hf_cache())
    if config.model_type not in HF_VIT_TYPES:
        raise ModelError(
            f"hf:{ref} is a {config.model_type!r} model, not a ViT; vitlens loads Hugging Face "
            f"{', '.join(HF_VIT_TYPES)} models (ViTModel, ViTForImageClassification, DeiT, DINOv2)"
        )
    archs = getattr(config, "architectures", None) or []
    with_head = any("ForImageClassification" in a for a in archs)
    auto = transformers.AutoModelForImageClassification if with_head else transformers.AutoModel
    peer = _fetch(lambda: auto.from_pretrained(ref), f"hf:{ref}", f"{ref} (model weights)", _hf_cache())
    classes = overrides.pop("num_classes", None)
    if overrides:
        raise ModelError(f"hf:{ref} takes its architecture from config.json; drop {', '.join(overrides)}")
    vit_config = hf_vit_config(config, with_head)
    if archs and archs[0] == "DeiTForImageClassification":  # one head on a distilled token: not ours
        vit_config = None
    meta = _pretrained_meta(_hf_preprocess(ref, config), f"hf:{ref}")
    if vit_config is not None and meta["img_size"] != vit_config["img_size"]:
        # DINOv2 is stored at 518 px and used at 224: built for the processor's crop, the position
        # table is resampled once on load (with a warning), where transformers does it every forward.
        vit_config["img_size"] = meta["img_size"]
    return _as_vitlens(peer, vit_config, "hf_vit", classes), meta


def _hf_preprocess(ref: str, config) -> dict | None:
    import transformers

    try:
        proc = transformers.AutoImageProcessor.from_pretrained(ref)
    except (OSError, ValueError):  # no preprocessor_config.json: the model's size, ImageNet defaults
        return _preprocess(
            config.image_size,
            config.image_size,
            "bilinear",
            (0.5,) * 3,
            (0.5,) * 3,
            "Hugging Face config (no image processor)",
        )
    size, crop = dict(proc.size or {}), dict(getattr(proc, "crop_size", None) or {})
    # {"shortest_edge": n} keeps the aspect ratio; {"height": h, "width": w} squashes (ViT, DeiT)
    resize = size.get("shortest_edge") or size.get("height")
    mode = "shorter" if size.get("shortest_edge") else "squash"
    crop_side = crop.get("height") if getattr(proc, "do_center_crop", False) else resize
    interp = getattr(proc, "resample", 2)
    names = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
    return _preprocess(
        resize,
        crop_side,
        names.get(int(interp), "bilinear"),
        proc.image_mean,
        proc.image_std,
        f"Hugging Face {type(proc).__name__}",
        resize_mode=mode,
    )


# -- shared -----------------------------------------------------------------------------------------------
def _as_vitlens(peer: nn.Module, config: dict | None, fmt: str, num_classes: int | None) -> nn.Module:
    """The peer's weights in a vitlens module where our classes express it; else the peer itself."""
    if config is None:
        if num_classes is not None:
            raise ModelError(
                f"{type(peer).__name__} is not a model vitlens converts, so its head cannot be "
                "resized here; load it without num_classes"
            )
        return peer.eval()
    is_vit = "embed_dim" in config
    model = VisionTransformer(ViTConfig(**config)) if is_vit else ResNet(ResNetConfig(**config))
    load_state_dict_into(model, convert_state_dict(peer.state_dict(), fmt, model), source=type(peer).__name__)
    if num_classes is not None and num_classes != config["num_classes"]:
        _new_head(model, num_classes)
    return model


def _new_head(model: nn.Module, num_classes: int) -> None:
    """Fine-tuning on other classes: a freshly initialised head (and config) for ``num_classes``."""
    model.cfg.num_classes = num_classes
    if isinstance(model, ResNet):
        model.fc = nn.Linear(model.num_features, num_classes) if num_classes else nn.Identity()
        return
    model.head = nn.Linear(model.num_features, num_classes) if num_classes else nn.Identity()
    if model.head_dist is not None:
        model.head_dist = nn.Linear(model.cfg.embed_dim, num_classes) if num_classes else nn.Identity()
    for head in (model.head, model.head_dist):
        if isinstance(head, nn.Linear):
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)


def _pretrained_meta(preprocess: dict, source: str) -> dict:
    """Run-like metadata: the analyses and ``eval`` read ``img_size`` and ``mean``/``std`` from it."""
    keys = ("img_size", "mean", "std")
    return {"preprocess": preprocess, "pretrained": source, **{k: preprocess[k] for k in keys}}


def _preprocess(resize, crop, interpolation, mean, std, source: str, resize_mode: str = "shorter") -> dict:
    """The plain-data description :mod:`vitlens.data.preprocess` turns into the transform."""
    return {
        "resize": int(resize),
        "resize_mode": resize_mode,
        "crop": int(crop),
        "img_size": int(crop),
        "interpolation": str(interpolation),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "source": source,
    }


def _hf_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _torch_cache() -> str:
    import torch.hub

    return str(Path(torch.hub.get_dir()) / "checkpoints")


def _missing(what: str, file: str, cache: str, reason: str) -> CheckpointError:
    return CheckpointError(
        f"pretrained weights for {what} are not cached: {file} is not in {cache} and cannot be "
        f"fetched ({reason}); download it once where the hub is reachable (unset "
        f"HF_HUB_OFFLINE), point HF_HOME/TORCH_HOME at a cache that has it, {_CHECKPOINT_HINT}"
    )


def _fetch(load, what: str, file: str, cache: str):
    """Run a hub loader; a missing or unreachable file is one CheckpointError, other errors stay bugs."""
    try:
        return load()
    except RuntimeError as e:
        if "Error(s) in loading state_dict" not in str(e):
            raise
        raise CheckpointError(
            f"the cached weights for {what} ({file} in {cache}) do not fit the model "
            f"({str(e).splitlines()[-1].strip()[:90]}...); the cache holds another variant or "
            f"a damaged file: delete it to fetch it again, {_CHECKPOINT_HINT}"
        ) from None
    except Exception as e:
        if not _is_missing_weights(e):
            raise
        first = (str(e).splitlines() or [type(e).__name__])[0][:90]
        raise _missing(what, file, cache, f"{type(e).__name__}: {first}") from None


def _is_missing_weights(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    hub_errors = {
        "LocalEntryNotFoundError",
        "EntryNotFoundError",
        "RepositoryNotFoundError",
        "OfflineModeIsEnabled",
        "HfHubHTTPError",
        "RevisionNotFoundError",
        "URLError",
        "HTTPError",
        "ConnectError",
        "ConnectionError",
        "TimeoutException",
    }
    return bool(names & hub_errors) or isinstance(e, OSError)
