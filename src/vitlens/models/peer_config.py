"""Which vitlens config expresses a peer library's model (timm, torchvision, Hugging Face)?

Each function reads a built peer module (or a transformers config) and returns the keyword
arguments of :class:`ViTConfig` or :class:`ResNetConfig` that build the same network, or
``None`` when the model uses something our classes do not have (attention pooling, SwiGLU,
grouped convolutions, deep stems, ...): the caller then keeps the peer's module. Reading the
module rather than a table of names means every tag and variant of an architecture is covered.
"""

from __future__ import annotations

from torch import nn


def _side(size) -> int | None:
    size = (size, size) if isinstance(size, int) else tuple(size)
    return size[0] if size[0] == size[1] else None


def _is(module, *names: str) -> bool:
    return type(module).__name__ in names


# -- timm ViT ----------------------------------------------------------------------------------
def timm_vit_config(m: nn.Module) -> dict | None:
    """ViTConfig kwargs for a timm ``VisionTransformer`` (or DeiT distilled), None if not expressible."""
    if not _is(m, "VisionTransformer", "VisionTransformerDistilled") or not all(
        _is(b, "Block") for b in m.blocks
    ):
        return None  # another class, or blocks of another design (parallel, scaling, ...)
    pe, blk = m.patch_embed, m.blocks[0]
    attn, mlp = blk.attn, blk.mlp
    act = "quick_gelu" if _is(mlp.act, "QuickGELU") else "gelu"
    plain = [
        m.global_pool in ("token", "avg"),
        getattr(m, "attn_pool", None) is None,
        not getattr(m, "dynamic_img_size", False),
        _is(pe, "PatchEmbed") and isinstance(pe.norm, nn.Identity) and _side(pe.img_size) is not None,
        all(_is(b, "Block") for b in m.blocks),
        _is(attn, "Attention")
        and isinstance(attn.q_norm, nn.Identity)
        and isinstance(attn.norm, nn.Identity),
        attn.proj.bias is not None,
        _is(mlp, "Mlp") and isinstance(mlp.norm, nn.Identity) and mlp.fc1.bias is not None,
        _is(mlp.act, "QuickGELU")
        or (_is(mlp.act, "GELU") and getattr(mlp.act, "approximate", "none") == "none"),
        isinstance(blk.norm1, nn.LayerNorm),
        isinstance(m.head, (nn.Linear, nn.Identity)),
        not (isinstance(m.norm, nn.Identity) and isinstance(m.fc_norm, nn.Identity)),  # final_norm=False
    ]
    if not all(plain):
        return None
    return dict(
        img_size=_side(pe.img_size),
        patch_size=_side(pe.patch_size),
        in_chans=pe.proj.in_channels,
        num_classes=m.num_classes,
        embed_dim=m.embed_dim,
        depth=len(m.blocks),
        num_heads=attn.num_heads,
        mlp_ratio=mlp.fc1.out_features / m.embed_dim,
        qkv_bias=attn.qkv.bias is not None,
        pool="cls" if m.global_pool == "token" else "gap",
        pos_embed="learned" if m.pos_embed is not None else "none",
        class_token=m.cls_token is not None,
        num_registers=int(getattr(m, "num_reg_tokens", 0)),
        init_values=1e-5 if _is(blk.ls1, "LayerScale") else None,  # any value: the weights replace it
        fc_norm=not isinstance(m.fc_norm, nn.Identity),
        norm_pre=not isinstance(m.norm_pre, nn.Identity),
        patch_bias=pe.proj.bias is not None,
        norm_eps=blk.norm1.eps,
        act=act,
        distilled=getattr(m, "dist_token", None) is not None,
    )


