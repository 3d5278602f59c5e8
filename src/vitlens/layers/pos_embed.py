"""Position embeddings: learned, 1D sinusoidal (Vaswani et al.), 2D sin-cos (MoCo v3 / MAE),
and resampling of a learned grid to another image size."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ModelError


def sincos_1d(length: int, dim: int, *, temperature: float = 10000.0) -> torch.Tensor:
    """(length, dim) table of "Attention Is All You Need": sin on even channels, cos on odd."""
    if dim % 2:
        raise ModelError(f"sinusoidal embedding needs an even dim, got {dim}")
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(temperature) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table.float()


def sincos_2d(grid_h: int, grid_w: int, dim: int, *, temperature: float = 10000.0) -> torch.Tensor:
    """(grid_h*grid_w, dim) table: half the channels encode the row, half the column (MAE layout)."""
    if dim % 4:
        raise ModelError(f"2D sin-cos embedding needs dim divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    out_y = ys.flatten()[:, None] * omega[None]
    out_x = xs.flatten()[:, None] * omega[None]
    return torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1).float()


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Bicubic resampling of a learned (1, prefix + H*W, D) table to another grid.

    The prefix ([CLS]) positions are kept as they are; the patch positions are treated as a
    D-channel image and interpolated, as in Dosovitskiy et al. 2020 (fine-tuning at higher res).
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = grid.shape[-1]
    if grid.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(
            f"pos_embed has {grid.shape[1]} patch positions, expected {old_grid[0]}x{old_grid[1]}"
        )
    grid = grid.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # (1, D, H, W)
    grid = F.interpolate(
        grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True
    )
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
