"""Mutation round 2, analysis core: the WHOLE text of every error and warning of capture, cka, common,
distributed and probes (the UX contract: the problem and the fix; a substring match misses a message
wrapped in XX or blanked), and where warnings point.
"""

from __future__ import annotations

import importlib
import warnings

import torch
from test_mut2_analysis_core import _raised, _Vitish, _warned
from torch import nn

from vitlens.analysis import ActivationCapture, MinibatchCKA, cka, cka_matrix, default_layers, hsic
from vitlens.analysis import distributed as dist_module
from vitlens.analysis import probes as probes_module
from vitlens.analysis.capture import reduce_activation
from vitlens.analysis.common import batch_images, subset_indices
from vitlens.analysis.distributed import RankBatches, RankFailedError
from vitlens.analysis.probes import ProbeStream, _TokenGrid, localization_probes
from vitlens.errors import ConfigError, DataError, ModelError

cka_module = importlib.import_module("vitlens.analysis.cka")  # the module; the package exports the function


# ----------------------------------------------------------------------------------------- messages
def _two_rank_world(monkeypatch, all_reduce):
    import torch.distributed as tdist

    monkeypatch.setattr(dist_module, "world", lambda: (0, 2))
    monkeypatch.setattr(tdist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(tdist, "get_rank", lambda: 0)
    monkeypatch.setattr(tdist, "all_reduce", all_reduce)


def _message_cases():
    seq = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    x4 = torch.randn(4, 3)

    class _ReturnsNone(nn.Module):
        def forward(self, x):
            return None

    class _Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Identity(), nn.Identity()

        def forward(self, x):
            return self.used(x)

    many_lists = nn.Module()
    for i in range(10):
        many_lists.add_module(f"list{i}", nn.ModuleList([nn.Identity()]))

    def capture(model, layers, data):
        with ActivationCapture(model, layers) as cap:
            return cap.run(data)

    def nested():
        cap = ActivationCapture(seq, ["0"])
        with cap, cap:
            pass

    def empty_stream():
        return ProbeStream(_Vitish(), ["blocks.0"])

    return [
        # capture.py
        (
            lambda: reduce_activation(torch.zeros(2, 3), lambda t: t[0]),
            ValueError,
            "token policy callable must return (B, features), got shape (3,)",
        ),
        (
            lambda: reduce_activation(torch.zeros(2, 3), lambda t: t[:1]),
            ValueError,
            "token policy callable must return (B, features), got shape (1, 3)",
        ),
        (
            lambda: reduce_activation(torch.zeros(2, 3), "first"),
            ConfigError,
            "unknown token policy 'first'; choose one of ('flatten', 'all', 'cls', 'mean') "
            "or pass a callable",
        ),
        (
            lambda: reduce_activation(torch.zeros(2, 3, 4), "cls"),
            ConfigError,
            "token_policy='cls' on a sequence of shape (2, 3, 4) without a class token (num_prefix_tokens=0, "
            "e.g. the patch_embed output or a model without [CLS]); use token_policy='mean' or 'flatten', or "
            "leave that layer out",
        ),
        (
            lambda: reduce_activation(torch.zeros(2, 1, 4), "mean", 1),
            ValueError,
            "token_policy='mean' needs patch tokens after the 1 prefix tokens, but the sequence has shape "
            "(2, 1, 4)",
        ),
        (
            lambda: reduce_activation(torch.zeros(2, 3, 4, 4), "cls"),
            ConfigError,
            "token_policy='cls' does not apply to the feature map of shape (2, 3, 4, 4); use 'mean' (spatial "
            "average) or 'flatten' for CNN layers (cka_matrix accepts a (policy_a, policy_b) pair)",
        ),
        (
            lambda: reduce_activation(torch.zeros(2, 3, 4, 4, 5)),
            ValueError,
            "cannot reduce an activation of shape (2, 3, 4, 4, 5): expected (B, D), (B, N, D) or "
            "(B, C, H, W); "
            "pass a callable token_policy for other layouts",
        ),
        (
            lambda: default_layers(many_lists),
            ModelError,
            "cannot guess which layers of Module to analyse (no ViT `blocks`, ResNet `layer1..` or Hugging "
            "Face encoder layers); pass layers=[...] explicitly, e.g. children of "
            f"{[f'list{i}' for i in range(8)]}",
        ),
        (
            lambda: ActivationCapture(seq, []),
            ConfigError,
            "layers is empty; pass at least one module name (or None for default_layers(model))",
        ),
        (
            lambda: ActivationCapture(seq, ["0", "1", "0", "1"]),
            ConfigError,
            "duplicate layer names ['0', '1']; list each module once",
        ),
        (
            lambda: ActivationCapture(seq, ["00", "zz"]),
            ConfigError,
            "Sequential has no module named '00' (did you mean '0'?); 'zz'. Layer names are "
            "model.named_modules() names; vitlens.analysis.default_layers(model) gives a sensible list",
        ),
        (
            lambda: ActivationCapture(seq, ["0"], "first"),
            ConfigError,
            "unknown token policy 'first'; choose one of ('flatten', 'all', 'cls', 'mean') or a callable",
        ),
        (
            lambda: capture(nn.Sequential(_ReturnsNone()), ["0"], x4),
            TypeError,
            "cannot capture a module output of type NoneType; hook a module returning a tensor",
        ),
        (nested, RuntimeError, "ActivationCapture is already active; do not nest the same instance"),
        (
            lambda: ActivationCapture(seq, ["0"]).run(x4),
            RuntimeError,
            "ActivationCapture.run() needs the hooks: use it inside `with ActivationCapture(...)`",
        ),
        (
            lambda: capture(_Unused(), ["used", "spare"], x4),
            RuntimeError,
            "layers ['spare'] did not run in the forward pass (modules defined but unused?); choose modules "
            "that are called by model.forward",
        ),
        # common.py
        (
            lambda: batch_images("abc"),
            TypeError,
            "cannot find images in a batch of type str; data must yield image tensors, (images, labels) "
            "tuples "
            "or dicts with one of the keys ('pixel_values', 'images', 'image', 'x')",
        ),
        (lambda: subset_indices(5, 0), ConfigError, "max_images must be >= 1 or None, got 0"),
        # cka.py
        (
            lambda: cka_module.feature_gram(torch.zeros(3)),
            ValueError,
            "feature_gram expects (n, features), got shape (3,); flatten it first",
        ),
        (
            lambda: cka(torch.ones(6, 2), torch.randn(6, 2), kernel="rbf"),
            ValueError,
            "RBF kernel bandwidth is 0: more than half of the pairwise distances are zero (duplicate or "
            "constant "
            "representations); use kernel='linear' or larger, more varied batches",
        ),
        (
            lambda: cka(torch.zeros(1, 2), torch.zeros(1, 2)),
            DataError,
            "HSIC/CKA needs at least 2 examples, got n=1",
        ),
        (
            lambda: cka(torch.randn(3, 2), torch.randn(3, 2), debiased=True),
            DataError,
            "debiased HSIC/CKA needs at least 4 examples (it divides by n-3), got n=3",
        ),
        (
            lambda: cka(x4, x4, kernel="poly"),
            ConfigError,
            "unknown kernel 'poly'; choose one of ('linear', 'rbf')",
        ),
        (
            lambda: cka(x4, x4, kernel="rbf", sigma_frac=0.0),
            ConfigError,
            "sigma_frac must be > 0 for the RBF kernel, got 0.0",
        ),
        (
            lambda: hsic(torch.zeros(3, 4), torch.zeros(3, 4)),
            ValueError,
            "hsic expects two (n, n) kernel matrices of one size, got (3, 4) and (3, 4)",
        ),
        (
            lambda: hsic(torch.zeros(3, 3), torch.zeros(4, 4)),
            ValueError,
            "hsic expects two (n, n) kernel matrices of one size, got (3, 3) and (4, 4)",
        ),
        (lambda: cka(x4.numpy(), x4), TypeError, "cka: x must be a torch.Tensor, got ndarray"),
        (lambda: cka(x4, [1]), TypeError, "cka: y must be a torch.Tensor, got list"),
        (
            lambda: cka(x4, torch.zeros(4, 3, 2)),
            ValueError,
            "cka: y must be 2-D (n_examples, features), got shape (4, 3, 2); reduce it with "
            "vitlens.analysis.reduce_activation(t, policy) or t.flatten(1)",
        ),
        (
            lambda: cka(torch.randn(4, 2), torch.randn(5, 2)),
            ValueError,
            "cka: x and y must describe the same examples, got 4 and 5 rows; pass activations of the same "
            "inputs, in the same order",
        ),
        (lambda: MinibatchCKA(0), ValueError, "need at least one layer per model, got 0 and None"),
        (lambda: MinibatchCKA(1, 0), ValueError, "need at least one layer per model, got 1 and 0"),
        (
            lambda: MinibatchCKA(1, kernel="rbf", sigma_frac=-1.0),
            ConfigError,
            "sigma_frac must be > 0 for the RBF kernel, got -1.0",
        ),
        (
            lambda: MinibatchCKA(2).update_grams(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8)),
            ValueError,
            "this MinibatchCKA was built with num_layers_b=None (self-comparison): pass only grams_a",
        ),
        (
            lambda: MinibatchCKA(2, 1).update_grams(torch.zeros(2, 8, 8)),
            ValueError,
            "this MinibatchCKA compares two models: pass grams for both",
        ),
        (
            lambda: MinibatchCKA(2, 1).update_grams(torch.zeros(3, 8, 8), torch.zeros(1, 8, 8)),
            ValueError,
            "grams_a must have shape (2, b, b), got (3, 8, 8)",
        ),
        (
            lambda: MinibatchCKA(2, 1).update_grams(torch.zeros(2, 8, 8), torch.zeros(1, 8, 7)),
            ValueError,
            "grams_b must have shape (1, b, b), got (1, 8, 7)",
        ),
        (
            lambda: MinibatchCKA(2, 1).update_grams(torch.zeros(2, 8, 8), torch.zeros(8, 8)),
            ValueError,
            "grams_b must have shape (1, b, b), got (8, 8)",
        ),
        (
            lambda: MinibatchCKA(2, 1).update_grams(torch.zeros(2, 8, 8), torch.zeros(1, 9, 9)),
            ValueError,
            "both models must see the same batch: 8 vs 9 examples",
        ),
        (
            lambda: MinibatchCKA(2).compute(),
            RuntimeError,
            "MinibatchCKA: no batch of >= 4 examples was added; feed data with update()",
        ),
        (
            lambda: MinibatchCKA(2, debiased=False).compute(),
            RuntimeError,
            "MinibatchCKA: no batch of >= 2 examples was added; feed data with update()",
        ),
        (
            lambda: cka_matrix(seq, [x4], layers_a=["0"], token_policy=("mean",), progress=False),
            ValueError,
            "token_policy tuple must be (policy_a, policy_b), got ('mean',)",
        ),
        (
            lambda: cka_matrix(seq, [x4], seq, progress=False),
            TypeError,
            "cka_matrix(model_a, model_b, data): model_b must be an nn.Module or None, got list; the data "
            "comes "
            "third (or as data=...)",
        ),
        (
            lambda: cka_matrix(seq, None, None),
            TypeError,
            "cka_matrix needs data: cka_matrix(model_a, model_b, data) or cka_matrix(model, data=...)",
        ),
        (
            lambda: cka_matrix([seq], seq, [x4]),
            TypeError,
            "cka_matrix: model_a must be an nn.Module, got list",
        ),
        (
            lambda: cka_matrix(seq, None, [x4], layers_b=["0"], progress=False),
            ValueError,
            "layers_b given without model_b; pass model_b=model_a to compare two layer sets of one model",
        ),
        # distributed.py
        (lambda: RankBatches([x4], max_batches=0), ValueError, "max_batches must be >= 1 or None, got 0"),
        (lambda: RankBatches([x4], max_images=-2), ValueError, "max_images must be >= 1 or None, got -2"),
        # probes.py
        (
            lambda: _TokenGrid(None)(torch.zeros(2, 3)),
            ValueError,
            "probes need token sequences (B, N, D) or feature maps (B, C, H, W), got (2, 3)",
        ),
        (
            lambda: localization_probes(_Vitish(), [torch.zeros(2, 3, 2, 2)], [], ["blocks.0"]),
            TypeError,
            "probe data must yield (images, labels) batches",
        ),
        (
            lambda: localization_probes(_Vitish(), [], [], ["blocks.0"]),
            DataError,
            "no images to fit probes on; the data iterable is empty",
        ),
        (
            lambda: localization_probes(_Vitish(), [], [], ["blocks.0"], class_probe="both"),
            ConfigError,
            "class_probe must be 'shared' or 'per_position', got 'both'",
        ),
        (
            lambda: ProbeStream(_Vitish(), ["blocks.0"], class_probe="each"),
            ConfigError,
            "class_probe must be 'shared' or 'per_position', got 'each'",
        ),
        (lambda: empty_stream().solve(), DataError, "no images to fit probes on; the data iterable is empty"),
        (
            lambda: empty_stream().results(),
            DataError,
            "no test images to score the probes on; the test data iterable is empty",
        ),
    ]


