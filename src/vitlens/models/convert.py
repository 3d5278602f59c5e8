"""Checkpoint interop: load timm, torchvision and Hugging Face weights; export to timm.

Loading is four small steps, each a function you can call on its own:

1. ``vitlens.io.load_state_dict_file``: read a file into a flat ``{name: tensor}`` dict, never
   running code (safetensors, or ``torch.load(weights_only=True)``).
2. ``detect_format``: recognise the layout from the key names.
3. ``convert_state_dict``: rename keys to vitlens names (timm's, for ViT; torchvision's, for
   ResNet) and adapt to the model: resample the position table to its grid, optionally
   start a new head when the class count differs.
4. ``load_checkpoint_into``: check every shape and report all problems in one error.

``vitlens.models.loading`` (``load_model``, ``create_model``, ``save_pretrained``) builds on these.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ModelError
from ..io import FORMAT, load_state_dict_file
from ..layers import resample_pos_embed
from .resnet import ResNet
from .vit import VisionTransformer

FORMATS = ("vitlens", "timm_vit", "torchvision_vit", "torchvision_resnet", "hf_vit")


# -- 2. recognising the layout -----------------------------------------------------------------
def detect_format(state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> str:
    """One of ``FORMATS``, from the metadata when it says vitlens, otherwise from the key names."""
    if metadata and metadata.get("format") == FORMAT:
        return "vitlens"
    keys = list(state_dict)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)
    if has("conv_proj.") and has("encoder.layers.encoder_layer_"):
        return "torchvision_vit"
    if any(_HF_PATCH.match(k) for k in keys):  # ViT, DeiT, DINOv2 (with or without their prefix)
        return "hf_vit"
    if "patch_embed.proj.weight" in state_dict:
        return "timm_vit"
    if has("blocks.0.attn.") or has("patch_embed."):  # a vitlens ViT with a non-patch tokenizer
        return "vitlens"
    if "conv1.weight" in state_dict and has("layer1."):
        return "torchvision_resnet"
    raise CheckpointError(
        f"unrecognised checkpoint layout (first keys: {', '.join(keys[:6])}); vitlens reads "
        "timm or torchvision ViTs, Hugging Face ViTForImageClassification, torchvision/timm "
        "ResNets and its own files"
    )


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
_HF_PATCH = re.compile(r"^(?:(?:vit|deit|dinov2)\.)?embeddings\.patch_embeddings\.")
_HF_VIT = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.distillation_token$", "dist_token"),  # DeiT
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (_HF_L + r"attention\.(?:output\.dense|o_proj)\.", r"blocks.\1.attn.proj."),
    (_HF_L + r"layernorm_before\.", r"blocks.\1.norm1."),
    (_HF_L + r"layernorm_after\.", r"blocks.\1.norm2."),
    (_HF_L + r"(norm1|norm2)\.", r"blocks.\1.\2."),  # DINOv2
    (_HF_L + r"layer_scale(1|2)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (_HF_L + r"(?:intermediate\.dense|mlp\.fc1)\.", r"blocks.\1.mlp.fc1."),
    (_HF_L + r"(?:output\.dense|mlp\.fc2)\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
    (r"^(?:classifier|cls_classifier)\.", "head."),
    (r"^distillation_classifier\.", "head_dist."),  # DeiTForImageClassificationWithTeacher
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
        raise CheckpointError(
            "this torchvision ViT has a pre-logits layer (representation_size), which the "
            "vitlens ViT does not have; use a checkpoint built with representation_size=None"
        )
    return _rename(sd, _TORCHVISION_VIT)


def _convert_hf_vit(sd: dict) -> dict:
    sd = {re.sub(r"^(?:vit|deit|dinov2)\.", "", k): v for k, v in sd.items()}
    dropped = [k for k in sd if k.startswith(_HF_UNUSED) and not k.endswith("mask_token")]  # pretraining only
    if dropped:
        warnings.warn(
            f"ignoring Hugging Face weights the classifier does not use: {', '.join(dropped)}", stacklevel=3
        )
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
            raise CheckpointError(
                f"Hugging Face layer {layer} has only {sorted(parts)} of query/key/value {kind}"
            )
        # timm's fused qkv is [q; k; v] along the output dim: (3D, D) weight, (3D,) bias
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _head_keys(model: nn.Module) -> tuple[str, ...]:
    """The classifier's parameter names: weight first (ResNet fc, ViT head, DeiT's second head)."""
    if isinstance(getattr(model, "fc", None), nn.Module):
        return ("fc.weight", "fc.bias")
    dist = (
        ("head_dist.weight", "head_dist.bias")
        if isinstance(getattr(model, "head_dist", None), nn.Linear)
        else ()
    )
    return ("head.weight", "head.bias", *dist)


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], fmt: str, model: nn.Module | None = None, *, strict_head: bool = True
) -> dict[str, torch.Tensor]:
    """Rename ``state_dict`` from layout ``fmt`` to vitlens names; with ``model``, adapt it to that model.

    Adapting: a learned position table for another grid is resampled bicubically (as when
    fine-tuning at a higher resolution). A head for another number of classes is an error
    unless ``strict_head=False``, which keeps the model's freshly initialised head (with a warning).
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected one of {', '.join(FORMATS)}")
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
    new_grid = tuple(model.patch_embed.grid_size)
    if new_grid != (side, side):
        warnings.warn(
            f"resampling the checkpoint's {side}x{side} position table to the model's "
            f"{new_grid[0]}x{new_grid[1]} grid (bicubic), as when fine-tuning at another "
            "resolution",
            stacklevel=4,
        )
    sd["pos_embed"] = resample_pos_embed(ckpt, new_grid, (side, side), prefix)


