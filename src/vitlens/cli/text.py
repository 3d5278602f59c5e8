"""``vitlens lm ...`` and ``vitlens translate ...``: the language models.

vitlens lm train --data ../shared/data/tinyshakespeare --model gpt_char_baby --out runs/shakespeare
vitlens lm sample runs/shakespeare --prompt "ROMEO:" --temperature 0.8 --top-k 200
vitlens lm attention runs/shakespeare "To be, or not to be"
vitlens translate train --data-dir ../shared/data/multi30k --out runs/multi30k
vitlens translate runs/multi30k "Ein Mann fährt Fahrrad."
vitlens translate runs/multi30k --file test.de --ref test.en --beam 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError, DataError
from . import ArgumentParser, add_run_arguments, run_training

TRANSLATE_USAGE = """usage: vitlens translate train [--data-dir DIR] [--out RUN] [options]
       vitlens translate RUN "Ein Mann fährt Fahrrad." [...]
       vitlens translate RUN --file SRC [--ref REF] [--out OUT] [--beam K]

Train a translation model, translate sentences, or translate a file (sacreBLEU with --ref).
`vitlens translate train --help` lists the training options, `vitlens translate RUN --help`
the decoding ones."""


# ------------------------------------------------------------------------------- value checks
def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _nonneg_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be 0 or more")
    return value


# argparse names the type in its message: "invalid non-negative int value: '-5'"
_nonneg_int.__name__, _positive_int.__name__, _nonneg_float.__name__ = (
    "non-negative int",
    "positive int",
    "non-negative float",
)


_LM_HELP = {
    "model": "gpt_char_baby | gpt_char_mini | gpt_nano | bert_mini | bert_nano",
    "model_args": "JSON overrides of the model config, e.g. '{\"dropout\": 0.0}'",
    "data": "a text file or a folder with input.txt (Tiny Shakespeare)",
    "amp": "auto | bf16 | fp16 | fp32 (auto: bf16 on capable GPUs, fp32 on CPU)",
    "time_budget_min": "stop cleanly after this many minutes (resume with --resume)",
}
_TR_HELP = {
    "model": "transformer_multi30k | transformer_base | transformer_nano",
    "model_args": "JSON overrides of the model config, e.g. '{\"dropout\": 0.3}'",
    "data_dir": "folder with {train,val,TEST}.{de,en}(.gz) (Multi30k layout)",
    "vocab_size": "joint BPE vocabulary size",
    "max_tokens": "tokens per batch (padded)",
    "amp": "auto | bf16 | fp16 | fp32",
    "time_budget_min": "stop cleanly after this many minutes",
}


# ------------------------------------------------------------------------------- lm
def register(sub) -> None:
    from ..train.lm import LMTrainConfig
    from ..train.translate import TranslateTrainConfig

    lm = sub.add_parser(
        "lm",
        help="character-level language models (GPT, BERT)",
        description="Train, sample from and inspect character-level GPT / BERT models.",
    )
    lm_sub = lm.add_subparsers(dest="lm_command", metavar="{train,sample,attention}")
    lm.set_defaults(func=lambda args: lm.print_help() or 2)

    t = lm_sub.add_parser("train", help="train a GPT (next character) or BERT (masked characters)")
    add_run_arguments(t, LMTrainConfig, _LM_HELP, choices={"amp": ["auto", "bf16", "fp16", "fp32"]})
    t.set_defaults(func=run_lm_train)

    s = lm_sub.add_parser("sample", help="generate text from a trained GPT run")
    s.add_argument("run", help="run directory of `vitlens lm train`")
    s.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    s.add_argument("--max-new-tokens", type=_nonneg_int, default=500)
    s.add_argument("--temperature", type=_nonneg_float, default=0.8, help="0 = greedy")
    s.add_argument(
        "--top-k", type=_nonneg_int, default=200, help="sample among the k likeliest characters (0 = all)"
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--no-cache", action="store_true", help="recompute the whole context every step")
    s.set_defaults(func=run_lm_sample)

    a = lm_sub.add_parser("attention", help="per-head attention entropy and distance on a sentence")
    a.add_argument("run", help="run directory of `vitlens lm train`")
    a.add_argument("text", help="the sentence to look at")
    a.add_argument("--save", help="write the attention maps of --layer as a PNG here")
    a.add_argument("--layer", type=int, default=-1, help="layer to draw (default: the last)")
    a.set_defaults(func=run_lm_attention)

    tr = sub.add_parser(
        "translate",
        help="train a translation model, or translate with one",
        add_help=False,
        usage=TRANSLATE_USAGE.split("\n", 1)[0][len("usage: ") :],
    )
    tr.add_argument("-h", "--help", action="store_true", dest="translate_help")
    tr.add_argument("rest", nargs=argparse.REMAINDER)
    tr.set_defaults(func=run_translate, _tr_config=TranslateTrainConfig)


def run_lm_train(args) -> int:
    from ..train.lm import LMTrainConfig, train_lm

    return run_training(LMTrainConfig, train_lm, args)


def run_lm_sample(args) -> int:
    from ..text.runs import sample

    text = sample(
        args.run,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        seed=args.seed,
        device=args.device,
        use_cache=not args.no_cache,
    )
    print(text)
    return 0


def run_lm_attention(args) -> int:
    from ..analysis.text_attention import text_attention_report
    from ..text.runs import load_lm

    if not args.text.strip():
        raise DataError(
            'the text is empty; give the sentence to look at in quotes, e.g. "To be, or not to be"'
        )
    if args.save and Path(args.save).is_dir():
        raise ConfigError(f"--save {args.save} is a folder; give a file name such as attention.png")
    model, tok, _ = load_lm(args.run)
    report = text_attention_report(model, tok, args.text)
    print(
        f"{len(report['tokens'])} tokens; entropy in nats (uniform over the visible keys = "
        f"{report['uniform_entropy']:.2f}), distance in tokens"
    )
    for layer, ent, dist in zip(report["layers"], report["entropy"], report["distance"]):
        cells = "  ".join(f"h{h}: {e:.2f} / {d:.1f}" for h, (e, d) in enumerate(zip(ent, dist)))
        print(f"{layer:20s} {cells}")
    if args.save:
        from ..analysis.text_attention import plot_text_attention

        plot_text_attention(report, args.layer, args.save)
        print(f"wrote {args.save}")
    return 0


# ------------------------------------------------------------------------------- translate
def _translate_train_parser(cls) -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="vitlens translate train",
        description="Train the encoder-decoder Transformer (joint BPE, label smoothing, "
        "Noam warmup); ends with test BLEU, greedy and beam search.",
    )
    add_run_arguments(p, cls, _TR_HELP, choices={"amp": ["auto", "bf16", "fp16", "fp32"]})
    return p


def _translate_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="vitlens translate", description="Translate with a trained run.")
    p.add_argument("run", help="run directory of `vitlens translate train`")
    p.add_argument("text", nargs="*", help="sentences to translate (each one argument)")
    p.add_argument("--file", help="translate every line of this file (.gz allowed)")
    p.add_argument("--ref", help="reference translations of --file: print sacreBLEU")
    p.add_argument("--out", help="write the translations here instead of printing them (a new file)")
    p.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")
    p.add_argument("--beam", type=_positive_int, default=4, help="beam size (1 = greedy)")
    p.add_argument("--alpha", type=_nonneg_float, default=0.6, help="length penalty ((5+len)/6)^alpha")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--attention",
        metavar="PNG",
        help="with one sentence: draw the last decoder layer's cross-attention (and print "
        "per-head entropy / distance) while the model writes its translation",
    )
    return p


def run_translate(args) -> int:
    rest = list(args.rest)
    if args.translate_help or not rest:
        print(TRANSLATE_USAGE)
        return 0 if args.translate_help else 2
    if rest[0] == "train":
        args.verb = "translate train"  # how an error line names the command
        from ..train.translate import train_translate

        targs = _translate_train_parser(args._tr_config).parse_args(rest[1:])
        return run_training(args._tr_config, train_translate, targs)
    return _decode(_translate_parser().parse_args(rest))


def _decode(a) -> int:
    from ..text.data import read_lines
    from ..text.decode import corpus_bleu, translate
    from ..text.runs import load_translator

    if not a.text and not a.file:
        raise ConfigError('nothing to translate: give sentences ("Ein Mann fährt Fahrrad.") or --file FILE')
    if a.ref and not a.file:
        raise ConfigError("--ref needs --file (the references must align with the file's lines)")
    empty = [i + 1 for i, t in enumerate(a.text) if not t.strip()]
    if empty:
        raise DataError(f"sentence {empty[0]} is empty; give the text to translate in quotes")
    if a.attention and (a.file or len(a.text) != 1):
        raise ConfigError("--attention draws one sentence: give exactly one sentence and no --file")
    if a.attention and Path(a.attention).is_dir():
        raise ConfigError(f"--attention {a.attention} is a folder; give a file name such as attention.png")
    if a.out:
        _check_new_file(Path(a.out), overwrite=a.overwrite)
    file_lines = read_lines(a.file) if a.file else []
    if a.file and not any(line.strip() for line in file_lines):
        raise DataError(f"{a.file} has no text to translate")
    refs = read_lines(a.ref) if a.ref else None
    if refs is not None and len(refs) != len(file_lines):
        raise DataError(f"--ref has {len(refs)} lines but --file has {len(file_lines)}; they must align")
    model, tok, _ = load_translator(a.run, a.device)
    sentences = list(a.text) + file_lines
    hyps = translate(
        model, tok, sentences, beam_size=a.beam, alpha=a.alpha, batch_size=a.batch_size, device=a.device
    )
    if a.out:
        _write_atomic(Path(a.out), "\n".join(hyps) + "\n")
    else:
        sys.stdout.write("\n".join(hyps) + "\n")
    if a.attention:
        _translation_attention(model, tok, sentences, hyps, a.attention)
    if refs is not None:
        file_hyps = hyps[len(a.text) :]
        print(
            f"BLEU = {corpus_bleu(file_hyps, refs):.2f} (sacreBLEU, detokenized, {len(refs)} sentences, "
            f"beam {a.beam})",
            file=sys.stderr,
        )
    return 0


def _check_new_file(path: Path, *, overwrite: bool) -> None:
    """Refuse before any work: an existing file (unless ``overwrite``), a folder, a missing parent."""
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise ConfigError(f"--out {path} already exists; choose another file or pass --overwrite")
    if not path.parent.is_dir():
        raise ConfigError(f"--out {path}: the folder {path.parent} does not exist")


def _write_atomic(path: Path, text: str) -> None:
    # A temporary file beside the target, then a rename: an interrupted write leaves no half file.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _translation_attention(model, tok, sentences, hyps, path) -> None:
    from ..analysis.text_attention import plot_text_attention, translation_attention_report

    report = translation_attention_report(model, tok, sentences[0], hyps[0])
    for layer, ent, dist in zip(report["layers"], report["entropy"], report["distance"]):
        cells = "  ".join(
            f"h{h}: {e:.2f}" + ("" if dist is None else f" / {dist[h]:.1f}") for h, e in enumerate(ent)
        )
        print(f"{layer:24s} {cells}", file=sys.stderr)
    cross = [n for n in report["layers"] if n.endswith("cross_attn")]
    plot_text_attention(report, cross[-1], path)
    print(f"entropy (nats) / distance (tokens) per head; wrote {path}", file=sys.stderr)
