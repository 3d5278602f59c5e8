"""The training harness every task runs on: the task brings data, objective, step and evaluation.

    start_run(cfg)       checks before anything is written: the device exists, the --out folder
                         can hold a run, a resume keeps the run's config (the folder is the truth)
    task builds          data, model, optimiser, schedule (a failure here leaves no files behind)
    run.restore(...)     on --resume: weights, optimiser, schedule, scaler from last.safetensors
    run.open(meta)       writes config.json, model.json; metrics.jsonl + TensorBoard, cut back
                         to the checkpoint's epoch/step when resuming
    loop                 train_step (autocast, finite check, backward, clip, update) per batch;
                         run.log_record / run.save_checkpoint per epoch or every eval_every steps
    run.finish(summary)  summary.json, then the process group is closed

Run folder: config.json (the resolved config + the history of deliberate overrides),
model.json, metrics.jsonl, tb/, checkpoints/last.safetensors, summary.json (+ the task's own
files). Exact resume: every epoch (image tasks) or step (text tasks) re-seeds the global RNG
with :func:`run_seed`, so a checkpoint needs only weights, optimiser, schedule and a counter.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CheckpointError, ConfigError, DeviceError, ResumeError, TrainingError
from ..io import load_checkpoint, save_checkpoint
from ..utils import check_out_folder
from .distributed import DistInfo, barrier, cleanup, init_distributed
from .precision import keep_freed_memory, match_param_layout, resolve_amp
from .run_folder import (
    EXECUTION_KEYS,
    INVOCATION_KEYS,
    LAST,
    OVERRIDABLE_KEYS,
    MetricsLog,
    as_json,
    config_differences,
    describe,
    has_checkpoint,
    refusal,
    remove_interrupted_writes,
    require_checkpoint,
    stored_config,
    write_json,
)


# ------------------------------------------------------------------------------- small pieces
def run_seed(seed: int, counter: int, rank: int = 0) -> int:
    """The seed of epoch (image tasks) or step (text tasks) ``counter`` on process ``rank``: the
    global RNG (dropout, augmentation) and the batch draws restart from it, so resume is exact."""
    return (seed * 1_000_003 + counter * 9_973 + rank * 101) % (2**31)


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA if present, else CPU) or a device name; a DeviceError for one that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: this machine has no CUDA device; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {name}: MPS is not available here; use --device cpu (or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device {name}: vitlens trains on cpu, cuda or mps")
    return device


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, position embeddings and special tokens (timm convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_no_decay = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token"))
        (no_decay if is_no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights count once


def model_config(name: str, overrides: dict):
    """The config dataclass model ``name`` would be built with, without building the model."""
    from ..models.registry import model_config_class, model_config_fields, model_defaults

    unknown = sorted(set(overrides) - model_config_fields(name))
    if unknown:
        raise ConfigError(
            f"{name} has no config field(s) {', '.join(unknown)}; "
            f"valid fields: {', '.join(sorted(model_config_fields(name)))}"
        )
    return model_config_class(name)(**{**model_defaults(name), **overrides})


# ------------------------------------------------------------------------------- divergence
def diverged(value: float, at: str, fix: str) -> TrainingError:
    kind = "NaN" if math.isnan(value) else "infinite"
    return TrainingError(f"training diverged: the loss became {kind} at {at}; {fix}")


@dataclass
class LossWatch:
    """The divergence check, without making an accelerator wait for the host every step.

    On the CPU :func:`train_step` checks each loss as it is computed (reading it costs nothing).
    On a GPU that read would stall the host until the step is done, so no step could be queued
    ahead; there the first non-finite loss is recorded on the device instead, and :meth:`check`,
    called before every metrics record, checkpoint and summary is written, reads it once and raises
    the same error naming the same step. A diverged GPU run so stops at its next record: a few more
    updates run, but nothing from after the bad step is ever written."""

    defer: bool | None = None  # None: defer on any device but the CPU
    _first_bad: torch.Tensor | None = None  # index into _labels of the first non-finite loss, -1: none
    _bad_value: torch.Tensor | None = None  # that loss (NaN or +-inf)
    _count: torch.Tensor | None = None  # losses noted since the last check, counted on the device
    _labels: list = field(default_factory=list)  # (at, fix) of each of those losses

    def deferred(self, loss: torch.Tensor) -> bool:
        return loss.device.type != "cpu" if self.defer is None else self.defer

    def note(self, loss: torch.Tensor, at: str, fix: str) -> None:
        loss = loss.detach().float()
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_value = torch.zeros((), device=loss.device)
            self._count = torch.zeros((), dtype=torch.long, device=loss.device)
        new_bad = ~torch.isfinite(loss) & (self._first_bad < 0)
        self._first_bad = torch.where(new_bad, self._count, self._first_bad)
        self._bad_value = torch.where(new_bad, loss, self._bad_value)
        self._count += 1
        self._labels.append((at, fix))

    def check(self) -> None:
        """Raise the TrainingError of the first non-finite loss noted since the last check."""
        if self._first_bad is None or not self._labels:
            return
        first, labels = int(self._first_bad), self._labels  # the one read of the device
        if first >= 0:
            raise diverged(float(self._bad_value), *labels[first])
        self._labels = []
        self._count.zero_()


# ------------------------------------------------------------------------------- the run
@dataclass
class Run:
    """One invocation of a training task: where it writes, on which device, in which precision."""

    cfg: Any  # the task's config, with this resume's overrides applied
    dir: Path
    device: torch.device
    dist: DistInfo
    amp_dtype: torch.dtype | None
    counter: str  # 'epoch' or 'step': what a checkpoint counts
    resume: bool
    overrides: dict = field(default_factory=dict)  # {key: (old, new)} applied by this resume
    started: float = field(default_factory=time.perf_counter)
    log: MetricsLog | None = None
    resumed_at: int = 0  # the checkpoint's epoch/step (0 for a new run)
    losses: LossWatch = field(default_factory=LossWatch)  # divergence, checked before anything is written

    # ---- numerics and processes
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def amp_name(self) -> str:
        return str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (a no-op in any other precision)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def wrap(self, module: nn.Module, find_unused: bool = False) -> nn.Module:
        """DDP under torchrun (gradients all-reduced), the module itself otherwise."""
        if not self.dist.enabled:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)

    def out_of_time(self) -> bool:
        budget = getattr(self.cfg, "time_budget_min", None)
        return budget is not None and time.perf_counter() - self.started > 60 * budget

    def progress(self, iterable=None, **kw) -> tqdm:
        """A progress bar on the main process when the config asks for one."""
        show = getattr(self.cfg, "progress", True) and self.is_main
        return tqdm(iterable, disable=not show, **kw)

    # ---- checkpoints
    def restore(self, model: nn.Module, optimizer=None, scheduler=None, scaler=None) -> dict:
        """On resume: load last.safetensors into the objects and return its state (counters,
        extras); ``{}`` for a new run. Weights that do not fit the model are a ResumeError."""
        if not self.resume:
            return {}
        path = self.dir / LAST
        weights, _, state = load_checkpoint(path)
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise ResumeError(
                f"{path} does not fit this model ({first}); was the run made with another model?"
            ) from None
        for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
            if obj is not None and state.get(key) is not None:
                obj.load_state_dict(state[key])
        if optimizer is not None:
            match_param_layout(optimizer)  # contiguous moments from the file -> the parameters' layout
        if self.counter not in state:
            raise CheckpointError(
                f"{path} holds no {self.counter} counter: it is not a checkpoint of this kind of run"
            )
        self.resumed_at = int(state[self.counter])
        if self.is_main:
            total = getattr(self.cfg, "epochs" if self.counter == "epoch" else "max_steps", "?")
            print(f"resuming {self.dir} at {self.counter} {self.resumed_at}/{total}", file=sys.stderr)
        return state

    def save_checkpoint(
        self, model: nn.Module, optimizer, scheduler, *, meta: dict, count: int, scaler=None, extra=None
    ) -> None:
        """Atomic last.safetensors with everything needed to continue (main process only)."""
        self.losses.check()  # never a checkpoint of a diverged model
        if not self.is_main:
            return
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **({"scaler": scaler.state_dict()} if scaler is not None else {}),
            self.counter: count,
            **(extra or {}),
        }
        save_checkpoint(self.dir / LAST, model.state_dict(), meta={**meta, self.counter: count}, state=state)

    # ---- the folder
    def open(self, meta: dict | None = None, files: dict | None = None) -> None:
        """The run is known to start: create its folder and files. ``meta`` becomes model.json;
        ``files`` maps names to writers ``fn(path)`` (tokenizers). On resume the metrics are cut
        back to the checkpoint and the override history of config.json grows."""
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            remove_interrupted_writes(self.dir)
            write_json(self.dir / "config.json", self._config_record())
            if meta is not None:
                write_json(self.dir / "model.json", meta)
            for name, write in (files or {}).items():
                write(self.dir / name)
        barrier(self.dist)
        self.log = MetricsLog(self.dir, self.is_main, keep_upto=(self.counter, self.resumed_at))

    def _config_record(self) -> dict:
        history = []
        if self.resume:
            old = (
                json.loads((self.dir / "config.json").read_text())
                if (self.dir / "config.json").is_file()
                else {}
            )
            history = old.get("overrides", [])
        if self.overrides:
            changes = {k: list(v) for k, v in self.overrides.items()}
            history = [*history, {"at_" + self.counter: self.resumed_at, "changes": changes}]
        return {**asdict(self.cfg), **({"overrides": history} if history else {})}

    def log_record(self, record: dict) -> None:
        """Append to metrics.jsonl / TensorBoard and print the record (rounded) when showing progress."""
        self.losses.check()
        self.log.write(record)
        if self.is_main and getattr(self.cfg, "progress", True):
            tqdm.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}))

    def finish(self, summary: dict) -> dict:
        """summary.json of a finished run (main process), then close the log and the process group."""
        self.losses.check()
        if summary.get("finished") and self.is_main:
            write_json(self.dir / "summary.json", summary)
        self.close()
        return summary

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        cleanup(self.dist)


def start_run(
    cfg,
    *,
    resume: bool = False,
    overrides: dict | None = None,
    counter: str = "epoch",
    distributed: bool = True,
) -> Run:
    """Check everything that can be checked before any work, and write nothing yet.

    Device (DeviceError), process group (torchrun), the ``--out`` folder (ConfigError), and the
    resume contract: ``resume=True`` needs a folder with a checkpoint whose config.json equals
    ``cfg`` except for INVOCATION_KEYS, where the run executes (EXECUTION_KEYS: said on stderr) and
    the deliberate ``overrides`` (OVERRIDABLE_KEYS, applied here); both kinds of change are recorded
    in config.json. A new run refuses a folder that already holds one.
    ``distributed=False``: a task that runs in one process whatever torchrun says.
    """
    run_dir = Path(cfg.out)
    overrides = dict(overrides or {})
    names = {f.name for f in fields(cfg)}
    applied: dict[str, tuple[Any, Any]] = {}
    moved: dict[str, tuple[Any, Any]] = {}  # EXECUTION_KEYS this resume changes
    if overrides and not resume:
        raise ConfigError("--override changes a run being resumed; for a new run set the values directly")
    check_out_folder(run_dir)
    if resume:
        require_checkpoint(run_dir)
        unknown = sorted(set(overrides) - (OVERRIDABLE_KEYS & names))
        if unknown:
            raise ResumeError(
                f"--override {', '.join(unknown)}: only {', '.join(sorted(OVERRIDABLE_KEYS & names))} can "
                "change when a run is resumed; start a new run (another --out) to change anything else"
            )
        if not (run_dir / "config.json").is_file():
            raise ResumeError(f"{run_dir} has a checkpoint but no config.json; it cannot be resumed safely")
        stored = stored_config(run_dir, type(cfg))
        # "out" is the same folder however the path is spelt
        diffs = config_differences(stored, asdict(cfg), ignore=INVOCATION_KEYS | set(overrides) | {"out"})
        moved = {k: d for k, d in diffs.items() if k in EXECUTION_KEYS}  # another machine, not another run
        diffs = {k: d for k, d in diffs.items() if k not in EXECUTION_KEYS}
        if diffs:
            raise ResumeError(refusal(run_dir, diffs, names))
        try:
            cfg = replace(cfg, **overrides)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--override {overrides}: {e}") from None
        applied = {
            k: (stored.get(k), as_json(v)) for k, v in overrides.items() if stored.get(k) != as_json(v)
        }
        applied.update(moved)
    elif has_checkpoint(run_dir):
        raise ResumeError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )

    device = resolve_device(getattr(cfg, "device", "cpu"))
    keep_freed_memory()  # each step reallocates the last step's activations: reuse, don't page-fault
    dinfo = init_distributed(device.type) if distributed else DistInfo()
    if dinfo.enabled and device.type == "cuda":
        device = torch.device("cuda", dinfo.local_rank)
    if moved and dinfo.is_main:
        print(
            f"resuming {run_dir} with {describe(moved)} (where it runs, not what it computes; recorded "
            "in config.json)",
            file=sys.stderr,
        )
    return Run(
        cfg=cfg,
        dir=run_dir,
        device=device,
        dist=dinfo,
        amp_dtype=resolve_amp(getattr(cfg, "amp", "fp32"), device),
        counter=counter,
        resume=resume,
        overrides=applied,
    )


def split_batch(batch_size: int, run: Run, what: str = "batch size") -> int:
    """Each process's share of a global batch (a ConfigError if it does not divide)."""
    if batch_size % run.dist.world_size:
        raise ConfigError(
            f"{what} {batch_size} is not divisible by {run.dist.world_size} processes; "
            f"use a multiple of {run.dist.world_size}"
        )
    return batch_size // run.dist.world_size


