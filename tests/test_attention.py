"""Attention recording (vitlens, timm, Hugging Face), mean attention distance, rollout, maps, entropy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitlens
from vitlens.analysis.attention import (
    attention_distance,
    attention_entropy,
    attention_layers,
    attention_maps,
    attention_rollout,
    attention_statistics,
    mean_attention_distance,
    record_attention,
    token_geometry,
)


@pytest.fixture
def vit():
    return vitlens.create_model("vit_micro_patch4_32").eval()  # 4 blocks, 4 heads, 8x8 patches + [CLS]


@pytest.fixture
def sdpa_counter(monkeypatch):
    """Count calls of the fused kernel (vitlens and timm both look it up on torch.nn.functional)."""
    calls = {"n": 0}
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def _timm_twin(vit):
    timm = pytest.importorskip("timm")
    t = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=4,
        embed_dim=128,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        num_classes=10,
    ).eval()
    t.load_state_dict(vit.state_dict())
    return t


def _attn_output_from_probs(attn_module, x_in, probs):
    """The attention module's output recomputed from recorded probabilities: proj(probs @ v)."""
    B, L, C = x_in.shape
    H = probs.shape[1]
    qkv = attn_module.qkv(x_in).reshape(B, L, 3, H, C // H).permute(2, 0, 3, 1, 4)  # (3, B, H, L, hd)
    out = (probs @ qkv[2]).transpose(1, 2).reshape(B, L, C)
    return attn_module.proj(out)


# ----------------------------------------------------------------------------- recording
@pytest.mark.parametrize("family", ["vitlens", "timm"])
def test_only_chosen_layers_leave_the_fused_kernel(vit, sdpa_counter, family):
    model = vit if family == "vitlens" else _timm_twin(vit)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert sdpa_counter["n"] == 4  # every layer fused normally
        sdpa_counter["n"] = 0
        with record_attention(model, layers=[1, "blocks.3.attn"]) as rec:
            out = model(x)
        assert sdpa_counter["n"] == 2  # blocks 0 and 2 still fused
    assert sorted(rec.probs) == ["blocks.1.attn", "blocks.3.attn"]
    p = rec["blocks.1.attn"]
    assert p.shape == (2, 4, 65, 65)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 65))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # explicit path == fused path
    # flags restored, hooks gone: a plain forward is fused everywhere again
    sdpa_counter["n"] = 0
    with torch.no_grad():
        model(x)
    assert sdpa_counter["n"] == 4
    for blk in model.blocks:
        if family == "vitlens":
            assert blk.attn.record_attn is False and not blk.attn.attn_probs._forward_hooks
        else:
            assert blk.attn.fused_attn is True and not blk.attn.attn_drop._forward_hooks


@pytest.mark.parametrize("family", ["vitlens", "timm"])
def test_recorded_probabilities_reproduce_the_fused_attention_output(vit, family):
    model = vit if family == "vitlens" else _timm_twin(vit)
    x = torch.randn(3, 3, 32, 32)
    seen = {}
    attn = model.blocks[2].attn
    h = attn.register_forward_hook(lambda m, inp, out: seen.update(x_in=inp[0], fused=out))
    with torch.no_grad():
        model(x)  # fused: record the attention module's input and output
        h.remove()
        with record_attention(model, layers=[2]) as rec:
            model(x)
        rebuilt = _attn_output_from_probs(attn, seen["x_in"], rec["blocks.2.attn"])
    torch.testing.assert_close(rebuilt, seen["fused"], atol=1e-5, rtol=1e-5)


def test_timm_and_vitlens_record_the_same_probabilities(vit):
    t = _timm_twin(vit)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), record_attention(vit) as a, record_attention(t) as b:
        vit(x)
        t(x)
    for name in attention_layers(vit):
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


