"""Character-level language models on a text file (Tiny Shakespeare): GPT or BERT, on the harness.

    config -> characters -> model -> AdamW + warmup/cosine -> [step: batch, loss, update;
    every eval_every steps: validation loss, metrics, checkpoint] -> summary

The objective follows the model: a GPT predicts the next character at every position
(causal LM); a BERT reconstructs the characters hidden by BERT's 15% / 80-10-10 corruption
(masked LM), each window starting with [CLS] so the classification head has its token.
Iteration-based like nanoGPT: batches are random windows drawn from ``run_seed(seed, step,
rank)``, the step counter is the clock (and all a checkpoint needs to continue exactly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..errors import ConfigError, DataError, ModelError
from ..models import create_model
from ..models.bert import Bert, BertConfig, mask_tokens
from ..models.gpt import GPTConfig
from ..models.registry import model_config_class
from ..text.data import BERT_SPECIALS, CharTokenizer, cls_windows, load_char_corpus, random_windows
from ..utils import eval_mode
from .distributed import all_reduce_sum
from .harness import (
    Run,
    StepLoop,
    count_params,
    model_config,
    param_groups,
    run_seed,
    run_steps,
    share_of_batch,
    split_batch,
    start_run,
    weighted,
)
from .schedule import warmup_cosine


@dataclass
class LMTrainConfig(Config):
    model: str = "gpt_char_baby"
    model_args: dict = field(default_factory=dict)  # overrides of the model config (dropout=0.0, ...)
    data: str | None = None  # a text file, or a folder with input.txt
    val_fraction: float = 0.1
    out: str = "runs/lm"
    seed: int = 0
    # optimisation (nanoGPT's shakespeare_char defaults)
    max_steps: int = 5000
    batch_size: int = 64
    block_size: int | None = None  # None: the model's context
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.99
    grad_clip: float | None = 1.0
    mlm_prob: float = 0.15  # BERT only
    # speed, numerics, bookkeeping
    amp: str = "auto"  # 'auto' (bf16 on capable GPUs, fp32 on CPU) | 'bf16' | 'fp16' | 'fp32'
    device: str = "auto"
    compile: bool = False
    eval_every: int = 250
    eval_iters: int = 20  # validation batches per evaluation (the same windows every time)
    time_budget_min: float | None = None  # stop cleanly (checkpoint) after this much wall time
    max_chars: int | None = None  # use only the start of the text (tests)
    progress: bool = True

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "eval_every", "eval_iters"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be at least 1, got {getattr(self, name)}")
        if self.block_size is not None and self.block_size < 2:
            raise ConfigError(f"--block-size must be at least 2, got {self.block_size}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 < self.mlm_prob < 1:
            raise ConfigError(f"--mlm-prob must be in (0, 1), got {self.mlm_prob}")
        if self.amp not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"--amp must be one of auto, bf16, fp16, fp32; got {self.amp!r}")


class LMObjective(nn.Module):
    """Batch -> loss, so DDP wraps one module whatever the objective.

    Causal: ``x`` (B, T) ids, ``y`` next ids. Masked: ``x`` corrupted ids, ``y`` originals at
    the chosen positions and -100 elsewhere.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.masked = isinstance(model, Bert)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.model.forward_features(x)
        logits = self.model.forward_mlm(h) if self.masked else self.model.forward_head(h)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)


def language_model_config(name: str, model_args: dict) -> GPTConfig | BertConfig:
    """The config a GPT or BERT ``name`` would be built with (no model is built to learn it)."""
    if model_config_class(name) not in (GPTConfig, BertConfig):
        raise ModelError(f"{name} is not a language model; `vitlens lm train` takes gpt_* or bert_* models")
    return model_config(name, model_args)


