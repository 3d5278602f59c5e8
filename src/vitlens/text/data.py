"""Text data: a character vocabulary (Tiny Shakespeare), a joint subword BPE (Multi30k),
and the batching each training loop needs.

* Character LM: the corpus becomes one long id tensor; the first 90% trains, the last 10%
  validates (the char-rnn / nanoGPT split); batches are random windows of ``block_size + 1``.
* Translation: one byte-pair-encoding vocabulary for both languages, trained with Hugging
  Face ``tokenizers`` on the training split only. A Metaspace pre-tokenizer marks word starts
  with "▁" and its decoder turns them back into spaces, so decoded output is ordinary text
  that sacreBLEU can score against the raw references. Batches hold sentence pairs of
  similar length up to a token budget (Vaswani et al. batch by ~25k tokens).
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..errors import ConfigError, DataError, MissingFileError

# ------------------------------------------------------------------------------- characters
BERT_SPECIALS = ("[PAD]", "[MASK]", "[CLS]", "[SEP]")  # [PAD] first: pad_id = 0


class CharTokenizer:
    """Characters <-> ids. ``specials`` (e.g. BERT's [PAD] [MASK] [CLS]) take the first ids."""

    def __init__(self, chars: Sequence[str], specials: Sequence[str] = ()):
        self.specials = list(specials)
        self.chars = list(chars)
        self.itos = self.specials + self.chars
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def from_text(cls, text: str, specials: Sequence[str] = ()) -> CharTokenizer:
        return cls(sorted(set(text)), specials)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def token_id(self, token: str) -> int:
        if token not in self.stoi:
            raise DataError(f"{token!r} is not in this vocabulary (specials: {self.specials})")
        return self.stoi[token]

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.chars))
        if unknown:
            raise DataError(
                f"characters {unknown} are not in the model's vocabulary of {len(self.chars)} "
                "characters; remove them from the prompt"
            )
        return [self.stoi[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.specials)
        return "".join(self.itos[i] for i in ids if i >= n)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(
            json.dumps({"type": "char", "specials": self.specials, "chars": self.chars}) + "\n"
        )

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        d = json.loads(Path(path).read_text())
        return cls(d["chars"], d["specials"])


def resolve_text_file(path: str | Path | None) -> Path:
    """A text file, or a directory holding ``input.txt`` (the Tiny Shakespeare layout)."""
    if path is None:
        raise ConfigError("no text given; pass --data PATH (e.g. ../shared/data/tinyshakespeare/input.txt)")
    path = Path(path)
    if path.is_dir():
        path = path / "input.txt"
    if not path.is_file():
        raise MissingFileError(
            f"text file {path} does not exist (expected a .txt file or a folder with input.txt)"
        )
    return path


def load_char_corpus(
    path: str | Path | None,
    *,
    val_fraction: float = 0.1,
    specials: Sequence[str] = (),
    max_chars: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, CharTokenizer]:
    """-> (train ids, val ids, tokenizer): first ``1 - val_fraction`` of the text trains, the rest validates.

    The vocabulary is every character of the whole file (as in nanoGPT), so validation has no
    unknown characters. ``max_chars`` then keeps only the start of the text (tests).
    """
    text = resolve_text_file(path).read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text, specials)
    if max_chars is not None:
        text = text[:max_chars]
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    n = int(len(ids) * (1 - val_fraction))
    return ids[:n], ids[n:], tok


def random_windows(
    data: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT batches: ``batch_size`` random windows -> inputs (B, T) and next-token targets (B, T)."""
    if len(data) <= block_size:
        raise DataError(f"text of {len(data)} tokens is too short for windows of {block_size} + 1")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    offsets = torch.arange(block_size + 1)
    chunk = data[starts[:, None] + offsets]  # (B, T + 1)
    return chunk[:, :-1], chunk[:, 1:]


def cls_windows(
    data: torch.Tensor, length: int, batch_size: int, cls_id: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """BERT batches: random windows of ``length - 1`` tokens behind a [CLS] token -> (B, length)."""
    x, _ = random_windows(data, length - 1, batch_size, generator)
    return torch.cat([torch.full((batch_size, 1), cls_id, dtype=x.dtype), x], dim=1)


# ------------------------------------------------------------------------------- subwords
PAD, BOS, EOS, UNK = 0, 1, 2, 3
SUBWORD_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3 in this order


def train_bpe(texts: Sequence[str], vocab_size: int = 8000, min_frequency: int = 2):
    """A byte-pair-encoding ``tokenizers.Tokenizer`` trained on ``texts`` (both languages together).

    Words are split at spaces (Metaspace: "▁" marks a word start) and punctuation; the
    decoder restores the spaces, so ``decode(encode(s)) == s`` for NFC-normalised text.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SUBWORD_SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    for i, s in enumerate(SUBWORD_SPECIALS):
        assert tok.token_to_id(s) == i, "special tokens must take ids 0..3"
    return tok


def load_subword_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"tokenizer file {path} does not exist")
    return Tokenizer.from_file(str(path))


