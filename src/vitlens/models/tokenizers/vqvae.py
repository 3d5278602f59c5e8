"""A VQ-VAE (van den Oord et al. 2017): conv encoder -> nearest codebook vector -> conv decoder.

The image tokenizer of DALL-E / BEiT in its simplest form. An image is encoded to a grid of
``code_dim`` vectors (downsampled ``downsample`` times), each replaced by the nearest of
``codebook_size`` learned vectors; the decoder rebuilds the image from those. The *indices*
of the chosen vectors are the image's tokens: a 32x32 image at downsample 4 becomes 8x8 = 64
integers in [0, codebook_size).

Two ways to learn the codebook, both with the straight-through estimator for the encoder:
- ``ema=True`` (default): codebook vectors are exponential moving averages of the encoder
  outputs assigned to them (k-means in mini-batches; van den Oord et al. appendix, Razavi et
  al. 2019). Stable and needs no codebook loss.
- ``ema=False``: the codebook is an ``nn.Parameter`` trained by gradient on the codebook loss
  ``||sg(z) - e||^2``.
Either way, codes nobody picks ("dead codes") are restarted at random encoder outputs of the
current batch (Dhariwal et al. 2020, Jukebox), which keeps most of the codebook in use.

Images enter and leave in [0, 1] pixel space (not dataset-normalised), so PSNR is measured
on the scale everyone reports it in.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError, ModelError
from ...utils import to_2tuple
from .common import Unnormalize, input_stats


@dataclass
class VQVAEConfig:
    in_chans: int = 3
    hidden: int = 128  # channels of the conv trunk
    res_hidden: int = 64  # bottleneck channels inside the residual blocks
    num_res_blocks: int = 2
    downsample: int = 4  # image side / code-grid side; a power of 2
    code_dim: int = 64
    codebook_size: int = 512
    ema: bool = True
    decay: float = 0.99  # EMA decay of the codebook statistics
    commitment: float = 0.25  # beta: pulls encoder outputs towards their code
    dead_threshold: float = 1.0  # a code whose EMA count per batch falls below this is restarted

    def __post_init__(self):
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ModelError(f"downsample must be a power of 2 (1, 2, 4, 8, ...), got {self.downsample}")
        if self.codebook_size < 2:
            raise ModelError(f"codebook_size must be at least 2, got {self.codebook_size}")


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): the residual unit of the original VQ-VAE."""

    def __init__(self, ch: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n_down = int(math.log2(cfg.downsample))
        layers: list[nn.Module] = []
        cin = cfg.in_chans
        for i in range(n_down):  # each 4x4 stride-2 conv halves the resolution
            cout = cfg.hidden if i == n_down - 1 else cfg.hidden // 2
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
            cin = cout
        layers.append(nn.Conv2d(cin, cfg.hidden, 3, padding=1))
        layers += [ResBlock(cfg.hidden, cfg.res_hidden) for _ in range(cfg.num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(cfg.hidden, cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 3, H, W) -> (B, code_dim, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        n_up = int(math.log2(cfg.downsample))
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, cfg.hidden, 3, padding=1)]
        layers += [ResBlock(cfg.hidden, cfg.res_hidden) for _ in range(cfg.num_res_blocks)]
        layers.append(nn.ReLU())
        cin = cfg.hidden
        for i in range(n_up):  # 4x4 stride-2 transposed convs double the resolution
            last = i == n_up - 1
            cout = cfg.in_chans if last else cfg.hidden // 2
            layers.append(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            cin = cout
        if n_up == 0:
            layers.append(nn.Conv2d(cin, cfg.in_chans, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # (B, code_dim, h, w) -> (B, 3, H, W)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup in a codebook, with EMA or gradient updates and dead-code restarts.

    Buffers: ``cluster_size`` (K,) is the EMA of how many vectors each code received per batch
    (kept in both modes: it is how dead codes are found); ``embed_sum`` (K, d) the EMA of their
    sum (EMA mode only); ``initialized`` flags the data-dependent initialisation (the first
    training batch seeds the codebook with random encoder outputs, so no code starts far away
    from the data and dead).
    """

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        K, d = cfg.codebook_size, cfg.code_dim
        init = torch.randn(K, d) / math.sqrt(d)
        if cfg.ema:
            self.register_buffer("codebook", init)
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("cluster_size", torch.ones(K))
        self.register_buffer("initialized", torch.tensor(False))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N,) index of the closest code, by ||z||^2 - 2 z.e + ||e||^2."""
        e = self.codebook.detach()
        dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)[None]  # (N, K)
        return dist.argmin(1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """z (B, d, h, w) -> (quantised z with straight-through gradient, indices (B, h, w), loss, stats)."""
        B, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, d)
        if self.training and not bool(self.initialized):
            self._restart(torch.ones(self.cfg.codebook_size, dtype=torch.bool), flat.detach())
            self.initialized.fill_(True)
        idx = self.nearest(flat.detach())
        zq = self.codebook[idx]  # (N, d); carries gradient to the codebook in the non-EMA mode
        counts = torch.bincount(idx, minlength=self.cfg.codebook_size).float()
        if self.training:
            self._update(flat.detach(), idx, counts)
        loss = self.cfg.commitment * F.mse_loss(flat, zq.detach())
        if not self.cfg.ema:
            loss = loss + F.mse_loss(zq, flat.detach())
        zq = flat + (zq - flat).detach()  # straight-through: forward uses zq, backward copies dL/dzq to z
        probs = counts / counts.sum()
        stats = {
            "perplexity": torch.exp(-(probs * torch.log(probs + 1e-10)).sum()).item(),
            "codes_used": int((counts > 0).sum()),
        }
        zq = zq.view(B, h, w, d).permute(0, 3, 1, 2)  # (B, d, h, w)
        return zq, idx.view(B, h, w), loss, stats

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        decay = self.cfg.decay
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        if self.cfg.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, flat)  # (K, d)
            self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            # Laplace smoothing keeps codes with ~0 count from dividing by zero.
            n = self.cluster_size.sum()
            size = (self.cluster_size + 1e-5) / (n + self.cfg.codebook_size * 1e-5) * n
            self.codebook.copy_(self.embed_sum / size[:, None])
        dead = self.cluster_size < self.cfg.dead_threshold
        if dead.any():
            self._restart(dead, flat)

    @torch.no_grad()
    def _restart(self, dead: torch.Tensor, flat: torch.Tensor) -> None:
        """Move the ``dead`` codes onto random encoder outputs of this batch."""
        n_dead = int(dead.sum())
        pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        new = flat[pick]
        self.codebook.data[dead] = new
        self.cluster_size[dead] = self.cfg.dead_threshold
        if self.cfg.ema:
            self.embed_sum[dead] = new * self.cfg.dead_threshold


class VQVAE(nn.Module):
    """Encoder + VectorQuantizer + Decoder. ``encode`` gives token indices, ``decode_indices`` images."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """x in [0, 1], (B, 3, H, W) -> (reconstruction, indices (B, h, w), VQ loss, stats)."""
        z = self.encoder(x - 0.5)  # centre the inputs; the decoder adds the 0.5 back
        zq, idx, vq_loss, stats = self.quantizer(z)
        return self.decoder(zq) + 0.5, idx, vq_loss, stats

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) -> code indices (B, H/f, W/f)."""
        return encode_indices(self.encoder, self.quantizer, x)

    @torch.no_grad()
    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) -> images in [0, 1] (B, 3, H, W)."""
        zq = self.quantizer.codebook[idx].permute(0, 3, 1, 2)  # (B, d, h, w)
        return (self.decoder(zq) + 0.5).clamp(0, 1)

    def config_dict(self) -> dict:
        return asdict(self.cfg)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [0, 1], one value per image."""
    mse = (x.clamp(0, 1) - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def encode_indices(encoder: Encoder, quantizer: VectorQuantizer, x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) -> code indices (B, H/f, W/f)."""
    z = encoder(x - 0.5)
    B, d, h, w = z.shape
    return quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(B, h, w)


# -- files ------------------------------------------------------------------------------------
def save_vqvae(path: str | Path, model: VQVAE, meta: dict | None = None) -> None:
    """Write a trained VQ-VAE as a vitlens safetensors checkpoint; the config goes in the metadata."""
    from ...io import save_checkpoint

    save_checkpoint(
        path, model.state_dict(), meta={"kind": "vqvae", "config": model.config_dict(), **(meta or {})}
    )


def load_vqvae(path: str | Path) -> tuple[VQVAE, dict]:
    """``(model in eval mode, meta)`` from a :func:`save_vqvae` / ``vitlens train-tokenizer`` file."""
    from ...io import load_checkpoint

    state, meta, _ = load_checkpoint(path)
    if meta.get("kind") != "vqvae":
        raise CheckpointError(
            f"{path} is not a VQ-VAE tokenizer (kind {meta.get('kind')!r}); train one with "
            "`vitlens train-tokenizer --kind vq --out DIR` and use DIR/tokenizer.safetensors"
        )
    model = VQVAE(VQVAEConfig(**meta["config"]))
    model.load_state_dict(state)
    return model.eval(), meta


# -- the ViT's tokenizer ----------------------------------------------------------------------
class VQTokenizer(nn.Module):
    """Normalised images (B, 3, H, W) -> frozen VQ-VAE encoder + codebook -> indices -> learned embedding.

    Only the lookup table ``embed`` (K, D) trains; the encoder and codebook are frozen (no
    gradient, always in eval mode), as BEiT's tokenizer is. They are still part of the
    state dict, so a saved ViT carries the exact tokenizer it was trained with.
    """

    def __init__(self, img_size, embed_dim: int, vq: VQVAE, mean=None, std=None):
        super().__init__()
        self.patch_size = (vq.cfg.downsample, vq.cfg.downsample)
        self.set_image_size(img_size)
        self.encoder, self.quantizer = vq.encoder, vq.quantizer  # the decoder is not needed
        for p in [*self.encoder.parameters(), *self.quantizer.parameters()]:
            p.requires_grad_(False)
        self.unnormalize = Unnormalize(mean, std)  # mean/std None: CIFAR-10's
        self.embed = nn.Embedding(vq.cfg.codebook_size, embed_dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.train()

    def set_image_size(self, img_size) -> None:
        """The conv encoder takes any size divisible by its downsampling; the token grid follows."""
        img_size, f = to_2tuple(img_size), self.patch_size[0]
        if img_size[0] % f or img_size[1] % f:
            raise ModelError(f"image size {img_size} is not divisible by the VQ-VAE's downsampling {f}")
        self.img_size = img_size
        self.grid_size = (img_size[0] // f, img_size[1] // f)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: no codebook EMA updates, no restarts
        self.quantizer.eval()
        return self

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> code indices (B, h, w)."""
        if x.dim() != 4:
            raise ModelError(
                f"VQ tokenizer expects a batch of images (B, 3, H, W), got shape {tuple(x.shape)}"
            )
        if tuple(x.shape[-2:]) != self.img_size:
            (h, w), (H, W) = self.img_size, tuple(x.shape[-2:])
            raise ModelError(
                f"VQ tokenizer built for {h}x{w} images, got {H}x{W}; resize the images or call "
                f"set_image_size(({H}, {W}))"
            )
        return encode_indices(self.encoder, self.quantizer, self.unnormalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.tokenize(x).flatten(1))  # (B, h*w, D)


def build_vq_tokenizer(cfg, args: dict) -> VQTokenizer:
    """From ``tokenizer_args``: ``checkpoint`` (a ``vitlens train-tokenizer`` output), ``mean``/``std``.

    Without a checkpoint the VQ-VAE is randomly initialised (config from ``vq_config``, else
    the defaults), with a warning: right only when a state dict with the trained tokenizer is
    loaded afterwards (or to probe a config, as the trainer does).
    """
    mean, std = input_stats(args)
    path = args.get("checkpoint")
    if path:
        vq, _ = load_vqvae(path)
    else:
        warnings.warn(
            "vq tokenizer: no tokenizer_args['checkpoint'], so its encoder and codebook are random; train "
            "one with `vitlens train-tokenizer --kind vq --out DIR` and pass tokenizer_args={'checkpoint': "
            "'DIR/tokenizer.safetensors'} (fine if a trained state dict is loaded next)",
            stacklevel=3,
        )
        vq_cfg = dict(args.get("vq_config", {}))
        known = {f.name for f in fields(VQVAEConfig)}
        if unknown := sorted(set(vq_cfg) - known):
            raise ModelError(f"unknown vq_config keys {unknown}; valid: {sorted(known)}")
        vq = VQVAE(VQVAEConfig(**vq_cfg))
    return VQTokenizer(cfg.img_size, cfg.embed_dim, vq, mean, std)