# -- timm and torchvision ResNets (same module names) -------------------------------------------------
def resnet_config(m: nn.Module) -> dict | None:
    """ResNetConfig kwargs for a torchvision or timm ResNet, None if not expressible."""
    if not _is(m, "ResNet") or not isinstance(m.conv1, nn.Conv2d):  # timm's deep stems are Sequential
        return None
    stages = [getattr(m, f"layer{i}") for i in range(1, 5) if hasattr(m, f"layer{i}")]
    first = stages[0][0]
    block = "bottleneck" if hasattr(first, "conv3") else "basic"
    if not _plain_resnet_blocks(stages, block):
        return None
    out = [s[0].conv3.out_channels if block == "bottleneck" else s[0].conv2.out_channels for s in stages]
    widths = tuple(c // 4 for c in out) if block == "bottleneck" else tuple(out)
    base_width = first.conv1.out_channels * 64 // widths[0] if block == "bottleneck" else 64
    imagenet_stem = (
        m.conv1.kernel_size == (7, 7)
        and m.conv1.stride == (2, 2)
        and isinstance(m.maxpool, nn.MaxPool2d)
        and m.conv1.out_channels == widths[0]
    )
    if not imagenet_stem:
        return None
    fc = m.fc
    return dict(
        block=block,
        layers=tuple(len(s) for s in stages),
        widths=widths,
        base_width=base_width,
        stem="imagenet",
        in_chans=m.conv1.in_channels,
        num_classes=fc.out_features if isinstance(fc, nn.Linear) else 0,
    )


def _plain_resnet_blocks(stages, block: str) -> bool:
    for stage in stages:
        for b in stage:
            convs = [b.conv1, b.conv2] + ([b.conv3] if block == "bottleneck" else [])
            if any(not isinstance(c, nn.Conv2d) or c.groups != 1 or c.bias is not None for c in convs):
                return False  # ResNeXt (groups), or a variant with biased convolutions
            extras = [getattr(b, name, None) for name in ("se", "aa", "drop_block")]
            if any(e is not None and not isinstance(e, nn.Identity) for e in extras):
                return False  # squeeze-excitation, anti-aliasing, DropBlock
            ds = b.downsample
            if ds is not None and not (
                isinstance(ds, nn.Sequential)
                and len(ds) == 2
                and isinstance(ds[0], nn.Conv2d)
                and ds[0].kernel_size == (1, 1)
            ):
                return False  # the 'd' variants' average-pool shortcut
    return True


# -- torchvision ViT --------------------------------------------------------------------------------
def torchvision_vit_config(m: nn.Module) -> dict | None:
    if not _is(m, "VisionTransformer") or not hasattr(m, "conv_proj"):
        return None
    heads = m.heads
    if hasattr(heads, "pre_logits"):
        return None
    layer = m.encoder.layers[0]
    return dict(
        img_size=m.image_size,
        patch_size=m.patch_size,
        in_chans=m.conv_proj.in_channels,
        num_classes=heads.head.out_features,
        embed_dim=m.hidden_dim,
        depth=len(m.encoder.layers),
        num_heads=layer.num_heads,
        mlp_ratio=m.mlp_dim / m.hidden_dim,
        norm_eps=layer.ln_1.eps,
    )


# -- Hugging Face configs ------------------------------------------------------------------------------
HF_VIT_TYPES = ("vit", "deit", "dinov2")


def hf_vit_config(config, with_head: bool) -> dict | None:
    """ViTConfig kwargs from a transformers ``ViTConfig``/``DeiTConfig``/``Dinov2Config``."""
    kind = config.model_type
    if kind not in HF_VIT_TYPES or getattr(config, "hidden_act", "gelu") != "gelu":
        return None
    if kind == "dinov2" and getattr(config, "use_swiglu_ffn", False):
        return None
    mlp = config.mlp_ratio * config.hidden_size if kind == "dinov2" else config.intermediate_size
    cfg = dict(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.num_channels,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=mlp / config.hidden_size,
        qkv_bias=config.qkv_bias,
        norm_eps=config.layer_norm_eps,
        num_classes=len(config.id2label) if with_head else 0,
    )
    if kind == "dinov2":
        cfg.update(init_values=config.layerscale_value, pool="cls+gap" if with_head else "cls")
    if kind == "deit" and with_head:
        cfg.update(distilled=True)  # DeiTForImageClassificationWithTeacher: [CLS] + distillation heads
    return cfg
