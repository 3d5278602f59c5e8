"""Mutation round 2 for the analysis core (capture, cka, common, distributed, probes): behaviour.

Every test states a behaviour a user relies on, against an independent expectation: hand-computed
values, the papers' formulas (tests/test_cka.py), the plain ridge reference (tests/test_probes.py),
and results computed under a default device that differs from the inputs' (``with
torch.device("meta")``: the user who set a default device and passes CPU tensors). The whole text of
every message is in test_mut2_analysis_messages.py, the cross-rank paths in test_mut2_analysis_ranks.py.

Test names avoid the words that the mutation run's ``-k`` filter drops (the launcher's name, the
process counts, the data-parallel abbreviation).
"""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from vitlens.analysis import ActivationCapture, MinibatchCKA, cka, cka_matrix, default_layers, hsic
from vitlens.analysis.probes import ProbeStream
from vitlens.errors import DataError, ModelError

cka_module = importlib.import_module("vitlens.analysis.cka")  # the module; the package exports the function


# ----------------------------------------------------------------------------------------- helpers
class _Vitish(nn.Module):
    """A ViT's module layout (patch_embed with a grid, [CLS] + 4 patch tokens, two blocks), tiny."""

    num_prefix_tokens = 1

    def __init__(self, d: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.patch_embed = nn.Linear(3, d)
        self.patch_embed.grid_size, self.patch_embed.patch_size = (2, 2), (4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d, generator=g))
        self.pos = nn.Parameter(torch.randn(1, 5, d, generator=g))
        self.blocks = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        with torch.no_grad():
            for p in (*self.patch_embed.parameters(), *self.blocks.parameters()):
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):  # x (B, 3, 2, 2): one 3-channel "pixel" per patch
        t = self.patch_embed(x.flatten(2).transpose(1, 2))  # (B, 4, d)
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), t], 1) + self.pos
        t = t + t.mean(1, keepdim=True)  # token mixing, so [CLS] depends on the image
        return self.blocks(t)[:, 0]


class _Cnnish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)
        self.layer1 = nn.Sequential(nn.Conv2d(5, 5, 1), nn.ReLU())

    def forward(self, x):
        return self.layer1(self.conv(x)).mean((2, 3))


def _raised(call, err_type) -> str:
    with pytest.raises(err_type) as info:
        call()
    assert type(info.value) is err_type or isinstance(info.value, err_type)
    return str(info.value)


def _warned(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught]


