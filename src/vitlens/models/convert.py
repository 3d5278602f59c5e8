"""Checkpoint interop: load timm, torchvision and Hugging Face weights; export to timm; save our own.

Loading is four small steps, each a function you can call on its own:

1. ``load_state_dict_file``: read a file into a flat ``{name: tensor}`` dict. ``.safetensors``
   is read as data; ``.pt/.pth/.bin`` only with ``torch.load(weights_only=True)``, so a
   checkpoint from a stranger can never run code while it is being read.
2. ``detect_format``: recognise the layout from the key names.
3. ``convert_state_dict``: rename keys to vitlens names (timm's, for ViT; torchvision's, for
   ResNet) and adapt to the model: resample the position table to its grid, optionally
   start a new head when the class count differs.
4. ``load_checkpoint_into``: check every shape and report all problems in one error.

``save_pretrained`` / ``model_from_checkpoint`` round-trip a vitlens model through one
``.safetensors`` file whose metadata carries the model name and config, so the file alone
is enough to rebuild the model.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..layers import resample_pos_embed
from ..io import FORMAT, load_checkpoint, save_checkpoint

FORMATS = ("vitlens", "timm_vit", "torchvision_vit", "torchvision_resnet", "hf_vit")
_WRAPPERS = ("state_dict", "model", "model_ema", "state_dict_ema", "module")  # tried in this order
_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


# -- 1. reading files ----------------------------------------------------------------------
def load_state_dict_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Return ``(state_dict, metadata)`` from a checkpoint file.

    metadata: for a vitlens file, ``{"format": "vitlens", "model": ..., "config": {...}, ...}``
    (the JSON ``meta`` it was saved with); for another ``.safetensors`` file its string
    metadata; ``{}`` for a pickle.
    """
    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():  # a Hugging Face save_pretrained folder
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
        except Exception as e:  # safetensors raises its own error type for a damaged header
            raise ValueError(f"could not read {path} as safetensors ({e}); is the file complete?") from None
        if metadata.get("format") == FORMAT:  # vitlens: tensors under "model.", JSON meta
            state, meta, _ = load_checkpoint(path)
            return _strip_prefixes(state), {**meta, "format": FORMAT}
        return _strip_prefixes(load_file(str(path), device="cpu")), metadata
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds Python objects other than tensors, and vitlens never unpickles untrusted files "
            f"(torch.load(weights_only=True) refused it: {str(e).splitlines()[0]}). If you trust its origin, "
            "convert it to safetensors once: sd = torch.load(path, weights_only=False) (take "
            "sd['state_dict'] or sd['model'] if it is wrapped), then "
            "safetensors.torch.save_file(sd, 'weights.safetensors')"
        ) from None
    except RuntimeError as e:
        raise ValueError(f"could not read {path} as a PyTorch checkpoint ({e}); expected a state dict saved "
                         "with torch.save, or a .safetensors file") from None
    return _strip_prefixes(_unwrap(obj, path)), {}


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside common training-checkpoint wrappers ({'state_dict': ...}, ...)."""
    for _ in range(3):  # wrappers nest at most a couple of levels in practice
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
            break
        obj = inner
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{path} holds no state dict (found {keys}); expected {{name: tensor}}, possibly under "
                     f"one of {', '.join(_WRAPPERS)}")


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# -- 2. recognising the layout -----------------------------------------------------------------
def detect_format(state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    """One of ``FORMATS``, from the metadata when it says vitlens, otherwise from the key names."""
    if metadata and metadata.get("format") == FORMAT:
        return "vitlens"
    keys = list(state_dict)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)
    if has("conv_proj.") and has("encoder.layers.encoder_layer_"):
        return "torchvision_vit"
    if has("vit.embeddings.") or has("embeddings.patch_embeddings."):
        return "hf_vit"
    if "patch_embed.proj.weight" in state_dict:
        return "timm_vit"
    if has("blocks.0.attn.") or has("patch_embed."):  # a vitlens ViT with a non-patch tokenizer
        return "vitlens"
    if "conv1.weight" in state_dict and has("layer1."):
        return "torchvision_resnet"
    raise ValueError(f"unrecognised checkpoint layout (first keys: {', '.join(keys[:6])}); vitlens reads "
                     "timm or torchvision ViTs, Hugging Face ViTForImageClassification, torchvision/timm "
                     "ResNets and its own files")


# -- 3. renaming and adapting ----------------------------------------------------------------------
_TV = r"^encoder\.layers\.encoder_layer_(\d+)\."
_TORCHVISION_VIT = [  # (pattern, replacement) applied to each key; the first match wins
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^class_token$", "cls_token"),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (_TV + r"ln_1\.", r"blocks.\1.norm1."),
    (_TV + r"self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),  # [q; k; v], like timm
    (_TV + r"self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (_TV + r"ln_2\.", r"blocks.\1.norm2."),
    (_TV + r"mlp\.(?:0|linear_1)\.", r"blocks.\1.mlp.fc1."),  # MLPBlock: Linear, GELU, Dropout, Linear, ...
    (_TV + r"mlp\.(?:3|linear_2)\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.ln\.", "norm."),
    (r"^heads\.head\.", "head."),
]
# Hugging Face: the layout saved on the Hub (encoder.layer.i...) and transformers 5's in-memory one
# (layers.i...); both are recognised.
_HF_L = r"^(?:encoder\.layer|layers)\.(\d+)\."
_HF_VIT = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (_HF_L + r"attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (_HF_L + r"layernorm_before\.", r"blocks.\1.norm1."),
    (_HF_L + r"layernorm_after\.", r"blocks.\1.norm2."),
    (_HF_L + r"(?:intermediate\.dense|mlp\.fc1)\.", r"blocks.\1.mlp.fc1."),
    (_HF_L + r"(?:output\.dense|mlp\.fc2)\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]
_HF_QKV = re.compile(_HF_L + r"attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$")
_HF_UNUSED = ("pooler.", "embeddings.mask_token")  # ViTModel's pooler / masked-image-modeling token


def _rename(sd: dict, rules: list[tuple[str, str]]) -> dict:
    compiled = [(re.compile(p), r) for p, r in rules]
    out = {}
    for k, v in sd.items():
        for pattern, repl in compiled:
            new, n = pattern.subn(repl, k)
            if n:
                k = new
                break
        out[k] = v
    return out


def _convert_torchvision_vit(sd: dict) -> dict:
    if any(k.startswith("heads.pre_logits") for k in sd):
        raise ValueError("this torchvision ViT has a pre-logits layer (representation_size), which the "
                         "vitlens ViT does not have; use a checkpoint built with representation_size=None")
    return _rename(sd, _TORCHVISION_VIT)


def _convert_hf_vit(sd: dict) -> dict:
    sd = {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in sd.items()}
    dropped = [k for k in sd if k.startswith(_HF_UNUSED)]
    if dropped:
        warnings.warn(f"ignoring Hugging Face weights the classifier does not use: {', '.join(dropped)}",
                      stacklevel=3)
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> {q, k, v}
    rest = {}
    for k, v in sd.items():
        if k.startswith(_HF_UNUSED):
            continue
        m = _HF_QKV.match(k)
        if m:
            layer, long_name, short_name, kind = m.groups()
            qkv.setdefault((layer, kind), {})[(long_name or short_name)[0]] = v
        else:
            rest[k] = v
    out = _rename(rest, _HF_VIT)
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"Hugging Face layer {layer} has only {sorted(parts)} of query/key/value {kind}")
        # timm's fused qkv is [q; k; v] along the output dim: (3D, D) weight, (3D,) bias
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _head_keys(model: nn.Module) -> tuple[str, str]:
    return ("fc.weight", "fc.bias") if isinstance(getattr(model, "fc", None), nn.Module) else ("head.weight",
                                                                                             "head.bias")


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], fmt: str, model: nn.Module | None = None, *, strict_head: bool = True
) -> dict[str, torch.Tensor]:
    """Rename ``state_dict`` from layout ``fmt`` to vitlens names; with ``model``, adapt it to that model.

    Adapting: a learned position table for another grid is resampled bicubically (as when
    fine-tuning at a higher resolution). A head for another number of classes is an error
    unless ``strict_head=False``, which keeps the model's freshly initialised head (with a warning).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "torchvision_vit":
        sd = _convert_torchvision_vit(state_dict)
    elif fmt == "hf_vit":
        sd = _convert_hf_vit(state_dict)
    else:  # vitlens, timm ViT, torchvision/timm ResNet: our names already are theirs
        sd = dict(state_dict)
    if model is not None:
        _adapt_pos_embed(sd, model)
        if not strict_head:
            _replace_head(sd, model)
    return sd


