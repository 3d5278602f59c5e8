"""Image classification on the harness (big_vision style: short, obvious, banner-commented sections).

    config -> data -> model -> optimiser/schedule -> [epoch: train, evaluate, checkpoint] -> summary

Exact resume: the data order comes from a sampler seeded by (seed, epoch), and every epoch
re-seeds the global RNG (dropout, stochastic depth, augmentation) with
``run_seed(seed, epoch, rank)``; a checkpoint after each epoch holds weights, optimiser, schedule
and EMA state. So a run killed at any point and resumed gives the same weights as one that
never stopped, on any number of processes.

The batches come from :func:`build_train_loader` alone (an iterable of ``(images, labels)`` with
``set_epoch`` and ``len``), so a loader that keeps the data on the device can take its place.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from ..errors import DataError, ModelError
from ..io import save_checkpoint
from ..models import create_model
from ..models.hub import is_peer_name, peer_config_fields, pretrained_stats
from ..models.loading import architecture_meta
from ..models.registry import is_registered, model_config_fields
from ..utils import eval_mode
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_sum, barrier
from .harness import (
    Run,
    count_params,
    param_groups,
    resolve_device,
    run_seed,
    split_batch,
    start_run,
    train_step,
)
from .precision import optimizer_options, want_channels_last
from .run_folder import BEST, LAST, is_finished, read_records
from .schedule import warmup_cosine

__all__ = [
    "BEST",
    "LAST",
    "build_train_loader",
    "evaluate",
    "is_finished",
    "model_overrides",
    "param_groups",
    "resolve_device",
    "train",
]


# The TrainConfig fields that ``vitlens.data.build_data`` takes as options of the same name.
DATA_OPTIONS = ("fraction", "seed", "img_size", "augment", "randaugment", "random_erasing", "on_corrupt")


# ------------------------------------------------------------------------------- pieces
def model_fields(name: str) -> set[str]:
    """The config fields of model ``name`` (empty for a builder registered without a config class;
    for ``timm:``/``torchvision:``/``hf:`` names, the keyword arguments its builder takes)."""
    if is_peer_name(name):
        return peer_config_fields(name)
    try:
        return model_config_fields(name)
    except ModelError:
        if is_registered(name):
            return set()
        raise


def model_overrides(
    cfg: TrainConfig,
    num_classes: int,
    img_size: int,
    in_chans: int,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> dict:
    """The keyword arguments given to ``create_model``: the data decides classes, size and statistics."""
    args = {"num_classes": num_classes, **cfg.model_args}
    fields = model_fields(cfg.model)
    if "img_size" in fields and "img_size" not in cfg.model_args:
        args["img_size"] = img_size  # ViTs are built for the data's resolution
    if "in_chans" in fields and in_chans != 3:
        args["in_chans"] = in_chans
    if cfg.tokenizer:
        args["tokenizer"] = cfg.tokenizer
        if cfg.tokenizer in ("pixel", "vq") and mean is not None and std is not None:
            # Pixel and VQ tokenizers un-normalise their input back to [0, 1] colours, so they
            # must know the statistics this data was normalised with (user values win).
            targs = dict(args.get("tokenizer_args") or {})
            targs.setdefault("mean", tuple(mean))
            targs.setdefault("std", tuple(std))
            args["tokenizer_args"] = targs
    return args


def input_stats(cfg: TrainConfig) -> dict | None:
    """The mean/std to normalise the images with when they are not the data's own: fine-tuning
    pretrained weights feeds them the statistics they were trained with (``{"mean", "std",
    "source"}``, :func:`vitlens.models.hub.pretrained_stats`); ``None``: the data's statistics."""
    return pretrained_stats(cfg.model, cfg.pretrained) if cfg.pretrained else None


def stats_message(cfg: TrainConfig, info, weights_stats: dict | None) -> str:
    """The one line that says which statistics a pretrained fine-tune normalises with, and why."""

    def fmt(values) -> str:
        return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"

    stats = f"mean {fmt(info.mean)} std {fmt(info.std)}"
    if weights_stats is not None:
        return (
            f"fine-tuning pretrained {cfg.model}: images normalised with {stats}, the statistics its "
            f"weights were trained with ({weights_stats['source']}), not {cfg.data}'s own"
        )
    return (
        f"fine-tuning pretrained {cfg.model}: the statistics its weights were trained with are unknown "
        f"(no pretrained cfg), so images are normalised with {cfg.data}'s own {stats}"
    )


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    fused = optimizer_options(next(model.parameters()).device)  # one kernel for all tensors
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, **fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), **fused)