# ----------------------------------------------------------------------------------------- capture.py
class _Returns(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.make = make

    def forward(self, x):
        return self.make(x)


def _captured(make, x):
    m = nn.Sequential(_Returns(make))
    with ActivationCapture(m, ["0"]) as cap:
        return cap.run(x)["0"]


def test_capture_reads_the_first_tensor_of_tuples_and_model_output_dicts_only():
    from collections import OrderedDict

    x = torch.arange(6.0).view(2, 3)
    assert torch.equal(_captured(lambda t: (t + 1, None), x), x + 1)  # HF layers: (hidden, attn)
    assert torch.equal(_captured(lambda t: [t * 2], x), x * 2)
    assert torch.equal(_captured(lambda t: OrderedDict(last_hidden_state=t - 1, pooler=t), x), x - 1)
    for bad, kind in (
        (lambda t: (None, t), "tuple"),  # a tuple whose first item is not a tensor
        (lambda t: (), "tuple"),
        (lambda t: {}, "dict"),  # an empty ModelOutput
        (lambda t: {"loss": None, "logits": t}, "dict"),  # a dict whose first value is not a tensor
        (lambda t: 3, "int"),
    ):
        msg = _raised(lambda bad=bad: _captured(bad, x), TypeError)
        assert msg == f"cannot capture a module output of type {kind}; hook a module returning a tensor"


# ----------------------------------------------------------------------------------------- cka.py
def test_hsic_one_sided_centering_equivalence_is_the_papers_identity():
    """<U(K), U(L)> = <K, U(L)>: U-centring is an orthogonal projection, so the debiased HSIC needs only
    one side U-centred (why a mutant centring K the biased way cannot be seen); the test pins the value."""
    from test_cka import ref_hsic_unbiased

    g = torch.Generator().manual_seed(3)
    x, y = (
        torch.randn(9, 4, generator=g, dtype=torch.float64),
        torch.randn(9, 3, generator=g, dtype=torch.float64),
    )
    k, l = x @ x.T, torch.exp(-(torch.cdist(y, y) ** 2))  # noqa: E741
    ref = ref_hsic_unbiased(k.numpy(), l.numpy())
    assert hsic(k, l, debiased=True) == pytest.approx(ref, rel=1e-12)
    assert float((k * cka_module._center(l, True)).sum()) / (9 * 6) == pytest.approx(ref, rel=1e-12)


def test_cka_matrix_cls_policy_of_model_b_leaves_out_its_patch_embedding():
    """("mean", "cls"): model B's default layers follow B's own policy (no patch_embed: it has no [CLS])."""
    cnn, vit = _Cnnish().eval(), _Vitish().eval()
    data = [torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    m, names_a, names_b = cka_matrix(
        cnn, vit, data, token_policy=("mean", "cls"), progress=False, gram_dtype=torch.float64
    )
    assert names_a == ["layer1.0", "layer1.1"] and names_b == ["blocks.0", "blocks.1"]
    ref = MinibatchCKA(2, 2)
    with ActivationCapture(cnn, names_a, "mean") as ca, ActivationCapture(vit, names_b, "cls") as cb:
        for x in data:
            ref.update(list(ca.run(x).values()), list(cb.run(x).values()))
    np.testing.assert_allclose(m, ref.compute(), atol=1e-12)


# ------------------------------------------------ a default device that differs from the inputs'
# The user who called torch.set_default_device(...) and passes CPU tensors: every tensor the analyses
# create must follow the inputs (or the analysis' own device), never the default. On a CPU-only machine
# the "meta" device plays that default: a tensor created there has no data, so the results differ.
def _offset_map_outputs():
    from test_probes import OffsetMap, _noisy_planted

    model = OffsetMap()
    (xtr, ytr), (xte, yte) = _noisy_planted(64, 0), _noisy_planted(24, 1)
    with torch.no_grad():
        train = (xtr @ model.to_map).view(64, -1, 7, 5) + 3 * model.where + 40
        test = (xte @ model.to_map).view(24, -1, 7, 5) + 3 * model.where + 40
    return model, (train, ytr), (test, yte)


@pytest.mark.parametrize("class_probe", ["shared", "per_position"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probe_stream_ignores_torchs_default_device(class_probe, dtype):
    model, (train, ytr), (test, yte) = _offset_map_outputs()

    def probe():
        s = ProbeStream(model, ["map"], class_probe=class_probe)
        s.fit("map", train[:40].to(dtype), ytr[:40])
        s.fit("map", train[40:].to(dtype), ytr[40:])
        s.score("map", test.to(dtype), yte)
        s.sum_scores_across_ranks()  # one rank: the sums are the counts themselves
        assert s.scored == {"map": 24}
        spare = ProbeStream(model, ["a", "b"], class_probe=class_probe)
        spare.fit("b", train[:8, :, :2, :3].to(dtype), ytr[:8])  # fitted, never scored: zeros of its grid
        spare.fit("a", train[:8, :, :1, :1].to(dtype), ytr[:8])
        spare.sum_scores_across_ranks()
        assert spare.scored == {"a": 0, "b": 0}
        assert [spare.correct_cls[k].tolist() for k in "ab"] == [[0.0], [0.0] * 6]
        assert [spare.correct_pos[k].tolist() for k in "ab"] == [[0.0], [0.0] * 6]
        assert spare.correct_cls["b"] is not spare.correct_pos["b"]
        return {k: s.results()["map"][k] for k in ("class_acc_map", "position_acc_map", "train_tokens")}

    ref = probe()
    with torch.device("meta"):
        got = probe()
    np.testing.assert_array_equal(got["class_acc_map"], ref["class_acc_map"])
    np.testing.assert_array_equal(got["position_acc_map"], ref["position_acc_map"])
    assert got["train_tokens"] == ref["train_tokens"] == 64 * 35
    assert 0.05 < ref["class_acc_map"].mean() < 0.95


@pytest.mark.filterwarnings("ignore:MinibatchCKA. skipping")
@pytest.mark.parametrize("kernel,debiased", [("linear", True), ("rbf", False)])
def test_cka_ignores_torchs_default_device(kernel, debiased):
    from test_analysis_units import _TwoLayer

    g = torch.Generator().manual_seed(2)
    x, y, z = (torch.randn(10, p, generator=g) for p in (4, 3, 300))
    a, b = _TwoLayer(0).eval(), _TwoLayer(1).eval()
    data = [torch.randn(8, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(2)]

    def run():
        two = MinibatchCKA(1, 2, kernel=kernel, debiased=debiased)
        two.update([x], [y, x])
        two.update([x[:1]], [y[:1], x[:1]])  # skipped
        one = MinibatchCKA(2, kernel=kernel, debiased=debiased)
        one.update([x, z], gram_dtype=torch.float32)
        m, _, _ = cka_matrix(
            a,
            b,
            data,
            layers_a=["fc1", "fc2"],
            layers_b=["fc2"],
            kernel=kernel,
            debiased=debiased,
            progress=False,
        )
        chunked = cka_module.feature_gram(z, dtype=torch.float32, chunk_elems=10 * 256)  # 2 chunks
        return (
            two.compute(),
            one.compute(),
            m,
            cka(x, z, kernel=kernel, debiased=debiased),
            chunked.numpy(),
            two.hsic_ab.device.type,
        )

    ref = run()
    with torch.device("meta"):
        got = run()
    for r, o in zip(ref[:-2], got[:-2]):
        np.testing.assert_allclose(o, r, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[-2], ref[-2], rtol=1e-9)
    assert got[-1] == ref[-1] == "cpu"  # the HSIC sums live on the CPU


@pytest.mark.parametrize("rows", [1, 3])
def test_ridge_statistics_reshift_to_sums_of_shifted_rows(rows):
    """After reshift(s) the sums are those of x - s, whatever was summed before (one row included)."""
    from vitlens.analysis.probes import _RidgeStats

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([2, 0, 2][:rows])
    s1, s2 = (
        torch.randn(3, generator=g, dtype=torch.float64),
        torch.randn(3, generator=g, dtype=torch.float64),
    )
    for before, after in ((None, s1), (s1, s2), (s2, None)):
        st = _RidgeStats.empty(3, 1, "cpu")
        st.reshift(before)  # nothing summed yet: only the reference is set
        assert st.n == 0 and st.sx.tolist() == [0.0] * 3
        st.update(x, y)
        st.reshift(after)
        xs = x if after is None else x - after
        onehot = torch.nn.functional.one_hot(y, 3).double()
        torch.testing.assert_close(st.sx, xs.sum(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st.sxx, xs.T @ xs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st.sxy, xs.T @ onehot, rtol=1e-12, atol=1e-12)
        assert st.sy.tolist() == onehot.sum(0).tolist() and st.n == rows
        assert (st.shift is None) == (after is None)


def test_probe_stream_defaults_equal_the_plain_ridge_reference_batch_by_batch():
    """Default ridge 1e-3, shared class probe: fitted and scored in several calls, one layer scored
    before the other was ever fitted; results are float64 maps equal to the numpy reference."""
    from test_probes import ridge_probe_reference

    g = torch.Generator().manual_seed(5)
    ytr, yte = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (30,), generator=g)
    code = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)  # class x position -> token

    def tokens(y):
        return code[y] + 1.5 * torch.randn(len(y), 6, 5, generator=g, dtype=torch.float64) + 7.0

    train, test = tokens(ytr), tokens(yte)
    stream = ProbeStream(nn.Identity(), ["late", "early"])  # no prefix tokens, no patch grid
    for s in (slice(0, 25), slice(25, 60)):
        stream.fit("late", train[s], ytr[s])
    stream.score("late", test[:10], yte[:10])  # solves "late" only: "early" has no statistics yet
    stream.score("late", test[10:], yte[10:])
    cls_ref, pos_ref = ridge_probe_reference(train, ytr, test, yte)
    assert _raised(stream.results, DataError).startswith("no test images")
    stream.layers = ["late"]
    got = stream.results()["late"]
    assert got["class_acc_map"].dtype == np.float64 and got["position_acc_map"].dtype == np.float64
    assert got["class_acc_map"].shape == got["position_acc_map"].shape == (1, 6)
    np.testing.assert_array_equal(got["class_acc_map"].ravel(), cls_ref)
    np.testing.assert_array_equal(got["position_acc_map"].ravel(), pos_ref)
    assert 0.2 < got["class_acc"] < 0.95 and 0.2 < got["position_acc"] < 0.95
    assert got["class_acc"] == pytest.approx(cls_ref.mean(), abs=1e-15)
    assert {k: v for k, v in got.items() if "acc" not in k} == {
        "grid_size": (1, 6),
        "num_positions": 6,
        "num_classes": 4,
        "chance_class": 0.25,
        "chance_position": 1 / 6,
        "train_tokens": 360,
        "class_probe": "shared",
    }


def test_capture_of_modules_that_run_once_does_not_warn():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with ActivationCapture(model, ["0", "1", "2"]) as cap:
        assert _warned(lambda: cap.run(x)) == []


@pytest.mark.parametrize(
    "kernel,debiased", [("linear", False), ("linear", True), ("rbf", False), ("rbf", True)]
)
def test_cka_of_tiny_scale_features_is_scale_free_without_warning(kernel, debiased):
    """Linear CKA and RBF CKA with the median bandwidth do not depend on the units of the features:
    features of size 1e-4 (squared distances far below 1) give the reference value, and no warning."""
    from test_cka import ref_cka, related_pair

    x, y = related_pair(12)
    ref = ref_cka(x.numpy(), y.numpy(), kernel, debiased)
    for scale in (1e-4, 1.0, 1e4):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = cka(scale * x, scale * y, kernel=kernel, debiased=debiased)
        assert caught == [] and got == pytest.approx(ref, abs=1e-9)


def test_float32_gram_under_a_float64_default_dtype():
    """torch.set_default_dtype(torch.float64) (common in scientific code) changes nothing: the float32
    path multiplies in float32 and returns the float64 Gram of the centred features."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 700, generator=g) + 5.0
    ref = cka_module.feature_gram(x.double())
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = cka_module.feature_gram(x, dtype=torch.float32, chunk_elems=6 * 256)  # 3 chunks
    finally:
        torch.set_default_dtype(before)
    assert got.dtype == torch.float64 and got.shape == (6, 6)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)


def test_cka_matrix_one_model_same_layers_two_policies_is_not_a_self_comparison():
    """Same model, same layers, ("flatten", "mean"): the two sides differ, exactly as against a copy."""
    import copy

    vit = _Vitish().eval()
    data = [torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    kw = dict(layers_a=["blocks.0"], layers_b=["blocks.0"], token_policy=("flatten", "mean"), progress=False)
    same, na, nb = cka_matrix(vit, vit, data, gram_dtype=torch.float64, **kw)
    copied, _, _ = cka_matrix(vit, copy.deepcopy(vit), data, gram_dtype=torch.float64, **kw)
    np.testing.assert_allclose(same, copied, atol=1e-12)
    assert (na, nb) == (["blocks.0"], ["blocks.0"]) and abs(same[0, 0]) < 0.999  # not 1: two policies


def test_huggingface_patch_grid_floors_like_the_patch_convolution():
    """A stride-p convolution over 34 x 50 pixels with 4 x 8 patches gives 8 x 6 tokens (floor)."""
    import types

    from vitlens.analysis.common import patch_grid

    hf = nn.Module()
    hf.config = types.SimpleNamespace(image_size=(34, 50), patch_size=(4, 8))
    grid, patch = patch_grid(hf)
    conv = nn.Conv2d(3, 1, kernel_size=(4, 8), stride=(4, 8))
    assert grid == tuple(conv(torch.zeros(1, 3, 34, 50)).shape[-2:]) == (8, 6)
    assert all(type(v) is int for v in grid) and patch == (4, 8)


@pytest.mark.parametrize("class_probe", ["shared", "per_position"])
def test_probe_regulariser_is_scale_free(class_probe):
    """ridge * mean(diag(Xc^T Xc)): tokens in other units (1e-4 x, variance far below 1) give the same
    fits, so the same accuracy maps."""
    _, (train, ytr), (test, yte) = _offset_map_outputs()

    def maps(scale):
        s = ProbeStream(nn.Identity(), ["map"], class_probe=class_probe, ridge=0.5)
        s.fit("map", scale * (train.double() - 40), ytr)
        s.score("map", scale * (test.double() - 40), yte)
        r = s.results()["map"]
        return r["class_acc_map"], r["position_acc_map"]

    ref = maps(1.0)
    for scale in (1e-4, 1e3):
        got = maps(scale)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
    assert 0.05 < ref[0].mean() < 0.95 and 0.05 < ref[1].mean() < 0.95


@pytest.mark.parametrize(
    "hw,grid,want",
    [
        ((6, 3), (4, 4), (4, 4)),  # taller than the grid: pooled to it
        ((3, 6), (5, 4), (5, 4)),  # wider than the grid: pooled to it
        ((5, 2), (6, 4), (5, 2)),  # smaller both ways: kept
        ((4, 4), (4, 4), (4, 4)),
    ],
)
def test_cnn_maps_larger_than_the_grid_are_average_pooled_to_it(hw, grid, want):
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    stream = ProbeStream(nn.Identity(), ["m"], grid=grid)
    tokens = stream.tokens("m", x)
    ref = torch.nn.functional.adaptive_avg_pool2d(x, want)  # position-major tokens of the pooled map
    torch.testing.assert_close(tokens, ref.flatten(2).transpose(1, 2))
    assert stream.reader.grids["m"] == want


def test_default_layers_of_one_block_models_and_empty_encoders():
    vit = nn.Module()
    vit.patch_embed, vit.blocks = nn.Identity(), nn.ModuleList([nn.Identity()])
    assert default_layers(vit) == ["patch_embed", "blocks.0"]  # a one-block ViT
    assert default_layers(vit, "cls") == ["blocks.0"]
    hf = nn.Module()
    hf.embeddings, hf.encoder = nn.Identity(), nn.Module()
    hf.encoder.layer = nn.ModuleList()  # no encoder layer at all: nothing sensible to compare
    msg = _raised(lambda: default_layers(hf), ModelError)
    assert msg.startswith("cannot guess which layers of Module to analyse") and msg.endswith(
        "e.g. children of ['encoder.layer']"
    )


def test_hsic_defaults_to_the_biased_estimator():
    from test_cka import ref_hsic_biased

    g = torch.Generator().manual_seed(6)
    x, y = (
        torch.randn(7, 3, generator=g, dtype=torch.float64),
        torch.randn(7, 2, generator=g, dtype=torch.float64),
    )
    assert hsic(x @ x.T, y @ y.T) == pytest.approx(
        ref_hsic_biased((x @ x.T).numpy(), (y @ y.T).numpy()), rel=1e-12
    )


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, *, scale=1.0):
        return self.lin(x * scale)


def test_capture_forwards_keyword_arguments_and_can_be_entered_again():
    """run(*args, **kwargs) calls model(*args, **kwargs) (Hugging Face models take pixel_values=...);
    the hooks go on exit, remove() is safe to call again, and the capture can be entered again."""
    m = _Scaled()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    cap = ActivationCapture(m, ["lin"])
    with cap:
        got = cap.run(x, scale=3.0)["lin"]
    torch.testing.assert_close(got, m.lin(3.0 * x).detach())
    assert m.lin._forward_hooks == {} and cap.activations == {}
    cap.remove()  # again: nothing left to remove
    with cap:
        torch.testing.assert_close(cap.run(x)["lin"], m.lin(x).detach())
    assert m.lin._forward_hooks == {}


def test_minibatch_debiased_hsic_sums_weight_batches_of_different_sizes_by_their_own_scale():
    """Nguyen et al.: each batch adds its own debiased HSIC, 1/(b(b-3)) of its U-centred product, so
    batches of 5, 9 and 6 examples give the sum of the three reference HSIC values."""
    from test_cka import ref_cka, ref_hsic_unbiased

    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(4, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    acc = MinibatchCKA(1, 1)
    want = np.zeros(3)
    for s, e in ((0, 5), (5, 14), (14, 20)):
        acc.update([x[s:e]], [y[s:e]])
        k, l = x[s:e].numpy() @ x[s:e].numpy().T, y[s:e].numpy() @ y[s:e].numpy().T  # noqa: E741
        want += [ref_hsic_unbiased(k, l), ref_hsic_unbiased(k, k), ref_hsic_unbiased(l, l)]
    got = [acc.hsic_ab.item(), acc.hsic_aa.item(), acc.hsic_bb.item()]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert acc.compute()[0, 0] == pytest.approx(want[0] / np.sqrt(want[1] * want[2]), abs=1e-12)
    assert acc.compute()[0, 0] != pytest.approx(ref_cka(x.numpy(), y.numpy(), debiased=True), abs=1e-6)


@pytest.mark.parametrize("class_probe", ["shared", "per_position"])
def test_probes_on_one_class_count_one_class(class_probe):
    """Labels all 0: one class (chance 1, every class prediction right); classes come from the labels."""
    _, (train, _), (test, _) = _offset_map_outputs()
    s = ProbeStream(nn.Identity(), ["map"], class_probe=class_probe)
    s.fit("map", train, torch.zeros(64, dtype=torch.long))
    s.score("map", test, torch.zeros(24, dtype=torch.long))
    r = s.results()["map"]
    assert (r["num_classes"], r["chance_class"], r["class_acc"]) == (1, 1.0, 1.0)
