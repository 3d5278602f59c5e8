"""The training loop (big_vision style: short, obvious, in banner-commented sections).

    config -> data -> model -> optimiser/schedule -> [epoch: train, evaluate, checkpoint] -> summary

Exact resume: the data order comes from a sampler seeded by (seed, epoch), and every
epoch re-seeds the global RNG (dropout, stochastic depth, augmentation) from
(seed, epoch, rank); a checkpoint after each epoch holds weights, optimiser, schedule and
EMA state. So a run killed at any point and resumed gives the same weights as one that
never stopped, on any number of processes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from ..models import create_model
from ..io import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed
from .schedule import warmup_cosine

LAST, BEST = "checkpoints/last.safetensors", "checkpoints/best.safetensors"


# ------------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None means full fp32. 'auto' takes bf16 where the GPU supports it and fp32 on CPU."""
    if amp == "fp32":
        return None
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 9_973 + rank * 101) % (2**31)


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
    # The probe only tells which config fields the model has; it is built without a tokenizer,
    # so it neither loads tokenizer files nor warns about an unfitted palette.
    probe_args = {k: v for k, v in args.items() if k not in ("tokenizer", "tokenizer_args")}
    probe = create_model(cfg.model, **probe_args)
    fields = probe.cfg.__dataclass_fields__ if hasattr(probe, "cfg") else {}
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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, position embeddings and special tokens (timm convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token")) else decay).append(
            p
        )
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def count_flops(model: nn.Module, img_size: int, in_chans: int, device: torch.device) -> int:
    """FLOPs of one forward pass on one image (multiply-add = 2 FLOPs), via PyTorch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_chans, img_size, img_size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


class MetricsLog:
    """metrics.jsonl (one JSON object per line) + TensorBoard, written by the main process only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                self.tb.add_scalar(k, v, record.get("step", 0))
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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
) -> dict:
    """Top-1 / top-5 accuracy and loss. Under DDP each rank takes every world_size-th image and
    the counts are summed, so the result is exact (no padded duplicates)."""
    dist_info = dist_info or DistInfo()
    if dist_info.enabled:
        dataset = Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = n = 0.0
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        n += len(labels)
    model.train(was_training)
    correct1, correct5, loss_sum, n = all_reduce_sum([correct1, correct5, loss_sum, n], dist_info, device)
    return {
        "top1": 100 * correct1 / max(n, 1),
        "top5": 100 * correct5 / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "n": int(n),
    }


