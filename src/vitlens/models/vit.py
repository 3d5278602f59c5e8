"""Vision Transformer (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words").

Reading order: config -> tokens (patches + [CLS] + registers + positions) -> encoder blocks
-> final norm -> head on the [CLS] output c0 (or on the average of the patch tokens).
Module and parameter names equal timm's ``VisionTransformer``, so a timm state dict loads
without renaming and ours exports to timm unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import nn

from ..errors import ModelError
from ..layers import Block, HookPoint, resample_pos_embed, sincos_2d
from ..layers.patch_embed import check_divisible
from .inputs import check_image_batch, model_label
from .registry import register_models
from .tokenizers import build_image_tokenizer


@dataclass
class ViTConfig:
    img_size: int | tuple[int, int] = 224  # (height, width) for non-square images
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
    # Variants of timm's VisionTransformer (defaults: the original ViT):
    fc_norm: bool | None = None  # final norm after pooling; None: only with pool='gap' (timm's rule)
    norm_pre: bool = False  # a LayerNorm on the tokens entering block 0 (CLIP)
    patch_bias: bool = True  # bias of the patch projection (CLIP has none)
    norm_eps: float = 1e-6  # LayerNorm eps: 1e-6 timm/Google, 1e-5 CLIP (PyTorch's default), 1e-12 HF ViT
    act: str = "gelu"  # MLP activation: 'gelu' | 'quick_gelu' (OpenAI CLIP)
    distilled: bool = False  # DeiT's distillation token and head; eval logits average both heads
    tokenizer: str = "patch"  # 'patch' | 'pixel' | 'vq' | 'hybrid' (see vitlens.models.tokenizers)
    tokenizer_args: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.pool not in ("cls", "gap", "cls+gap"):
            raise ModelError(f"pool must be 'cls', 'gap' or 'cls+gap', got {self.pool!r}")
        if self.act not in _ACTS:
            raise ModelError(f"act must be one of {', '.join(_ACTS)}, got {self.act!r}")
        if self.pos_embed not in ("learned", "sincos2d", "none"):
            raise ModelError(f"pos_embed must be 'learned', 'sincos2d' or 'none', got {self.pos_embed!r}")
        if self.pool != "gap" and not self.class_token:
            raise ModelError(f"pool={self.pool!r} needs class_token=True; use pool='gap' for a model "
                             "without [CLS]")
        if self.distilled and (self.pool != "cls" or self.num_registers):
            raise ModelError("distilled=True (DeiT) needs pool='cls' and no registers")
        if self.fc_norm is None:
            self.fc_norm = self.pool == "gap"


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's approximation of GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.num_pos_prefix = int(cfg.class_token) + int(cfg.distilled)  # prefix tokens with a position
        self.num_prefix_tokens = self.num_pos_prefix + cfg.num_registers
        self.patch_embed = build_image_tokenizer(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_registers, D)) if cfg.num_registers else None
        # Position table covers [CLS] (+ DeiT's distillation token) + patches (timm layout);
        # registers carry no position.
        n_pos = self.patch_embed.num_patches + self.num_pos_prefix
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, n_pos, D) * 0.02)
        elif cfg.pos_embed == "sincos2d":
            self.register_buffer("pos_embed", self._sincos_table(), persistent=False)
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.norm_pre = norm_layer(D) if cfg.norm_pre else nn.Identity()
        self.hook_embed = HookPoint()  # residual stream entering block 0
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_drop=cfg.drop_rate,
                  attn_drop=cfg.attn_drop_rate, drop_path=dpr[i], init_values=cfg.init_values,
                  norm_layer=norm_layer, act_layer=_ACTS[cfg.act])
            for i in range(cfg.depth)
        )
        # timm convention: the final norm acts on every token, or (fc_norm) on the pooled vector.
        self.norm = nn.Identity() if cfg.fc_norm else norm_layer(D)
        self.fc_norm = norm_layer(D) if cfg.fc_norm else nn.Identity()
        self.hook_pre_logits = HookPoint()  # the vector the head sees
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.num_features = 2 * D if cfg.pool == "cls+gap" else D
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.head_dist = None
        if cfg.distilled:
            self.head_dist = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._init_weights()

    # -- construction helpers ------------------------------------------------------------
    def _sincos_table(self) -> torch.Tensor:
        gh, gw = self.patch_embed.grid_size
        table = sincos_2d(gh, gw, self.cfg.embed_dim)
        if self.num_pos_prefix:
            table = torch.cat([torch.zeros(self.num_pos_prefix, self.cfg.embed_dim), table])
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
        for token in (self.reg_token, self.dist_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    def set_image_size(self, img_size) -> None:
        """Adapt to another input size: the learned position table is resampled bicubically."""
        if not hasattr(self.patch_embed, "set_image_size"):
            h, w = self.patch_embed.img_size
            raise ModelError(
                f"the {self.cfg.tokenizer!r} tokenizer has a fixed input size; resize the images to {h}x{w} "
                "instead"
            )
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_image_size(img_size)
        self.cfg.img_size = img_size
        if isinstance(self.pos_embed, nn.Parameter):
            new = resample_pos_embed(self.pos_embed.data, self.patch_embed.grid_size, old_grid,
                                     self.num_pos_prefix)
            self.pos_embed = nn.Parameter(new)
        elif self.pos_embed is not None:
            self.pos_embed = self._sincos_table().to(self.pos_embed.device)

    # -- forward ---------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        """Every tokenizer takes a float (B, in_chans, H, W) batch of the size the model was built for."""
        who = model_label(self)
        check_image_batch(x, self.cfg.in_chans, who)
        if self.cfg.tokenizer == "patch":
            check_divisible(tuple(x.shape[-2:]), self.patch_embed.patch_size)
        (h, w), (H, W) = tuple(self.patch_embed.img_size), tuple(x.shape[-2:])
        if (H, W) != (h, w):
            ph, pw = self.patch_embed.patch_size  # input pixels per token
            if not hasattr(self.patch_embed, "set_image_size"):
                fix = (f"resize the images to {h}x{w} (the {self.cfg.tokenizer!r} tokenizer has a fixed "
                       "input size)")
            elif H % ph or W % pw:
                fix = f"resize the images to {h}x{w} ({H}x{W} is not a multiple of its {ph}x{pw} tokens)"
            else:
                fix = (f"resize the images to {h}x{w} or call model.set_image_size(({H}, {W})) to adapt the "
                       "model (its position embeddings are resampled)")
            raise ModelError(f"{who} was built for {h}x{w} images, got {H}x{W}; {fix}")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> token sequence (B, prefix + N, D) entering the first block."""
        self._check_input(x)
        x = self.patch_embed(x)  # (B, N, D)
        B = x.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        x = torch.cat([*prefix, x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        if self.reg_token is not None:  # registers go after [CLS], before the patches, without position
            n = self.num_pos_prefix
            x = torch.cat([x[:, :n], self.reg_token.expand(B, -1, -1), x[:, n:]], dim=1)
        return self.hook_embed(self.norm_pre(self.pos_drop(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)  # (B, prefix + N, D)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        patches = x[:, self.num_prefix_tokens:]
        if self.cfg.pool == "cls":
            return x[:, 0]  # c0, the [CLS] output
        if self.cfg.pool == "gap":
            return patches.mean(dim=1)
        return torch.cat([x[:, 0], patches.mean(dim=1)], dim=-1)  # 'cls+gap': DINOv2's linear head

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.head_dist is not None:  # DeiT distilled: the average of the [CLS] and distillation heads
            cls, dist = x[:, 0], x[:, 1]
            mean = self.hook_pre_logits((cls + dist) / 2)
            return mean if pre_logits else (self.head(cls) + self.head_dist(dist)) / 2
        x = self.hook_pre_logits(self.fc_norm(self.pool(x)))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def config_dict(self) -> dict:
        return asdict(self.cfg)


# -- the registered variants ------------------------------------------------------------------
# ImageNet-scale configs equal timm's models of the same names (tests/test_pretrained.py checks
# each row against timm's own model).
_CIFAR = dict(img_size=32, patch_size=4, num_classes=10)  # 32 px images, 4x4 patches -> 64 tokens
_MICRO = dict(_CIFAR, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0)

_TINY, _SMALL = dict(embed_dim=192, num_heads=3), dict(embed_dim=384, num_heads=6)
_LARGE = dict(embed_dim=1024, depth=24, num_heads=16)
_GAP = dict(pool="gap", class_token=False, fc_norm=False)  # timm's *_gap_*: norm, then pooling
_CLIP = dict(norm_pre=True, patch_bias=False, norm_eps=1e-5)
_DINOV2 = dict(img_size=518, patch_size=14, num_classes=0, init_values=1e-5)

register_models(VisionTransformer, ViTConfig, {
    "vit_tiny_patch16_224": dict(patch_size=16, **_TINY),
    "vit_small_patch16_224": dict(patch_size=16, **_SMALL),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_small_patch32_224": dict(patch_size=32, **_SMALL),
    "vit_base_patch32_224": dict(patch_size=32),
    "vit_large_patch16_224": dict(_LARGE),
    "vit_base_patch16_384": dict(img_size=384),
    "vit_base_patch16_gap_224": dict(_GAP, num_heads=16),
    "vit_medium_patch16_gap_256": dict(_GAP, img_size=256, embed_dim=512, num_heads=8, qkv_bias=False,
                                       init_values=1e-6),
    "vit_base_patch16_clip_224": dict(_CLIP),
    "vit_base_patch16_clip_quickgelu_224": dict(_CLIP, num_classes=512, act="quick_gelu"),
    "vit_large_patch14_clip_224": dict(_CLIP, **_LARGE, patch_size=14),
    "deit_tiny_patch16_224": dict(_TINY),
    "deit_small_patch16_224": dict(_SMALL),
    "deit_base_patch16_224": dict(),
    "deit_tiny_distilled_patch16_224": dict(_TINY, distilled=True),
    "deit_small_distilled_patch16_224": dict(_SMALL, distilled=True),
    "deit_base_distilled_patch16_224": dict(distilled=True),
    "vit_small_patch14_dinov2": dict(_DINOV2, **_SMALL),
    "vit_base_patch14_dinov2": dict(_DINOV2),
    "vit_large_patch14_dinov2": dict(_DINOV2, **_LARGE),
    "vit_small_patch14_reg4_dinov2": dict(_DINOV2, num_registers=4, **_SMALL),
    "vit_base_patch14_reg4_dinov2": dict(_DINOV2, num_registers=4),
    "vit_tiny_patch4_32": dict(_CIFAR, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch4_32": dict(_CIFAR, embed_dim=384, depth=12, num_heads=6),
    # 6 blocks, 256 wide: CIFAR on a CPU budget (about 4.8M parameters).
    "vit_cifar_patch4_32": dict(_CIFAR, embed_dim=256, depth=6, num_heads=4, mlp_ratio=2.0),
    # 4 blocks, 128 wide: the quickstart / study default that trains in minutes on a laptop CPU.
    "vit_micro_patch4_32": _MICRO,
    # The micro ViT with the other tokenizers (vitlens.models.tokenizers):
    # iGPT-style: 32 px images box-downsampled to 16x16, each pixel one of 512 palette colours.
    "vit_micro_pixel16_32": dict(_MICRO, tokenizer="pixel", tokenizer_args={"resolution": 16, "k": 512}),
    # BEiT-style: 8x8 VQ-VAE codes (pass tokenizer_args={"checkpoint": ...} from `train-tokenizer`).
    "vit_micro_vq_32": dict(_MICRO, tokenizer="vq", tokenizer_args={}),
    # ViT-paper hybrid: CIFAR ResNet stem + 3 stages (32/64/128 wide, 1 block each) -> 8x8 tokens.
    "vit_micro_hybrid_32": dict(_MICRO, tokenizer="hybrid",
                                tokenizer_args={"layers": (1, 1, 1), "widths": (32, 64, 128)}),
})
