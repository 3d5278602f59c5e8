"""Pixels as tokens (iGPT, Chen et al. 2020): every pixel is one token, its colour one of K palette entries.

The palette is learned by k-means over RGB values of training pixels (iGPT: 512 clusters,
"9-bit colour"). An image is first downsampled (iGPT: 32x32 or smaller) because a Transformer's
cost grows with the square of the sequence length; each pixel is then replaced by the index of
its nearest palette colour, and the indices are embedded by a lookup table. The ViT adds
[CLS] and position embeddings as for patches.

Input convention: like every vitlens tokenizer, :class:`PixelTokenizer` receives the images
the ViT receives - dataset-normalised floats ``(x - mean) / std`` - and un-normalises them
internally (``mean``/``std`` tokenizer args, CIFAR-10's statistics by default). Palettes are
stored in 0..255 RGB units.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError, DataError, ModelError
from ...utils import to_2tuple
from .common import Unnormalize, input_stats


def _exact_cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # The matmul form ||a||^2 - 2ab + ||b||^2 loses precision at 0..255 scale and can flip near-ties;
    # with only 3 channels the exact difference form costs little.
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def assign_palette(pixels: torch.Tensor, palette: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of the nearest palette colour (Euclidean in RGB) for each pixel.

    pixels (..., 3) float in the palette's units; palette (K, 3) -> (...) long. Processed in
    chunks so a large batch never materialises a (pixels x K) distance matrix at once.
    """
    flat = pixels.reshape(-1, 3).float()
    pal = palette.float()
    out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for i in range(0, flat.shape[0], chunk):
        out[i : i + chunk] = _exact_cdist(flat[i : i + chunk], pal).argmin(1)
    return out.view(pixels.shape[:-1])


