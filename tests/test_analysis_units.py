"""Fast unit tests of vitlens.analysis (common, capture, cka, distributed) against independent expectations.

Each test pins one behaviour that a realistic one-line bug (an off-by-one, a dropped argument, a
swapped constant, an inverted condition) would change: reference formulas written here from the
papers (Kornblith et al. 2019; Song et al. 2012 / Nguyen et al. 2021), hand-built module trees with
known layer names, and hand-counted batch splits. Tiny tensors only: the whole file runs in seconds.
"""

from __future__ import annotations

import hashlib
import importlib
import types
import warnings

import numpy as np
import pytest
import torch
from test_cka import ref_cka, ref_gram, ref_hsic_biased, ref_hsic_unbiased  # the papers' formulas
from torch import nn

from vitlens.analysis import (
    ActivationCapture,
    MinibatchCKA,
    cka,
    cka_matrix,
    default_layers,
    feature_gram,
    hsic,
    infer_num_prefix_tokens,
    layer_prefix_tokens,
    reduce_activation,
)
from vitlens.analysis import distributed as dist_module
from vitlens.analysis.common import (
    batch_images,
    image_subset,
    indices_fingerprint,
    is_vit,
    patch_grid,
    subset_indices,
)
from vitlens.analysis.distributed import (
    RankBatches,
    init_from_torchrun,
    is_main_process,
    main_process_says,
    max_across_ranks,
    rank_device,
    sum_across_ranks,
    world,
)
from vitlens.errors import ConfigError, DataError, ModelError

cka_module = importlib.import_module("vitlens.analysis.cka")  # the module; the package exports the function


def pair(n: int, p: int = 6, q: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64) + 2.0
    y = torch.tanh(x @ torch.randn(p, q, generator=g, dtype=torch.float64)) + 0.3 * torch.randn(
        n, q, generator=g, dtype=torch.float64
    )
    return x, y


# ======================================== common.py
def test_batch_images_reads_every_layout_and_prefers_pixel_values():
    x, y = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert batch_images(x) is x
    assert batch_images([x, torch.zeros(2)]) is x and batch_images((x,)) is x
    for key in ("pixel_values", "images", "image", "x"):
        assert batch_images({key: x, "label": torch.zeros(2)}) is x
    assert batch_images({"images": y, "pixel_values": x}) is x  # Hugging Face's key first
    assert batch_images({"image": "not a tensor", "x": x}) is x  # a non-tensor under a key is skipped
    with pytest.raises(TypeError, match=r"batch of type str.*\('pixel_values', 'images', 'image', 'x'\)"):
        batch_images("abc")
    for bad in ([], (1, 2), {"label": x}):
        with pytest.raises(TypeError, match="cannot find images"):
            batch_images(bad)


def test_subset_indices_is_the_sorted_seeded_sample():
    assert subset_indices(10, None) == list(range(10))
    assert subset_indices(10, 10) == list(range(10)) and subset_indices(10, 11) == list(range(10))
    want = sorted(torch.randperm(1000, generator=torch.Generator().manual_seed(3))[:5].tolist())
    assert subset_indices(1000, 5, seed=3) == want
    seed0 = sorted(torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:5].tolist())
    assert subset_indices(1000, 5) == seed0 != want  # default seed 0
    one = subset_indices(10, 1)
    assert len(one) == 1 and 0 <= one[0] < 10
    assert subset_indices(10, 9) == sorted(subset_indices(10, 9)) and len(set(subset_indices(10, 9))) == 9
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=f"max_images must be >= 1 or None, got {bad}"):
            subset_indices(10, bad)


def test_image_subset_and_fingerprint():
    ds = list(range(100))
    assert image_subset(ds, None) is ds and image_subset(ds, 100) is ds and image_subset(ds, 200) is ds
    sub = image_subset(ds, 7, seed=2)
    assert isinstance(sub, torch.utils.data.Subset) and sub.dataset is ds
    assert list(sub.indices) == subset_indices(100, 7, 2) and len(sub) == 7
    assert list(image_subset(ds, 7).indices) == subset_indices(100, 7, 0)
    fp = indices_fingerprint([3, 1, 2])
    assert fp == "sha256:" + hashlib.sha256(b"3,1,2").hexdigest()[:16]
    assert indices_fingerprint(torch.tensor([3, 1, 2])) == fp and indices_fingerprint([1, 2, 3]) != fp


class _Holder(nn.Module):
    pass


def _with_patch_embed(grid, patch, token_px=None, model_px=None):
    m = _Holder()
    m.patch_embed = _Holder()
    m.patch_embed.grid_size, m.patch_embed.patch_size = grid, patch
    if token_px is not None:
        m.patch_embed.token_pixel_size = token_px
    if model_px is not None:
        m.token_pixel_size = model_px
    return m