def test_every_analysis_error_message_is_whole():
    """The exact text of each raise: a substring match would miss an XX-wrapped or blanked message."""
    cases = _message_cases()
    for call, err_type, message in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = _raised(call, err_type)
        assert got == message


def test_cross_rank_failures_name_the_rank_the_statistic_and_the_backend(monkeypatch):
    def broken(t, op):
        raise RuntimeError("Connection closed by peer\nmore detail")

    _two_rank_world(monkeypatch, broken)
    a = torch.ones(2)
    assert _raised(lambda: dist_module.sum_across_ranks([a], "probe statistics"), RankFailedError) == (
        "rank 0 of 2: summing the probe statistics across processes failed: another rank failed or did not "
        "arrive within the process group's timeout (look for its error above); backend said: Connection "
        "closed by peer"
    )
    assert _raised(lambda: dist_module.sum_across_ranks([a]), RankFailedError).startswith(
        "rank 0 of 2: summing the analysis statistics across processes failed"
    )
    assert _raised(lambda: dist_module.max_across_ranks([1]), RankFailedError) == (
        "rank 0: exchanging shapes across processes failed: another rank failed or timed out (RuntimeError)"
    )

    def silent(t, op):
        raise TimeoutError()

    _two_rank_world(monkeypatch, silent)
    assert _raised(lambda: dist_module.sum_across_ranks([a], "x"), RankFailedError).endswith(
        "(look for its error above); backend said: TimeoutError"
    )
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2, shuffle=True)
    assert _raised(lambda: RankBatches(loader), ValueError) == (
        "the analysis data loader shuffles (shuffle=True): every process would draw other batches; use "
        "shuffle=False (the analyses need a fixed image order, e.g. a seeded subset)"
    )