def _adapt_pos_embed(sd: dict, model: nn.Module) -> None:
    target = getattr(model, "pos_embed", None)
    ckpt = sd.get("pos_embed")
    if not isinstance(target, nn.Parameter) or ckpt is None or ckpt.shape == target.shape:
        return
    if ckpt.dim() != 3 or ckpt.shape[-1] != target.shape[-1]:
        return  # a different width: reported as a shape mismatch
    prefix = target.shape[1] - model.patch_embed.num_patches  # [CLS] positions (registers have none)
    if prefix and math.isqrt(ckpt.shape[1]) ** 2 == ckpt.shape[1]:
        # timm's no_embed_class layout (its register models): [CLS] has no position, i.e. a zero one.
        ckpt = torch.cat([ckpt.new_zeros(1, prefix, ckpt.shape[-1]), ckpt], dim=1)
    old = ckpt.shape[1] - prefix
    side = math.isqrt(max(old, 0))
    if old <= 0 or side * side != old:
        return  # not a square grid we can infer: reported as a shape mismatch
    sd["pos_embed"] = resample_pos_embed(ckpt, model.patch_embed.grid_size, (side, side), prefix)


def _replace_head(sd: dict, model: nn.Module) -> None:
    own = model.state_dict()
    fits = lambda k: (k in sd) == (k in own) and (k not in sd or sd[k].shape == own[k].shape)
    changed = [k for k in _head_keys(model) if not fits(k)]
    if not changed:
        return
    shapes = [tuple(sd[k].shape) for k in changed if k in sd]
    warnings.warn(f"checkpoint head {shapes} does not fit the model; keeping the model's newly initialised "
                  "head (strict_head=False)", stacklevel=3)
    for k in _head_keys(model):
        sd.pop(k, None)
        if k in own:
            sd[k] = own[k]