def test_patch_grid_reads_vitlens_timm_and_huggingface_layouts():
    assert patch_grid(_with_patch_embed((3, 5), (4, 8))) == ((3, 5), (4, 8))
    assert patch_grid(_with_patch_embed(6, 2)) == ((6, 6), (2, 2))
    assert patch_grid(_with_patch_embed((3, 5), (4, 4), token_px=(8, 2))) == ((3, 5), (8, 2))
    assert patch_grid(_with_patch_embed((3, 5), (4, 4), model_px=(2, 6))) == ((3, 5), (2, 6))
    hf = _Holder()
    hf.config = types.SimpleNamespace(image_size=(32, 48), patch_size=(4, 8))
    assert patch_grid(hf) == ((8, 6), (4, 8)) and is_vit(hf)
    hf.config = types.SimpleNamespace(image_size=32, patch_size=4)
    assert patch_grid(hf) == ((8, 8), (4, 4))
    no_grid = _with_patch_embed(None, 4)
    assert patch_grid(no_grid) is None and not is_vit(no_grid)
    only_patch = _Holder()
    only_patch.config = types.SimpleNamespace(patch_size=4)  # no image_size: not a grid
    assert patch_grid(only_patch) is None and not is_vit(nn.Linear(2, 2))


# ======================================== capture.py
def test_reduce_activation_policies_and_defaults():
    t3 = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    assert torch.equal(reduce_activation(t3), t3.flatten(1))  # default: flatten
    assert torch.equal(reduce_activation(t3, "flatten"), t3.reshape(2, 12))
    assert torch.equal(reduce_activation(t3, "mean"), t3.mean(1))  # default: no prefix tokens
    assert torch.equal(reduce_activation(t3, "mean", num_prefix_tokens=3), t3[:, 3])  # one patch token left
    assert torch.equal(reduce_activation(t3, "cls", num_prefix_tokens=2), t3[:, 0])
    assert torch.equal(reduce_activation(t3, "all"), t3.reshape(2, 12))
    with pytest.raises(ConfigError) as err:
        reduce_activation(t3, "cls")
    assert str(err.value) == (  # the whole message: what is wrong, why, and the two ways out
        "token_policy='cls' on a sequence of shape (2, 4, 3) without a class token (num_prefix_tokens=0, "
        "e.g. the patch_embed output or a model without [CLS]); use token_policy='mean' or 'flatten', "
        "or leave that layer out"
    )
    with pytest.raises(ValueError, match="after the 4 prefix tokens"):
        reduce_activation(t3, "mean", num_prefix_tokens=4)
    t4 = torch.arange(2 * 3 * 2 * 5, dtype=torch.float32).reshape(2, 3, 2, 5)
    assert torch.equal(reduce_activation(t4, "all"), t4.reshape(2, 30))
    assert torch.equal(reduce_activation(t4, "flatten"), t4.reshape(2, 30))
    with pytest.raises(ConfigError, match="does not apply to the feature map"):
        reduce_activation(t4, "cls", num_prefix_tokens=1)
    with pytest.raises(ValueError, match="callable must return"):
        reduce_activation(t3, lambda t: t.sum((1, 2)))  # (B,) not (B, features)
    with pytest.raises(ValueError, match="callable must return"):
        reduce_activation(t3, lambda t: t.flatten()[None])  # (1, ...) for B = 2
    with pytest.raises(ConfigError, match="unknown token policy 'max'"):
        reduce_activation(torch.zeros(2, 3), "max")


def test_infer_num_prefix_tokens_counts_prefix_parameters():
    m = _Holder()
    m.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
    m.emb = _Holder()
    m.emb.reg_token = nn.Parameter(torch.zeros(1, 4, 8))
    m.emb.dist_token = nn.Parameter(torch.zeros(1, 1, 8))
    m.pos_embed = nn.Parameter(torch.zeros(1, 7, 8))  # not a prefix token
    m.register_tokens = nn.Parameter(torch.zeros(4, 8))  # 2-D: not a (1, n, D) token table
    assert infer_num_prefix_tokens(m) == 6
    m.num_prefix_tokens = 3  # the model's own count wins
    assert infer_num_prefix_tokens(m) == 3
    m.num_prefix_tokens = None  # not an int: count
    assert infer_num_prefix_tokens(m) == 6
    assert infer_num_prefix_tokens(nn.Linear(2, 2)) == 0


def test_layer_prefix_tokens_patch_embeddings_have_none():
    m = _Holder()
    m.num_prefix_tokens = 2
    assert layer_prefix_tokens(m, "blocks.0") == 2
    assert layer_prefix_tokens(m, "blocks.0", num_prefix_tokens=5) == 5
    assert layer_prefix_tokens(m, "blocks.0", num_prefix_tokens=0) == 0
    for name in ("patch_embed", "patch_embed.proj", "vit.embeddings.patch_embeddings", "x.my_patch_embed"):
        assert layer_prefix_tokens(m, name, num_prefix_tokens=5) == 0