def share_of_batch(run: Run, rows: tuple[torch.Tensor, ...], counted: torch.Tensor) -> tuple:
    """This process's rows (every world_size-th) of a global batch, and the weight of its mean loss.

    Every process draws the same global batch and keeps its share, so N processes see what one
    process sees. ``counted`` marks the targets the loss averages over (not padding, not -100);
    the weight ``n_local * world_size / n_global`` makes DDP's average of the processes' mean
    losses the global mean (exactly 1.0 in one process).
    """
    world, rank = run.dist.world_size, run.dist.rank
    if world == 1:
        return (*rows, 1.0)
    n_global = int(counted.sum())
    n_local = int(counted[rank::world].sum())
    return (*(r[rank::world] for r in rows), n_local * world / max(n_global, 1))


def weighted(loss: torch.Tensor, weight: float) -> torch.Tensor:
    """``loss * weight``, leaving the one-process loss (weight 1.0) untouched."""
    return loss * weight if weight != 1.0 else loss


# ------------------------------------------------------------------------------- one step
def train_step(
    run: Run,
    forward,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    params,
    grad_clip: float | None,
    scaler: torch.amp.GradScaler | None = None,
    where: str = "",
    fix: str = "lower the learning rate or use --amp fp32",
):
    """One optimiser step shared by every task: ``loss, out = forward()`` under autocast, a finite
    check, zero_grad, backward (fp16 loss scaling), gradient clipping, update, schedule.

    A NaN or infinite loss is a :class:`TrainingError` naming the step (the schedule's count,
    1-based, so it survives a resume), ``where`` (e.g. "epoch 2") and the ``fix``: raised here on
    the CPU, before the update; on an accelerator at the run's next record (see :class:`LossWatch`)."""
    with run.autocast():
        loss, out = forward()
    at = f"step {scheduler.last_epoch + 1}" + (f" ({where})" if where else "")
    watch = getattr(run, "losses", None)
    if watch is not None and watch.deferred(loss):
        watch.note(loss, at, fix)
    elif not torch.isfinite(loss):
        raise diverged(float(loss.detach()), at, fix)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
    scheduler.step()
    return loss, out