def test_every_analysis_warning_message_is_whole():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    assert _warned(lambda: cka(x, torch.ones(6, 2))) == [
        "cka: a representation is constant across examples (HSIC(K, K) = 0); CKA is undefined"
    ]
    acc = MinibatchCKA(1, 1)
    assert _warned(lambda: acc.update([x[:3]], [x[:3]])) == [
        "MinibatchCKA: skipping a batch of 3 examples (debiased HSIC needs >= 4); use drop_last=True or a "
        "batch size that divides the data"
    ]
    biased = MinibatchCKA(1, 1, debiased=False)
    assert _warned(lambda: biased.update([x[:1]], [x[:1]])) == [
        "MinibatchCKA: skipping a batch of 1 examples (biased HSIC needs >= 2); use drop_last=True or a "
        "batch size that divides the data"
    ]
    assert _warned(lambda: biased.update([x[:2]], [x[:2]])) == []  # 2 is enough for the biased one
    acc.update([x], [torch.ones(6, 2)])
    assert _warned(acc.compute) == [
        "MinibatchCKA: some layers are constant over the data (HSIC = 0); their CKA is NaN"
    ]

    class _SharedReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.act(x) - 1)

    m = _SharedReLU()
    with ActivationCapture(m, ["act"]) as cap:
        first = _warned(lambda: cap.run(torch.randn(2, 3)))
        again = _warned(lambda: cap.run(torch.randn(2, 3)))
    assert first == [
        "module 'act' ran 2 times in one forward pass (a shared module, e.g. a reused ReLU); keeping its "
        "last "
        "output. Hook a module that runs once (e.g. the enclosing block)"
    ]
    assert again == []  # once per module and capture


