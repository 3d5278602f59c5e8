"""Image -> patch tokens through one shared linear projection.

A Conv2d with kernel = stride = P is exactly "flatten each PxP patch and multiply by one
matrix" (tests check this against an explicit per-patch linear map); the conv form is what
timm uses, so its checkpoints load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelError
from ..utils import to_2tuple


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/P * W/P, D). Attributes used by the analysis: ``grid_size``, ``patch_size``."""

    def __init__(
        self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768, bias: bool = True
    ):
        super().__init__()
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        check_divisible(self.img_size, self.patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size,
                              bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible(tuple(x.shape[-2:]), self.patch_size)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)

    def set_image_size(self, img_size) -> None:
        self.img_size = to_2tuple(img_size)
        check_divisible(self.img_size, self.patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]


def check_divisible(img_size: tuple[int, int], patch_size: tuple[int, int]) -> None:
    if img_size[0] % patch_size[0] or img_size[1] % patch_size[1]:
        raise ModelError(
            f"image size {img_size[0]}x{img_size[1]} is not divisible by patch size "
            f"{patch_size[0]}x{patch_size[1]}; resize the images (e.g. --img-size) or choose a patch size "
            f"that divides them"
        )