# ------------------------------------------------------------------------------- training
def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Train ``cfg.model`` on ``cfg.data``; returns the summary also written to RUN/summary.json."""
    from ..data import build_batch_mixer, build_data

    run_dir = Path(cfg.out)
    device = resolve_device(cfg.device)
    dinfo = init_distributed(device.type)
    if dinfo.enabled and device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)
    if cfg.batch_size % dinfo.world_size:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by {dinfo.world_size} processes")
    last_ckpt = run_dir / LAST
    if last_ckpt.exists() and not resume:
        raise ValueError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    amp_dtype = autocast_dtype(cfg.amp, device)

    # ---- data: the training split is a class-balanced nested fraction; the test split is whole
    torch.manual_seed(cfg.seed)
    train_ds, test_ds, info = build_data(
        cfg.data,
        cfg.data_dir,
        fraction=cfg.fraction,
        seed=cfg.seed,
        img_size=cfg.img_size,
        augment=cfg.augment,
        randaugment=cfg.randaugment,
        random_erasing=cfg.random_erasing,
        on_corrupt=cfg.on_corrupt,
    )
    local_bs = cfg.batch_size // dinfo.world_size
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
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"no training batches: {len(train_ds)} images for batch size {cfg.batch_size}")
    mixer = build_batch_mixer(info.num_classes, cfg.mixup, cfg.cutmix)

    # ---- model, optimiser, schedule
    margs = model_overrides(cfg, info.num_classes, info.img_size, info.in_chans, info.mean, info.std)
    model = create_model(cfg.model, **margs).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    flops = count_flops(model, info.img_size, info.in_chans, device)
    optimizer = build_optimizer(model, cfg)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = warmup_cosine(
        optimizer,
        total_steps=total_steps,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        base_lr=cfg.lr,
        min_lr=cfg.min_lr,
    )
    ema = None
    if cfg.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    meta = {
        "model": cfg.model,
        "model_args": margs,
        "classes": info.classes,
        "img_size": info.img_size,
        "in_chans": info.in_chans,
        "mean": list(info.mean),
        "std": list(info.std),
        "data": cfg.data,
    }

    start_epoch, best_top1, train_time = 0, -1.0, 0.0
    if resume and last_ckpt.exists():
        weights, _, state = load_checkpoint(last_ckpt)
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, best_top1, train_time = state["epoch"], state["best_top1"], state["train_time"]

    if dinfo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
        (run_dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    log = MetricsLog(run_dir, dinfo.is_main)
    step_model = model
    if dinfo.enabled:
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        step_model = torch.compile(step_model)

    # ---- epochs
    started = time.perf_counter()
    epochs_this_run = 0

    def evaluate_on_test(m: nn.Module) -> dict:
        return evaluate(
            m,
            test_ds,
            batch_size=local_bs * 2,
            device=device,
            amp_dtype=amp_dtype,
            dist_info=dinfo,
            num_workers=cfg.num_workers,
        )

    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(epoch_seed(cfg.seed, epoch, dinfo.rank))
        sampler.set_epoch(epoch)
        model.train()
        loss_sum = correct = seen = 0.0
        t0 = time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=not (cfg.progress and dinfo.is_main),
        )
        for images, labels in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = labels
            if mixer is not None:
                images, targets = mixer(images, labels)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = step_model(images)
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} at epoch {epoch + 1}; lower --lr or use --amp fp32"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}",
                img_s=f"{seen * dinfo.world_size / (time.perf_counter() - t0):.0f}",
                lr=f"{scheduler.get_last_lr()[0]:.2e}",
            )
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], dinfo, device)
        record = {
            "epoch": epoch + 1,
            "step": (epoch + 1) * steps_per_epoch,
            "lr": scheduler.get_last_lr()[0],
            "train_loss": loss_sum / seen,
            "train_acc": 100 * correct / seen,
            "img_per_s": seen / epoch_time,
            "epoch_time_s": epoch_time,
        }
        is_last = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.eval_every == 0 or is_last:
            ev = evaluate_on_test(model)
            record.update({"test_top1": ev["top1"], "test_top5": ev["top5"], "test_loss": ev["loss"]})
            if ema is not None:
                ev_ema = evaluate_on_test(ema.module)
                record.update({"ema_test_top1": ev_ema["top1"], "ema_test_top5": ev_ema["top5"]})
        log.write(record)
        if dinfo.is_main and cfg.progress:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
            tqdm.write(json.dumps(shown))

        # ---- checkpoint (main process; atomic, so a kill here keeps the previous one)
        top1 = record.get("test_top1", -1.0)
        if dinfo.is_main:
            if top1 > best_top1:
                save_checkpoint(
                    run_dir / BEST, model.state_dict(), meta={**meta, "epoch": epoch + 1, "test_top1": top1}
                )
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "epoch": epoch + 1,
                "best_top1": max(best_top1, top1),
                "train_time": train_time,
            }
            save_checkpoint(
                run_dir / LAST, model.state_dict(), meta={**meta, "epoch": epoch + 1}, state=state
            )
        best_top1 = max(best_top1, top1)
        barrier(dinfo)
        epochs_this_run += 1
        out_of_time = (
            cfg.time_budget_min is not None and time.perf_counter() - started > 60 * cfg.time_budget_min
        )
        if not is_last and (
            (cfg.stop_after_epochs and epochs_this_run >= cfg.stop_after_epochs) or out_of_time
        ):
            log.close()
            cleanup(dinfo)
            return {"finished": False, "epoch": epoch + 1}

    # ---- summary
    last = _last_record(run_dir / "metrics.jsonl") if dinfo.is_main else {}
    summary = {
        "finished": True,
        "model": cfg.model,
        "params": n_params,
        "flops_per_image": flops,
        "train_images": len(train_ds),
        "epochs": cfg.epochs,
        "train_time_s": train_time,
        "img_per_s": last.get("img_per_s"),
        "test_top1": last.get("test_top1"),
        "test_top5": last.get("test_top5"),
        "best_test_top1": best_top1,
        "ema_test_top1": last.get("ema_test_top1"),
        "device": str(device),
        "world_size": dinfo.world_size,
    }
    if dinfo.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.close()
    cleanup(dinfo)
    return summary


def _last_record(path: Path) -> dict:
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


def is_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "summary.json").exists()
