"""The block library against its definitions: patch projection, attention (fused = explicit,
masks, probabilities), position embeddings, LayerScale and stochastic depth."""

from __future__ import annotations

import math

import pytest
import torch

from vitlens.layers import (
    Attention,
    Block,
    CrossBlock,
    PatchEmbed,
    build_attention_mask,
    resample_pos_embed,
    sincos_1d,
    sincos_2d,
)

B, L, D, H = 2, 7, 32, 4  # batch, tokens, width, heads


# -- patch embedding -----------------------------------------------------------------------------
@pytest.mark.parametrize("img,patch", [(32, 4), ((24, 16), 8)])
def test_patch_projection_is_a_per_patch_linear_map(img, patch):
    pe = PatchEmbed(img, patch, in_chans=3, embed_dim=D)
    h, w = (img, img) if isinstance(img, int) else img
    x = torch.randn(B, 3, h, w)
    P = patch
    # Cut the image into PxP patches, row-major over the grid, each flattened in (C, P, P) order.
    patches = x.unfold(2, P, P).unfold(3, P, P)  # (B, C, h/P, w/P, P, P)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, (h // P) * (w // P), 3 * P * P)  # (B, N, C*P*P)
    W = pe.proj.weight.reshape(D, 3 * P * P)  # the conv kernel is one (D, C*P*P) matrix
    expected = patches @ W.T + pe.proj.bias
    got = pe(x)
    assert got.shape == (B, pe.num_patches, D) and pe.grid_size == (h // P, w // P)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# -- attention ---------------------------------------------------------------------------------------
def _padding(lengths: list[int], T: int) -> torch.Tensor:
    return torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]  # (B, T) True = pad (right padding)


MASKS = {
    "none": {},
    "padding": dict(key_padding_mask=_padding([L, 4], L)),
    "causal": dict(is_causal=True),
    "causal+padding": dict(is_causal=True, key_padding_mask=_padding([5, 3], L)),
    "bool attn_mask": dict(attn_mask=torch.rand(L, L).ge(0.5) | torch.eye(L, dtype=torch.bool)),
    "additive attn_mask": dict(attn_mask=torch.zeros(L, L).masked_fill(torch.ones(L, L).triu(2).bool(),
                                                                           float("-inf"))),
}


def _both_paths(attn: Attention, *args, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    attn.record_attn = False
    fused = attn(*args, **kw)
    attn.record_attn = True
    explicit = attn(*args, **kw)
    attn.record_attn = False
    return fused, explicit


@pytest.mark.parametrize("mask", list(MASKS))
def test_fused_attention_equals_explicit(mask):
    attn = Attention(D, H).eval()
    x = torch.randn(B, L, D)
    fused, explicit = _both_paths(attn, x, **MASKS[mask])
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_fused_cross_attention_equals_explicit():
    attn = Attention(D, H, cross=True, context_dim=24).eval()
    x, ctx = torch.randn(B, L, D), torch.randn(B, 5, 24)
    fused, explicit = _both_paths(attn, x, ctx, key_padding_mask=_padding([5, 2], 5))
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def _probs(attn: Attention, *args, **kw) -> torch.Tensor:
    seen = []
    handle = attn.attn_probs.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    attn.record_attn = True
    try:
        attn(*args, **kw)
    finally:
        attn.record_attn = False
        handle.remove()
    (probs,) = seen
    return probs


def test_attention_probabilities():
    attn = Attention(D, H).eval()
    x = torch.randn(B, L, D)
    pad = _padding([L, 4], L)
    probs = _probs(attn, x, key_padding_mask=pad, is_causal=True)
    assert probs.shape == (B, H, L, L)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, H, L))
    causal = torch.ones(L, L).tril().bool()
    allowed = causal[None, None] & ~pad[:, None, None, :]  # (B, 1, L, S)
    assert (probs.masked_select(~allowed.expand_as(probs)) == 0).all()
    assert (probs.masked_select(allowed.expand_as(probs)) > 0).all()
    # Without any mask the fused kernel is used and the hook point never fires.
    seen = []
    attn.attn_probs.register_forward_hook(lambda m, i, o: seen.append(o))
    attn(x)
    assert seen == []