def lm_batch(
    data, tok: CharTokenizer, masked: bool, mlm_prob: float, T: int, batch_size: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``data``: next-character targets, or BERT-corrupted windows behind [CLS]."""
    if masked:
        ids = cls_windows(data, T, batch_size, tok.token_id("[CLS]"), g)
        special = ids == tok.token_id("[CLS]")
        return mask_tokens(
            ids,
            vocab_size=tok.vocab_size,
            mask_id=tok.token_id("[MASK]"),
            special_mask=special,
            mlm_prob=mlm_prob,
            random_low=len(tok.specials),
            generator=g,
        )
    return random_windows(data, T, batch_size, g)


@torch.no_grad()
def evaluate_lm(objective: LMObjective, data, tok, cfg: LMTrainConfig, T: int, run: Run) -> float:
    """Mean loss over ``cfg.eval_iters`` fixed random validation batches (the same every call, and
    the same whatever the number of processes: each takes its share of one global batch)."""
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    with eval_mode(objective):
        for _ in range(cfg.eval_iters):
            x, y = lm_batch(data, tok, objective.masked, cfg.mlm_prob, T, cfg.batch_size, g)
            x, y, weight = share_of_batch(run, (x, y), y != -100)
            with run.autocast():
                loss = objective(x.to(run.device), y.to(run.device))
            total += weighted(loss, weight).item()
    total, n = all_reduce_sum([total, float(cfg.eval_iters)], run.dist, run.device)
    return total / n


def train_lm(cfg: LMTrainConfig, *, resume: bool = False, overrides: dict | None = None) -> dict:
    """Train ``cfg.model`` (a GPT or a BERT) on ``cfg.data``; returns the summary (also RUN/summary.json).

    ``resume``/``overrides``: as for :func:`vitlens.train.train` (``max_steps`` may change on purpose).
    """
    run = start_run(cfg, resume=resume, overrides=overrides, counter="step")
    cfg, dev = run.cfg, run.device

    torch.manual_seed(cfg.seed)  # the initial weights
    # ---- data: characters; BERT gets [PAD] [MASK] [CLS] [SEP] in front of them
    model_cfg = language_model_config(cfg.model, cfg.model_args)
    masked = isinstance(model_cfg, BertConfig)
    train_ids, val_ids, tok = load_char_corpus(
        cfg.data,
        val_fraction=cfg.val_fraction,
        specials=BERT_SPECIALS if masked else (),
        max_chars=cfg.max_chars,
    )
    context = model_cfg.max_len if masked else model_cfg.block_size
    T = cfg.block_size or context
    if T > context:
        raise ConfigError(f"block_size {T} exceeds the model's context {context}; lower --block-size")
    window = T - 1 if masked else T  # BERT windows hold [CLS] + T - 1 characters
    for split, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) <= window:
            raise DataError(
                f"the {split} text has {len(ids)} characters, too few for windows of {window} + 1; "
                "give more text (--max-chars) or a smaller --block-size"
            )
    split_batch(cfg.batch_size, run)  # a ConfigError unless every process gets the same share

    # ---- model, optimiser, schedule
    margs = {**cfg.model_args, "vocab_size": tok.vocab_size}
    model = create_model(cfg.model, **margs).to(dev)
    objective = LMObjective(model)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, cfg.beta2), fused=dev.type == "cuda"
    )
    scheduler = warmup_cosine(
        optimizer, total_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps, base_lr=cfg.lr, min_lr=cfg.min_lr
    )
    scaler = run.grad_scaler()
    meta = {
        "model": cfg.model,
        "model_args": margs,
        "task": "mlm" if masked else "causal_lm",
        "tokenizer": "chars.json",
        "block_size": T,
    }
    state = run.restore(model, optimizer, scheduler, scaler)
    run.open(meta, files={"chars.json": tok.save})
    step_fn = run.wrap(objective, find_unused=masked)  # BERT's pooler/head get no MLM gradient
    if cfg.compile:
        step_fn = torch.compile(step_fn)

    # ---- steps
    g = torch.Generator()

    def next_batch(step: int):
        # One global batch per step (drawn alike by every process), of which each takes its share.
        g.manual_seed(run_seed(cfg.seed, step))
        x, y = lm_batch(train_ids, tok, masked, cfg.mlm_prob, T, cfg.batch_size, g)
        return share_of_batch(run, (x, y), y != -100)

    def loss(batch):
        x, y, weight = batch
        return weighted(step_fn(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)), weight)

    task = StepLoop(
        next_batch=next_batch,
        loss=loss,
        tokens=lambda batch: batch[0].numel(),
        evaluate=lambda: {"val_loss": evaluate_lm(objective, val_ids, tok, cfg, T, run)},
    )
    step, record, train_time = run_steps(
        run, task, model, optimizer, scheduler, meta=meta, state=state, scaler=scaler
    )

    summary = {
        "finished": step >= cfg.max_steps,
        "model": cfg.model,
        "task": meta["task"],
        "params": count_params(model),
        "steps": step,
        "batch_size": cfg.batch_size,
        "block_size": T,
        "train_time_s": train_time,
        "val_loss": record.get("val_loss"),
        "train_loss": record.get("train_loss"),
        "device": str(dev),
        "amp": run.amp_name,
        "world_size": run.dist.world_size,
    }
    return run.finish(summary)