# -- 4. loading with one clear error ------------------------------------------------------------------
def load_checkpoint_into(model: nn.Module, path: str | Path, strict: bool = True, *,
                         strict_head: bool = True) -> nn.Module:
    """Load the checkpoint at ``path`` (any supported layout) into ``model`` and return the model.

    Shape mismatches always raise (one ValueError listing every one, with a hint); missing and
    unexpected keys raise too when ``strict``, and are warned about otherwise.
    """
    state_dict, metadata = load_state_dict_file(path)
    own = model.state_dict()
    try:
        fmt = detect_format(state_dict, metadata)
    except ValueError:
        if len(own.keys() & state_dict.keys()) < 0.5 * len(own):
            raise
        fmt = "vitlens"  # plain weights of a vitlens model without distinctive names (e.g. the seq2seq)
    sd = convert_state_dict(state_dict, fmt, model, strict_head=strict_head)
    _fill_tied(sd, own)
    mismatched = [(k, tuple(sd[k].shape), tuple(v.shape))  # (key, checkpoint shape, model shape)
                  for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    missing = [k for k in own if k not in sd]
    unexpected = sorted((k for k in sd if k not in own), key=_natural)
    if mismatched or (strict and (missing or unexpected)):
        raise ValueError(_mismatch_message(model, path, fmt, sd, mismatched, missing, unexpected))
    if missing or unexpected:
        warnings.warn(f"loading {path} with strict=False: {len(missing)} missing keys ({_few(missing)}), "
                      f"{len(unexpected)} unexpected keys ({_few(unexpected)})", stacklevel=2)
    model.load_state_dict(sd, strict=False)
    return model


def _fill_tied(sd: dict, own: dict) -> None:
    """Tied weights (GPT's embedding = LM head) are often saved once; copy them to the other name."""
    by_storage: dict[int, list[str]] = {}
    for k, v in own.items():
        if v.numel():
            by_storage.setdefault(v.untyped_storage().data_ptr(), []).append(k)
    for names in by_storage.values():
        present = [k for k in names if k in sd]
        for k in names:
            if present and k not in sd:
                sd[k] = sd[present[0]]


def _natural(key: str) -> list:
    """Sort key putting blocks.2 before blocks.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


_MAX_LISTED = 20  # shape mismatches listed one per line; a wrong width would otherwise print hundreds


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _mismatch_message(model, path, fmt, sd, mismatched, missing, unexpected) -> str:
    name = getattr(model, "model_name", type(model).__name__)
    lines = [f"checkpoint {path} ({fmt} layout) does not fit model {name}:"]
    for k, ckpt_shape, model_shape in mismatched[:_MAX_LISTED]:
        lines.append(f"  {k}: checkpoint {ckpt_shape} vs model {model_shape}")
    if len(mismatched) > _MAX_LISTED:
        lines.append(f"  ... and {len(mismatched) - _MAX_LISTED} more shape mismatches")
    if missing:
        lines.append(f"  missing in checkpoint ({len(missing)}): {_few(missing)}")
    if unexpected:
        lines.append(f"  not in model ({len(unexpected)}): {_few(unexpected)}")
    lines += [f"hint: {h}" for h in _hints(model, sd, mismatched, missing, unexpected)]
    return "\n".join(lines)


def _hints(model, sd, mismatched, missing, unexpected) -> list[str]:
    hints = []
    shapes = {k: c for k, c, _ in mismatched}
    for k in _head_keys(model)[:1]:
        if k in shapes:
            n = shapes[k][0]
            hints.append(f"the checkpoint's head has {n} classes: pass num_classes={n} (create_model(name, "
                         f"checkpoint=..., num_classes={n})), or load_checkpoint_into(..., "
                         "strict_head=False) to start a new head")
    if "patch_embed.proj.weight" in shapes:
        d, c, ph, _ = shapes["patch_embed.proj.weight"]
        hints.append(f"the checkpoint's patch embedding is embed_dim={d}, in_chans={c}, patch_size={ph}")
    elif "cls_token" in shapes:
        hints.append(f"the checkpoint's embed_dim is {shapes['cls_token'][-1]}")
    blocks = lambda keys: {int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
    ckpt_depth, model_depth = len(blocks(sd)), len(blocks(model.state_dict()))
    if ckpt_depth != model_depth and ckpt_depth and model_depth:
        hints.append(f"the checkpoint has depth={ckpt_depth}, the model {model_depth}: "
                     f"pass depth={ckpt_depth}")
    if len(missing) > 0.5 * len(model.state_dict()):
        hints.append("most keys do not match: is this checkpoint for another architecture?")
    return hints


# -- export and our own files ---------------------------------------------------------------------------
def export_timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict that loads into the matching timm model (``timm_model_kwargs`` builds it)."""
    from .resnet import ResNet
    from .vit import VisionTransformer

    if isinstance(model, VisionTransformer):
        if model.cfg.tokenizer != "patch":
            raise ValueError(f"a ViT with the {model.cfg.tokenizer!r} tokenizer has no timm equivalent")
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}  # names are timm's already
        if model.cfg.pos_embed == "sincos2d":  # a fixed buffer here, a (frozen) parameter in timm
            sd["pos_embed"] = model.pos_embed.detach().clone()
        if model.cfg.num_registers and model.cfg.class_token and "pos_embed" in sd:
            # With registers timm uses no_embed_class (no position for any prefix token), while here
            # [CLS] has one; [CLS] + its position is a constant, so fold it into the token.
            sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
            sd["pos_embed"] = sd["pos_embed"][:, 1:]
        return sd
    if isinstance(model, ResNet):
        # timm's ResNet uses torchvision's names, which are ours
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    raise TypeError(f"cannot export {type(model).__name__} to timm; expected a vitlens ViT or ResNet")


