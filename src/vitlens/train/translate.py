"""Translation with the encoder-decoder Transformer (Multi30k de->en by default).

    config -> joint BPE on the training split -> token-budget batches -> model ->
    Adam(0.9, 0.98, 1e-9) + "Noam" warmup -> [step: teacher-forced label-smoothed loss,
    update; every eval_every steps: validation loss + greedy BLEU, checkpoint] ->
    test BLEU (greedy and beam search) -> summary

The schedule is the paper's: lr = factor * d^-0.5 * min(step^-0.5, step * warmup^-1.5),
a linear warmup then inverse-square-root decay. BLEU is sacreBLEU's detokenized corpus
BLEU of the decoded text against the raw reference lines.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models import create_model
from ..models.seq2seq import Seq2SeqTransformer
from . import text_run as R
from ..text.data import (
    PAD,
    collate_pairs,
    encode_pairs,
    epoch_batch_indices,
    epoch_batches,
    load_parallel,
    load_subword_tokenizer,
    train_bpe,
)
from ..text.decode import corpus_bleu, translate


@dataclass
class TranslateTrainConfig:
    model: str = "transformer_multi30k"
    model_args: dict = field(default_factory=dict)
    data_dir: str | None = None  # holds {train,val,<test_split>}.{src,tgt}[.gz]
    src_lang: str = "de"
    tgt_lang: str = "en"
    test_split: str = "test_2016_flickr"
    vocab_size: int = 8000  # joint BPE for both languages
    out: str = "runs/translate"
    seed: int = 0
    # optimisation
    max_steps: int = 10000
    max_tokens: int = 4096  # per batch (source or target side, padded), summed over processes
    lr_factor: float = 1.0  # the Noam schedule's scale
    warmup_steps: int = 1000
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    # decoding at the end
    beam_size: int = 4
    length_penalty: float = 0.6  # GNMT alpha
    # speed, numerics, bookkeeping
    amp: str = "auto"
    device: str = "auto"
    compile: bool = False
    eval_every: int = 500
    eval_bleu: bool = True  # greedy validation BLEU at each evaluation
    time_budget_min: float | None = None
    limit_train: int | None = None  # use only the first N training pairs (tests)
    limit_eval: int | None = None  # and the first N validation / test pairs
    progress: bool = True


def noam(optimizer: torch.optim.Optimizer, d_model: int, warmup: int, factor: float = 1.0):
    """LambdaLR of "Attention Is All You Need" (set the optimizer's lr to 1.0)."""

    def rate(step: int) -> float:
        s = step + 1
        return factor * d_model**-0.5 * min(s**-0.5, s * warmup**-1.5)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, rate)


