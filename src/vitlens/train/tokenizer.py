"""Train an image tokenizer on a dataset: a VQ-VAE (``kind='vq'``) or a k-means palette (``kind='palette'``).

    images (uint8) -> [epoch: AdamW on MSE(recon) + commitment; EMA codebook; dead-code restarts]
                   -> test PSNR, codebook usage, perplexity -> metrics.jsonl, tokenizer.safetensors

``vitlens train-tokenizer`` is this module's command line. The output folder then holds
``tokenizer.safetensors`` (or ``palette.safetensors``), ``metrics.jsonl`` (one JSON record per
epoch), ``summary.json`` and ``recon.png`` (test images over their reconstructions).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import Config
from ..errors import ConfigError, DataError, ResumeError
from ..models.tokenizers.palette import assign_palette, fit_palette, save_palette
from ..models.tokenizers.vqvae import VQVAE, VQVAEConfig, load_vqvae, save_vqvae
from ..utils import eval_mode
from .harness import Run, count_params, start_run, train_step
from .run_folder import write_json
from .schedule import warmup_cosine


@dataclass
class TokenizerTrainConfig(Config):
    kind: str = "vq"  # 'vq' | 'palette'
    data: str = "cifar10"
    data_dir: str | None = None
    out: str = "runs/tokenizer"
    fraction: float = 1.0  # class-balanced share of the training split
    seed: int = 0
    # VQ-VAE model
    codebook_size: int = 512
    code_dim: int = 64
    hidden: int = 128
    res_hidden: int = 32
    num_res_blocks: int = 2
    downsample: int = 4
    ema: bool = True
    commitment: float = 0.25
    # VQ-VAE optimisation
    epochs: int = 5
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 200
    hflip: bool = True
    # stop after the epoch that exceeds this many minutes (the schedule still spans `epochs`)
    time_budget_min: float | None = None
    init: str | None = None  # start from this tokenizer file (same model options), with a fresh schedule
    eval_images: int | None = None  # test images (evenly spaced) for the per-epoch metrics; None = all
    # palette
    k: int = 512
    palette_iters: int = 10
    palette_sample: int = 200_000
    progress: bool = True

    def __post_init__(self):
        if self.kind not in ("vq", "palette"):
            raise ConfigError(f"kind must be 'vq' or 'palette', got {self.kind!r}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        for name in ("epochs", "batch_size", "k", "palette_iters", "palette_sample", "codebook_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError("lr must be positive, warmup_steps and weight_decay non-negative")

    def vq_config(self) -> VQVAEConfig:
        names = {f.name for f in fields(VQVAEConfig)}
        return VQVAEConfig(**{k: v for k, v in asdict(self).items() if k in names})


def load_images(data: str, split: str, data_dir=None, fraction: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A split as one uint8 (N, 3, H, W) tensor, via ``vitlens.data.build_dataset`` (decoded once, cached)."""
    from ..data import build_dataset, nested_fraction_indices

    ds = build_dataset(data, split, data_dir)
    images = ds.images if hasattr(ds, "images") else torch.stack([ds[i][0] for i in range(len(ds))])
    if fraction < 1:
        images = images[torch.as_tensor(nested_fraction_indices(ds.targets, fraction, seed))]
    return images


def spread(images: torch.Tensor, n: int | None) -> torch.Tensor:
    """``n`` evenly spaced items (all if ``n`` is None): test splits are often stored class by class,
    so the first ``n`` would cover only the first classes."""
    if not n or n >= len(images):
        return images
    return images[torch.linspace(0, len(images) - 1, n).round().long()]


