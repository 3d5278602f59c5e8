"""CKA: agreement with slow reference formulas, invariances, minibatch accumulation, cka_matrix."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

from vitlens.analysis import MinibatchCKA, cka, cka_matrix, feature_gram, hsic
from vitlens.analysis.capture import ActivationCapture


# --------------------------------------------------------------------------- slow references
# Written straight from the papers' formulas, in numpy float64, sharing no code with vitlens.
def ref_gram(x: np.ndarray, kernel: str, sigma_frac: float = 1.0) -> np.ndarray:
    g = x @ x.T
    if kernel == "linear":
        return g
    # Kornblith et al. 2019 reference code (gram_rbf): sigma^2 = frac^2 * median squared distance
    sq = np.diag(g)[:, None] + np.diag(g)[None, :] - 2 * g
    return np.exp(-sq / (2 * sigma_frac**2 * np.median(sq)))


def ref_hsic_biased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h) / (n - 1) ** 2)


def ref_hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. 2012, eq. (5); Nguyen, Raghu & Kornblith 2021, eq. (3)."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones((n, 1))
    t1 = np.trace(kt @ lt)
    t2 = (one.T @ kt @ one).item() * (one.T @ lt @ one).item() / ((n - 1) * (n - 2))
    t3 = 2.0 / (n - 2) * (one.T @ kt @ lt @ one).item()
    return float((t1 + t2 - t3) / (n * (n - 3)))


def ref_cka(x, y, kernel="linear", debiased=False, sigma_frac=1.0) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k, l = ref_gram(x, kernel, sigma_frac), ref_gram(y, kernel, sigma_frac)  # noqa: E741
    h = ref_hsic_unbiased if debiased else ref_hsic_biased
    return h(k, l) / np.sqrt(h(k, k) * h(l, l))


def related_pair(n: int, p: int = 24, q: int = 16, seed: int = 0, offset: float = 3.0):
    """Two correlated representations with a feature offset (ReLU-like, exercises centring)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(p, q, generator=g, dtype=torch.float64)) + 0.5 * torch.randn(
        n, q, generator=g, dtype=torch.float64
    )
    return x + offset, y


# --------------------------------------------------------------------------- cka() vs reference
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("sigma_frac", [1.0, 0.4])
def test_cka_matches_reference(kernel, debiased, sigma_frac):
    x, y = related_pair(37)
    ours = cka(x, y, kernel=kernel, debiased=debiased, sigma_frac=sigma_frac)
    ref = ref_cka(x.numpy(), y.numpy(), kernel, debiased, sigma_frac)
    assert isinstance(ours, float)
    assert 0.05 < abs(ref) < 1.0  # a non-trivial value, so the comparison means something
    assert ours == pytest.approx(ref, abs=1e-6)


def test_cka_float32_inputs_are_computed_in_float64():
    x, y = related_pair(50)
    assert cka(x.float(), y.float(), debiased=True) == pytest.approx(
        ref_cka(x.float().double().numpy(), y.float().double().numpy(), debiased=True), abs=1e-9
    )


@pytest.mark.parametrize("debiased", [False, True])
def test_hsic_matches_reference_on_uncentred_kernels(debiased):
    x, y = related_pair(30)
    k, l = x @ x.T, torch.exp(-(torch.cdist(y, y) ** 2) / 10)  # noqa: E741
    ref = (ref_hsic_unbiased if debiased else ref_hsic_biased)(k.numpy(), l.numpy())
    assert hsic(k, l, debiased=debiased) == pytest.approx(ref, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_invariances(debiased):
    x, y = related_pair(60)
    base = cka(x, y, debiased=debiased)
    q, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], dtype=torch.float64))
    perm = torch.randperm(y.shape[1])
    assert cka(x @ q, y, debiased=debiased) == pytest.approx(base, abs=1e-9)  # orthogonal
    assert cka(7.3 * x, 0.01 * y, debiased=debiased) == pytest.approx(base, abs=1e-9)  # isotropic scaling
    assert cka(x, y[:, perm], debiased=debiased) == pytest.approx(base, abs=1e-9)  # feature permutation
    assert cka(x - 100.0, y, debiased=debiased) == pytest.approx(base, abs=1e-9)  # translation
    assert cka(y, x, debiased=debiased) == pytest.approx(base, abs=1e-12)  # symmetry