def _as_pixels(images) -> torch.Tensor:
    """uint8 images (N, H, W, 3) or (N, 3, H, W), numpy or torch -> float pixels (M, 3) in 0..255."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype != torch.uint8:
        raise ModelError(
            f"fit_palette expects uint8 images (0..255), got {x.dtype}; convert with (x * 255).round()"
        )
    if x.ndim == 4 and x.shape[1] == 3 and x.shape[-1] != 3:
        x = x.permute(0, 2, 3, 1)  # (N, 3, H, W) -> (N, H, W, 3)
    if x.shape[-1] != 3:
        raise ModelError(f"expected RGB images (N, H, W, 3) or (N, 3, H, W), got shape {tuple(x.shape)}")
    return x.reshape(-1, 3).float()


def fit_palette(images, k: int = 512, seed: int = 0, iters: int = 10, sample: int = 200_000) -> torch.Tensor:
    """k-means colour palette of ``images``: (k, 3) float centroids in 0..255, sorted by brightness.

    ``sample`` random pixels are clustered (iGPT also fits on a subsample), starting from
    k-means++ seeds (Arthur & Vassilvitskii 2007: each new seed drawn with probability
    proportional to its squared distance from the seeds so far, which avoids two seeds in one
    cluster), then ``iters`` Lloyd steps; a cluster that empties moves to a random pixel.
    """
    pixels = _as_pixels(images)
    g = torch.Generator().manual_seed(seed)
    if pixels.shape[0] > sample:
        pixels = pixels[torch.randperm(pixels.shape[0], generator=g)[:sample]]
    n_colours = torch.unique(pixels, dim=0).shape[0]
    if n_colours < k:
        raise DataError(f"only {n_colours} distinct colours in the sample, fewer than k={k}; lower k")
    centroids = _kmeans_pp(pixels, k, g)
    for _ in range(iters):
        assign = assign_palette(pixels, centroids)  # (M,)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, pixels)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            centroids[empty] = pixels[torch.randint(0, pixels.shape[0], (int(empty.sum()),), generator=g)]
    return centroids[centroids.sum(1).argsort()]


def _kmeans_pp(pixels: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    centroids = torch.empty(k, 3)
    centroids[0] = pixels[torch.randint(0, pixels.shape[0], (1,), generator=g)]
    d2 = (pixels - centroids[0]).pow(2).sum(1)  # (M,) squared distance to the nearest seed so far
    for i in range(1, k):
        centroids[i] = pixels[torch.multinomial(d2, 1, generator=g)]
        d2 = torch.minimum(d2, (pixels - centroids[i]).pow(2).sum(1))
    return centroids


def uniform_palette(k: int = 512) -> torch.Tensor:
    """A fixed palette: ``k = L^3`` colours on a uniform RGB grid (512 = 8 levels a channel), 0..255."""
    levels = round(k ** (1 / 3))
    if levels**3 != k:
        raise ModelError(f"a uniform RGB palette needs a cube number of colours (8, 64, 512, ...), got k={k}")
    v = (torch.arange(levels, dtype=torch.float32) + 0.5) * (256 / levels) - 0.5  # bin centres
    r, g, b = torch.meshgrid(v, v, v, indexing="ij")
    return torch.stack([r, g, b], -1).reshape(-1, 3)


def save_palette(path: str | Path, palette: torch.Tensor, meta: dict | None = None) -> None:
    """Write a palette (K, 3) as a vitlens safetensors checkpoint (key ``palette``)."""
    from ...io import save_checkpoint

    save_checkpoint(
        path,
        {"palette": palette.float()},
        meta={"kind": "palette", "k": int(palette.shape[0]), **(meta or {})},
    )


def load_palette(path: str | Path) -> torch.Tensor:
    from ...io import load_checkpoint

    state, meta, _ = load_checkpoint(path)
    if "palette" not in state:
        raise CheckpointError(
            f"{path} holds no palette (kind {meta.get('kind')!r}); make one with "
            "`vitlens train-tokenizer --kind palette`"
        )
    return state["palette"]


class PixelTokenizer(nn.Module):
    """Normalised images (B, 3, H, W) -> (B, r*r, D): downsample to r x r, nearest palette colour, embed.

    ``palette`` is a persistent buffer, so a model's ``state_dict`` carries it and a saved model
    tokenizes exactly as it did in training.
    """

    def __init__(
        self, img_size, embed_dim: int, palette: torch.Tensor, resolution: int = 16, mean=None, std=None
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.resolution = resolution
        if self.img_size[0] % resolution or self.img_size[1] % resolution:
            raise ModelError(
                f"image size {self.img_size} is not a multiple of resolution {resolution}; "
                f"pick a resolution that divides it (e.g. {math.gcd(*self.img_size) // 2})"
            )
        self.grid_size = (resolution, resolution)
        self.num_patches = resolution * resolution
        self.patch_size = (
            self.img_size[0] // resolution,
            self.img_size[1] // resolution,
        )  # input px per token
        self.register_buffer("palette", palette.float().clone())  # (K, 3) in 0..255
        self.unnormalize = Unnormalize(mean, std)  # mean/std None: CIFAR-10's
        self.embed = nn.Embedding(palette.shape[0], embed_dim)
        nn.init.normal_(self.embed.weight, std=0.02)

    @property
    def num_colors(self) -> int:
        return self.palette.shape[0]

    def set_palette(self, palette: torch.Tensor) -> None:
        """Replace the palette (e.g. with :func:`fit_palette` on the training set) - same K only."""
        if palette.shape != self.palette.shape:
            raise CheckpointError(
                f"palette shape {tuple(palette.shape)} differs from the model's {tuple(self.palette.shape)}"
            )
        self.palette.copy_(palette)

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> palette indices (B, r, r)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ModelError(f"expected RGB images (B, 3, H, W), got shape {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != self.img_size:
            (h, w), (H, W) = self.img_size, tuple(x.shape[-2:])
            raise ModelError(
                f"pixel tokenizer built for {h}x{w} images, got {H}x{W}; resize the images to {h}x{w} "
                "(its input size is fixed)"
            )
        rgb = self.unnormalize(x) * 255  # back to 0..255
        rgb = F.adaptive_avg_pool2d(rgb, self.resolution)  # box downsampling, (B, 3, r, r)
        return assign_palette(rgb.permute(0, 2, 3, 1), self.palette)  # (B, r, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.tokenize(x).flatten(1))  # (B, r*r, D)

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        """Indices (B, r, r) -> the palette image (B, 3, r, r) in [0, 1], to look at what the model sees."""
        return (self.palette[idx] / 255).permute(0, 3, 1, 2)


def build_pixel_tokenizer(cfg, args: dict) -> PixelTokenizer:
    """From ``tokenizer_args``: ``palette`` (path or None), ``k`` (512), ``resolution`` (16), mean/std."""
    k, path = int(args.get("k", 512)), args.get("palette")
    if path:
        palette = load_palette(path)
        if "k" in args and palette.shape[0] != k:
            raise CheckpointError(
                f"palette {path} has {palette.shape[0]} colours but tokenizer_args k={k}; "
                "drop k (the file decides) or pass a palette with k colours"
            )
    else:
        warnings.warn(
            f"pixel tokenizer: no palette file given, using a fixed uniform {k}-colour RGB palette; fit one "
            "with `vitlens train-tokenizer --kind palette --out DIR` and pass tokenizer_args={'palette': "
            "'DIR/palette.safetensors'} (a state dict loaded later brings its own palette)",
            stacklevel=3,
        )
        palette = uniform_palette(k)
    mean, std = input_stats(args)
    return PixelTokenizer(cfg.img_size, cfg.embed_dim, palette, int(args.get("resolution", 16)), mean, std)
