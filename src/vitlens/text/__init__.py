"""Language data and decoding on the shared block library: character and BPE tokenizers,
batching, greedy and beam search, and loading trained runs (``load_lm``, ``sample``,
``load_translator``). The training tasks live in :mod:`vitlens.train` (``train_lm``,
``train_translate``).
"""

from .decode import beam_search, corpus_bleu, greedy_decode, translate
from .runs import load_lm, load_translator, sample

__all__ = [
    "beam_search",
    "corpus_bleu",
    "greedy_decode",
    "translate",
    "load_lm",
    "sample",
    "load_translator",
]