def seq2seq_loss(model, src: torch.Tensor, tgt: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Teacher forcing: predict tgt[:, 1:] from tgt[:, :-1]; mean over non-padding target tokens."""
    logits = model(src, tgt[:, :-1])  # (B, T-1, V)
    return F.cross_entropy(
        logits.float().flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD, label_smoothing=label_smoothing
    )


@torch.no_grad()
def evaluate_loss(model, pairs, run: R.Run, max_tokens: int) -> float:
    """Teacher-forced cross-entropy (no smoothing) per target token over ``pairs``."""
    was = model.training
    model.eval()
    total = count = 0.0
    for src, tgt in epoch_batches(
        pairs, max_tokens, seed=0, epoch=0, rank=run.dist.rank, world_size=run.dist.world_size
    ):
        n = (tgt[:, 1:] != PAD).sum().item()
        with run.autocast():
            total += seq2seq_loss(model, src.to(run.device), tgt.to(run.device)).item() * n
        count += n
    model.train(was)
    total, count = R.all_reduce_sum([total, count], run.dist, run.device)
    return total / max(count, 1)


def train_translate(cfg: TranslateTrainConfig, *, resume: bool = False) -> dict:
    """Train on ``cfg.data_dir``; returns the summary with test BLEU (also RUN/summary.json)."""
    run = R.start_run(cfg, resume=resume)
    dev, dinfo = run.device, run.dist

    torch.manual_seed(cfg.seed)  # the initial weights
    # ---- data: joint BPE trained on the training split (reused when resuming)
    train_src, train_tgt = load_parallel(cfg.data_dir, "train", cfg.src_lang, cfg.tgt_lang, cfg.limit_train)
    val_src, val_tgt = load_parallel(cfg.data_dir, "val", cfg.src_lang, cfg.tgt_lang, cfg.limit_eval)
    tok_path = run.dir / "tokenizer.json"
    if tok_path.exists() and resume:
        tok = load_subword_tokenizer(tok_path)
    else:
        tok = train_bpe(train_src + train_tgt, cfg.vocab_size)
        if dinfo.is_main:
            tok.save(str(tok_path))
    vocab = tok.get_vocab_size()
    margs = {**cfg.model_args, "src_vocab_size": vocab, "tgt_vocab_size": vocab, "pad_id": PAD}
    model = create_model(cfg.model, **margs).to(dev)
    if not isinstance(model, Seq2SeqTransformer):
        raise ValueError(
            f"{cfg.model} is not an encoder-decoder; `vitlens translate train` takes transformer_* models"
        )
    train_pairs = encode_pairs(tok, train_src, train_tgt, model.cfg.max_len)
    val_pairs = encode_pairs(tok, val_src, val_tgt, model.cfg.max_len)
    local_tokens = cfg.max_tokens // dinfo.world_size

    # ---- optimiser, schedule
    optimizer = torch.optim.Adam(
        model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9, weight_decay=cfg.weight_decay
    )
    scheduler = noam(optimizer, model.cfg.d_model, cfg.warmup_steps, cfg.lr_factor)
    meta = {
        "model": cfg.model,
        "model_args": margs,
        "task": "translation",
        "tokenizer": "tokenizer.json",
        "src_lang": cfg.src_lang,
        "tgt_lang": cfg.tgt_lang,
    }
    step, train_time, state = 0, 0.0, {}
    if resume and (run.dir / R.LAST).exists():
        state = R.restore_state(run, model, optimizer, scheduler)
        step, train_time = state["step"], state["train_time"]
    if dinfo.is_main:
        (run.dir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    step_model = run.wrap(model)
    if cfg.compile:
        step_model = torch.compile(step_model)

    # ---- steps: epochs of shuffled, length-bucketed batches; (epoch, batch) is checkpointed
    n_params = R.count_params(model)
    epoch = state.get("epoch", 0) if step else 0
    pos = state.get("pos", 0) if step else 0
    bar = tqdm(
        total=cfg.max_steps, initial=step, desc=cfg.model, disable=not (cfg.progress and dinfo.is_main)
    )
    record: dict = {}
    tokens_seen, t0 = 0, time.perf_counter()
    out_of_time = False
    while step < cfg.max_steps and not out_of_time:
        batches = epoch_batch_indices(
            train_pairs, local_tokens, cfg.seed, epoch, dinfo.rank, dinfo.world_size
        )
        if not batches:
            raise ValueError(f"no training batches: {len(train_pairs)} pairs for max_tokens {cfg.max_tokens}")
        while pos < len(batches) and step < cfg.max_steps and not out_of_time:
            torch.manual_seed(R.step_seed(cfg.seed, step, dinfo.rank))  # dropout
            src, tgt = collate_pairs(train_pairs, batches[pos])
            src, tgt = src.to(dev, non_blocking=True), tgt.to(dev, non_blocking=True)
            with run.autocast():
                loss = seq2seq_loss(step_model, src, tgt, cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} at step {step}; lower --lr-factor or use --amp fp32"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step, pos = step + 1, pos + 1
            tokens_seen += int((tgt[:, 1:] != PAD).sum()) * dinfo.world_size
            elapsed = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss.item():.3f}",
                tgt_tok_s=f"{tokens_seen / elapsed:.0f}",
                lr=f"{scheduler.get_last_lr()[0]:.1e}",
            )

            # ---- evaluate + checkpoint
            out_of_time = run.out_of_time(cfg.time_budget_min)
            if step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time:
                train_time += elapsed
                record = {
                    "step": step,
                    "epoch": epoch + pos / len(batches),
                    "lr": scheduler.get_last_lr()[0],
                    "train_loss": loss.item(),
                    "tgt_tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                    "val_loss": evaluate_loss(model, val_pairs, run, local_tokens),
                    "train_time_s": train_time,
                }
                if cfg.eval_bleu and dinfo.is_main:
                    with run.autocast():
                        hyps = translate(model, tok, val_src, beam_size=1, device=dev)
                    model.train()
                    record["val_bleu_greedy"] = corpus_bleu(hyps, val_tgt)
                run.log.write(record)
                if cfg.progress and dinfo.is_main:
                    tqdm.write(
                        json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()})
                    )
                R.save_state(
                    run,
                    model,
                    optimizer,
                    scheduler,
                    meta=meta,
                    step=step,
                    extra={"train_time": train_time, "epoch": epoch, "pos": pos},
                )
                R.barrier(dinfo)
                tokens_seen, t0 = 0, time.perf_counter()
        if pos >= len(batches):
            epoch, pos = epoch + 1, 0
    bar.close()

    # ---- test BLEU: greedy and beam search (main process)
    summary = {
        "finished": step >= cfg.max_steps,
        "model": cfg.model,
        "params": n_params,
        "vocab_size": vocab,
        "steps": step,
        "epochs": record.get("epoch"),
        "max_tokens": cfg.max_tokens,
        "train_time_s": train_time,
        "val_loss": record.get("val_loss"),
        "val_bleu_greedy": record.get("val_bleu_greedy"),
        "device": str(dev),
        "amp": str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "fp32",
        "world_size": dinfo.world_size,
    }
    if dinfo.is_main and summary["finished"]:
        summary.update(
            evaluate_bleu(
                model,
                tok,
                cfg.data_dir,
                cfg.test_split,
                src_lang=cfg.src_lang,
                tgt_lang=cfg.tgt_lang,
                beam_size=cfg.beam_size,
                alpha=cfg.length_penalty,
                device=dev,
                limit=cfg.limit_eval,
                out_dir=run.dir,
            )
        )
        (run.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    run.log.close()
    R.cleanup(dinfo)
    return summary


def evaluate_bleu(
    model,
    tok,
    data_dir,
    split: str,
    *,
    src_lang: str = "de",
    tgt_lang: str = "en",
    beam_size: int = 4,
    alpha: float = 0.6,
    device="cpu",
    limit: int | None = None,
    out_dir: Path | None = None,
) -> dict:
    """Test-set BLEU with greedy decoding and with beam search; writes the hypotheses to ``out_dir``."""
    src, ref = load_parallel(data_dir, split, src_lang, tgt_lang, limit)
    result = {"test_split": split}
    for name, k in (("greedy", 1), (f"beam{beam_size}", beam_size)):
        t0 = time.perf_counter()
        hyps = translate(model, tok, src, beam_size=k, alpha=alpha, device=device)
        result[f"test_bleu_{name}"] = corpus_bleu(hyps, ref)
        result[f"decode_time_s_{name}"] = time.perf_counter() - t0
        if out_dir is not None:
            (Path(out_dir) / f"{split}.{name}.{tgt_lang}").write_text("\n".join(hyps) + "\n")
        if k == 1 and beam_size == 1:
            break
    return result