def _seq(n):
    return nn.Sequential(*[nn.Identity() for _ in range(n)])


def test_default_layers_of_hand_built_module_trees():
    vit = _Holder()
    vit.blocks = nn.ModuleList([nn.Identity(), nn.Identity()])
    assert default_layers(vit) == ["blocks.0", "blocks.1"]  # no patch_embed module
    vit.patch_embed = nn.Identity()
    assert default_layers(vit) == ["patch_embed", "blocks.0", "blocks.1"]
    assert default_layers(vit, "mean") == ["patch_embed", "blocks.0", "blocks.1"]
    assert default_layers(vit, "cls") == ["blocks.0", "blocks.1"]

    cnn = _Holder()
    cnn.relu, cnn.layer1, cnn.layer2, cnn.layer4 = nn.ReLU(), _seq(2), _seq(1), _seq(3)
    assert default_layers(cnn) == ["relu", "layer1.0", "layer1.1", "layer2.0"]  # stops at the missing layer3
    cnn.maxpool = nn.Identity()
    assert default_layers(cnn)[0] == "maxpool" and "relu" not in default_layers(cnn)

    hf = _Holder()
    hf.embeddings, hf.encoder = nn.Identity(), _Holder()
    hf.encoder.layer = nn.ModuleList([nn.Identity(), nn.Identity()])
    assert default_layers(hf) == ["embeddings", "encoder.layer.0", "encoder.layer.1"]
    hf5 = _Holder()
    hf5.vit = _Holder()
    hf5.vit.embeddings, hf5.vit.layers = nn.Identity(), nn.ModuleList([nn.Identity()])
    assert default_layers(hf5) == ["vit.embeddings", "vit.layers.0"]

    odd = _Holder()
    odd.embeddings, odd.mylayers = nn.Identity(), nn.ModuleList([nn.Identity()])  # not "layers"
    with pytest.raises(ModelError, match=r"pass layers=\[...\] explicitly, e.g. children of \['mylayers'\]"):
        default_layers(odd)
    empty = _Holder()
    empty.blocks = nn.ModuleList()
    with pytest.raises(ModelError, match="cannot guess"):
        default_layers(empty)


class _Outputs(nn.Module):
    """Modules whose outputs are a list, a dict and a plain value (what the hooks must unpack)."""

    def __init__(self):
        super().__init__()
        self.as_list, self.as_dict, self.lin = _ListOut(), _DictOut(), nn.Linear(3, 3)

    def forward(self, x):
        self.as_list(x)
        self.as_dict(x)
        return self.lin(x)


class _ListOut(nn.Module):
    def forward(self, x):
        return [x + 1, x + 2]


class _DictOut(nn.Module):
    def forward(self, x):
        return {"last_hidden_state": x * 3, "other": x}


def test_capture_unpacks_list_and_dict_outputs_and_applies_transform():
    model = _Outputs()
    x = torch.randn(4, 3)
    with ActivationCapture(model, ["as_list", "as_dict"]) as cap:
        acts = cap.run(x)
    assert list(acts) == ["as_list", "as_dict"]
    assert torch.equal(acts["as_list"], x + 1) and torch.equal(acts["as_dict"], x * 3)
    seen = []
    with ActivationCapture(
        model, ["as_dict", "lin"], transform=lambda name, f: seen.append(name) or f.sum(1)
    ) as cap:
        acts = cap.run(x)
    assert sorted(seen) == ["as_dict", "lin"]
    assert torch.allclose(acts["as_dict"], (x * 3).sum(1))
    assert torch.allclose(acts["lin"], model.lin(x).sum(1).detach())

    class Bad(nn.Module):
        def forward(self, x):
            return None

    holder = nn.Sequential(Bad())
    with ActivationCapture(holder, ["0"]) as cap, pytest.raises(TypeError, match="NoneType"):
        cap.run(x)


