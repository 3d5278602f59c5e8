"""The hybrid ViT's tokenizer (Dosovitskiy et al. 2020, section 3.1): CNN feature map positions as tokens.

"As an alternative to raw image patches, the input sequence can be formed from feature maps of
a CNN ... the patches can have spatial size 1x1, which means that the input sequence is
obtained by simply flattening the spatial dimensions of the feature map and projecting to the
Transformer dimension." The paper uses the first stages of a ResNet-50; here the stem and
first stages of a vitlens :class:`~vitlens.models.resnet.ResNet` (same blocks, same names as
torchvision, so a torchvision/timm ResNet checkpoint can initialise ``backbone``), then a
``patch x patch`` convolution to ``embed_dim``. Module names follow timm's ``HybridEmbed``
(``backbone``, ``proj``).

Token grid = image side / (stem stride x 2^(stages - 1) x patch): with the 'cifar' stem
(stride 1) and three stages, a 32x32 image gives an 8x8 grid, like 4x4 patches.
Input: the same dataset-normalised images the ViT receives (a CNN wants them that way).
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ModelError
from ...utils import eval_mode, to_2tuple
from ..resnet import ResNet, ResNetConfig

_STEM_STRIDE = {"cifar": 1, "imagenet": 4}


class HybridEmbed(nn.Module):
    """(B, 3, H, W) -> CNN backbone -> (B, C, h', w') -> patch conv -> (B, h*w, D).

    Like timm's ``HybridEmbed``, it takes any ``backbone`` module that maps images to a feature
    map (``forward_features`` if it has one); its stride and width are measured once with a
    dummy image, as timm does.
    """

    def __init__(self, backbone: nn.Module, img_size, embed_dim: int, *, patch: int = 1, in_chans: int = 3):
        super().__init__()
        self.backbone = backbone
        self.feature_stride, channels = _feature_geometry(backbone, in_chans)
        self.proj = nn.Conv2d(channels, embed_dim, kernel_size=patch, stride=patch)
        stride = self.feature_stride * patch
        self.patch_size = (stride, stride)  # input pixels covered by one token (for attention distances)
        self.set_image_size(img_size)

    def set_image_size(self, img_size) -> None:
        """Convolutions take any size: only the token grid changes (the ViT resamples its positions)."""
        img_size, stride = to_2tuple(img_size), self.patch_size[0]
        if img_size[0] % stride or img_size[1] % stride:
            raise ModelError(
                f"hybrid tokenizer: image size {img_size} is not divisible by the backbone stride "
                f"{self.feature_stride} x patch {stride // self.feature_stride} = {stride}; use fewer "
                "stages, a smaller patch or another image size"
            )
        self.img_size = img_size
        self.grid_size = (img_size[0] // stride, img_size[1] // stride)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            (h, w), (H, W) = self.img_size, tuple(x.shape[-2:])
            raise ModelError(
                f"hybrid tokenizer built for {h}x{w} images, got {H}x{W}; resize the images or call "
                f"set_image_size(({H}, {W}))"
            )
        x = _features(self.backbone, x)  # (B, C, H/s, W/s)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


def _features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return backbone.forward_features(x) if hasattr(backbone, "forward_features") else backbone(x)


@torch.no_grad()
def _feature_geometry(backbone: nn.Module, in_chans: int, probe: int = 256) -> tuple[int, int]:
    """(input pixels per feature position, feature channels), from one dummy forward in eval mode.

    The probe image is a power of two wide, so every CNN stride divides it exactly.
    """
    with eval_mode(backbone):
        feat = _features(backbone, torch.zeros(1, in_chans, probe, probe))
    if feat.dim() != 4:
        raise ModelError(f"the hybrid backbone must return a (B, C, H, W) feature map, got "
                         f"{tuple(feat.shape)}")
    return probe // feat.shape[-2], feat.shape[1]


def build_hybrid_tokenizer(cfg, args: dict) -> HybridEmbed:
    """From ``tokenizer_args``: ``layers``, ``widths``, ``block``, ``stem``, and ``patch`` or ``grid``
    (tokens along the image's height; sets ``patch`` = feature-map height / grid, so a non-square image
    gets a grid of the same aspect)."""
    known = {"layers", "widths", "block", "stem", "patch", "grid"}
    if unknown := sorted(set(args) - known - {"mean", "std"}):
        raise ModelError(f"unknown hybrid tokenizer_args {unknown}; valid: {sorted(known)}")
    kw = {k: args[k] for k in ("layers", "widths", "block", "stem") if k in args}
    stem = kw.get("stem", "cifar")
    if stem not in _STEM_STRIDE:
        raise ModelError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
    patch = int(args.get("patch", 1))
    if "grid" in args:
        n_stages = len(kw.get("layers", (1, 1, 1)))
        feat = to_2tuple(cfg.img_size)[0] // (_STEM_STRIDE[stem] * 2 ** (n_stages - 1))
        grid = int(args["grid"])
        if grid < 1 or feat % grid:
            raise ModelError(
                f"hybrid tokenizer: the {feat}x{feat} feature map cannot be cut into a {grid}x{grid} "
                "grid; choose a grid that divides it"
            )
        patch = feat // grid
    backbone = ResNet(ResNetConfig(block=kw.get("block", "basic"), layers=tuple(kw.get("layers", (1, 1, 1))),
                                   widths=tuple(kw.get("widths", (32, 64, 128))), stem=stem,
                                   in_chans=cfg.in_chans, num_classes=0))
    return HybridEmbed(backbone, cfg.img_size, cfg.embed_dim, patch=patch, in_chans=cfg.in_chans)