def test_timm_train_mode_records_probabilities_before_dropout():
    timm = pytest.importorskip("timm")
    t = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, attn_drop_rate=0.5
    ).train()
    with record_attention(t, layers=[0]) as rec:
        t(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(rec["blocks.0.attn"].sum(-1), torch.ones(2, 3, 17))


def test_flags_restored_after_an_exception(vit):
    with pytest.raises(RuntimeError, match="boom"):
        with record_attention(vit):
            raise RuntimeError("boom")
    assert all(not b.attn.record_attn and not b.attn.attn_probs._forward_hooks for b in vit.blocks)


def test_accumulate_concatenates_batches(vit):
    with torch.no_grad(), record_attention(vit, layers=[0], accumulate=True) as rec:
        vit(torch.randn(2, 3, 32, 32))
        vit(torch.randn(3, 3, 32, 32))
    assert rec["blocks.0.attn"].shape[0] == 5


def _hf_config(transformers, cls=None):
    return (cls or transformers.ViTConfig)(
        image_size=32,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )


def test_huggingface_vit_records_one_layer_and_keeps_sdpa_elsewhere(monkeypatch):
    transformers = pytest.importorskip("transformers")
    model = transformers.ViTModel(_hf_config(transformers), add_pooling_layer=False).eval()
    model.set_attn_implementation("sdpa")
    x = torch.randn(2, 3, 32, 32)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    with torch.no_grad(), record_attention(model, layers=[0]) as rec:
        model(x)
        assert model.config._attn_implementation == "sdpa"  # the shared config is untouched
    assert len(calls) == 1  # layer 1 kept the fused kernel; layer 0 ran eager to give its weights
    layer0 = model.get_submodule(rec.layers[0])
    assert layer0.config is model.config  # restored
    with torch.no_grad(), record_attention(model) as rec:
        model(x)
    assert len(rec.layers) == 2
    # the reference: Hugging Face's own output_attentions under eager attention
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(x, output_attentions=True).attentions
    for got, want in zip(rec.in_order(), ref):
        torch.testing.assert_close(got, want)
    geo = token_geometry(model)
    assert (geo.grid_size, geo.patch_size, geo.num_prefix_tokens) == ((8, 8), (4, 4), 1)
    assert mean_attention_distance(model, [x]).shape == (2, 2)


def test_huggingface_deit_distillation_token_is_left_out_of_the_geometry():
    transformers = pytest.importorskip("transformers")
    model = transformers.DeiTModel(_hf_config(transformers, transformers.DeiTConfig), add_pooling_layer=False)
    geo = token_geometry(model.eval())
    assert (geo.grid_size, geo.num_prefix_tokens, geo.has_cls) == ((8, 8), 2, True)  # [CLS] + distillation
    d = mean_attention_distance(model, [torch.randn(2, 3, 32, 32)])
    assert d.shape == (2, 2) and np.isfinite(d).all()


def test_clear_errors(vit):
    with pytest.raises(ValueError, match="no attention layers"):
        record_attention(vitlens.create_model("resnet8_cifar")).__enter__()
    with pytest.raises(ValueError, match="not an attention layer"):
        record_attention(vit, layers=["blocks.0.mlp"]).__enter__()
    with pytest.raises(ValueError, match="out of range"):
        record_attention(vit, layers=[7]).__enter__()


# ----------------------------------------------------------------------------- distance
def _enumerated_mean_pairwise_distance(gh, gw, ph, pw) -> float:
    """Independent reference: plain Python over all (query, key) patch pairs."""
    cells = list(itertools.product(range(gh), range(gw)))
    total = sum(
        math.hypot((r1 - r2) * ph, (c1 - c2) * pw) for (r1, c1), (r2, c2) in itertools.product(cells, cells)
    )
    return total / len(cells) ** 2


def _with_prefix(patch_probs: torch.Tensor, prefix: int, prefix_mass: float) -> torch.Tensor:
    """Embed (B, H, N, N) patch attention into (B, H, P+N, P+N); every query puts some mass on the prefix."""
    B, H, N, _ = patch_probs.shape
    full = torch.zeros(B, H, prefix + N, prefix + N)
    full[..., prefix:, prefix:] = (1 - prefix_mass) * patch_probs
    if prefix:
        full[..., :, :prefix] += prefix_mass / prefix
        full[..., :prefix, prefix:] = 1.0 / N
        full[..., :prefix, :prefix] = 0.0
    return full


def test_attention_to_self_is_distance_zero():
    probs = _with_prefix(torch.eye(16).expand(2, 3, 16, 16), prefix=2, prefix_mass=0.7)
    d = attention_distance(probs, (4, 4), 16, num_prefix_tokens=2)
    assert d.shape == (3,)
    torch.testing.assert_close(d, torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("grid,patch", [((4, 4), (16, 16)), ((3, 5), (4, 8))])
def test_uniform_attention_gives_the_mean_pairwise_distance(grid, patch):
    n = grid[0] * grid[1]
    probs = _with_prefix(torch.full((1, 2, n, n), 1.0 / n), prefix=1, prefix_mass=0.5)
    d = attention_distance(probs, grid, patch, num_prefix_tokens=1)
    expected = _enumerated_mean_pairwise_distance(*grid, *patch)
    np.testing.assert_allclose(d.numpy(), [expected, expected], rtol=1e-12)
    # and by offset counting: an axis of length g has g pairs at offset 0 and 2 (g - k) at offset k > 0
    count = lambda g, k: g if k == 0 else 2 * (g - k)  # noqa: E731
    closed = (
        sum(
            count(grid[0], i) * count(grid[1], j) * math.hypot(i * patch[0], j * patch[1])
            for i in range(grid[0])
            for j in range(grid[1])
        )
        / n**2
    )
    assert expected == pytest.approx(closed, rel=1e-12)


def test_attention_to_the_right_neighbour_is_one_patch_width():
    gh, gw, ph, pw = 3, 5, 4, 8
    a = torch.zeros(gh * gw, gh * gw)
    for r, c in itertools.product(range(gh), range(gw - 1)):
        a[r * gw + c, r * gw + c + 1] = 1.0
    for r in range(gh):  # last column looks left instead
        a[r * gw + gw - 1, r * gw + gw - 2] = 1.0
    d = attention_distance(a[None, None], (gh, gw), (ph, pw), num_prefix_tokens=0)
    torch.testing.assert_close(d, torch.tensor([float(pw)], dtype=torch.float64))


def test_model_level_distance_streams_exactly(vit):
    batches = [torch.randn(3, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    mad = mean_attention_distance(vit, [(b, torch.zeros(len(b))) for b in batches])
    with torch.no_grad(), record_attention(vit, accumulate=True) as rec:
        for b in batches:
            vit(b)
    expected = np.stack([attention_distance(p, (8, 8), 4, 1).numpy() for p in rec.in_order()])
    assert mad.shape == (4, 4)
    np.testing.assert_allclose(mad, expected, rtol=1e-10)
    # random init attends almost uniformly: close to the 8x8 grid's mean pairwise distance in pixels
    np.testing.assert_allclose(mad, _enumerated_mean_pairwise_distance(8, 8, 4, 4), rtol=0.05)


def test_statistics_entropy_and_max_batches(vit):
    data = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    st = attention_statistics(vit, data, layers=[0, -1], max_batches=1)
    assert st["layers"] == ["blocks.0.attn", "blocks.3.attn"]
    with torch.no_grad(), record_attention(vit, layers=[0, -1]) as rec:
        vit(data[0])
    np.testing.assert_allclose(st["entropy"][0], attention_entropy(rec["blocks.0.attn"]).numpy(), rtol=1e-10)
    assert np.all(st["entropy"] <= math.log(65) + 1e-9)


def test_non_square_grid_model_geometry():
    m = vitlens.create_model("vit_micro_patch4_32", img_size=(16, 40), pos_embed="sincos2d").eval()
    geo = token_geometry(m)
    assert geo.grid_size == (4, 10) and geo.patch_size == (4, 4)
    assert mean_attention_distance(m, [torch.randn(2, 3, 16, 40)]).shape == (4, 4)


# ----------------------------------------------------------------------------- rollout, entropy, maps
def test_rollout_matches_an_explicit_product():
    torch.manual_seed(1)
    layers = [torch.softmax(torch.randn(2, 3, 5, 5), -1) for _ in range(3)]
    ref = np.stack([np.eye(5)] * 2)
    for a in layers:
        m = 0.5 * a.double().mean(1).numpy() + 0.5 * np.eye(5)
        m /= m.sum(-1, keepdims=True)
        ref = m @ ref
    got = attention_rollout(layers)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    # attention to self only: nothing flows anywhere
    eye = torch.eye(4).expand(1, 2, 4, 4)
    torch.testing.assert_close(attention_rollout([eye, eye]), torch.eye(4, dtype=torch.float64)[None])


def test_rollout_options():
    a = torch.softmax(torch.randn(1, 2, 6, 6), -1)
    mx = attention_rollout([a], head_fusion="max")
    expected = 0.5 * a.double().amax(1) + 0.5 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(mx, expected / expected.sum(-1, keepdim=True))
    dropped = attention_rollout([a], discard_ratio=0.5)
    off_diag = dropped[0][~torch.eye(6, dtype=torch.bool)]
    assert (off_diag == 0).sum() >= 18 - 6  # half of the 36 fused entries zeroed (diagonal refilled by I)
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout([a], head_fusion="median")


def test_entropy_bounds():
    S = 7
    uniform = torch.full((2, 3, 4, S), 1.0 / S)
    torch.testing.assert_close(attention_entropy(uniform), torch.full((3,), math.log(S), dtype=torch.float64))
    onehot = F.one_hot(torch.randint(0, S, (2, 3, 4)), S).float()
    torch.testing.assert_close(attention_entropy(onehot), torch.zeros(3, dtype=torch.float64))
    assert attention_entropy(uniform, reduce=False).shape == (2, 3, 4)


@pytest.mark.parametrize("overrides", [{}, {"class_token": False, "pool": "gap", "num_registers": 2}])
def test_attention_maps(overrides):
    m = vitlens.create_model("vit_micro_patch4_32", **overrides).eval()
    maps = attention_maps(m, torch.randn(3, 32, 32), layer=2)
    assert maps["layer"] == "blocks.2.attn"
    assert (
        maps["heads"].shape == (4, 8, 8) and maps["mean"].shape == (8, 8) and maps["rollout"].shape == (8, 8)
    )
    np.testing.assert_allclose(maps["heads"].sum((1, 2)), np.ones(4), rtol=1e-6)
    np.testing.assert_allclose(maps["rollout"].sum(), 1.0, rtol=1e-6)
    assert all(not b.attn.record_attn for b in m.blocks)