def test_capture_prefix_counts_lifecycle_and_warnings():
    seq = nn.Sequential(nn.Identity(), nn.Identity())
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    with ActivationCapture(seq, ["0", "1"], "mean", num_prefix_tokens=2) as cap:
        assert cap.prefix == {"0": 2, "1": 2}
        acts = cap.run(x)
        assert torch.equal(acts["1"], x[:, 2:].mean(1))
        with pytest.raises(RuntimeError, match="already active"):
            cap.__enter__()
    assert cap.activations == {} and cap._handles == []
    with ActivationCapture(seq, ["0", "1"], "mean", num_prefix_tokens={"1": 4}) as cap:
        assert cap.prefix == {"0": 0, "1": 4}  # a missing layer falls back to the model's count (0)
        assert torch.equal(cap.run(x)["1"], x[:, 4])
    with pytest.raises(ConfigError, match="unknown token policy 'first'"):
        ActivationCapture(seq, ["0"], "first")

    relu = nn.ReLU()
    shared = nn.Sequential(relu, nn.Linear(3, 3), relu)  # one module run twice per forward
    with ActivationCapture(shared, ["0"]) as cap:
        with pytest.warns(UserWarning, match="ran 2 times"):
            cap.run(torch.randn(2, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once per layer, not at every batch
            cap.run(torch.randn(2, 3))


# ======================================== cka.py: building blocks
def test_median_matches_numpy_for_odd_and_even_sizes():
    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 5, 6, 9):
        t = torch.randn(3, k, generator=g, dtype=torch.float64)
        np.testing.assert_allclose(cka_module._median(t).numpy(), np.median(t.numpy(), axis=-1), rtol=1e-15)


def test_feature_gram_is_the_centred_gram_in_float64_and_float32_chunks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 700, generator=g, dtype=torch.float64) + 10.0
    xc = x.numpy() - x.numpy().mean(0)
    ref = xc @ xc.T
    g64 = feature_gram(x)
    assert g64.dtype == torch.float64 and g64.shape == (5, 5)
    np.testing.assert_allclose(g64.numpy(), ref, rtol=1e-12, atol=1e-9)
    g32 = feature_gram(x.float(), dtype=torch.float32, chunk_elems=1)  # 256-column chunks: 256, 256, 188
    assert g32.dtype == torch.float64
    np.testing.assert_allclose(g32.numpy(), ref, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match=r"\(n, features\), got shape \(5, 2, 350\)"):
        feature_gram(x.view(5, 2, 350))


@pytest.mark.parametrize("n", [4, 5, 7])
def test_hsic_small_n_matches_the_paper_formulas(n):
    g = torch.Generator().manual_seed(n)
    a, b = (
        torch.randn(n, 3, generator=g, dtype=torch.float64),
        torch.randn(n, 2, generator=g, dtype=torch.float64),
    )
    k, l = a @ a.T + 1.0, torch.exp(-(torch.cdist(b, b) ** 2))  # noqa: E741
    assert hsic(k, l) == pytest.approx(ref_hsic_biased(k.numpy(), l.numpy()), rel=1e-10, abs=1e-14)
    assert hsic(k, l, debiased=True) == pytest.approx(
        ref_hsic_unbiased(k.numpy(), l.numpy()), rel=1e-10, abs=1e-14
    )
    assert hsic(k.float(), l.float()) == pytest.approx(hsic(k, l), rel=1e-5)


def test_hsic_and_cka_example_count_limits():
    k = torch.eye(4, dtype=torch.float64) + 0.5
    hsic(k, k, debiased=True)  # n = 4 is enough for the debiased estimator
    hsic(k[:2, :2], k[:2, :2])  # n = 2 is enough for the biased one
    with pytest.raises(DataError, match="at least 4 examples.*got n=3"):
        hsic(k[:3, :3], k[:3, :3], debiased=True)
    with pytest.raises(DataError, match="at least 2 examples, got n=1"):
        hsic(k[:1, :1], k[:1, :1])
    for a, b in ((torch.zeros(4, 3), torch.zeros(4, 3)), (k, k[:3, :3]), (torch.zeros(2, 4, 4), k)):
        with pytest.raises(ValueError, match="two \\(n, n\\) kernel matrices of one size"):
            hsic(a, b)


def test_cka_defaults_are_linear_biased_and_sigma_one():
    x, y = pair(9)
    assert cka(x, y) == pytest.approx(ref_cka(x, y, "linear", False), abs=1e-12)
    assert cka(x, y, kernel="rbf") == pytest.approx(ref_cka(x, y, "rbf", False, 1.0), abs=1e-12)
    assert cka(x, y, "rbf", True, 0.3) == pytest.approx(ref_cka(x, y, "rbf", True, 0.3), abs=1e-12)
    assert cka(x[:4], y[:4], debiased=True) == pytest.approx(ref_cka(x[:4], y[:4], debiased=True), abs=1e-10)
    with pytest.raises(ValueError, match="must describe the same examples, got 9 and 8 rows"):
        cka(x, y[:8])
    with pytest.raises(TypeError, match="y must be a torch.Tensor, got list"):
        cka(x, [[1.0]])