def count_flops(model: nn.Module, img_size: int, in_chans: int, device: torch.device) -> int:
    """FLOPs of one forward pass on one image (multiply-add = 2 FLOPs), via PyTorch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_chans, img_size, img_size, device=device))
    return int(counter.get_total_flops())


class EpochLoader:
    """A DataLoader over a DistributedSampler: ``set_epoch`` reshuffles, ``len`` counts batches."""

    def __init__(self, loader: DataLoader, sampler: DistributedSampler):
        self.loader, self.sampler = loader, sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def build_train_loader(
    train_ds, cfg: TrainConfig, dinfo: DistInfo, device: torch.device, local_bs: int
) -> EpochLoader:
    """This process's training batches ``(images, labels)``: seeded by (seed, epoch), sharded across
    processes, ``local_bs`` images each. Decoded data that fits stays on the device
    (``cfg.data_path``, data/device_loader.py): same order, sharding and drop rule, batched augmentation."""
    from ..data.device_loader import DeviceLoader, resolve_data_path

    if resolve_data_path(cfg.data_path, train_ds, device, cfg.num_workers) == "device":
        return DeviceLoader(
            train_ds, local_bs, device=device, seed=cfg.seed, world_size=dinfo.world_size, rank=dinfo.rank
        )
    sampler = DistributedSampler(
        train_ds, num_replicas=dinfo.world_size, rank=dinfo.rank, shuffle=True, seed=cfg.seed
    )
    # A final batch of one sample breaks BatchNorm; drop it only then, so small subsets still train.
    drop_last = len(sampler) % local_bs == 1
    loader = DataLoader(
        train_ds,
        batch_size=local_bs,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=drop_last,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
    )
    return EpochLoader(loader, sampler)


# ------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    *,
    batch_size: int,
    device: torch.device,
    amp_dtype=None,
    dist_info: DistInfo | None = None,
    num_workers: int = 0,
    progress: bool = False,
    data_path: str = "dataloader",
    tta: str | None = None,
) -> dict:
    """Top-1 / top-5 accuracy and loss. Under DDP each rank takes every world_size-th image and
    the counts are summed, so the result is exact (no padded duplicates)."""
    from ..data.device_loader import DeviceLoader, resolve_data_path

    dist_info = dist_info or DistInfo()
    if resolve_data_path(data_path, dataset, device, num_workers) == "device":
        loader = DeviceLoader(
            dataset, batch_size, device=device, shuffle=False, world_size=dist_info.world_size,
            rank=dist_info.rank,
        )
    else:
        if dist_info.enabled:
            dataset = Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    # Sums stay on the device and are read once at the end: a read per batch would make a GPU wait
    # for every batch before queueing the next (MPS has no float64).
    sums = torch.zeros(3, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    n = 0
    with eval_mode(model):
        for images, labels in tqdm(loader, desc="eval", leave=False, disable=not progress):
            images, labels = images.to(device), labels.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images).float()
                if tta == "flip":  # mean of the logits of the image and its mirror
                    logits = (logits + model(images.flip(-1)).float()) / 2
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            sums += torch.stack([
                F.cross_entropy(logits, labels, reduction="sum").to(sums.dtype),
                (top[:, 0] == labels).sum().to(sums.dtype),
                (top == labels[:, None]).any(dim=1).sum().to(sums.dtype),
            ])
            n += len(labels)
    loss_sum, correct1, correct5 = sums.tolist()
    correct1, correct5, loss_sum, n = all_reduce_sum([correct1, correct5, loss_sum, n], dist_info, device)
    return {
        "top1": 100 * correct1 / max(n, 1),
        "top5": 100 * correct5 / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "n": int(n),
    }


# ------------------------------------------------------------------------------- training
def train(cfg: TrainConfig, *, resume: bool = False, overrides: dict | None = None) -> dict:
    """Train ``cfg.model`` on ``cfg.data``; returns the summary also written to RUN/summary.json.

    ``resume``: continue the run in ``cfg.out`` (its config.json must equal ``cfg``);
    ``overrides``: deliberate changes of a resumed run (``{"epochs": 20}``; see harness.OVERRIDABLE_KEYS).
    """
    from ..data import build_batch_mixer, build_data

    run = start_run(cfg, resume=resume, overrides=overrides, counter="epoch")
    cfg, device, dinfo = run.cfg, run.device, run.dist
    local_bs = split_batch(cfg.batch_size, run)

    # ---- data: the training split is a class-balanced nested fraction; the test split is whole.
    # Both are normalised with the data's statistics, or a pretrained model's own (input_stats).
    torch.manual_seed(cfg.seed)
    weights_stats = input_stats(cfg)
    norm = {"mean": weights_stats["mean"], "std": weights_stats["std"]} if weights_stats else {}
    train_ds, test_ds, info = build_data(
        cfg.data, cfg.data_dir, **{k: getattr(cfg, k) for k in DATA_OPTIONS}, **norm
    )
    loader = build_train_loader(train_ds, cfg, dinfo, device, local_bs)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise DataError(
            f"no training batches: {len(train_ds)} images for batch size {cfg.batch_size}; "
            "lower --batch-size or raise --fraction"
        )
    mixer = build_batch_mixer(info.num_classes, cfg.mixup, cfg.cutmix)

    # ---- model, optimiser, schedule, EMA
    margs = model_overrides(cfg, info.num_classes, info.img_size, info.in_chans, info.mean, info.std)
    model = create_model(cfg.model, pretrained=cfg.pretrained, **margs).to(device)
    if cfg.pretrained and run.is_main:
        print(stats_message(cfg, info, weights_stats), file=sys.stderr)
    if want_channels_last(cfg.channels_last, model):
        model = model.to(memory_format=torch.channels_last)
    n_params = count_params(model)
    flops = count_flops(model, info.img_size, info.in_chans, device)
    optimizer = build_optimizer(model, cfg)
    scheduler = warmup_cosine(
        optimizer,
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        base_lr=cfg.lr,
        min_lr=cfg.min_lr,
    )
    ema = None
    if cfg.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    scaler = run.grad_scaler()
    meta = {
        "model": cfg.model,
        "model_args": margs,
        "classes": info.classes,
        "img_size": info.img_size,
        "in_chans": info.in_chans,
        "mean": list(info.mean),
        "std": list(info.std),
        "data": cfg.data,
        # where mean/std come from when not the data's own (the analyses normalise the same way)
        **({"normalization": weights_stats["source"]} if weights_stats else {}),
        # a timm:/torchvision: model converted to a vitlens module is rebuilt from its architecture
        **(architecture_meta(model) if is_peer_name(cfg.model) else {}),
    }
    state = run.restore(model, optimizer, scheduler, scaler)
    if ema is not None and state:
        ema.load_state_dict(state["ema"])
    best_top1, train_time = state.get("best_top1", -1.0), state.get("train_time", 0.0)
    run.open(meta)

    step_model = run.wrap(model)
    if cfg.compile:
        step_model = torch.compile(step_model)

    # ---- epochs
    epochs_this_run = 0
    for epoch in range(run.resumed_at, cfg.epochs):
        torch.manual_seed(run_seed(cfg.seed, epoch, dinfo.rank))
        loader.set_epoch(epoch)
        model.train()
        stats, epoch_time = train_epoch(
            run, step_model, model, loader, optimizer, scheduler, scaler, ema, mixer, epoch
        )
        train_time += epoch_time
        record = epoch_record(run, epoch, steps_per_epoch, scheduler, stats, epoch_time)
        is_last = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.eval_every == 0 or is_last:
            record.update(evaluate_epoch(run, model, ema, test_ds, local_bs))
        run.log_record(record)

        # ---- checkpoint (main process; atomic, so a kill here keeps the previous one)
        top1 = record.get("test_top1", -1.0)
        if run.is_main and top1 > best_top1:
            save_checkpoint(
                run.dir / BEST, model.state_dict(), meta={**meta, "epoch": epoch + 1, "test_top1": top1}
            )
        best_top1 = max(best_top1, top1)
        extra = {
            "ema": ema.state_dict() if ema is not None else None,
            "best_top1": best_top1,
            "train_time": train_time,
        }
        epochs_this_run += 1
        stop_early = cfg.stop_after_epochs and epochs_this_run >= cfg.stop_after_epochs
        leaving = not is_last and (stop_early or run.out_of_time())
        # Every checkpoint_every epochs (many tiny epochs of a small fraction would spend their time
        # writing files), and always at the end or when leaving early, so a resume never loses work.
        if is_last or leaving or (epoch + 1) % cfg.checkpoint_every == 0:
            run.save_checkpoint(
                model, optimizer, scheduler, meta=meta, count=epoch + 1, scaler=scaler, extra=extra
            )
        barrier(dinfo)
        if leaving:
            run.close()
            return {"finished": False, "epoch": epoch + 1}

    # ---- summary
    records = read_records(run.dir / "metrics.jsonl") if run.is_main else []
    last = records[-1] if records else {}
    summary = {
        "finished": True,
        "model": cfg.model,
        "params": n_params,
        "flops_per_image": flops,
        "train_images": len(train_ds),
        "epochs": cfg.epochs,
        "steps": scheduler.last_epoch,  # optimiser steps, across resumes
        "images_seen": sum(r.get("images", 0) for r in records),  # images trained on, every epoch counted
        "train_time_s": train_time,
        "img_per_s": last.get("img_per_s"),
        "test_top1": last.get("test_top1"),
        "test_top5": last.get("test_top5"),
        "best_test_top1": best_top1,
        "ema_test_top1": last.get("ema_test_top1"),
        "device": str(device),
        "world_size": dinfo.world_size,
    }
    return run.finish(summary)


def train_epoch(run: Run, step_model, model, loader, optimizer, scheduler, scaler, ema, mixer, epoch: int):
    """One pass over ``loader``; returns the summed (loss, correct, seen) of this process and the time.

    The step's loss and correct count stay on the device; they are read once at the end of the epoch
    (and by the progress bar at most once a second), so a GPU never waits for the host between steps."""
    cfg = run.cfg
    channels_last = want_channels_last(cfg.channels_last, model)
    fix = "lower --lr or use --amp fp32"
    fix += "" if cfg.grad_clip else ", or clip the gradients (--grad-clip 1.0)"
    losses, corrects, sizes = [], [], []
    t0 = shown = time.perf_counter()
    bar = run.progress(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
    for images, labels in bar:
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = labels
        if mixer is not None:
            images, targets = mixer(images, labels)

        def forward(images=images, targets=targets):
            logits = step_model(images)
            return F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing), logits

        loss, logits = train_step(
            run,
            forward,
            optimizer,
            scheduler,
            params=model.parameters(),
            grad_clip=cfg.grad_clip,
            scaler=scaler,
            where=f"epoch {epoch + 1}",
            fix=fix,
        )
        if ema is not None:
            ema.update_parameters(model)
        losses.append(loss.detach())
        corrects.append((logits.argmax(1) == labels).sum())
        sizes.append(len(labels))
        now = time.perf_counter()
        if not bar.disable and (now - shown >= 1.0 or len(sizes) == len(loader)):
            shown = now
            loss_sum, _, seen = epoch_sums(losses, corrects, sizes)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}",
                img_s=f"{seen * run.dist.world_size / (now - t0):.0f}",
                lr=f"{scheduler.get_last_lr()[0]:.2e}",
            )
    return epoch_sums(losses, corrects, sizes), time.perf_counter() - t0


def epoch_sums(losses: list, corrects: list, sizes: list[int]) -> tuple[float, float, float]:
    """(loss x images, correct, images) summed over the steps so far, in step order: one host read."""
    loss_sum = correct = seen = 0.0
    if not sizes:
        return loss_sum, correct, seen
    for loss, right, n in zip(torch.stack(losses).tolist(), torch.stack(corrects).tolist(), sizes):
        loss_sum += loss * n
        correct += right
        seen += n
    return loss_sum, correct, seen


def epoch_record(run: Run, epoch: int, steps_per_epoch: int, scheduler, stats, epoch_time: float) -> dict:
    loss_sum, correct, seen = all_reduce_sum(list(stats), run.dist, run.device)
    return {
        "epoch": epoch + 1,
        "step": (epoch + 1) * steps_per_epoch,
        "lr": scheduler.get_last_lr()[0],
        "train_loss": loss_sum / seen,
        "train_acc": 100 * correct / seen,
        "img_per_s": seen / epoch_time,
        "epoch_time_s": epoch_time,
        "images": int(seen),  # training images this epoch, all processes
    }


def evaluate_epoch(run: Run, model, ema, test_ds, local_bs: int) -> dict:
    """Test top-1/top-5/loss of the model (and of its EMA) for the epoch's record."""

    def on_test(m: nn.Module) -> dict:
        return evaluate(
            m,
            test_ds,
            batch_size=local_bs * 2,
            device=run.device,
            amp_dtype=run.amp_dtype,
            dist_info=run.dist,
            num_workers=run.cfg.num_workers,
            data_path=run.cfg.data_path,
            tta=run.cfg.tta,
        )

    ev = on_test(model)
    out = {"test_top1": ev["top1"], "test_top5": ev["top5"], "test_loss": ev["loss"]}
    if ema is not None:
        ev_ema = on_test(ema.module)
        out.update({"ema_test_top1": ev_ema["top1"], "ema_test_top5": ev_ema["top5"]})
    return out
