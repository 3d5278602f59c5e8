"""Per-class counts of nested fractions: ``max(1, round half up(fraction * n_c))``, by hand.

Half-way cases are where rounding rules differ: Python's ``round`` (half to even) gives 2 for
2.5 and 4 for 4.5; half up gives 3 and 5. Fractions that are exact binary numbers (0.5, 0.25,
0.125) make ``fraction * n`` exact, so each expected count below is plain arithmetic.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from vitlens.data.subset import nested_fraction_indices


def _counts(class_sizes: dict[int, int], fraction: float, seed: int = 0) -> dict[int, int]:
    targets = np.concatenate([np.full(n, c) for c, n in class_sizes.items()])
    np.random.default_rng(9).shuffle(targets)  # interleaved classes: counts must not depend on order
    idx = nested_fraction_indices(targets, fraction, seed=seed)
    return dict(Counter(targets[idx].tolist()))


@pytest.mark.parametrize(
    "fraction, sizes, expected",
    [
        # n * f:          2.5 -> 3   4.5 -> 5   1.5 -> 2   0.5 -> 1   3.5 -> 4
        (0.5, {0: 5, 1: 9, 2: 3, 3: 1, 4: 7}, {0: 3, 1: 5, 2: 2, 3: 1, 4: 4}),
        # n * f:          2.5 -> 3   0.5 -> 1   1.25 -> 1  1.75 -> 2  6.5 -> 7
        (0.25, {0: 10, 1: 2, 2: 5, 3: 7, 4: 26}, {0: 3, 1: 1, 2: 1, 3: 2, 4: 7}),
        # n * f:          2.5 -> 3   0.375 -> max(1, 0) = 1   1.125 -> 1   4.5 -> 5
        (0.125, {0: 20, 1: 3, 2: 9, 3: 36}, {0: 3, 1: 1, 2: 1, 3: 5}),
        # tiny fraction: every class keeps one image
        (0.001, {0: 10, 1: 200, 2: 1}, {0: 1, 1: 1, 2: 1}),
        # the whole set
        (1.0, {0: 3, 1: 4}, {0: 3, 1: 4}),
    ],
)
def test_per_class_counts_round_half_up(fraction, sizes, expected):
    assert _counts(sizes, fraction) == expected


def test_counts_do_not_depend_on_the_seed_and_subsets_nest():
    sizes = {0: 5, 1: 9, 2: 10, 3: 26}
    targets = np.repeat(list(sizes), list(sizes.values()))
    by_fraction = {
        f: set(nested_fraction_indices(targets, f, seed=4).tolist()) for f in (0.125, 0.25, 0.5, 1.0)
    }
    assert by_fraction[0.125] <= by_fraction[0.25] <= by_fraction[0.5] <= by_fraction[1.0]
    assert by_fraction[1.0] == set(range(len(targets)))
    for seed in (0, 1, 2):
        assert _counts(sizes, 0.5, seed) == {0: 3, 1: 5, 2: 5, 3: 13}


def test_each_class_is_shuffled_not_taken_from_the_front():
    targets = np.repeat([0, 1], 200)
    picks = [set(nested_fraction_indices(targets, 0.25, seed=s).tolist()) for s in (0, 1)]
    assert picks[0] != picks[1]  # the seed picks different images
    first = set(range(50)) | set(range(200, 250))
    assert picks[0] != first  # not the first quarter of each class
    class0 = sorted(i for i in picks[0] if i < 200)
    assert max(class0) > 100  # spread over the class
    class1 = sorted(i - 200 for i in picks[0] if i >= 200)
    assert class0 != class1  # each class has its own order (the generator depends on the class too)


def test_empty_targets_give_an_empty_index_array():
    idx = nested_fraction_indices([], 0.5)
    assert idx.shape == (0,) and idx.dtype == np.int64  # usable to index a dataset


@pytest.mark.parametrize("bad", [np.zeros((4, 2), dtype=int), np.array([0.0, 1.0, 1.0])])
def test_targets_must_be_one_dimensional_int_labels(bad):
    with pytest.raises(ValueError, match=r"targets must be a 1-D sequence of int labels, got shape"):
        nested_fraction_indices(bad, 0.5)


def test_default_seed_is_zero():
    targets = np.repeat([0, 1, 2], 40)
    assert np.array_equal(
        nested_fraction_indices(targets, 0.25), nested_fraction_indices(targets, 0.25, seed=0)
    )