def test_rbf_bandwidth_errors():
    x, _ = pair(8)
    dup = torch.cat([x[:1].expand(6, -1), x[1:3]])  # 6 identical rows: most distances are 0
    with pytest.raises(ValueError) as err:
        cka(dup, x, kernel="rbf")
    assert str(err.value) == (
        "RBF kernel bandwidth is 0: more than half of the pairwise distances are zero (duplicate or "
        "constant representations); use kernel='linear' or larger, more varied batches"
    )
    with pytest.raises(ValueError, match=r"reduce_activation\(t, policy\) or t.flatten\(1\)"):
        cka(x[:, :, None], x)
    cka(dup, x, kernel="linear")  # the linear kernel has no bandwidth
    for bad in (0.0, -1.0):
        with pytest.raises(ConfigError, match=f"sigma_frac must be > 0 for the RBF kernel, got {bad}"):
            cka(x, x, kernel="rbf", sigma_frac=bad)
    assert cka(x, x, kernel="linear", sigma_frac=0.0) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match=r"unknown kernel 'poly'; choose one of \('linear', 'rbf'\)"):
        cka(x, x, kernel="poly")


# ======================================== cka.py: MinibatchCKA
@pytest.mark.parametrize(
    "kernel,debiased,sigma", [("linear", False, 1.0), ("rbf", True, 0.5), ("rbf", False, 2.0)]
)
def test_minibatch_one_batch_equals_the_reference_cka(kernel, debiased, sigma):
    x, y = pair(10)
    z = x[:, :2] ** 2
    acc = MinibatchCKA(2, 1, kernel=kernel, debiased=debiased, sigma_frac=sigma)
    acc.update([x, z], [y])
    m = acc.compute()
    assert m.shape == (2, 1)
    assert m[0, 0] == pytest.approx(ref_cka(x, y, kernel, debiased, sigma), abs=1e-10)
    assert m[1, 0] == pytest.approx(ref_cka(z, y, kernel, debiased, sigma), abs=1e-10)


def test_minibatch_default_is_debiased_linear():
    x, y = pair(10)
    acc = MinibatchCKA(1, 1)
    assert (acc.kernel, acc.debiased, acc.sigma_frac, acc.min_batch) == ("linear", True, 1.0, 4)
    acc.update([x], [y])
    assert acc.compute()[0, 0] == pytest.approx(ref_cka(x, y, debiased=True), abs=1e-10)
    assert ref_cka(x, y, debiased=True) != pytest.approx(ref_cka(x, y), abs=1e-3)  # the two differ here


def test_minibatch_sums_hsic_over_batches_with_batch_limits():
    x, y = pair(13)
    acc = MinibatchCKA(1, 1, debiased=False)
    assert acc.min_batch == 2
    acc.update([x[:5]], [y[:5]])
    acc.update([x[5:8]], [y[5:8]])  # 3 examples: enough for the biased estimator
    acc.update([x[8:10]], [y[8:10]])  # 2: still enough
    with pytest.warns(UserWarning, match=r"skipping a batch of 1 examples \(biased HSIC needs >= 2\)"):
        acc.update([x[10:11]], [y[10:11]])
    assert (acc.num_batches, acc.num_examples, acc.skipped_examples) == (3, 10, 1)
    hs = np.zeros(3)
    for s, e in ((0, 5), (5, 8), (8, 10)):
        k, l = ref_gram(x[s:e].numpy(), "linear"), ref_gram(y[s:e].numpy(), "linear")  # noqa: E741
        hs += [ref_hsic_biased(k, l), ref_hsic_biased(k, k), ref_hsic_biased(l, l)]
    np.testing.assert_allclose(acc.hsic_ab.numpy(), [[hs[0]]], rtol=1e-12)
    np.testing.assert_allclose([acc.hsic_aa.item(), acc.hsic_bb.item()], hs[1:], rtol=1e-12)
    assert acc.compute()[0, 0] == pytest.approx(hs[0] / np.sqrt(hs[1] * hs[2]), abs=1e-12)

    deb = MinibatchCKA(1, 1)
    with pytest.warns(UserWarning, match=r"batch of 3 examples \(debiased HSIC needs >= 4\)"):
        deb.update([x[:3]], [y[:3]])
    deb.update([x[:4]], [y[:4]])  # 4 is enough
    assert (deb.num_batches, deb.skipped_examples) == (1, 3)


