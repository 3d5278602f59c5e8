"""Translation with the encoder-decoder Transformer (Multi30k de->en by default), on the harness.

    config -> joint BPE on the training split -> token-budget batches -> model ->
    Adam(0.9, 0.98, 1e-9) + "Noam" warmup -> [step: teacher-forced label-smoothed loss,
    update; every eval_every steps: validation loss + greedy BLEU, checkpoint] ->
    test BLEU (greedy and beam search) -> summary

The schedule is the paper's: lr = factor * d^-0.5 * min(step^-0.5, step * warmup^-1.5),
a linear warmup then inverse-square-root decay. BLEU is sacreBLEU's detokenized corpus
BLEU of the decoded text against the raw reference lines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import Config
from ..errors import ConfigError, DataError, ModelError
from ..models import create_model
from ..models.registry import model_config_class
from ..models.seq2seq import Seq2SeqConfig
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
from ..utils import eval_mode
from .distributed import all_reduce_sum
from .harness import Run, StepLoop, count_params, model_config, run_steps, share_of_batch, start_run, weighted


@dataclass
class TranslateTrainConfig(Config):
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

    def __post_init__(self):
        for name in ("max_steps", "max_tokens", "eval_every", "warmup_steps", "beam_size", "vocab_size"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be at least 1, got {getattr(self, name)}")
        if self.vocab_size < 100:
            # BPE keeps every character of the corpus plus 4 specials whatever the target size, and a
            # target below the alphabet makes tokenizers' trainer crawl; no useful vocabulary is that small.
            raise ConfigError(
                f"--vocab-size {self.vocab_size} is smaller than the characters of any real corpus; "
                "give at least 100 (8000 is the default for Multi30k)"
            )
        if self.amp not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"--amp must be one of auto, bf16, fp16, fp32; got {self.amp!r}")


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
def evaluate_loss(model, pairs, run: Run, max_tokens: int) -> float:
    """Teacher-forced cross-entropy (no smoothing) per target token over ``pairs``."""
    total = count = 0.0
    with eval_mode(model):
        for src, tgt in epoch_batches(
            pairs, max_tokens, seed=0, epoch=0, rank=run.dist.rank, world_size=run.dist.world_size
        ):
            n = (tgt[:, 1:] != PAD).sum().item()
            with run.autocast():
                total += seq2seq_loss(model, src.to(run.device), tgt.to(run.device)).item() * n
            count += n
    total, count = all_reduce_sum([total, count], run.dist, run.device)
    return total / max(count, 1)


# ------------------------------------------------------------------------------- the data
@dataclass
class TranslationData:
    tok: object  # a Hugging Face `tokenizers.Tokenizer` (joint BPE)
    train_pairs: list
    val_pairs: list
    val_src: list[str]
    val_tgt: list[str]


def load_translation_data(cfg: TranslateTrainConfig, run: Run, max_len: int) -> TranslationData:
    """Raw pairs, the joint BPE (trained on the training split, or the run's own when resuming)
    and the encoded pairs cut to the model's ``max_len``."""
    train_src, train_tgt = load_parallel(cfg.data_dir, "train", cfg.src_lang, cfg.tgt_lang, cfg.limit_train)
    val_src, val_tgt = load_parallel(cfg.data_dir, "val", cfg.src_lang, cfg.tgt_lang, cfg.limit_eval)
    tok_path = run.dir / "tokenizer.json"
    if run.resume and tok_path.exists():
        tok = load_subword_tokenizer(tok_path)
    else:
        tok = train_bpe(train_src + train_tgt, cfg.vocab_size)
    return TranslationData(
        tok,
        encode_pairs(tok, train_src, train_tgt, max_len),
        encode_pairs(tok, val_src, val_tgt, max_len),
        val_src,
        val_tgt,
    )


class EpochBatches:
    """Shuffled, length-bucketed batches of at most ``max_tokens`` (padded) tokens, epoch after
    epoch. Every process forms the same global batches and keeps every world_size-th pair of each
    (see :func:`~vitlens.train.harness.share_of_batch`), so N processes train as one does; (epoch,
    pos) is the position a checkpoint stores so that a resumed run draws the same batches."""

    def __init__(self, pairs, max_tokens: int, seed: int, run: Run, epoch: int = 0, pos: int = 0):
        self.pairs, self.max_tokens, self.seed, self.run = pairs, max_tokens, seed, run
        self.epoch, self.pos = epoch, pos
        self.batches = self._epoch_batches()

    def _epoch_batches(self) -> list[list[int]]:
        world = self.run.dist.world_size
        batches = epoch_batch_indices(self.pairs, self.max_tokens, self.seed, self.epoch)
        batches = [b for b in batches if len(b) >= world]  # every process needs a pair
        if not batches:
            raise DataError(
                f"no training batches: {len(self.pairs)} pairs for max_tokens {self.max_tokens}; "
                "raise --max-tokens or --limit-train"
            )
        return batches

    def next(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This process's (src, tgt, loss weight) of the next global batch."""
        if self.pos >= len(self.batches):
            self.epoch, self.pos = self.epoch + 1, 0
            self.batches = self._epoch_batches()
        batch = self.batches[self.pos]
        self.pos += 1
        targets = torch.tensor([len(self.pairs[i][1]) - 1 for i in batch])  # predicted tokens (after BOS)
        local, _, weight = share_of_batch(self.run, (torch.tensor(batch), targets), targets)
        return (*collate_pairs(self.pairs, local.tolist()), weight)

    @property
    def progress(self) -> float:
        """Epochs done, fractional."""
        return self.epoch + self.pos / len(self.batches)

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


def translation_model_config(cfg: TranslateTrainConfig) -> Seq2SeqConfig:
    """The model's config, known before the BPE is trained and the model is built."""
    if model_config_class(cfg.model) is not Seq2SeqConfig:
        raise ModelError(
            f"{cfg.model} is not an encoder-decoder; `vitlens translate train` takes transformer_* models"
        )
    return model_config(cfg.model, cfg.model_args)


def validation_figures(
    model, data: TranslationData, run: Run, local_tokens: int, batches: EpochBatches
) -> dict:
    """Validation loss (all processes) and greedy BLEU (main process) at one evaluation."""
    out = {"epoch": batches.progress, "val_loss": evaluate_loss(model, data.val_pairs, run, local_tokens)}
    if run.cfg.eval_bleu and run.is_main:
        with eval_mode(model), run.autocast():
            hyps = translate(model, data.tok, data.val_src, beam_size=1, device=run.device)
        out["val_bleu_greedy"] = corpus_bleu(hyps, data.val_tgt)
    return out


# ------------------------------------------------------------------------------- training
def train_translate(
    cfg: TranslateTrainConfig, *, resume: bool = False, overrides: dict | None = None
) -> dict:
    """Train on ``cfg.data_dir``; returns the summary with test BLEU (also RUN/summary.json).

    ``resume``/``overrides``: as for :func:`vitlens.train.train` (``max_steps`` may change on purpose).
    """
    run = start_run(cfg, resume=resume, overrides=overrides, counter="step")
    cfg, dev = run.cfg, run.device
    max_len = translation_model_config(cfg).max_len

    torch.manual_seed(cfg.seed)  # the initial weights
    data = load_translation_data(cfg, run, max_len)
    vocab = data.tok.get_vocab_size()
    margs = {**cfg.model_args, "src_vocab_size": vocab, "tgt_vocab_size": vocab, "pad_id": PAD}
    model = create_model(cfg.model, **margs).to(dev)
    local_tokens = cfg.max_tokens // run.dist.world_size

    # ---- optimiser, schedule
    optimizer = torch.optim.Adam(
        model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9, weight_decay=cfg.weight_decay
    )
    scheduler = noam(optimizer, model.cfg.d_model, cfg.warmup_steps, cfg.lr_factor)
    scaler = run.grad_scaler()
    meta = {
        "model": cfg.model,
        "model_args": margs,
        "task": "translation",
        "tokenizer": "tokenizer.json",
        "src_lang": cfg.src_lang,
        "tgt_lang": cfg.tgt_lang,
    }
    state = run.restore(model, optimizer, scheduler, scaler)
    batches = EpochBatches(
        data.train_pairs, cfg.max_tokens, cfg.seed, run, state.get("epoch", 0), state.get("pos", 0)
    )
    run.open(meta, files={"tokenizer.json": lambda path: data.tok.save(str(path))})
    step_model = run.wrap(model)
    if cfg.compile:
        step_model = torch.compile(step_model)

    # ---- steps: epochs of shuffled, length-bucketed batches; (epoch, batch) is checkpointed
    def loss(batch) -> torch.Tensor:
        src, tgt, weight = batch
        src, tgt = src.to(dev, non_blocking=True), tgt.to(dev, non_blocking=True)
        return weighted(seq2seq_loss(step_model, src, tgt, cfg.label_smoothing), weight)

    task = StepLoop(
        next_batch=lambda step: batches.next(),
        loss=loss,
        tokens=lambda batch: int((batch[1][:, 1:] != PAD).sum()),
        evaluate=lambda: validation_figures(model, data, run, local_tokens, batches),
        position=batches.state,
        tokens_name="tgt_tokens_per_s",
        fix="lower --lr-factor or use --amp fp32",
    )
    step, record, train_time = run_steps(
        run, task, model, optimizer, scheduler, meta=meta, state=state, scaler=scaler
    )
    return run.finish(translation_summary(run, model, data, cfg, step, record, train_time))


def translation_summary(
    run: Run, model, data: TranslationData, cfg, step: int, record: dict, train_time: float
) -> dict:
    """The run's figures, with test BLEU (greedy and beam search, main process) once it is finished."""
    summary = {
        "finished": step >= cfg.max_steps,
        "model": cfg.model,
        "params": count_params(model),
        "vocab_size": data.tok.get_vocab_size(),
        "steps": step,
        "epochs": record.get("epoch"),
        "max_tokens": cfg.max_tokens,
        "train_time_s": train_time,
        "val_loss": record.get("val_loss"),
        "val_bleu_greedy": record.get("val_bleu_greedy"),
        "device": str(run.device),
        "amp": run.amp_name,
        "world_size": run.dist.world_size,
    }
    if run.is_main and summary["finished"]:
        summary.update(evaluate_bleu(model, data.tok, cfg, device=run.device, out_dir=run.dir))
    return summary


def evaluate_bleu(
    model, tok, cfg: TranslateTrainConfig, *, device="cpu", out_dir: Path | None = None
) -> dict:
    """BLEU on ``cfg.test_split`` (its first ``cfg.limit_eval`` pairs) with greedy decoding and with
    beam search (``cfg.beam_size``, ``cfg.length_penalty``); writes the hypotheses to ``out_dir``."""
    split, tgt_lang, beam_size = cfg.test_split, cfg.tgt_lang, cfg.beam_size
    src, ref = load_parallel(cfg.data_dir, split, cfg.src_lang, tgt_lang, cfg.limit_eval)
    result = {"test_split": split}
    for name, k in (("greedy", 1), (f"beam{beam_size}", beam_size)):
        t0 = time.perf_counter()
        hyps = translate(model, tok, src, beam_size=k, alpha=cfg.length_penalty, device=device)
        result[f"test_bleu_{name}"] = corpus_bleu(hyps, ref)
        result[f"decode_time_s_{name}"] = time.perf_counter() - t0
        if out_dir is not None:
            (Path(out_dir) / f"{split}.{name}.{tgt_lang}").write_text("\n".join(hyps) + "\n")
        if k == 1 and beam_size == 1:
            break
    return result
