"""Using a trained language-model run: load it, sample from a GPT, load a translator.

The run folders are written by ``vitlens lm train`` (``chars.json``) and ``vitlens translate
train`` (``tokenizer.json``); the model itself is rebuilt by :func:`vitlens.models.load_model`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, MissingFileError, ModelError
from ..models.gpt import GPT
from ..models.loading import load_run_model
from ..models.seq2seq import Seq2SeqTransformer
from .data import CharTokenizer, load_subword_tokenizer


def load_lm(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, CharTokenizer, dict]:
    """(model in eval mode, tokenizer, meta) of a ``vitlens lm train`` run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "chars.json").is_file():
        raise MissingFileError(f"{run_dir} has no chars.json; is it a `vitlens lm train` run directory?")
    model, meta = load_run_model(run_dir)
    return model.to(device), CharTokenizer.load(run_dir / "chars.json"), meta


def sample(
    run_dir: str | Path,
    prompt: str = "\n",
    *,
    max_new_tokens: int = 500,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int = 0,
    device: str | torch.device = "cpu",
    use_cache: bool = True,
) -> str:
    """Continue ``prompt`` with a trained GPT run; returns prompt + continuation."""
    model, tok, meta = load_lm(run_dir, device)
    if not isinstance(model, GPT):
        raise ModelError(f"{run_dir} holds a {meta.get('model')} (a masked LM); sampling needs a GPT run")
    if not prompt:
        raise ConfigError("the prompt is empty; give at least one character (e.g. --prompt $'\\n')")
    idx = torch.tensor([tok.encode(prompt)], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(
        idx, max_new_tokens, temperature=temperature, top_k=top_k, use_cache=use_cache, generator=g
    )
    return tok.decode(out[0].tolist())


def load_translator(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, subword tokenizer, meta) of a ``vitlens translate train`` run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "tokenizer.json").is_file():
        raise MissingFileError(
            f"{run_dir} has no tokenizer.json; is it a `vitlens translate train` run directory?"
        )
    model, meta = load_run_model(run_dir)
    if not isinstance(model, Seq2SeqTransformer):
        raise ModelError(f"{run_dir} holds a {meta.get('model')}, not a translation model")
    return model.to(device), load_subword_tokenizer(run_dir / "tokenizer.json"), meta
