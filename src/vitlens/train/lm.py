"""Character-level language models on a text file (Tiny Shakespeare): GPT or BERT.

    config -> characters -> model -> AdamW + warmup/cosine -> [step: batch, loss, update;
    every eval_every steps: validation loss, metrics, checkpoint] -> summary

The objective follows the model: a GPT predicts the next character at every position
(causal LM); a BERT reconstructs the characters hidden by BERT's 15% / 80-10-10 corruption
(masked LM), each window starting with [CLS] so the classification head has its token.
Iteration-based like nanoGPT: batches are random windows, the step counter is the clock.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..models import create_model
from ..models.bert import Bert, mask_tokens
from ..models.gpt import GPT
from .schedule import warmup_cosine
from . import text_run as R
from ..text.data import BERT_SPECIALS, CharTokenizer, cls_windows, load_char_corpus, random_windows


@dataclass
class LMTrainConfig:
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


def _batch(
    data, tok: CharTokenizer, model, cfg: LMTrainConfig, T: int, batch_size: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(model, Bert):
        ids = cls_windows(data, T, batch_size, tok.token_id("[CLS]"), g)
        special = ids == tok.token_id("[CLS]")
        return mask_tokens(
            ids,
            vocab_size=tok.vocab_size,
            mask_id=tok.token_id("[MASK]"),
            special_mask=special,
            mlm_prob=cfg.mlm_prob,
            random_low=len(tok.specials),
            generator=g,
        )
    return random_windows(data, T, batch_size, g)


@torch.no_grad()
def evaluate_lm(
    objective: LMObjective, data, tok, cfg: LMTrainConfig, T: int, run: R.Run, iters: int, batch_size: int
) -> float:
    """Mean loss over ``iters`` fixed random validation batches (same seed every call)."""
    was = objective.training
    objective.eval()
    g = torch.Generator().manual_seed(1234 + run.dist.rank)
    total = 0.0
    for _ in range(iters):
        x, y = _batch(data, tok, objective.model, cfg, T, batch_size, g)
        with run.autocast():
            total += objective(x.to(run.device), y.to(run.device)).item()
    objective.train(was)
    total, n = R.all_reduce_sum([total, float(iters)], run.dist, run.device)
    return total / n


def train_lm(cfg: LMTrainConfig, *, resume: bool = False) -> dict:
    """Train ``cfg.model`` (a GPT or a BERT) on ``cfg.data``; returns the summary (also RUN/summary.json)."""
    run = R.start_run(cfg, resume=resume)
    dev, dinfo = run.device, run.dist

    torch.manual_seed(cfg.seed)  # the initial weights
    # ---- data: characters; BERT gets [PAD] [MASK] [CLS] [SEP] in front of them
    probe = create_model(cfg.model, **cfg.model_args)
    if not isinstance(probe, (GPT, Bert)):
        raise ValueError(
            f"{cfg.model} is not a language model; `vitlens lm train` takes gpt_* or bert_* models"
        )
    masked = isinstance(probe, Bert)
    train_ids, val_ids, tok = load_char_corpus(
        cfg.data,
        val_fraction=cfg.val_fraction,
        specials=BERT_SPECIALS if masked else (),
        max_chars=cfg.max_chars,
    )
    context = probe.cfg.max_len if masked else probe.cfg.block_size
    T = cfg.block_size or context
    if T > context:
        raise ValueError(f"block_size {T} exceeds the model's context {context}; lower --block-size")
    if cfg.batch_size % dinfo.world_size:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by {dinfo.world_size} processes")
    local_bs = cfg.batch_size // dinfo.world_size

    # ---- model, optimiser, schedule
    margs = {**cfg.model_args, "vocab_size": tok.vocab_size}
    model = create_model(cfg.model, **margs).to(dev)
    objective = LMObjective(model)
    optimizer = torch.optim.AdamW(
        R.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, cfg.beta2), fused=dev.type == "cuda"
    )
    scheduler = warmup_cosine(
        optimizer, total_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps, base_lr=cfg.lr, min_lr=cfg.min_lr
    )
    meta = {
        "model": cfg.model,
        "model_args": margs,
        "task": "mlm" if masked else "causal_lm",
        "tokenizer": "chars.json",
        "block_size": T,
    }
    step, train_time = 0, 0.0
    if resume and (run.dir / R.LAST).exists():
        state = R.restore_state(run, model, optimizer, scheduler)
        step, train_time = state["step"], state["train_time"]
    if dinfo.is_main:
        tok.save(run.dir / "chars.json")
        (run.dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    step_fn = run.wrap(objective, find_unused=masked)  # BERT's pooler/head get no MLM gradient
    if cfg.compile:
        step_fn = torch.compile(step_fn)

    # ---- steps
    n_params = R.count_params(model)
    g = torch.Generator()
    bar = tqdm(
        total=cfg.max_steps, initial=step, desc=cfg.model, disable=not (cfg.progress and dinfo.is_main)
    )
    record: dict = {}
    tokens_seen, t0 = 0, time.perf_counter()
    while step < cfg.max_steps:
        seed = R.step_seed(cfg.seed, step, dinfo.rank)
        torch.manual_seed(seed)  # dropout
        x, y = _batch(train_ids, tok, model, cfg, T, local_bs, g.manual_seed(seed))
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with run.autocast():
            loss = step_fn(x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss.item()} at step {step}; lower --lr or use --amp fp32"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        tokens_seen += x.numel() * dinfo.world_size
        elapsed = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss.item():.3f}",
            tok_s=f"{tokens_seen / elapsed:.0f}",
            lr=f"{scheduler.get_last_lr()[0]:.1e}",
        )

        # ---- evaluate + checkpoint every eval_every steps, at the end, and when time is up
        out_of_time = run.out_of_time(cfg.time_budget_min)
        if step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time:
            train_time += elapsed
            tok_s = tokens_seen / max(elapsed, 1e-9)
            val = evaluate_lm(objective, val_ids, tok, cfg, T, run, cfg.eval_iters, local_bs)
            record = {
                "step": step,
                "lr": scheduler.get_last_lr()[0],
                "train_loss": loss.item(),
                "val_loss": val,
                "tokens_per_s": tok_s,
                "train_time_s": train_time,
            }
            run.log.write(record)
            if cfg.progress and dinfo.is_main:
                tqdm.write(f"step {step}: train loss {loss.item():.4f}, val loss {val:.4f}")
            R.save_state(
                run, model, optimizer, scheduler, meta=meta, step=step, extra={"train_time": train_time}
            )
            R.barrier(dinfo)
            tokens_seen, t0 = 0, time.perf_counter()
            if out_of_time and step < cfg.max_steps:
                break
    bar.close()

    summary = {
        "finished": step >= cfg.max_steps,
        "model": cfg.model,
        "task": meta["task"],
        "params": n_params,
        "steps": step,
        "batch_size": cfg.batch_size,
        "block_size": T,
        "train_time_s": train_time,
        "val_loss": record.get("val_loss"),
        "train_loss": record.get("train_loss"),
        "device": str(dev),
        "amp": str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "fp32",
        "world_size": dinfo.world_size,
    }
    if dinfo.is_main:
        (run.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    run.log.close()
    R.cleanup(dinfo)
    return summary