@pytest.mark.parametrize("record_attn", [False, True])
def test_causal_output_ignores_the_future(record_attn):
    blk = Block(D, H).eval()
    blk.attn.record_attn = record_attn
    x = torch.randn(B, L, D)
    t = 3
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn(B, L - t - 1, D)  # change only the future of position t
    y, y2 = blk(x, is_causal=True), blk(x2, is_causal=True)
    torch.testing.assert_close(y[:, :t + 1], y2[:, :t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(y[:, t + 1:], y2[:, t + 1:])


@pytest.mark.parametrize("record_attn", [False, True])
def test_padding_content_is_invisible(record_attn):
    blk = Block(D, H).eval()
    blk.attn.record_attn = record_attn
    lengths = [5, 3]
    pad = _padding(lengths, L)
    x = torch.randn(B, L, D)
    x2 = torch.where(pad[..., None], torch.randn(B, L, D) * 10, x)  # new content at padded positions only
    y, y2 = blk(x, key_padding_mask=pad), blk(x2, key_padding_mask=pad)
    keep = ~pad
    torch.testing.assert_close(y[keep], y2[keep], atol=1e-5, rtol=0)


def test_kv_cache_equals_full_causal_pass():
    """Decoding one token at a time with the cache (query offset into the causal mask) = one full pass."""
    attn = Attention(D, H).eval()
    x = torch.randn(B, L, D)
    full = attn(x, is_causal=True)
    cache: dict = {}
    steps = [attn(x[:, :3], is_causal=True, kv_cache=cache)]  # prefill 3 tokens
    steps += [attn(x[:, t:t + 1], is_causal=True, kv_cache=cache) for t in range(3, L)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache["k"].shape == (B, H, L, D // H)


@pytest.mark.parametrize("mask", ["none", "causal+padding"])
def test_cpu_half_precision_training_backend_matches_flash(mask, monkeypatch):
    """bf16 CPU training at short lengths spells attention out (faster there); same result as flash."""
    from vitlens.layers import attention as attention_module

    q = torch.randn(1, H, L, D // H, dtype=torch.bfloat16, requires_grad=True)
    assert attention_module._explicit_half_attention(q, L)  # spelt-out matrix products
    assert not attention_module._explicit_half_attention(q.detach(), L)  # inference: SDPA
    assert not attention_module._explicit_half_attention(q.float(), L)  # fp32: SDPA
    assert not attention_module._explicit_half_attention(q, 1000)  # long sequences: SDPA

    attn = Attention(D, H)
    x = torch.randn(B, L, D)
    outs, grads = [], []
    for max_keys in (attention_module.CPU_HALF_MATH_MAX_KEYS, 0):  # 0: always the default (flash) kernel
        monkeypatch.setattr(attention_module, "CPU_HALF_MATH_MAX_KEYS", max_keys)
        attn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x, **MASKS[mask])
        out.float().square().sum().backward()
        outs.append(out.float())
        grads.append(attn.qkv.weight.grad.clone())
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)
    scale = grads[1].abs().max().item()  # bf16 keeps ~3 significant digits
    torch.testing.assert_close(grads[0], grads[1], atol=2e-2 * scale, rtol=2e-2)


def test_mask_builder():
    assert build_attention_mask(4, 4) is None  # nothing masked: SDPA keeps its fastest kernel
    m = build_attention_mask(2, 5, is_causal=True)  # two queries at positions 3 and 4
    assert m.shape == (1, 1, 2, 5)
    assert m[0, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    with pytest.raises(TypeError, match="bool"):
        build_attention_mask(3, 3, key_padding_mask=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Attention(30, 4)


def test_cross_block_runs_with_masks():
    blk = CrossBlock(D, H, context_dim=24).eval()
    out = blk(torch.randn(B, L, D), torch.randn(B, 5, 24), context_padding_mask=_padding([5, 2], 5))
    assert out.shape == (B, L, D) and torch.isfinite(out).all()


# -- position embeddings -----------------------------------------------------------------------------
def test_sincos_1d_is_vaswani_formula():
    length, dim = 11, 16
    table = sincos_1d(length, dim)
    expected = torch.empty(length, dim)
    for pos in range(length):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            expected[pos, 2 * i] = math.sin(angle)  # PE(pos, 2i)   = sin(pos / 10000^(2i/d))
            expected[pos, 2 * i + 1] = math.cos(angle)  # PE(pos, 2i+1) = cos(pos / 10000^(2i/d))
    torch.testing.assert_close(table, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="even"):
        sincos_1d(4, 7)


def test_sincos_2d_values():
    gh, gw, dim = 3, 5, 16
    table = sincos_2d(gh, gw, dim)
    assert table.shape == (gh * gw, dim)
    q = dim // 4
    for y in range(gh):
        for x in range(gw):
            row = table[y * gw + x]  # tokens in row-major grid order
            omega = torch.tensor([1 / 10000 ** (k / q) for k in range(q)], dtype=torch.float64)
            expected = torch.cat([(x * omega).sin(), (x * omega).cos(), (y * omega).sin(), (y * omega).cos()])
            torch.testing.assert_close(row, expected.float(), atol=1e-6, rtol=0)
    assert len({tuple(r.tolist()) for r in table}) == gh * gw  # every position distinct
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 6)


def test_resample_pos_embed():
    pe = torch.randn(1, 1 + 4 * 4, 8)
    assert resample_pos_embed(pe, (4, 4), (4, 4)) is pe  # same grid: untouched
    out = resample_pos_embed(pe, (6, 3), (4, 4))
    assert out.shape == (1, 1 + 6 * 3, 8)
    torch.testing.assert_close(out[:, :1], pe[:, :1])  # [CLS] position kept as is
    const = torch.cat([torch.zeros(1, 1, 8), torch.full((1, 16, 8), 0.7)], dim=1)
    torch.testing.assert_close(resample_pos_embed(const, (7, 7), (4, 4))[:, 1:], torch.full((1, 49, 8), 0.7))
    with pytest.raises(ValueError, match="patch positions"):
        resample_pos_embed(pe, (5, 5), (3, 3))


# -- LayerScale and stochastic depth ------------------------------------------------------------------
def test_layerscale_scales_each_branch():
    blk = Block(D, H, init_values=0.1).eval()
    with torch.no_grad():
        blk.ls1.gamma.uniform_(-1, 1)
        blk.ls2.gamma.uniform_(-1, 1)
    x = torch.randn(B, L, D)
    mid = x + blk.ls1.gamma * blk.attn(blk.norm1(x))
    expected = mid + blk.ls2.gamma * blk.mlp(blk.norm2(mid))
    torch.testing.assert_close(blk(x), expected)
    tiny = Block(D, H, init_values=1e-6).eval()  # CaiT's point: a deep net starts near the identity
    assert (tiny(x) - x).abs().max() < 1e-4


def test_drop_path_train_vs_eval():
    x = torch.randn(64, L, D)
    ref = Block(D, H)
    blk = Block(D, H, drop_path=0.5)
    blk.load_state_dict(ref.state_dict())
    blk.eval(), ref.eval()
    torch.testing.assert_close(blk(x), ref(x))  # eval: no stochastic depth
    blk.train()
    a, b = blk(x), blk(x)
    assert not torch.allclose(a, b)  # train: a random subset of samples skips each branch
    # Per sample, the attention branch is dropped (delta 0) or kept and rescaled by 1/(1-p) = 2.
    only_attn = Block(D, H, drop_path=0.5)
    only_attn.load_state_dict(ref.state_dict())
    only_attn.mlp.fc2.weight.data.zero_(), only_attn.mlp.fc2.bias.data.zero_()
    delta = only_attn.train()(x) - x
    full = only_attn.attn(only_attn.norm1(x)).detach()
    kept = delta.flatten(1).abs().amax(1) > 0
    assert 0 < kept.sum() < len(x)
    torch.testing.assert_close(delta[kept], 2 * full[kept], atol=1e-5, rtol=1e-5)
    dead = Block(D, H, drop_path=1.0).train()
    torch.testing.assert_close(dead(x), x)  # every branch dropped: the identity
