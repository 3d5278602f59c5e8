"""Vision Transformer (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words").

Reading order: config -> tokens (patches + [CLS] + registers + positions) -> encoder blocks
-> final norm -> head on the [CLS] output c0 (or on the average of the patch tokens).
Module and parameter names equal timm's ``VisionTransformer``, so a timm state dict loads
without renaming and ours exports to timm unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..layers import Block, HookPoint, LayerNorm, PatchEmbed, resample_pos_embed, sincos_2d
from ..layers.patch_embed import check_divisible
from .registry import register_model


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    pool: str = "cls"  # 'cls': head on c0 (ViT paper); 'gap': average of patch tokens
    pos_embed: str = "learned"  # 'learned' | 'sincos2d' (fixed) | 'none'
    class_token: bool = True
    num_registers: int = 0  # register tokens (Darcet et al. 2023); no position embedding, like timm
    drop_rate: float = 0.0  # dropout on embeddings, projections and before the head
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing with depth
    init_values: float | None = None  # LayerScale init; None disables it
    tokenizer: str = "patch"  # 'patch' | 'pixel' | 'vq' | 'hybrid' (see vitlens.models.tokenizers)
    tokenizer_args: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.pool not in ("cls", "gap"):
            raise ValueError(f"pool must be 'cls' or 'gap', got {self.pool!r}")
        if self.pos_embed not in ("learned", "sincos2d", "none"):
            raise ValueError(f"pos_embed must be 'learned', 'sincos2d' or 'none', got {self.pos_embed!r}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool='cls' needs class_token=True; use pool='gap' for a model without [CLS]")


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.num_prefix_tokens = int(cfg.class_token) + cfg.num_registers
        self.patch_embed = build_tokenizer(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_registers, D)) if cfg.num_registers else None
        # Position table covers [CLS] + patches (timm layout); registers carry no position.
        n_pos = self.patch_embed.num_patches + int(cfg.class_token)
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, n_pos, D) * 0.02)
        elif cfg.pos_embed == "sincos2d":
            self.register_buffer("pos_embed", self._sincos_table(), persistent=False)
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.hook_embed = HookPoint()  # residual stream entering block 0
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_drop=cfg.drop_rate,
                  attn_drop=cfg.attn_drop_rate, drop_path=dpr[i], init_values=cfg.init_values)
            for i in range(cfg.depth)
        )
        # timm convention: with GAP the final norm moves after pooling (fc_norm).
        self.norm = LayerNorm(D) if cfg.pool == "cls" else nn.Identity()
        self.fc_norm = LayerNorm(D) if cfg.pool == "gap" else nn.Identity()
        self.hook_pre_logits = HookPoint()  # the vector the head sees
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    # -- construction helpers ------------------------------------------------------------
    def _sincos_table(self) -> torch.Tensor:
        gh, gw = self.patch_embed.grid_size
        table = sincos_2d(gh, gw, self.cfg.embed_dim)
        if self.cfg.class_token:
            table = torch.cat([torch.zeros(1, self.cfg.embed_dim), table])
        return table[None]

    def _init_weights(self) -> None:
        # timm's 'jax'-free default: truncated normal for linears, tiny [CLS], zero head bias.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    def set_image_size(self, img_size) -> None:
        """Adapt to another input size: the learned position table is resampled bicubically."""
        if not hasattr(self.patch_embed, "set_image_size"):
            raise ValueError(f"the {self.cfg.tokenizer!r} tokenizer has a fixed input size")
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_image_size(img_size)
        self.cfg.img_size = img_size
        if isinstance(self.pos_embed, nn.Parameter):
            new = resample_pos_embed(self.pos_embed.data, self.patch_embed.grid_size, old_grid,
                                     int(self.cfg.class_token))
            self.pos_embed = nn.Parameter(new)
        elif self.pos_embed is not None:
            self.pos_embed = self._sincos_table().to(self.pos_embed.device)

    # -- forward ---------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 and self.cfg.tokenizer == "patch":
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.dim() == 4 and x.shape[1] != self.cfg.in_chans:
            raise ValueError(
                f"model built for {self.cfg.in_chans}-channel images, got {x.shape[1]} channels "
                f"(shape {tuple(x.shape)}); convert the images (e.g. RGB) or build the model with "
                f"in_chans={x.shape[1]}"
            )
        if self.cfg.tokenizer == "patch":
            check_divisible(tuple(x.shape[-2:]), self.patch_embed.patch_size)
            if tuple(x.shape[-2:]) != tuple(self.patch_embed.img_size):
                raise ValueError(
                    f"model built for {tuple(self.patch_embed.img_size)} images, got {tuple(x.shape[-2:])}; "
                    f"call model.set_image_size({tuple(x.shape[-2:])}) to resample the position embeddings"
                )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> token sequence (B, prefix + N, D) entering the first block."""
        self._check_input(x)
        x = self.patch_embed(x)  # (B, N, D)
        B = x.shape[0]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        if self.reg_token is not None:  # registers go after [CLS], before the patches, without position
            x = torch.cat([x[:, :1 if self.cls_token is not None else 0], self.reg_token.expand(B, -1, -1),
                           x[:, 1 if self.cls_token is not None else 0:]], dim=1)
        return self.hook_embed(self.pos_drop(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)  # (B, prefix + N, D)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool == "cls":
            return x[:, 0]  # c0, the [CLS] output
        return x[:, self.num_prefix_tokens:].mean(dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.hook_pre_logits(self.fc_norm(self.pool(x)))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def config_dict(self) -> dict:
        return asdict(self.cfg)


def build_tokenizer(cfg: ViTConfig) -> nn.Module:
    if cfg.tokenizer == "patch":
        return PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
    try:
        from .tokenizers import build_image_tokenizer
    except ImportError as e:  # pragma: no cover - only when the tokenizers module is absent
        raise ValueError(f"tokenizer {cfg.tokenizer!r} is not available: {e}") from e
    return build_image_tokenizer(cfg)


def _vit(defaults: dict, overrides: dict) -> VisionTransformer:
    return VisionTransformer(ViTConfig(**{**defaults, **overrides}))


# -- ImageNet-scale configs, equal to timm's vit_{tiny,small,base}_patch16_224 ---------------
@register_model
def vit_tiny_patch16_224(**kw):
    return _vit(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kw)


@register_model
def vit_small_patch16_224(**kw):
    return _vit(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), kw)


@register_model
def vit_base_patch16_224(**kw):
    return _vit(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kw)


# -- CIFAR-scale configs: 32 px images, 4x4 patches -> 64 tokens ------------------------------
_CIFAR = dict(img_size=32, patch_size=4, num_classes=10)


@register_model
def vit_tiny_patch4_32(**kw):
    return _vit(dict(_CIFAR, embed_dim=192, depth=12, num_heads=3), kw)


@register_model
def vit_small_patch4_32(**kw):
    return _vit(dict(_CIFAR, embed_dim=384, depth=12, num_heads=6), kw)


@register_model
def vit_cifar_patch4_32(**kw):
    """A 6-block, 256-wide ViT for CIFAR on a CPU budget (about 4.8M parameters)."""
    return _vit(dict(_CIFAR, embed_dim=256, depth=6, num_heads=4, mlp_ratio=2.0), kw)


@register_model
def vit_micro_patch4_32(**kw):
    """4 blocks, 128 wide: the quickstart / study default that trains in minutes on a laptop CPU."""
    return _vit(dict(_CIFAR, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0), kw)