@torch.no_grad()
def evaluate_vq(model: VQVAE, images: torch.Tensor, batch_size: int = 500) -> dict:
    """Reconstruction PSNR (dB; of the mean MSE, and the mean of per-image values), codebook usage and
    perplexity of the code distribution over ``images`` (uint8 (N, 3, H, W))."""
    K = model.cfg.codebook_size
    counts = torch.zeros(K)
    mse = []
    with eval_mode(model):
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].float() / 255
            recon, idx, _, _ = model(x)
            mse.append((recon.clamp(0, 1) - x).pow(2).flatten(1).mean(1))
            counts += torch.bincount(idx.flatten(), minlength=K).float()
    mse = torch.cat(mse)
    p = counts / counts.sum()
    return {
        "psnr": 10 * math.log10(1 / max(mse.mean().item(), 1e-10)),  # a perfect reconstruction: 100 dB
        "psnr_per_image": (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item(),
        "mse": mse.mean().item(),
        "codebook_usage": 100 * (counts > 0).float().mean().item(),
        "perplexity": math.exp(-(p * torch.log(p + 1e-10)).sum().item()),
    }


def train_tokenizer(
    cfg: TokenizerTrainConfig, *, resume: bool = False, overrides: dict | None = None
) -> dict:
    """Run ``cfg``; returns the summary also written to OUT/summary.json.

    ``resume``: continue a VQ-VAE run from its last epoch (``overrides`` as for
    :func:`vitlens.train.train`, e.g. ``{"epochs": 10}``).
    """
    if resume and cfg.kind == "palette":
        raise ResumeError(
            "a palette is fitted in one go; there is nothing to resume (run it again without --resume)"
        )
    run = start_run(cfg, resume=resume, overrides=overrides, counter="epoch", distributed=False)
    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    train = load_images(cfg.data, "train", cfg.data_dir, cfg.fraction, cfg.seed)
    test = load_images(cfg.data, "test", cfg.data_dir)
    summary = _fit_palette(run, train, test) if cfg.kind == "palette" else _train_vq(run, train, test)
    # A VQ-VAE cut short by its time budget is still a usable tokenizer: its summary is written too.
    write_json(run.dir / "summary.json", summary)
    run.close()
    return summary


def _fit_palette(run: Run, train: torch.Tensor, test: torch.Tensor) -> dict:
    cfg = run.cfg
    t0 = time.perf_counter()
    palette = fit_palette(train, k=cfg.k, seed=cfg.seed, iters=cfg.palette_iters, sample=cfg.palette_sample)
    # How faithful is "every pixel becomes its nearest palette colour"? (full resolution, test set)
    x = spread(test, cfg.eval_images).permute(0, 2, 3, 1).float()  # (N, H, W, 3)
    idx = assign_palette(x, palette)
    mse = ((palette[idx] - x) / 255).pow(2).mean().item()
    used = torch.unique(idx).numel()
    summary = {
        "kind": "palette",
        "k": cfg.k,
        "psnr": 10 * math.log10(1 / max(mse, 1e-10)),  # every colour in the palette: 100 dB, not a crash
        "colors_used_test": used,
        "fit_time_s": time.perf_counter() - t0,
        "train_images": len(train),
        "file": "palette.safetensors",
    }
    run.open()
    save_palette(run.dir / "palette.safetensors", palette, meta={"data": cfg.data, "psnr": summary["psnr"]})
    run.log.write(summary)
    return summary


def _vq_model(cfg: TokenizerTrainConfig) -> VQVAE:
    model = VQVAE(cfg.vq_config())
    if cfg.init:  # e.g. continue a run its time budget cut short, at a lower learning rate
        start, _ = load_vqvae(cfg.init)
        if start.cfg != model.cfg:
            raise ConfigError(
                f"--init {cfg.init} was trained with {start.cfg}, not this run's {model.cfg}; "
                "pass the same model options"
            )
        model.load_state_dict(start.state_dict())
    return model


def _train_vq(run: Run, train: torch.Tensor, test: torch.Tensor) -> dict:
    cfg = run.cfg
    model = _vq_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise DataError(
            f"{len(train)} training images are fewer than one batch of {cfg.batch_size}; lower --batch-size"
        )
    sched = warmup_cosine(
        opt, total_steps=cfg.epochs * steps_per_epoch, warmup_steps=cfg.warmup_steps, base_lr=cfg.lr
    )
    eval_set = spread(test, cfg.eval_images)
    meta = {"data": cfg.data, "train_images": len(train), "init": cfg.init}
    state = run.restore(model, opt, sched)
    if state:
        # One RNG stream runs through the whole fit (shuffles, flips, codebook restarts), as it
        # always has; the checkpoint carries it so that a resumed fit draws what an unbroken one would.
        torch.set_rng_state(state["rng"])
    train_time, record = state.get("train_time", 0.0), {}
    run.open(meta={"kind": "vqvae", "config": model.config_dict(), **meta})
    for epoch in range(run.resumed_at, cfg.epochs):
        sums, epoch_time = _vq_epoch(run, model, opt, sched, train, epoch, steps_per_epoch)
        train_time += epoch_time
        ev = evaluate_vq(model, eval_set)
        record = {
            "epoch": epoch + 1,
            "step": (epoch + 1) * steps_per_epoch,
            "lr": sched.get_last_lr()[0],
            "train_loss": sums["loss"] / steps_per_epoch,
            "train_psnr": 10 * math.log10(steps_per_epoch / sums["recon"]),
            "train_perplexity": sums["perplexity"] / steps_per_epoch,
            **{f"test_{k}": v for k, v in ev.items()},
            "img_per_s": steps_per_epoch * cfg.batch_size / epoch_time,
            "epoch_time_s": epoch_time,
        }
        run.log_record(record)
        save_vqvae(
            run.dir / "tokenizer.safetensors", model, meta={**meta, "epoch": epoch + 1, "metrics": record}
        )
        extra = {"rng": torch.get_rng_state(), "train_time": train_time}
        run.save_checkpoint(model, opt, sched, meta=meta, count=epoch + 1, extra=extra)
        if run.out_of_time():
            break
    if not record:  # resumed a finished fit: report what the file holds
        record = {
            "epoch": run.resumed_at,
            **{f"test_{k}": v for k, v in evaluate_vq(model, eval_set).items()},
        }
    final = {k: v for k, v in record.items() if k.startswith("test_")}
    if len(eval_set) < len(
        test
    ):  # the per-epoch figures used a subset; the summary uses the whole test split
        final = {f"test_{k}": v for k, v in evaluate_vq(model, test).items()}
    _save_recon_grid(model, test[:16], run.dir / "recon.png")
    return {
        "kind": "vq",
        "finished": record["epoch"] == cfg.epochs,
        "params": count_params(model),
        "epochs_done": record["epoch"],
        "train_images": len(train),
        "train_time_s": train_time,
        "test_images": len(test),
        **final,
        "file": "tokenizer.safetensors",
        "config": asdict(cfg.vq_config()),
    }


def _vq_epoch(run: Run, model: VQVAE, opt, sched, train: torch.Tensor, epoch: int, steps_per_epoch: int):
    """One shuffled pass: MSE reconstruction + the quantiser's loss; returns the sums and the time."""
    cfg = run.cfg
    model.train()
    perm = torch.randperm(len(train))
    sums = {"loss": 0.0, "recon": 0.0, "perplexity": 0.0}
    t0 = time.perf_counter()
    bar = run.progress(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
    for i in bar:
        x = train[perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]].float() / 255  # (B, 3, H, W) in [0, 1]
        if cfg.hflip:  # flip a random half of the batch
            flip = torch.rand(len(x)) < 0.5
            x[flip] = x[flip].flip(-1)

        def forward(x=x):
            recon, _, vq_loss, stats = model(x)
            recon_loss = F.mse_loss(recon, x)
            return recon_loss + vq_loss, (recon_loss, stats)

        loss, (recon_loss, stats) = train_step(
            run, forward, opt, sched, params=model.parameters(), grad_clip=None, where=f"epoch {epoch + 1}"
        )
        sums["loss"] += loss.item()
        sums["recon"] += recon_loss.item()
        sums["perplexity"] += stats["perplexity"]
        bar.set_postfix(
            psnr=f"{10 * math.log10(1 / max(recon_loss.item(), 1e-10)):.2f}",
            ppl=f"{stats['perplexity']:.0f}",
        )
    return sums, time.perf_counter() - t0


@torch.no_grad()
def _save_recon_grid(model: VQVAE, images: torch.Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    x = images.float() / 255
    with eval_mode(model):
        recon = model(x)[0].clamp(0, 1)
    save_image(torch.cat([x, recon]), str(path), nrow=len(x))