def test_rbf_cka_invariant_to_rotation_and_scale():
    x, y = related_pair(40)
    q, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], dtype=torch.float64))
    base = cka(x, y, kernel="rbf")
    assert cka(3.0 * x @ q, y, kernel="rbf") == pytest.approx(base, abs=1e-9)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_with_itself_is_one(kernel, debiased):
    x, _ = related_pair(25)
    assert cka(x, x, kernel=kernel, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


def test_unrelated_representations_have_low_debiased_cka():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(400, 50, generator=g), torch.randn(400, 50, generator=g)
    assert cka(x, y) > 0.05  # the biased estimator is inflated for p ~ n/8 ...
    assert abs(cka(x, y, debiased=True)) < 0.02  # ... the debiased one is not


# --------------------------------------------------------------------------- errors
def test_cka_errors_are_clear():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="same examples"):
        cka(x, torch.randn(9, 4))
    with pytest.raises(ValueError, match="at least 4"):
        cka(x[:3], x[:3], debiased=True)
    with pytest.raises(ValueError, match="at least 2"):
        cka(x[:1], x[:1])
    with pytest.raises(ValueError, match="2-D.*flatten"):
        cka(torch.randn(10, 3, 4), x)
    with pytest.raises(ValueError, match="unknown kernel"):
        cka(x, x, kernel="poly")
    with pytest.raises(TypeError, match="torch.Tensor"):
        cka(x.numpy(), x)
    with pytest.warns(UserWarning, match="constant"):
        assert np.isnan(cka(torch.ones(10, 3), x))


# --------------------------------------------------------------------------- minibatch accumulation
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_minibatch_one_big_batch_equals_debiased_cka(kernel):
    x, y = related_pair(64)
    z = x[:, :5] ** 2
    acc = MinibatchCKA(2, 2, kernel=kernel)
    acc.update([x, z], [y, x])
    m = acc.compute()
    assert m.shape == (2, 2) and m.dtype == np.float64
    for i, a in enumerate([x, z]):
        for j, b in enumerate([y, x]):
            assert m[i, j] == pytest.approx(cka(a, b, kernel=kernel, debiased=True), abs=1e-9)


def test_minibatch_equals_nguyen_sum_of_hsic_not_mean_of_cka():
    x, y = related_pair(120)
    acc = MinibatchCKA(1, 1)
    hxy = hxx = hyy = 0.0
    for s in range(0, 120, 30):
        xb, yb = x[s : s + 30].numpy(), y[s : s + 30].numpy()
        acc.update([x[s : s + 30]], [y[s : s + 30]])
        k, l = xb @ xb.T, yb @ yb.T  # noqa: E741
        hxy += ref_hsic_unbiased(k, l)
        hxx += ref_hsic_unbiased(k, k)
        hyy += ref_hsic_unbiased(l, l)
    assert acc.compute()[0, 0] == pytest.approx(hxy / np.sqrt(hxx * hyy), abs=1e-9)
    assert acc.num_examples == 120 and acc.num_batches == 4


def test_minibatch_approaches_full_batch_for_large_n():
    x, y = related_pair(2048, p=32, q=32, seed=3)
    full = cka(x, y, debiased=True)
    acc = MinibatchCKA(1, 1)
    for s in range(0, 2048, 256):
        acc.update([x[s : s + 256]], [y[s : s + 256]])
    assert acc.compute()[0, 0] == pytest.approx(full, abs=0.005)


def test_minibatch_float32_gram_is_accurate():
    x, y = related_pair(256, p=3000, q=500, offset=20.0)
    acc64, acc32 = MinibatchCKA(1, 1), MinibatchCKA(1, 1)
    acc64.update([x], [y])
    acc32.update([x.float()], [y.float()], gram_dtype=torch.float32)
    assert acc32.compute()[0, 0] == pytest.approx(acc64.compute()[0, 0], abs=1e-6)