def read_lines(path: str | Path) -> list[str]:
    """Lines of a text file (gzip if it ends in .gz), without their newline."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def load_parallel(
    data_dir: str | Path | None,
    split: str,
    src_lang: str = "de",
    tgt_lang: str = "en",
    limit: int | None = None,
) -> tuple[list[str], list[str]]:
    """Aligned sentences of ``{split}.{lang}[.gz]`` in ``data_dir`` (the Multi30k layout)."""
    if data_dir is None:
        raise ConfigError("no data directory; pass --data-dir (e.g. ../shared/data/multi30k)")
    data_dir = Path(data_dir)

    def find(lang):
        for name in (f"{split}.{lang}.gz", f"{split}.{lang}"):
            if (data_dir / name).is_file():
                return data_dir / name
        raise MissingFileError(
            f"{data_dir} has no {split}.{lang}(.gz); expected the Multi30k layout "
            "train/val/test_2016_flickr.{de,en}.gz"
        )

    src, tgt = read_lines(find(src_lang)), read_lines(find(tgt_lang))
    if len(src) != len(tgt):
        raise DataError(
            f"{split}: {len(src)} {src_lang} lines but {len(tgt)} {tgt_lang} lines; files must align"
        )
    return (src[:limit], tgt[:limit]) if limit else (src, tgt)


def encode_pairs(
    tok, src: Sequence[str], tgt: Sequence[str], max_len: int
) -> list[tuple[list[int], list[int]]]:
    """Subword ids per pair; the target gets <s> ... </s>. Pairs longer than ``max_len`` are dropped."""
    pairs = []
    for s, t in zip(tok.encode_batch(list(src)), tok.encode_batch(list(tgt))):
        s_ids, t_ids = s.ids + [EOS], [BOS] + t.ids + [EOS]
        if len(s_ids) <= max_len and len(t_ids) <= max_len:
            pairs.append((s_ids, t_ids))
    return pairs


def token_batches(lengths: Sequence[int], max_tokens: int, *, seed: int | None = None) -> list[list[int]]:
    """Group indices into batches of similar length with at most ``max_tokens`` (padded) tokens.

    With a seed: shuffle, sort within pools of ~100 batches (little padding, yet random), and
    shuffle the batch order; without: sorted by length (evaluation).
    """
    idx = list(range(len(lengths)))
    if seed is None:
        idx.sort(key=lambda i: lengths[i])
        pools = [idx]
    else:
        rng = random.Random(seed)
        rng.shuffle(idx)
        pool = max(1, 100 * max_tokens // max(1, int(sum(lengths) / max(1, len(lengths)))))
        pools = [sorted(idx[i : i + pool], key=lambda j: lengths[j]) for i in range(0, len(idx), pool)]
    batches = []
    for pool in pools:
        batch, longest = [], 0
        for i in pool:
            longest_if = max(longest, lengths[i])
            if batch and longest_if * (len(batch) + 1) > max_tokens:
                batches.append(batch)
                batch, longest_if = [], lengths[i]
            batch.append(i)
            longest = longest_if
        if batch:
            batches.append(batch)
    if seed is not None:
        random.Random(seed + 1).shuffle(batches)
    return batches


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = PAD) -> torch.Tensor:
    """Right-pad id lists into a (B, T) tensor."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def epoch_batch_indices(
    pairs, max_tokens: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """One epoch's batches of pair indices, shuffled by (seed, epoch); each process takes every
    ``world_size``-th batch (all get the same count)."""
    lengths = [max(len(s), len(t)) for s, t in pairs]
    batches = token_batches(lengths, max_tokens, seed=seed * 100_003 + epoch)
    return batches[: len(batches) - len(batches) % world_size][rank::world_size]


def collate_pairs(pairs, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (src (B, S), tgt (B, T)) right-padded with PAD."""
    return pad_batch([pairs[i][0] for i in indices]), pad_batch([pairs[i][1] for i in indices])


def epoch_batches(
    pairs, max_tokens: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of :func:`epoch_batch_indices`, collated."""
    for b in epoch_batch_indices(pairs, max_tokens, seed, epoch, rank, world_size):
        yield collate_pairs(pairs, b)