def test_minibatch_self_comparison_and_constant_layers():
    x, y = pair(12)
    const = torch.ones(12, 3, dtype=torch.float64)
    acc = MinibatchCKA(3)
    assert acc.shape == (3, 3) and acc.self_compare
    acc.update([x, y, const])
    with pytest.warns(UserWarning, match="constant over the data"):
        m = acc.compute()
    assert m[0, 1] == pytest.approx(ref_cka(x, y, debiased=True), abs=1e-10) and m[1, 0] == m[0, 1]
    assert m[0, 0] == pytest.approx(1.0, abs=1e-12) and m[1, 1] == pytest.approx(1.0, abs=1e-12)
    assert np.isnan(m[2]).all() and np.isnan(m[:, 2]).all() and np.isfinite(m[:2, :2]).all()
    assert m.dtype == np.float64
    with pytest.raises(ValueError, match="at least one layer per model, got 0 and None"):
        MinibatchCKA(0)
    with pytest.raises(ValueError, match="at least one layer per model, got 2 and 0"):
        MinibatchCKA(2, 0)
    with pytest.raises(ValueError, match=r"grams_b must have shape \(1, b, b\), got \(2, 4, 4\)"):
        MinibatchCKA(1, 1).update_grams(torch.zeros(1, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"grams_a must have shape \(1, b, b\), got \(1, 4, 5\)"):
        MinibatchCKA(1, 1).update_grams(torch.zeros(1, 4, 5), torch.zeros(1, 4, 4))
    with pytest.raises(RuntimeError, match="no batch of >= 2 examples"):
        MinibatchCKA(1, 1, debiased=False).compute()


def test_minibatch_float32_grams_through_update():
    x, y = pair(16)
    a64, a32 = MinibatchCKA(1, 1), MinibatchCKA(1, 1)
    a64.update([x], [y])
    a32.update([x.float()], [y.float()], gram_dtype=torch.float32)
    assert a32.compute()[0, 0] == pytest.approx(a64.compute()[0, 0], abs=1e-5)


@pytest.mark.parametrize("self_compare", [True, False])
def test_minibatch_sum_across_ranks_adds_every_statistic(monkeypatch, self_compare):
    """Two ranks that saw the same batch: every sum doubles, the CKA ratio does not move."""
    x, y = pair(10)
    acc = MinibatchCKA(2) if self_compare else MinibatchCKA(2, 1)
    acc.update([x, y]) if self_compare else acc.update([x, y], [y])
    acc.skipped_examples = 1
    before = acc.compute().copy()
    ab, aa, bb = acc.hsic_ab.clone(), acc.hsic_aa.clone(), acc.hsic_bb.clone()
    acc.sum_across_ranks()  # one process: nothing to add
    assert torch.equal(acc.hsic_ab, ab) and acc.num_batches == 1
    calls = []
    monkeypatch.setattr(cka_module, "world", lambda: (0, 2))
    monkeypatch.setattr(
        cka_module, "sum_across_ranks", lambda parts, what: calls.append(what) or [2 * p for p in parts]
    )
    acc.sum_across_ranks()
    assert len(calls) == 1 and "HSIC" in calls[0]
    assert (acc.num_batches, acc.num_examples, acc.skipped_examples) == (2, 20, 2)
    assert all(isinstance(v, int) for v in (acc.num_batches, acc.num_examples, acc.skipped_examples))
    torch.testing.assert_close(acc.hsic_ab, 2 * ab)
    torch.testing.assert_close(acc.hsic_aa, 2 * aa)
    torch.testing.assert_close(acc.hsic_bb, 2 * bb)
    np.testing.assert_allclose(acc.compute(), before, rtol=1e-12)


# ======================================== cka.py: cka_matrix on a tiny model
class _TwoLayer(nn.Module):
    """(B, 3, 2, 2) images -> two named layers with known features (and dropout, off in eval mode)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.flat = nn.Flatten()
        self.fc1, self.act, self.drop, self.fc2 = (
            nn.Linear(12, 8),
            nn.Tanh(),
            nn.Dropout(0.5),
            nn.Linear(8, 5),
        )
        self.double()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc2(self.drop(self.act(self.fc1(self.flat(x)))))

    def feats(self, x):
        with torch.no_grad():
            h = self.fc1(x.flatten(1))
            return h, self.fc2(torch.tanh(h))


def _images(n_batches=2, b=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 2, 2, generator=g, dtype=torch.float64) for _ in range(n_batches)]


@pytest.mark.parametrize(
    "kernel,debiased,sigma", [("linear", False, 1.0), ("rbf", True, 0.7), ("rbf", False, 1.0)]
)
def test_cka_matrix_one_batch_equals_reference(kernel, debiased, sigma):
    a, b = _TwoLayer(0).train(), _TwoLayer(1).eval()
    data = _images(1)
    m, na, nb = cka_matrix(
        a, b, data, layers_a=["fc1", "fc2"], layers_b=["fc2"], kernel=kernel, debiased=debiased,
        sigma_frac=sigma, gram_dtype=torch.float64, progress=False,
    )  # fmt: skip
    assert (na, nb) == (["fc1", "fc2"], ["fc2"]) and m.shape == (2, 1)
    fa, fb = a.feats(data[0]), b.feats(data[0])  # eval-mode features: no dropout
    for i in range(2):
        assert m[i, 0] == pytest.approx(ref_cka(fa[i], fb[1], kernel, debiased, sigma), abs=1e-9)
    assert a.training and not b.training  # each model gets its own mode back


def test_cka_matrix_self_max_batches_and_one_forward():
    model = _TwoLayer(0)
    data = _images(3)
    model.calls = 0
    m, na, nb = cka_matrix(model, data, layers_a=["fc1", "fc2"], max_batches=2, progress=False)
    assert model.calls == 2 and na == nb == ["fc1", "fc2"]  # one forward per batch, two batches
    acc = MinibatchCKA(2)
    for x in data[:2]:
        acc.update(list(model.feats(x)))
    np.testing.assert_allclose(m, acc.compute(), atol=1e-6)  # default float32 Grams: ~1e-7
    same, _, _ = cka_matrix(
        model, model, data, layers_a=["fc1", "fc2"], layers_b=["fc1", "fc2"], progress=False
    )
    np.testing.assert_allclose(
        same, cka_matrix(model, None, data, layers_a=["fc1", "fc2"], progress=False)[0]
    )
    with pytest.raises(ValueError, match=r"must be \(policy_a, policy_b\)"):
        cka_matrix(model, data, layers_a=["fc1"], token_policy=("mean",), progress=False)
    with pytest.raises(TypeError, match="model_a must be an nn.Module, got list"):
        cka_matrix(data, model, data, progress=False)


# ======================================== distributed.py (one process)
def test_world_and_main_process_without_a_process_group(monkeypatch):
    assert world() == (0, 1)
    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    box = {"a": 1}
    assert main_process_says(box) is box
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_torchrun() is False
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_torchrun() is False


def test_rank_device(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert rank_device("cuda") == torch.device("cuda") and rank_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cuda") == torch.device("cuda", 1)
    assert rank_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert rank_device("cpu") == torch.device("cpu")


def test_sums_and_maxima_in_one_process_are_float64_copies():
    a, b = torch.arange(6, dtype=torch.float32).view(2, 3), torch.tensor([7], dtype=torch.int64)
    out = sum_across_ranks([a, b], "test")
    assert [o.dtype for o in out] == [torch.float64, torch.float64]
    assert [o.shape for o in out] == [a.shape, b.shape]
    assert torch.equal(out[0], a.double()) and torch.equal(out[1], b.double())
    out[0] += 1
    assert a[0, 0] == 0  # a copy, not the input
    assert sum_across_ranks([]) == []
    assert max_across_ranks([3, 1.0, True]) == [3, 1, 1]


def test_cut_and_size_of_every_batch_layout():
    x, y = torch.arange(5), torch.arange(5) * 10
    assert torch.equal(dist_module._cut(x, 2), x[:2])
    cut = dist_module._cut((x, [y, y]), 3)
    assert isinstance(cut, tuple) and isinstance(cut[1], list) and cut[1][0].tolist() == [0, 10, 20]
    d = dist_module._cut({"pixel_values": x, "label": y, "name": "keep"}, 1)
    assert d["pixel_values"].tolist() == [0] and d["label"].tolist() == [0] and d["name"] == "keep"
    assert dist_module._size({"images": torch.zeros(4, 3)}) == 4 and dist_module._size((x, y)) == 5


def test_rank_batches_limits_from_a_list_and_a_loader():
    data = [torch.arange(s, s + 3) for s in (0, 3, 6, 9)]
    rb = RankBatches(data, max_images=5)
    assert [b.tolist() for b in rb] == [[0, 1, 2], [3, 4]] and rb.sizes == [3, 2]
    assert rb.total_images is None and rb.indices is None and rb.images_per_rank == [5]
    assert rb.describe() == {"world_size": 1, "images": 5, "images_per_rank": [5]}
    assert [b.tolist() for b in RankBatches(data, max_batches=1)] == [[0, 1, 2]]
    assert [b.tolist() for b in RankBatches(data, max_images=3)] == [[0, 1, 2]]
    assert len(list(RankBatches(data, max_batches=1, max_images=1))) == 1
    for kw in ({"max_batches": 0}, {"max_images": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be >= 1 or None, got 0"):
            RankBatches(data, **kw)

    base = list(range(100, 120))
    sub = torch.utils.data.Subset(torch.utils.data.Subset(base, list(range(2, 20))), [5, 1, 7, 3, 0, 9, 4])
    loader = torch.utils.data.DataLoader(
        sub, batch_size=3, shuffle=False, collate_fn=lambda items: {"images": torch.tensor(items)}
    )
    rb = RankBatches(loader, max_images=5)
    assert rb.index_lists == [[0, 1, 2], [3, 4]] and rb.total_images == 5 and rb.indices == [0, 1, 2, 3, 4]
    got = list(rb)
    assert [b["images"].tolist() for b in got] == [[107, 103, 109], [105, 102]]  # the loader's collate_fn
    described = rb.describe()
    assert described["batches"] == 2 and described["images"] == 5 and described["images_per_rank"] == [5]
    # the fingerprint names the images of the underlying dataset, through both Subset layers
    assert described["indices_fingerprint"] == indices_fingerprint([7, 3, 9, 5, 2])
    assert RankBatches(loader, max_batches=2).index_lists == [[0, 1, 2], [3, 4, 5]]


# ---------------------------------------- distributed.py: the collectives, with a fake two-process group
def test_collectives_under_a_fake_two_process_group(monkeypatch):
    """world() says 2 ranks; the all-reduce/broadcast of torch.distributed are replaced by fakes that
    act as the other rank would (it holds the same tensors, and 5 for every maximum)."""
    import torch.distributed as tdist

    monkeypatch.setattr(dist_module, "world", lambda: (0, 2))
    monkeypatch.setattr(tdist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(tdist, "get_rank", lambda: 0)
    ops = []

    def all_reduce(t, op):
        ops.append((op, t.device.type, t.dtype))
        if op == tdist.ReduceOp.SUM:
            t.mul_(2)
        else:
            t.clamp_(min=5)

    monkeypatch.setattr(tdist, "all_reduce", all_reduce)
    a, b = torch.arange(6, dtype=torch.float32).view(2, 3), torch.tensor([1.5])
    out = sum_across_ranks([a, b], "test sums")
    assert torch.equal(out[0], 2 * a.double()) and torch.equal(
        out[1], torch.tensor([3.0], dtype=torch.float64)
    )
    assert ops == [(tdist.ReduceOp.SUM, "cpu", torch.float64)]  # one all-reduce for all tensors
    assert max_across_ranks([3, 9]) == [5, 9] and ops[-1] == (tdist.ReduceOp.MAX, "cpu", torch.int64)

    def broken(t, op):
        raise RuntimeError("Connection closed by peer\nmore detail")

    monkeypatch.setattr(tdist, "all_reduce", broken)
    with pytest.raises(
        dist_module.RankFailedError,
        match=r"^rank 0 of 2: summing the test sums across processes failed: another rank failed.*"
        r"backend said: Connection closed by peer$",
    ):
        sum_across_ranks([a], "test sums")
    with pytest.raises(dist_module.RankFailedError, match=r"rank 0: exchanging shapes .*\(RuntimeError\)"):
        max_across_ranks([1])

    sent = []

    def broadcast(box, src):
        sent.append((list(box), src))
        box[0] = "rank 0's value"

    monkeypatch.setattr(tdist, "broadcast_object_list", broadcast)
    assert main_process_says("mine") == "rank 0's value" and sent == [(["mine"], 0)]


@pytest.mark.parametrize("device,backend", [("cpu", "gloo"), ("cuda", "nccl")])
def test_init_from_torchrun_joins_with_the_right_backend(monkeypatch, device, backend):
    import datetime

    import torch.distributed as tdist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    assert init_from_torchrun(device, timeout_s=12.5) is True
    joined = {"backend": backend, "timeout": datetime.timedelta(seconds=12.5)}
    assert calls == ([("set_device", 1), joined] if device == "cuda" else [joined])
    monkeypatch.delenv("LOCAL_RANK")  # a single-node launch without LOCAL_RANK: device 0
    calls.clear()
    assert init_from_torchrun(device) is True
    default = {"backend": backend, "timeout": datetime.timedelta(seconds=600.0)}
    assert calls == ([("set_device", 0), default] if device == "cuda" else [default])
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)  # a group already there: nothing to do
    assert init_from_torchrun(device) is False


def test_cka_matrix_two_layer_sets_of_one_model():
    model = _TwoLayer(0).eval()
    data = _images(1)
    m, na, nb = cka_matrix(
        model, model, data, layers_a=["fc1"], layers_b=["fc2"], gram_dtype=torch.float64, progress=False
    )
    assert (na, nb) == (["fc1"], ["fc2"]) and m.shape == (1, 1)
    f1, f2 = model.feats(data[0])
    assert m[0, 0] == pytest.approx(ref_cka(f1, f2, debiased=True), abs=1e-9)


def test_unknown_layer_suggests_at_most_four_close_names():
    m = _Holder()
    m.blocks = nn.ModuleList([nn.Identity() for _ in range(12)])
    with pytest.raises(ConfigError) as err:
        ActivationCapture(m, ["blocks.1x"])
    assert str(err.value).endswith(
        "Layer names are model.named_modules() names; "
        "vitlens.analysis.default_layers(model) gives a sensible list"
    )
    suggested = str(err.value).split("did you mean ")[1].split("?)")[0]
    assert len(suggested.split(", ")) == 4 and "'blocks.1'" in suggested