def test_feature_gram_chunked_float32_matches_float64():
    def rel_err(g, ref):
        return ((g - ref).abs().max() / ref.abs().max()).item()

    x = torch.randn(16, 50_000) + 50.0  # a large common offset, as in deep ReLU / residual features
    ref = feature_gram(x.double())
    g32 = feature_gram(x, dtype=torch.float32, chunk_elems=16 * 4096)  # 13 chunks, the last one partial
    assert g32.dtype == torch.float64 and rel_err(g32, ref) < 1e-6
    # why the features are centred before multiplying: an uncentred float32 Gram, centred afterwards,
    # loses several digits to cancellation
    raw = (x @ x.T).double()
    assert rel_err(raw - raw.mean(0) - raw.mean(1, keepdim=True) + raw.mean(), ref) > 1e-5


def test_minibatch_self_comparison_is_symmetric_with_unit_diagonal():
    x, y = related_pair(100)
    acc = MinibatchCKA(3)
    for s in range(0, 100, 25):
        acc.update([x[s : s + 25], y[s : s + 25], x[s : s + 25, :3]])
    m = acc.compute()
    assert np.array_equal(m, m.T)
    assert np.allclose(np.diag(m), 1.0, atol=1e-12)


def test_small_last_batch_is_skipped_with_warning():
    x, y = related_pair(67)
    ref = MinibatchCKA(1, 1)
    ref.update([x[:32]], [y[:32]])
    ref.update([x[32:64]], [y[32:64]])
    acc = MinibatchCKA(1, 1)
    acc.update([x[:32]], [y[:32]])
    acc.update([x[32:64]], [y[32:64]])
    with pytest.warns(UserWarning, match="skipping a batch of 3"):
        acc.update([x[64:]], [y[64:]])
    assert acc.skipped_examples == 3 and acc.num_examples == 64
    assert not np.isnan(acc.compute()).any()
    assert acc.compute()[0, 0] == ref.compute()[0, 0]


def test_minibatch_errors():
    with pytest.raises(RuntimeError, match="no batch"):
        MinibatchCKA(1, 1).compute()
    acc = MinibatchCKA(2, 1)
    with pytest.raises(ValueError, match=r"grams_a must have shape \(2, b, b\)"):
        acc.update_grams(torch.zeros(3, 8, 8), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="same batch"):
        acc.update_grams(torch.zeros(2, 8, 8), torch.zeros(1, 9, 9))
    with pytest.raises(ValueError, match="pass grams for both"):
        acc.update_grams(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="pass only grams_a"):
        MinibatchCKA(2).update_grams(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="unknown kernel"):
        MinibatchCKA(1, kernel="cosine")


# --------------------------------------------------------------------------- cka_matrix on models
def tiny_vit() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, embed_dim=48, num_heads=3, num_classes=10
    )


def image_batches(n_batches=4, b=16, size=32, labels=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(b, 3, size, size, generator=g)
        out.append((x, torch.zeros(b, dtype=torch.long)) if labels else x)
    return out


def test_cka_matrix_self_is_symmetric_with_unit_diagonal():
    model = tiny_vit().train()
    data = image_batches()
    m, names_a, names_b = cka_matrix(model, data, progress=False)
    assert names_a == names_b == ["patch_embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert m.shape == (5, 5)
    assert np.allclose(np.diag(m), 1.0, atol=1e-6)
    assert np.allclose(m, m.T, atol=1e-12)
    assert model.training  # train/eval mode restored


def test_cka_matrix_equals_manual_float64_accumulation():
    vit, cnn = tiny_vit(), torchvision.models.resnet18(num_classes=10)
    data = image_batches(3, b=12, labels=False)
    layers_a = ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]  # not patch_embed: it has no [CLS] token
    layers_b = ["maxpool", "layer2.1", "layer4.1"]
    m, na, nb = cka_matrix(
        vit,
        cnn,
        data,
        layers_a=layers_a,
        layers_b=layers_b,
        token_policy=("cls", "mean"),
        max_batches=2,
        progress=False,
    )
    assert (na, nb) == (layers_a, layers_b) and m.shape == (4, 3)

    # reference: plain capture + float64 MinibatchCKA over the same 2 batches
    vit.eval(), cnn.eval()
    acc = MinibatchCKA(4, 3)
    with ActivationCapture(vit, layers_a, "cls") as ca, ActivationCapture(cnn, layers_b, "mean") as cb:
        for x in data[:2]:
            acc.update(list(ca.run(x).values()), list(cb.run(x).values()))
    assert np.allclose(m, acc.compute(), atol=1e-6)
    assert not np.allclose(m, m[0, 0])  # layers differ


def test_cka_matrix_agrees_with_torch_cka_package():
    """Independent check: the `torch-cka` PyPI package implements the same Nguyen et al. estimator."""
    from torch_cka import CKA

    vit = tiny_vit().eval()
    cnn = torchvision.models.resnet18(num_classes=10).eval()
    layers_a, layers_b = ["blocks.0", "blocks.3"], ["layer1.0", "layer3.1", "layer4.1"]
    data = image_batches(3, b=16)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])),
        batch_size=16,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = CKA(
            vit, cnn, model1_name="vit", model2_name="resnet", model1_layers=layers_a, model2_layers=layers_b
        )
        ref.compare(loader)
    for mod in (*vit.modules(), *cnn.modules()):  # torch-cka never removes its hooks
        mod._forward_hooks.clear()
    ours, _, _ = cka_matrix(vit, cnn, loader, layers_a=layers_a, layers_b=layers_b, progress=False)
    # torch-cka works in float32 on uncentred Grams, which costs it ~3-4 digits here (its formula
    # replayed in float64 agrees with ours to 1e-12), hence the loose tolerance.
    assert np.allclose(ours, ref.export()["CKA"].double().numpy(), atol=1e-3)