def timm_model_kwargs(model: nn.Module) -> dict:
    """kwargs for ``timm.create_model('vit_base_patch16_224', pretrained=False, **kwargs)`` giving our ViT."""
    cfg = model.cfg
    return dict(img_size=model.patch_embed.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                num_classes=cfg.num_classes, embed_dim=cfg.embed_dim, depth=cfg.depth,
                num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                class_token=cfg.class_token, global_pool="token" if cfg.pool == "cls" else "avg",
                fc_norm=cfg.pool == "gap", reg_tokens=cfg.num_registers,
                no_embed_class=cfg.num_registers > 0, init_values=cfg.init_values,
                pos_embed="none" if cfg.pos_embed == "none" else "learn")


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """Write weights + ``{format: vitlens, model, arch, config}`` metadata to one ``.safetensors`` file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_pretrained writes safetensors; give a path ending in .safetensors, "
                         f"not {path.name}")
    if not hasattr(model, "config_dict"):
        raise TypeError(f"{type(model).__name__} is not a vitlens model (it has no config_dict())")
    meta = {"model": getattr(model, "model_name", None), "arch": type(model).__name__,
            "config": model.config_dict()}
    save_checkpoint(path, model.state_dict(), meta=meta)
    return path


def model_from_checkpoint(path: str | Path) -> nn.Module:
    """Rebuild a vitlens model from a file written by ``save_pretrained`` (or a training checkpoint)."""
    from .registry import _MODELS, create_model
    from .resnet import ResNet, ResNetConfig
    from .vit import VisionTransformer, ViTConfig

    state_dict, meta = load_state_dict_file(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has no vitlens metadata, so the architecture is unknown; use "
                         "vitlens.create_model(name, checkpoint=path) with the matching model name")
    name = meta.get("model")
    # save_pretrained records the full config; the trainer records the overrides it passed (model_args).
    config = meta["config"] if "config" in meta else meta.get("model_args")
    if config is None:
        raise ValueError(f"{path} records no model config; use vitlens.create_model(name, checkpoint=path)")
    if name in _MODELS:
        model = create_model(name, **config)
    else:  # built from a config object rather than by name: the class is recorded
        archs = {"VisionTransformer": (VisionTransformer, ViTConfig), "ResNet": (ResNet, ResNetConfig)}
        if meta.get("arch") not in archs:
            raise ValueError(f"{path} names neither a registered model ({name!r}) nor a known architecture "
                             f"({meta.get('arch')!r})")
        cls, cfg_cls = archs[meta["arch"]]
        model = cls(cfg_cls(**config))
        model.model_name = name
    model.load_state_dict(state_dict)
    return model
