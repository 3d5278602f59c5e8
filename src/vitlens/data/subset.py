"""Class-balanced, nested training subsets for data-scaling experiments.

"How does accuracy grow with data?" needs subsets that differ only in size: the 5% run's
images must be part of the 10% run's, or the comparison mixes the effect of more data with
the effect of different data. So each class's indices are shuffled once, by a generator that
depends on the seed and the class only - never on the fraction - and a fraction takes a
prefix of that order. Same seed => nested; per-class prefixes => class-balanced.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError


def nested_fraction_indices(targets, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced ``fraction`` of ``targets``, nested across fractions.

    Per class ``c`` with ``n_c`` items: permute that class's indices with a generator seeded by
    ``(seed, c)``, keep the first ``max(1, round(fraction * n_c))``. For the same seed,
    ``nested_fraction_indices(t, 0.05) ⊆ nested_fraction_indices(t, 0.1)``.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (0 < fraction <= 1):
        raise ConfigError(
            f"fraction must be a number in (0, 1] (the share of each class's training images to use), "
            f"got {fraction!r}; e.g. 0.1 for 10%"
        )
    targets = np.asarray(targets)
    if targets.ndim != 1 or (targets.size and not np.issubdtype(targets.dtype, np.integer)):
        raise ValueError(
            f"targets must be a 1-D sequence of int labels, got shape {targets.shape} {targets.dtype}"
        )
    picked = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        order = np.random.default_rng([int(seed), int(c)]).permutation(idx)
        k = max(1, math.floor(fraction * len(idx) + 0.5))  # round half up; Python's round() is half-even
        picked.append(order[:k])
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)