def test_cka_matrix_errors():
    model = tiny_vit()
    with pytest.raises(ValueError, match="no module named 'blocks.9'"):
        cka_matrix(model, image_batches(1), layers_a=["blocks.9"], progress=False)
    with pytest.raises(ValueError, match="layers_b given without model_b"):
        cka_matrix(model, image_batches(1), layers_b=["blocks.0"], progress=False)
    with pytest.raises(ValueError, match="token_policy='cls'.*without a class token"):
        cka_matrix(
            model, image_batches(1), layers_a=["patch_embed", "blocks.0"], token_policy="cls", progress=False
        )
    cnn = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(
        TypeError, match=r"model_b must be an nn.Module or None, got list; the data comes third"
    ):
        cka_matrix(model, image_batches(1), cnn, progress=False)  # the data in model_b's place
    with pytest.raises(TypeError, match="needs data"):
        cka_matrix(model, cnn, progress=False)
    with pytest.raises(TypeError, match="cannot find images"):
        cka_matrix(model, [{"foo": 1}], progress=False)


def test_cka_matrix_call_forms_and_cls_default_layers():
    """(model_a, model_b, data) as documented; (model, data) and data= for one model; the 'cls'
    policy's default layers leave out the patch embedding (no [CLS] there) instead of failing."""
    vit, cnn = tiny_vit(), torchvision.models.resnet18(num_classes=10)
    data = image_batches(2, b=8)
    m1, names, _ = cka_matrix(vit, None, data, progress=False)
    m2, _, _ = cka_matrix(vit, data, progress=False)
    m3, _, _ = cka_matrix(vit, data=data, progress=False)
    assert np.array_equal(m1, m2) and np.array_equal(m1, m3) and names[0] == "patch_embed"
    m, names_a, names_b = cka_matrix(vit, cnn, data, token_policy=("cls", "mean"), progress=False)
    assert names_a == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert names_b[0] == "maxpool" and m.shape == (4, len(names_b)) and np.isfinite(m).all()


def test_cka_matrix_one_model_two_layer_sets_runs_it_once_per_batch():
    import copy

    vit = tiny_vit().eval()
    data = image_batches(3, b=8)
    calls = []
    h = vit.register_forward_pre_hook(lambda m, a: calls.append(1))
    kwargs = dict(layers_a=["blocks.0", "blocks.1"], layers_b=["blocks.2", "blocks.3"], progress=False)
    m_same, _, _ = cka_matrix(vit, vit, data, token_policy=("cls", "mean"), **kwargs)
    h.remove()
    assert len(calls) == len(data)  # one forward per batch fills both layer sets
    m_copy, _, _ = cka_matrix(vit, copy.deepcopy(vit), data, token_policy=("cls", "mean"), **kwargs)
    np.testing.assert_allclose(m_same, m_copy, atol=1e-9)
