"""Language models on the shared block library: data, decoding, training loops, attention tools.

``train_lm`` trains a GPT (causal LM) or a BERT (masked LM) on characters; ``train_translate``
trains the encoder-decoder on a parallel corpus; ``decode`` holds greedy and beam search.
"""

from .decode import beam_search, corpus_bleu, greedy_decode, translate
from .train_lm import LMTrainConfig, load_lm, sample, train_lm
from .train_translate import TranslateTrainConfig, load_translator, train_translate

__all__ = [
    "beam_search",
    "corpus_bleu",
    "greedy_decode",
    "translate",
    "LMTrainConfig",
    "load_lm",
    "sample",
    "train_lm",
    "TranslateTrainConfig",
    "load_translator",
    "train_translate",
]