def _replace_head(sd: dict, model: nn.Module) -> None:
    own = model.state_dict()
    fits = lambda k: (k in sd) == (k in own) and (k not in sd or sd[k].shape == own[k].shape)
    changed = [k for k in _head_keys(model) if not fits(k)]
    if not changed:
        return
    shapes = [tuple(sd[k].shape) for k in changed if k in sd]
    warnings.warn(
        f"checkpoint head {shapes} does not fit the model; keeping the model's newly initialised "
        "head (strict_head=False)",
        stacklevel=3,
    )
    for k in _head_keys(model):
        sd.pop(k, None)
        if k in own:
            sd[k] = own[k]


# -- 4. loading with one clear error ------------------------------------------------------------------
def load_checkpoint_into(
    model: nn.Module, path: str | Path, strict: bool = True, *, strict_head: bool = True
) -> nn.Module:
    """Load the checkpoint at ``path`` (any supported layout) into ``model`` and return the model.

    Shape mismatches always raise (one CheckpointError listing every one, with a hint); missing and
    unexpected keys raise too when ``strict``, and are warned about otherwise.
    """
    state_dict, metadata = load_state_dict_file(path)
    return load_state_dict_into(
        model, state_dict, metadata, source=path, strict=strict, strict_head=strict_head
    )


def load_state_dict_into(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    metadata: dict | None = None,
    *,
    source: str | Path = "state dict",
    strict: bool = True,
    strict_head: bool = True,
) -> nn.Module:
    """``load_checkpoint_into`` for a state dict in memory (a peer model's, say); ``source`` names it."""
    path = source
    own = model.state_dict()
    try:
        fmt = detect_format(state_dict, metadata)
    except CheckpointError:
        if len(own.keys() & state_dict.keys()) < 0.5 * len(own):
            raise
        fmt = "vitlens"  # plain weights of a vitlens model without distinctive names (e.g. the seq2seq)
    sd = convert_state_dict(state_dict, fmt, model, strict_head=strict_head)
    _fill_tied(sd, own)
    mismatched = [
        (k, tuple(sd[k].shape), tuple(v.shape))  # (key, checkpoint shape, model shape)
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    missing = [k for k in own if k not in sd]
    unexpected = sorted((k for k in sd if k not in own), key=_natural)
    if mismatched or (strict and (missing or unexpected)):
        raise CheckpointError(_mismatch_message(model, path, fmt, sd, mismatched, missing, unexpected))
    if missing or unexpected:
        warnings.warn(
            f"loading {path} with strict=False: {len(missing)} missing keys ({_few(missing)}), "
            f"{len(unexpected)} unexpected keys ({_few(unexpected)})",
            stacklevel=2,
        )
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
    model_shapes = {k: m for k, _, m in mismatched}
    head = _head_keys(model)
    head_only = all(k in head for k in shapes)  # the body fits: only the class count differs
    for k in head[:1]:
        if k in shapes and head_only and shapes[k][1:] == model_shapes[k][1:]:
            n = shapes[k][0]
            hints.append(
                f"the checkpoint's head has {n} classes: pass num_classes={n} (create_model(name, "
                f"checkpoint=..., num_classes={n})), or load_checkpoint_into(..., "
                "strict_head=False) to start a new head"
            )
    if "patch_embed.proj.weight" in shapes:
        d, c, ph, _ = shapes["patch_embed.proj.weight"]
        hints.append(f"the checkpoint's patch embedding is embed_dim={d}, in_chans={c}, patch_size={ph}")
    elif "cls_token" in shapes:
        hints.append(f"the checkpoint's embed_dim is {shapes['cls_token'][-1]}")
    blocks = lambda keys: {int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
    ckpt_depth, model_depth = len(blocks(sd)), len(blocks(model.state_dict()))
    if ckpt_depth != model_depth and ckpt_depth and model_depth:
        hints.append(
            f"the checkpoint has depth={ckpt_depth}, the model {model_depth}: pass depth={ckpt_depth}"
        )
    if len(missing) > 0.5 * len(model.state_dict()):
        hints.append("most keys do not match: is this checkpoint for another architecture?")
    return hints


# -- export and our own files ---------------------------------------------------------------------------
def export_timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict that loads into the matching timm model (``timm_model_kwargs`` builds it)."""
    if isinstance(model, VisionTransformer):
        if model.cfg.tokenizer != "patch":
            raise ModelError(f"a ViT with the {model.cfg.tokenizer!r} tokenizer has no timm equivalent")
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
    raise ModelError(f"cannot export {type(model).__name__} to timm; expected a vitlens ViT or ResNet")


def timm_model_kwargs(model: nn.Module) -> dict:
    """kwargs for ``timm.create_model('vit_base_patch16_224', pretrained=False, **kwargs)`` giving our ViT."""
    from functools import partial

    cfg = model.cfg
    if cfg.distilled or cfg.norm_pre == cfg.patch_bias or cfg.pool == "cls+gap":
        raise ModelError("timm's VisionTransformer has no equivalent of this config (distilled, cls+gap "
                         "pooling, or norm_pre without patch_bias=False); export the state dict instead")
    kw = dict(img_size=model.patch_embed.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
              num_classes=cfg.num_classes, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
              mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, class_token=cfg.class_token)
    kw.update(global_pool="token" if cfg.pool == "cls" else "avg", fc_norm=cfg.fc_norm,
              reg_tokens=cfg.num_registers, no_embed_class=cfg.num_registers > 0, init_values=cfg.init_values,
              pos_embed="none" if cfg.pos_embed == "none" else "learn", pre_norm=cfg.norm_pre,
              norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps), act_layer=cfg.act)
    return kw