def test_cka_warnings_point_at_the_callers_line_not_at_vitlens():
    """stacklevel: the user sees the line of their own call, not a line inside vitlens.analysis."""
    import os

    inside = os.path.dirname(cka_module.__file__)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    acc = MinibatchCKA(1, 1)
    acc.update([x], [torch.ones(6, 2)])
    for call in (
        lambda: cka(x, torch.ones(6, 2)),
        lambda: MinibatchCKA(1, 1).update_grams(torch.ones(1, 3, 3), torch.ones(1, 3, 3)),
        acc.compute,
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert len(caught) == 1 and os.path.dirname(caught[0].filename) != inside, caught[0].filename


def test_each_cross_rank_sum_names_what_it_was_summing(monkeypatch):
    """A failed all-reduce says which statistic was being summed: the HSIC sums, the probe statistics
    (after the shapes were agreed on) or the probe accuracies."""
    import torch.distributed as tdist

    def sum_fails(t, op):
        if op == tdist.ReduceOp.SUM:
            raise RuntimeError("peer gone")

    _two_rank_world(monkeypatch, sum_fails)
    monkeypatch.setattr(probes_module, "world", lambda: (0, 2))
    monkeypatch.setattr(cka_module, "world", lambda: (0, 2))
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    acc = MinibatchCKA(1, 1)
    acc.update([x], [x])
    stream = ProbeStream(nn.Identity(), ["t"])
    stream.fit("t", x[:, None, :].expand(6, 2, 3), torch.tensor([0, 1, 0, 1, 0, 1]))
    stream.score("t", x[:, None, :].expand(6, 2, 3), torch.tensor([0, 1, 0, 1, 0, 1]))
    for call, what in (
        (acc.sum_across_ranks, "CKA statistics (HSIC sums)"),
        (lambda: stream.stats.sum_across_ranks(["t"], stream.reader), "probe statistics"),
        (stream.sum_scores_across_ranks, "probe accuracies"),
    ):
        assert _raised(call, RankFailedError) == (
            f"rank 0 of 2: summing the {what} across processes failed: another rank failed or did not arrive "
            "within the process group's timeout (look for its error above); backend said: peer gone"
        )