# ------------------------------------------------------------------------------- step loop (text tasks)
@dataclass
class StepLoop:
    """What an iteration-based task (LM, translation) gives the step loop.

    ``next_batch(step)`` is called after the global RNG was seeded for ``step``; ``loss(batch)``
    runs under autocast; ``tokens(batch)`` counts this process's tokens; ``evaluate()`` returns the
    figures logged at each evaluation (all processes take part); ``position()`` the extra state a
    checkpoint needs to continue the data order (translation: epoch and batch within it).
    """

    next_batch: Any
    loss: Any
    tokens: Any
    evaluate: Any
    position: Any = dict
    tokens_name: str = "tokens_per_s"
    fix: str = "lower the learning rate or use --amp fp32"


def run_steps(
    run: Run,
    task: StepLoop,
    model: nn.Module,
    optimizer,
    scheduler,
    *,
    meta: dict,
    state: dict,
    scaler=None,
) -> tuple[int, dict, float]:
    """Steps from the checkpoint's to ``cfg.max_steps``; every ``cfg.eval_every`` steps, at the end
    and when the time budget is spent: evaluate, log, checkpoint. Returns (step, last record, train time)."""
    cfg, dinfo = run.cfg, run.dist
    step, train_time = state.get("step", 0), state.get("train_time", 0.0)
    bar = run.progress(total=cfg.max_steps, initial=step, desc=cfg.model)
    record: dict = {}
    tokens_seen, t0 = 0, time.perf_counter()
    fix = task.fix + ("" if cfg.grad_clip else ", or clip the gradients (--grad-clip 1.0)")
    update = dict(params=list(model.parameters()), grad_clip=cfg.grad_clip, scaler=scaler, fix=fix)
    while step < cfg.max_steps:
        torch.manual_seed(run_seed(cfg.seed, step, dinfo.rank))  # dropout (and the batch draw)
        batch = task.next_batch(step)
        forward = lambda batch=batch: (task.loss(batch), None)  # noqa: E731
        loss, _ = train_step(run, forward, optimizer, scheduler, **update)
        step += 1
        tokens_seen += task.tokens(batch) * dinfo.world_size
        elapsed = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss.item():.3f}",
            tok_s=f"{tokens_seen / elapsed:.0f}",
            lr=f"{scheduler.get_last_lr()[0]:.1e}",
        )

        out_of_time = run.out_of_time()
        if step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time:
            train_time += elapsed
            record = {
                "step": step,
                "lr": scheduler.get_last_lr()[0],
                "train_loss": loss.item(),
                task.tokens_name: tokens_seen / max(elapsed, 1e-9),
                **task.evaluate(),
                "train_time_s": train_time,
            }
            run.log_record(record)
            extra = {"train_time": train_time, **task.position()}
            run.save_checkpoint(
                model, optimizer, scheduler, meta=meta, count=step, scaler=scaler, extra=extra
            )
            barrier(dinfo)
            tokens_seen, t0 = 0, time.perf_counter()
            if out_of_time:
                break
    bar.close()
    return step, record, train_time
