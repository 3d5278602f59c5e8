r"""Image tokenizers: four ways to turn an image into the token sequence a ViT reads.

=========  ===================================================  ==================================
option     tokens                                               module
=========  ===================================================  ==================================
patch      one linear projection of each PxP patch (ViT)        :class:`vitlens.layers.PatchEmbed`
pixel      downsampled pixels as palette indices (iGPT)          :mod:`.palette`
vq         code indices of a trained VQ-VAE (DALL-E / BEiT)     :mod:`.vqvae`
hybrid     positions of a ResNet feature map (ViT sec. 3.1)     :mod:`.hybrid`
=========  ===================================================  ==================================

Pick one with ``create_model("vit_micro_patch4_32", tokenizer="pixel", tokenizer_args={...})``,
or on the command line::

    vitlens train-tokenizer --data cifar10 --data-dir ../shared/data/cifar10 --out runs/vq
    vitlens train --tokenizer vq \
        --model-args '{"tokenizer_args": {"checkpoint": "runs/vq/tokenizer.safetensors"}}'

Every tokenizer takes the images the ViT takes (dataset-normalised, (B, 3, H, W)) and returns
(B, N, embed_dim); the ViT adds [CLS] and position embeddings. Each exposes ``num_patches``,
``grid_size`` (h, w), ``patch_size`` (input pixels per token, used by attention-distance
analyses) and ``img_size``. Whatever a tokenizer holds (palette, frozen VQ weights, ResNet
stages) is in the model's ``state_dict``, so a saved ViT reloads with its exact tokenizer.

``tokenizer_args`` per tokenizer:

* pixel: ``palette`` (a ``vitlens train-tokenizer --kind palette`` file; None -> fixed uniform
  palette, with a warning), ``k`` (512), ``resolution`` (16), ``mean``/``std``.
* vq: ``checkpoint`` (a ``vitlens train-tokenizer --kind vq`` file), ``mean``/``std``.
* hybrid: ``layers`` ((1, 1, 1)), ``widths`` ((32, 64, 128)), ``block``, ``stem`` ('cifar'),
  ``patch`` (1) or ``grid``.

``mean``/``std`` are the statistics the inputs were normalised with (CIFAR-10's by default).
"""

from __future__ import annotations

from torch import nn

from ...errors import ModelError
from ...layers import PatchEmbed
from .hybrid import HybridEmbed, build_hybrid_tokenizer
from .palette import (
    PixelTokenizer,
    assign_palette,
    build_pixel_tokenizer,
    fit_palette,
    load_palette,
    save_palette,
    uniform_palette,
)
from .vqvae import VQVAE, VQTokenizer, VQVAEConfig, build_vq_tokenizer, load_vqvae, psnr, save_vqvae

TOKENIZERS = ("patch", "pixel", "vq", "hybrid")

__all__ = [
    "TOKENIZERS",
    "build_image_tokenizer",
    "HybridEmbed",
    "PixelTokenizer",
    "VQTokenizer",
    "VQVAE",
    "VQVAEConfig",
    "assign_palette",
    "fit_palette",
    "load_palette",
    "save_palette",
    "uniform_palette",
    "load_vqvae",
    "save_vqvae",
    "psnr",
]


_BUILDERS = {"pixel": build_pixel_tokenizer, "vq": build_vq_tokenizer, "hybrid": build_hybrid_tokenizer}


def build_image_tokenizer(cfg) -> nn.Module:
    """The tokenizer module a ``ViTConfig`` asks for (``cfg.tokenizer``, ``cfg.tokenizer_args``).

    The one place a ViT's tokenizer (``patch_embed``) is built, the plain patch projection included.
    """
    if cfg.tokenizer == "patch":
        return PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, bias=cfg.patch_bias)
    if cfg.tokenizer not in _BUILDERS:
        raise ModelError(f"unknown tokenizer {cfg.tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    return _BUILDERS[cfg.tokenizer](cfg, dict(cfg.tokenizer_args or {}))
