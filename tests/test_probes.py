"""Localization probes: ridge maths, planted class/position signals, real ViT/ResNet behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import vitlens
from vitlens.analysis.probes import _RidgeStats, localization_probes

K, N = 5, 16  # classes, tokens


class Planted(nn.Module):
    """Two token layers with known content. Input: a one-hot class vector (B, K) per "image".

    ``where``: token n is one-hot(n) plus noise -> position decodable, class not.
    ``what``: every token is the class one-hot plus noise -> class decodable, position not.
    ``grid``: an (B, N, 8, 8) map whose channel c is 1 on pixel c of an 8x8 image -> position only.
    """

    num_prefix_tokens = 0

    def __init__(self):
        super().__init__()
        self.where, self.what, self.grid = nn.Identity(), nn.Identity(), nn.Identity()

    def forward(self, x):
        B = x.shape[0]
        noise = lambda *s: 0.1 * torch.randn(*s)  # noqa: E731
        self.where(torch.eye(N).expand(B, N, N) + noise(B, N, N))
        self.what(x[:, None, :].expand(B, N, K) + noise(B, N, K))
        self.grid(torch.eye(64).view(64, 8, 8).expand(B, 64, 8, 8) + noise(B, 64, 8, 8))
        return x


def _planted_data(n_batches, B=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, K, (B,), generator=g)
        out.append((torch.nn.functional.one_hot(y, K).float(), y))
    return out


def test_planted_signals_are_found_and_absent_ones_are_at_chance():
    torch.manual_seed(0)
    res = localization_probes(
        Planted(), _planted_data(4), _planted_data(2, seed=1), ["where", "what", "grid"], grid=4
    )
    where, what, grid = res["where"], res["what"], res["grid"]
    assert where["position_acc"] == 1.0 and what["class_acc"] == 1.0
    assert where["class_acc"] < 0.35  # chance 0.2
    assert what["position_acc"] < 0.15  # chance 1/16
    # the 8x8 map is pooled to 4x4: 16 positions, each a distinct mix of channels -> exactly decodable
    assert grid["grid_size"] == (4, 4) and grid["num_positions"] == 16 and grid["position_acc"] == 1.0
    assert where["class_acc_map"].shape == (1, N)  # no patch grid known for this toy: one row
    assert where["train_tokens"] == 4 * 32 * N and where["num_classes"] == K
    assert where["chance_position"] == pytest.approx(1 / N)


def test_streamed_ridge_equals_a_one_shot_solution():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) * [1, 2, 3, 4, 5, 6] + 3.0
    y = rng.integers(0, 4, size=300)
    stats = _RidgeStats.empty(6, 1, "cpu")
    for chunk in np.array_split(np.arange(300), 3):
        stats.update(torch.from_numpy(x[chunk]), torch.from_numpy(y[chunk]))
    w, b = stats.solve(ridge=1e-2)
    # reference: centred ridge regression on one-hot targets, solved in numpy
    Y = np.eye(4)[y]
    xc, yc = x - x.mean(0), Y - Y.mean(0)
    gram = xc.T @ xc
    lam = 1e-2 * np.mean(np.diag(gram))
    w_ref = np.linalg.solve(gram + lam * np.eye(6), xc.T @ yc)
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b.numpy(), Y.mean(0) - x.mean(0) @ w_ref, rtol=1e-9, atol=1e-12)


def _images(n_batches, B=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, 10, (B,), generator=g))
        for _ in range(n_batches)
    ]


def test_vit_position_is_decodable_only_after_the_position_embedding():
    """Random-init vit_micro: patch_embed outputs carry no position; blocks see patch + learned position."""
    m = vitlens.create_model("vit_micro_patch4_32")
    res = localization_probes(
        m, _images(3), _images(1, seed=1), ["patch_embed", "blocks.0", "blocks.3"], max_images=64
    )
    assert res["patch_embed"]["position_acc"] < 0.1  # chance 1/64
    assert res["blocks.0"]["position_acc"] > 0.9
    assert res["blocks.0"]["grid_size"] == (8, 8) and res["blocks.0"]["class_acc_map"].shape == (8, 8)
    assert res["blocks.0"]["train_tokens"] == 64 * 64  # max_images cut the third batch; [CLS] left out
    again = localization_probes(m, _images(3), _images(1, seed=1), ["blocks.3"], max_images=64)
    assert again["blocks.3"]["class_acc"] == res["blocks.3"]["class_acc"]  # deterministic


def test_resnet_maps_pool_to_the_requested_grid():
    m = vitlens.create_model("resnet8_cifar")
    res = localization_probes(m, _images(2, B=16), _images(1, B=16, seed=1), grid=8)
    assert list(res) == ["maxpool", "layer1.0", "layer2.0", "layer3.0"]
    assert res["layer1.0"]["grid_size"] == (8, 8)  # 32x32 map pooled
    assert res["layer3.0"]["grid_size"] == (8, 8)  # already 8x8
    for r in res.values():
        assert 0.0 <= r["class_acc"] <= 1.0 and 0.0 <= r["position_acc"] <= 1.0


def test_probe_data_errors():
    with pytest.raises(TypeError, match="images, labels"):
        localization_probes(Planted(), [torch.zeros(2, K)], [], ["what"])
    with pytest.raises(ValueError, match="empty"):
        localization_probes(Planted(), [], [], ["what"])


class Rotated(nn.Module):
    """Class coded differently at every position: token n = one_hot(class) @ R_n (+ noise), with
    R_n a random orthogonal matrix per position. One shared linear probe cannot read it (the
    positions contradict each other); one probe per position reads it exactly."""

    num_prefix_tokens = 0

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("rot", torch.linalg.qr(torch.randn(N, K, K, generator=g))[0])
        self.tokens = nn.Identity()

    def forward(self, x):
        self.tokens(torch.einsum("bk,nkd->bnd", x, self.rot) + 0.05 * torch.randn(x.shape[0], N, K))
        return x


def test_per_position_class_probe_reads_position_specific_codes():
    train, test = _planted_data(6), _planted_data(2, seed=1)
    torch.manual_seed(0)  # the same token noise in both runs
    shared = localization_probes(Rotated(), train, test, ["tokens"])["tokens"]
    torch.manual_seed(0)
    own = localization_probes(Rotated(), train, test, ["tokens"], class_probe="per_position")["tokens"]
    assert own["class_probe"] == "per_position" and own["class_acc"] == 1.0
    assert shared["class_acc"] < 0.6  # chance 0.2
    assert own["position_acc"] == shared["position_acc"]  # the position probe is unchanged
    with pytest.raises(ValueError, match="class_probe must be"):
        localization_probes(Rotated(), train, test, ["tokens"], class_probe="each")


def test_per_position_ridge_equals_one_fit_per_position():
    from vitlens.analysis.probes import _PerPositionRidgeStats

    g = torch.Generator().manual_seed(0)
    t = torch.randn(200, 3, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2, 3, 4]) + 1
    y = torch.randint(0, 5, (200,), generator=g)
    batched = _PerPositionRidgeStats.empty(3, 4, "cpu")
    for chunk in torch.arange(200).chunk(4):
        batched.update(t[chunk], y[chunk])
    w, b = batched.solve(ridge=1e-2)
    for p in range(3):
        one = _RidgeStats.empty(4, 1, "cpu")
        one.update(t[:, p], y)
        w1, b1 = one.solve(ridge=1e-2)
        torch.testing.assert_close(w[p], w1, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b[p], b1, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- the fast path vs plain ridge
def ridge_probe_reference(train_tokens, train_labels, test_tokens, test_labels, ridge=1e-3):
    """Class and position accuracy maps (N,) of the probes, straight from the definition, numpy float64.

    ``*_tokens`` (images, N, D), ``*_labels`` (images,). Every token is an example: one shared class
    probe (target: its image's class) and one position probe (target: its index), each a centred
    ridge regression on one-hot targets with regulariser ``ridge * mean(diag(Xc^T Xc))``, argmax.
    """
    train_tokens, test_tokens = np.asarray(train_tokens, np.float64), np.asarray(test_tokens, np.float64)
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    B, N, D = train_tokens.shape
    x = train_tokens.reshape(B * N, D)
    xc = x - x.mean(0)
    gram = xc.T @ xc
    lam = ridge * np.mean(np.diag(gram))
    maps = []
    for targets, truth in (
        (np.repeat(train_labels, N), np.repeat(test_labels[:, None], N, 1)),
        (np.tile(np.arange(N), B), np.tile(np.arange(N), (len(test_tokens), 1))),
    ):
        y = np.eye(targets.max() + 1)[targets]
        w = np.linalg.solve(gram + lam * np.eye(D), xc.T @ (y - y.mean(0)))
        b = y.mean(0) - x.mean(0) @ w
        pred = (test_tokens @ w + b).argmax(-1)  # (images, N)
        maps.append((pred == truth).mean(0))
    return maps


class OffsetMap(nn.Module):
    """A (B, C, H, W) map and a (B, N, D) token layer computed from the input by fixed random maps,
    on a large common offset (+40, as ReLU maps and residual streams have): class and position are
    both partly decodable, so neither accuracy is 0 or 1."""

    num_prefix_tokens = 0

    def __init__(self, k=K, c=6, hw=(7, 5), d=5):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.hw = hw
        self.register_buffer("to_map", torch.randn(k + 8, c * hw[0] * hw[1], generator=g))
        self.register_buffer("where", torch.randn(c, *hw, generator=g))
        self.register_buffer("to_tokens", torch.randn(k + 8, N * d, generator=g))
        self.map, self.tokens = nn.Identity(), nn.Identity()
        self.d = d

    def forward(self, x):
        B = x.shape[0]
        self.map((x @ self.to_map).view(B, -1, *self.hw) + 3 * self.where + 40)
        self.tokens((x @ self.to_tokens).view(B, N, self.d) + torch.linspace(0, 2, N)[:, None] + 40)
        return x


def _noisy_planted(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    x = torch.cat([torch.nn.functional.one_hot(y, K).float() * 2, torch.randn(n, 8, generator=g)], 1)
    return x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_probes_equal_a_plain_ridge_reference(dtype, monkeypatch):
    """float32 (shifted float32 products, float64 sums) and float64 tokens, a map of 35 positions
    scored a few images at a time (chunks forced small): the accuracy maps equal the float64
    reference's computed from the same tokens."""
    import vitlens.analysis.probes as probes

    monkeypatch.setattr(probes, "_SCORE_ELEMS", 2 * 35 * 35)  # 2 images' (35, 35) scores at a time
    monkeypatch.setattr(probes, "_ROWS", 70)  # X^T X from 2 images' tokens at a time
    model = OffsetMap().to(dtype)
    (xtr, ytr), (xte, yte) = _noisy_planted(96, 0), _noisy_planted(40, 1)
    xtr, xte = xtr.to(dtype), xte.to(dtype)
    res = localization_probes(
        model, [(xtr[i : i + 32], ytr[i : i + 32]) for i in range(0, 96, 32)],
        [(xte[i : i + 16], yte[i : i + 16]) for i in range(0, 40, 16)], ["map", "tokens"], max_images=None,
    )
    with torch.no_grad():
        tokens = {}
        for name, x in (("train", xtr), ("test", xte)):
            B = x.shape[0]
            m = ((x @ model.to_map).view(B, -1, 7, 5) + 3 * model.where + 40).permute(0, 2, 3, 1)
            tokens[name] = (m.reshape(B, 35, -1), (x @ model.to_tokens).view(B, N, 5)
                            + torch.linspace(0, 2, N, dtype=dtype)[:, None] + 40)
    for i, layer in enumerate(["map", "tokens"]):
        cls_ref, pos_ref = ridge_probe_reference(tokens["train"][i], ytr, tokens["test"][i], yte)
        got = res[layer]
        assert got["num_positions"] == len(pos_ref) and got["train_tokens"] == 96 * len(pos_ref)
        np.testing.assert_array_equal(got["class_acc_map"].ravel(), cls_ref)
        np.testing.assert_array_equal(got["position_acc_map"].ravel(), pos_ref)
        assert 0.05 < got["class_acc"] < 0.95 and 0.05 < got["position_acc"] < 0.95  # not trivial
    assert res["map"]["grid_size"] == (7, 5)


def test_probe_stream_takes_tokens_from_the_caller():
    """ProbeStream fed one layer's outputs directly (the study's one forward pass) = localization_probes."""
    from vitlens.analysis.probes import ProbeStream

    model = OffsetMap()
    (xtr, ytr), (xte, yte) = _noisy_planted(64, 0), _noisy_planted(24, 1)
    ref = localization_probes(model, [(xtr, ytr)], [(xte, yte)], ["map"], max_images=None)["map"]
    stream = ProbeStream(model, ["map"])
    B = 64
    out = (xtr @ model.to_map).view(B, -1, 7, 5) + 3 * model.where + 40
    stream.fit("map", out[:40], ytr[:40])  # in two pieces: statistics add up
    stream.fit("map", out[40:], ytr[40:])
    out_test = (xte @ model.to_map).view(24, -1, 7, 5) + 3 * model.where + 40
    stream.score("map", out_test, yte)  # solves on first use
    got = stream.results()["map"]
    np.testing.assert_array_equal(got["position_acc_map"], ref["position_acc_map"])
    np.testing.assert_array_equal(got["class_acc_map"], ref["class_acc_map"])
