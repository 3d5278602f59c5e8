"""Fast unit tests of layers/ and models/ against independent references.

Each test compares with something that does not share our code: PyTorch's own modules
(``nn.MultiheadAttention``, ``nn.Transformer``), timm, torchvision, Hugging Face GPT-2 / BERT with
copied weights, or values computed by hand. They are tiny configs (well under a second each) so
they can run in the mutation-testing selection; each names the one-line bug it is there to catch.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlens
from vitlens.errors import ModelError
from vitlens.layers import Attention, Block, LayerScale, Mlp, PatchEmbed, build_attention_mask

ATOL = 1e-5


def _randomise(module: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Random values in every parameter (norm gains around 1), so no path hides behind a zero init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_gain = ("norm" in name.lower() or "ln" in name) and name.endswith("weight") and p.dim() == 1
            p.copy_(torch.randn(p.shape, generator=g) * scale + float(is_gain))
    return module


# =============================================================================== attention
def _mha_like(ours: Attention, dim: int, heads: int) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    return ref


@torch.no_grad()
@pytest.mark.parametrize("record", [False, True])
def test_self_attention_equals_torch_multihead_attention(record):
    """Scale, head split, q/k/v order, output projection; with padding, causal and both masks."""
    D, H = 24, 3
    ours = _randomise(Attention(D, H)).eval()
    ours.record_attn = record
    ref = _mha_like(ours, D, H)
    x = torch.randn(2, 6, D)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)  # True = blocked (PyTorch)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(x, key_padding_mask=pad),
                               ref(x, x, x, key_padding_mask=pad, need_weights=False)[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(x, is_causal=True),
                               ref(x, x, x, attn_mask=causal, need_weights=False)[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(x, is_causal=True, key_padding_mask=pad),
                               ref(x, x, x, attn_mask=causal, key_padding_mask=pad, need_weights=False)[0],
                               atol=ATOL, rtol=0)
    # A boolean "allowed" mask and the same mask as an additive 0/-inf float mask.
    allowed = torch.rand(6, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    allowed |= torch.eye(6, dtype=torch.bool)
    additive = torch.zeros(6, 6).masked_fill(~allowed, float("-inf"))
    expected = ref(x, x, x, attn_mask=~allowed, need_weights=False)[0]
    torch.testing.assert_close(ours(x, attn_mask=allowed), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(x, attn_mask=additive), expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_recorded_probabilities_equal_torch_per_head_weights():
    D, H = 16, 4
    ours = _randomise(Attention(D, H)).eval()
    ours.record_attn = True
    ref = _mha_like(ours, D, H)
    seen = []
    ours.attn_probs.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 5, D)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    ours(x, key_padding_mask=pad)
    expected = ref(x, x, x, key_padding_mask=pad, need_weights=True, average_attn_weights=False)[1]
    assert seen[0].shape == (2, H, 5, 5)
    torch.testing.assert_close(seen[0], expected, atol=1e-6, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("context_dim", [None, 12])
def test_cross_attention_equals_torch_multihead_attention(context_dim):
    D, H = 16, 2
    ours = _randomise(Attention(D, H, cross=True, context_dim=context_dim)).eval()
    kdim = context_dim or D
    ref = nn.MultiheadAttention(D, H, batch_first=True, kdim=kdim, vdim=kdim).eval()
    with torch.no_grad():
        if context_dim is None:
            ref.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.kv.weight]))
        else:  # separate projections when the context has another width
            ref.q_proj_weight.copy_(ours.q.weight)
            ref.k_proj_weight.copy_(ours.kv.weight[:D])
            ref.v_proj_weight.copy_(ours.kv.weight[D:])
        ref.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.kv.bias]))
        ref.out_proj.load_state_dict(ours.proj.state_dict())
    x, ctx = torch.randn(2, 3, D), torch.randn(2, 7, kdim)
    pad = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])
    torch.testing.assert_close(ours(x, ctx), ref(x, ctx, ctx, need_weights=False)[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(x, ctx, key_padding_mask=pad),
                               ref(x, ctx, ctx, key_padding_mask=pad, need_weights=False)[0],
                               atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="context"):
        ours(x)


@torch.no_grad()
def test_attention_kv_cache_step_by_step_equals_causal_pass():
    """Feeding one token at a time with a key/value cache gives the full causal pass, row by row;
    the cache holds every key and value so far, in order."""
    D, H = 16, 4
    att = _randomise(Attention(D, H)).eval()
    x = torch.randn(2, 5, D)
    full = att(x, is_causal=True)
    cache = {}
    steps = [att(x[:, :2], is_causal=True, kv_cache=cache)]  # a 2-token prompt, then single tokens
    steps += [att(x[:, t:t + 1], is_causal=True, kv_cache=cache) for t in range(2, 5)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    keys = att.qkv(x)[..., D:2 * D].view(2, 5, H, D // H).transpose(1, 2)
    torch.testing.assert_close(cache["k"], keys, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_training_attention_equals_torch_in_fp32(dtype):
    """CPU training in bf16/fp16 at a short length (whichever kernel or spelt-out path serves it) gives
    PyTorch's fp32 attention up to the rounding of the reduced precision, masks included."""
    D, H = 32, 4
    att = _randomise(Attention(D, H), scale=0.2).train()  # attn_drop 0: training mode is deterministic
    ref = _mha_like(att, D, H)
    att = att.to(dtype)
    x = torch.randn(2, 9, D)
    pad = torch.tensor([[False] * 9, [False] * 6 + [True] * 3])
    causal = torch.triu(torch.ones(9, 9, dtype=torch.bool), diagonal=1)
    xh = x.to(dtype).requires_grad_(True)
    with torch.no_grad():
        want = ref(x, x, x, attn_mask=causal, key_padding_mask=pad, need_weights=False)[0]
        plain = ref(x, x, x, need_weights=False)[0]
    got = att(xh, is_causal=True, key_padding_mask=pad)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(att(xh).float(), plain, atol=3e-2, rtol=3e-2)
    got.float().sum().backward()
    assert xh.grad is not None and torch.isfinite(xh.grad.float()).all()


def test_attention_sizes_and_errors():
    att = Attention(12, 3)
    assert (att.num_heads, att.head_dim) == (3, 4)
    assert att.scale == pytest.approx(0.5)  # 1/sqrt(head_dim)
    assert att.qkv.bias is not None and Attention(12, 3, qkv_bias=False).qkv.bias is None
    with pytest.raises(ModelError, match="divisible"):
        Attention(10, 3)


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    att = Attention(16, 2, attn_drop=0.5)
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        att.eval()
        assert torch.equal(att(x), att(x))
        att.train()
        assert not torch.allclose(att(x), att(x))  # 50% attention dropout changes the output per call


def test_attention_mask_builder_by_hand():
    # causal with a query offset: the last 2 of 4 positions see keys <= their position.
    m = build_attention_mask(2, 4, is_causal=True)
    assert m.shape == (1, 1, 2, 4)
    assert m[0, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    assert build_attention_mask(3, 3) is None
    pad = torch.tensor([[False, False, True]])
    m = build_attention_mask(3, 3, key_padding_mask=pad, is_causal=True)
    assert m.shape == (1, 1, 3, 3)
    assert m[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, False]]
    m = build_attention_mask(2, 3, key_padding_mask=pad)
    assert m.shape == (1, 1, 1, 3) and m.flatten().tolist() == [True, True, False]
    additive = torch.tensor([[0.0, float("-inf")], [0.0, 0.0]])
    assert build_attention_mask(2, 2, attn_mask=additive)[0, 0].tolist() == [[True, False], [True, True]]
    allowed = torch.tensor([[True, False, True], [False, True, True], [True, True, False]])
    both = build_attention_mask(3, 3, attn_mask=allowed, is_causal=True)[0, 0]  # allowed by both
    assert both.tolist() == [[True, False, False], [False, True, False], [True, True, False]]
    per_batch = torch.ones(2, 2, 2, dtype=torch.bool)
    assert build_attention_mask(2, 2, attn_mask=per_batch).shape == (2, 1, 2, 2)
    with pytest.raises(TypeError):
        build_attention_mask(2, 2, key_padding_mask=torch.zeros(1, 2))


# =============================================================================== MLP, block, LayerScale
@torch.no_grad()
def test_mlp_is_fc2_gelu_fc1():
    mlp = _randomise(Mlp(8, 20)).eval()
    assert (mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features) == (8, 20, 8)
    x = torch.randn(3, 8)
    expected = F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    torch.testing.assert_close(mlp(x), expected)
    assert isinstance(Mlp(4, 8, act_layer=nn.ReLU).act, nn.ReLU)


@torch.no_grad()
@pytest.mark.parametrize("init_values", [None, 0.1])
def test_block_equals_timm_block(init_values):
    """timm's ViT Block with LayerNorm eps 1e-6 (timm's ViT default). The input has a tiny variance
    (1e-6), so a LayerNorm eps changed from 1e-6 would change the output visibly."""
    from timm.models.vision_transformer import Block as TimmBlock

    D, H = 16, 4
    ours = Block(D, H, mlp_ratio=3.0, init_values=init_values).eval()
    ref = TimmBlock(D, H, mlp_ratio=3.0, qkv_bias=True, init_values=init_values,
                    norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    _randomise(ref)
    missing = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not missing.missing_keys
    x = torch.randn(2, 5, D) * 1e-3
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-4)
    assert ours.norm1.eps == ours.norm2.eps == 1e-6


def test_layerscale_init_and_block_default_has_none():
    ls = LayerScale(6, init_values=0.25)
    torch.testing.assert_close(ls.gamma.detach(), torch.full((6,), 0.25))
    assert LayerScale(3).gamma.detach().tolist() == pytest.approx([1e-5] * 3)  # CaiT / timm default
    x = torch.randn(2, 6)
    torch.testing.assert_close(ls(x), x * 0.25)
    assert isinstance(Block(8, 2).ls1, nn.Identity) and isinstance(Block(8, 2).ls2, nn.Identity)
    assert isinstance(Block(8, 2, init_values=1e-4).ls2, LayerScale)
    assert Block(8, 2, mlp_ratio=2.5).mlp.fc1.out_features == 20
    assert isinstance(Block(8, 2, act_layer=nn.ReLU).mlp.act, nn.ReLU)
    assert isinstance(Block(8, 2).mlp.act, nn.GELU)


def test_drop_path_drops_whole_samples_with_rescaling():
    """Stochastic depth in training: each sample keeps its branch scaled by 1/(1-p), or drops all of it."""
    torch.manual_seed(0)
    blk = Block(8, 2, drop_path=0.5)
    assert blk.drop_path1.p == 0.5 and blk.drop_path2.p == 0.5
    with torch.no_grad():
        branch = torch.ones(64, 3, 8)
        out = blk.drop_path1.train()(branch)
        per_sample = out.flatten(1)
        kept = (per_sample == 2.0).all(dim=1)  # 1 / (1 - 0.5)
        dropped = (per_sample == 0.0).all(dim=1)
        assert (kept | dropped).all() and kept.any() and dropped.any()
        assert torch.equal(blk.drop_path1.eval()(branch), branch)
    assert isinstance(Block(8, 2).drop_path1, nn.Identity)


# =============================================================================== patch embedding
def test_patch_embed_geometry_non_square():
    pe = PatchEmbed(img_size=(8, 12), patch_size=4, in_chans=2, embed_dim=5)
    assert pe.grid_size == (2, 3) and pe.num_patches == 6
    x = torch.randn(1, 2, 8, 12)
    out = pe(x)
    assert out.shape == (1, 6, 5)
    # token 1 is row 0, column 1: the patch x[..., 0:4, 4:8], flattened in conv weight order
    patch = x[0, :, 0:4, 4:8]
    expected = pe.proj.weight.flatten(1) @ patch.flatten() + pe.proj.bias
    torch.testing.assert_close(out[0, 1], expected)
    patch = x[0, :, 4:8, 0:4]  # token 3: row 1, column 0
    torch.testing.assert_close(out[0, 3], pe.proj.weight.flatten(1) @ patch.flatten() + pe.proj.bias)
    pe.set_image_size((16, 4))
    assert pe.grid_size == (4, 1) and pe.num_patches == 4 and pe.img_size == (16, 4)
    assert PatchEmbed(8, 4, bias=False).proj.bias is None
    with pytest.raises(ModelError, match="divisible"):
        PatchEmbed(img_size=10, patch_size=4)
    with pytest.raises(ModelError, match="divisible"):
        pe(torch.randn(1, 2, 16, 6))


# =============================================================================== ViT
def _vit(**kw):
    base = dict(img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)
    return vitlens.create_model("vit_micro_patch4_32", **{**base, **kw})


def test_vit_init_follows_timm():
    """Linears trunc-normal std 0.02 with zero bias, [CLS] ~1e-6, position table std 0.02, norms 1/0."""
    torch.manual_seed(0)
    m = vitlens.create_model("vit_micro_patch4_32", embed_dim=192, num_heads=3, depth=1)
    w = m.blocks[0].mlp.fc1.weight
    assert w.std().item() == pytest.approx(0.02, rel=0.03)
    assert m.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.03)
    for name, p in m.named_parameters():
        if name.endswith("bias") and "patch_embed" not in name:
            assert torch.count_nonzero(p) == 0, name
        if "norm" in name and name.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), name
    assert m.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.pos_embed.shape == (1, 65, 192)
    assert 0 < m.cls_token.abs().max().item() < 1e-5
    assert m.blocks[0].norm1.eps == m.norm.eps == 1e-6


def test_vit_drop_path_rates_increase_linearly_like_timm():
    import timm

    ours = _vit(depth=5, drop_path_rate=0.2)
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=5, num_heads=4, drop_path_rate=0.2)
    got = [b.drop_path1.p if not isinstance(b.drop_path1, nn.Identity) else 0.0 for b in ours.blocks]
    want = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in ref.blocks]
    assert got == pytest.approx(want) and got == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert [b.drop_path2.p for b in ours.blocks[1:]] == pytest.approx([0.05, 0.1, 0.15, 0.2])


@torch.no_grad()
@pytest.mark.parametrize("kw,timm_kw", [
    (dict(), dict()),
    (dict(pool="gap", class_token=False), dict(global_pool="avg", class_token=False)),
    (dict(pool="gap"), dict(global_pool="avg")),  # [CLS] kept but not pooled
    (dict(norm_pre=True, patch_bias=False, norm_eps=1e-5), dict(pre_norm=True, norm_layer=nn.LayerNorm)),
    (dict(qkv_bias=False, init_values=0.1), dict(qkv_bias=False, init_values=0.1)),
    (dict(pos_embed="none"), dict(pos_embed="none")),
])
def test_vit_equals_timm_vision_transformer(kw, timm_kw):
    """Tiny ViTs with timm's own ``VisionTransformer`` and copied (randomised) weights."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    timm_kw = {"norm_layer": partial(nn.LayerNorm, eps=1e-6), **timm_kw}
    if kw.get("patch_bias") is False:
        timm_kw["embed_layer"] = partial(__import__("timm").layers.PatchEmbed, bias=False)
    ref = TimmViT(img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
                  **timm_kw).eval()
    _randomise(ref, scale=0.2)
    ours = _vit(**kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                               ref.forward_head(ref.forward_features(x), pre_logits=True),
                               atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_vit_cls_plus_gap_pool_and_hooks():
    m = _vit(pool="cls+gap", num_registers=2).eval()
    _randomise(m)
    assert m.num_features == 64 and m.head.in_features == 64 and m.num_prefix_tokens == 3
    x = torch.randn(2, 3, 16, 16)
    seen = []
    m.hook_embed.register_forward_hook(lambda mod, i, o: seen.append(o))
    feats = m.forward_features(x)
    assert feats.shape == (2, 3 + 16, 32)
    tokens, pos = seen[0], m.pos_embed[0]  # [CLS] + position, 2 registers without one, patches + theirs
    torch.testing.assert_close(tokens[:, 0], (m.cls_token[0, 0] + pos[0]).expand(2, -1))
    torch.testing.assert_close(tokens[:, 1:3], m.reg_token.expand(2, -1, -1))
    torch.testing.assert_close(tokens[:, 3:], m.patch_embed(x) + pos[1:])
    pooled = m.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(pooled, torch.cat([feats[:, 0], feats[:, 3:].mean(1)], dim=-1))
    torch.testing.assert_close(m(x), pooled @ m.head.weight.T + m.head.bias)


@torch.no_grad()
def test_deit_distilled_logits_average_both_heads():
    """DeiT (Touvron et al. 2021) at inference: the mean of the [CLS] head and the distillation head."""
    m = _randomise(_vit(distilled=True)).eval()
    assert m.num_prefix_tokens == 2 and m.pos_embed.shape == (1, 2 + 16, 32)
    x = torch.randn(2, 3, 16, 16)
    f = m.forward_features(x)
    want = (f[:, 0] @ m.head.weight.T + m.head.bias + f[:, 1] @ m.head_dist.weight.T + m.head_dist.bias) / 2
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.forward_head(f, pre_logits=True), (f[:, 0] + f[:, 1]) / 2)


def test_vit_num_classes_zero_and_errors():
    m = _vit(num_classes=0)
    assert isinstance(m.head, nn.Identity)
    assert m(torch.randn(1, 3, 16, 16)).shape == (1, 32)
    with pytest.raises(ValueError, match="channel"):
        _vit()(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="set_image_size"):
        _vit()(torch.randn(1, 3, 24, 24))
    with pytest.raises(ModelError, match="pool"):
        _vit(pool="max")
    with pytest.raises(ModelError, match="class_token"):
        _vit(class_token=False)
    with pytest.raises(ModelError, match="act"):
        _vit(act="relu")
    with pytest.raises(ModelError, match="pos_embed"):
        _vit(pos_embed="rope")
    with pytest.raises(ModelError, match="distilled"):
        _vit(distilled=True, pool="gap")


def test_vit_fc_norm_rule():
    assert isinstance(_vit().fc_norm, nn.Identity) and isinstance(_vit().norm, nn.LayerNorm)
    gap = _vit(pool="gap", class_token=False)
    assert isinstance(gap.fc_norm, nn.LayerNorm) and isinstance(gap.norm, nn.Identity)
    gap_norm_first = _vit(pool="gap", class_token=False, fc_norm=False)
    assert isinstance(gap_norm_first.fc_norm, nn.Identity) and isinstance(gap_norm_first.norm, nn.LayerNorm)


def test_quick_gelu_is_clip_formula():
    from vitlens.models.vit import QuickGELU

    x = torch.linspace(-4, 4, 17)
    torch.testing.assert_close(QuickGELU()(x), x / (1 + torch.exp(-1.702 * x)))
    assert isinstance(_vit(act="quick_gelu").blocks[0].mlp.act, QuickGELU)


@torch.no_grad()
def test_vit_sincos_table_and_resize():
    """Fixed 2D sin-cos table: zero row for [CLS], then MAE's layout; rebuilt (not resampled) on resize."""
    m = _vit(pos_embed="sincos2d")
    assert not isinstance(m.pos_embed, nn.Parameter)
    table = m.pos_embed[0]
    assert table.shape == (17, 32) and torch.count_nonzero(table[0]) == 0
    # patch (row 1, col 2) is token 1 + 1*4 + 2; channel 0 is sin(col * omega_0) = sin(2)
    assert table[1 + 4 + 2, 0].item() == pytest.approx(math.sin(2.0), abs=1e-6)
    assert table[1 + 4 + 2, 16].item() == pytest.approx(math.sin(1.0), abs=1e-6)  # row half
    omega_1 = 10000 ** (-1 / 8)  # MAE: omega_i = 1 / 10000^(i / (dim / 4)), dim / 4 = 8 per block
    assert table[1 + 4 + 2, 1].item() == pytest.approx(math.sin(2.0 * omega_1), abs=1e-6)
    assert table[1 + 4 + 2, 8 + 1].item() == pytest.approx(math.cos(2.0 * omega_1), abs=1e-6)
    assert table[1 + 4 + 2, 24 + 1].item() == pytest.approx(math.cos(1.0 * omega_1), abs=1e-6)
    m.set_image_size(24)
    assert m.pos_embed.shape == (1, 1 + 36, 32) and m.grid_size == (6, 6)
    assert m.pos_embed[0, 1 + 6 * 5 + 3, 16].item() == pytest.approx(math.sin(5.0), abs=1e-6)
    assert m(torch.randn(1, 3, 24, 24)).shape == (1, 5)


@torch.no_grad()
def test_vit_set_image_size_keeps_prefix_and_resamples_grid():
    m = _vit()
    old = m.pos_embed.detach().clone()
    m.set_image_size(32)
    assert m.pos_embed.shape == (1, 1 + 64, 32) and isinstance(m.pos_embed, nn.Parameter)
    assert torch.equal(m.pos_embed[:, :1], old[:, :1])
    assert m.cfg.img_size == 32 and m.patch_embed.img_size == (32, 32)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    # and down again (8x8 -> 2x2, where antialiasing matters) exactly as timm resamples
    from timm.layers import resample_abs_pos_embed

    table = m.pos_embed.detach().clone()
    m.set_image_size(8)
    want = resample_abs_pos_embed(table, new_size=(2, 2), old_size=(8, 8), num_prefix_tokens=1)
    torch.testing.assert_close(m.pos_embed.detach(), want, atol=1e-6, rtol=1e-5)


# =============================================================================== model sizes
@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch32_224",
                                  "deit_tiny_distilled_patch16_224", "vit_medium_patch16_gap_256",
                                  "vit_small_patch14_dinov2", "vit_base_patch16_clip_224"])
def test_vit_param_shapes_equal_timm(name):
    """Every tensor of the named variant (one block deep, to stay fast) has timm's name and shape."""
    import timm

    ours = vitlens.create_model(name, depth=1)
    ref = timm.create_model(name, pretrained=False, depth=1)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(ours) == shapes(ref)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "wide_resnet50_2"])
def test_resnet_param_counts_and_shapes_equal_torchvision(name):
    import torchvision

    with torch.device("meta"):
        ours = vitlens.create_model(name)
        ref = getattr(torchvision.models, name)()
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(ours) == shapes(ref)


def test_registered_small_models_sizes():
    count = lambda m: sum(p.numel() for p in m.parameters())
    # He et al. 2016: ResNet-20 has 0.27M parameters (theirs with parameter-free shortcuts); the
    # projection ("option B") shortcuts add two 1x1 convs + BN: 16*32+64 + 32*64+128.
    with torch.device("meta"):
        r20 = vitlens.create_model("resnet20")
        gpt = vitlens.create_model("gpt_char_baby")
    assert count(r20) == 269_722 + (16 * 32 + 64) + (32 * 64 + 128)
    # GPT-2 layout by hand: per block 12 D^2 (qkv 3, proj 1, MLP 4 + 4) + 13 D (their biases, two
    # norms), tied token table, position table, final norm.
    L, D, V, T = 6, 384, 65, 256
    assert count(gpt) == L * (12 * D * D + 13 * D) + V * D + T * D + 2 * D


# =============================================================================== ResNet
def test_resnet_init_kaiming_fan_out_and_zero_init_residual():
    import torchvision

    torch.manual_seed(0)
    m = vitlens.create_model("resnet18_cifar", widths=(16, 64, 64, 64), layers=(1, 1, 1, 1))
    w = m.layer2[0].conv1.weight  # 16 -> 64, 3x3: fan_out = 64 * 9 (fan_in would be 16 * 9)
    assert w.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)
    assert all(torch.equal(b.bn2.weight, torch.ones(64)) for b in m.stages[1])
    assert torch.count_nonzero(m.bn1.bias) == 0
    for name, bottleneck in [("resnet18", False), ("resnet50", True)]:
        ours = vitlens.create_model(name, zero_init_residual=True)
        ref = getattr(torchvision.models, name)(zero_init_residual=True)
        zeros = lambda m: {k for k, v in m.state_dict().items() if k.endswith("weight") and v.dim() == 1
                           and not v.any()}
        last_bn = "bn3.weight" if bottleneck else "bn2.weight"
        assert zeros(ours) == zeros(ref) and zeros(ours) and all(k.endswith(last_bn) for k in zeros(ours))
    assert not any(k for k, v in vitlens.create_model("resnet8_cifar").state_dict().items()
                   if k.endswith("bn2.weight") and not v.any())


@torch.no_grad()
@pytest.mark.parametrize("name,block", [("resnet18", "BasicBlock"), ("resnet50", "Bottleneck")])
def test_resnet_equals_torchvision_with_copied_weights(name, block):
    """One block a stage, random weights and BatchNorm statistics: the same logits as torchvision."""
    import torchvision.models.resnet as tv

    ref = tv.ResNet(getattr(tv, block), [1, 1, 1, 1], num_classes=7).eval()
    _randomise(ref, scale=0.1)
    for mod in ref.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    ours = vitlens.create_model(name, layers=(1, 1, 1, 1), num_classes=7).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_resnet_cifar_stem_and_stage_geometry():
    m = vitlens.create_model("resnet20").eval()
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    assert m.forward_features(x).shape == (2, 64, 8, 8)  # stages at 32, 16, 8
    assert m.layer2[0].conv1.stride == (2, 2) and m.layer2[1].conv1.stride == (1, 1)
    assert m.layer1[0].downsample is None and m.layer2[0].downsample is not None
    feats = m.forward_features(x)
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="built for 3-channel images, got 1-channel images"):
        m(torch.randn(2, 1, 32, 32))
    with pytest.raises(ModelError):
        vitlens.create_model("resnet20", block="basic", base_width=128)
    with pytest.raises(ModelError, match="same length"):
        vitlens.create_model("resnet20", layers=(1, 1))


# =============================================================================== ResNet-9 (fast)
def _conv_bn_act(x, unit, act):
    conv, bn = unit[0], unit[1]
    y = F.conv2d(x, conv.weight, padding=1)
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return act(y)


@torch.no_grad()
@pytest.mark.parametrize("act,fn", [("relu", F.relu), ("celu", partial(F.celu, alpha=0.075)),
                                    ("gelu", F.gelu)])
def test_resnet9_forward_equals_pages_network_written_out(act, fn):
    """Page's net with functional ops: prep; conv, pool, x + res2(res1(x)); conv, pool; conv, pool,
    residual; global max-pool; linear without bias; x 0.125."""
    m = vitlens.create_model("resnet9_fast", widths=(8, 16, 16, 32), num_classes=3, act=act).eval()
    _randomise(m, scale=0.2)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    h = _conv_bn_act(x, m.prep, fn)
    h = F.max_pool2d(_conv_bn_act(h, m.layer1[0], fn), 2)
    h = h + _conv_bn_act(_conv_bn_act(h, m.layer1[2].res1, fn), m.layer1[2].res2, fn)
    h = F.max_pool2d(_conv_bn_act(h, m.layer2[0], fn), 2)
    h = F.max_pool2d(_conv_bn_act(h, m.layer3[0], fn), 2)
    h = h + _conv_bn_act(_conv_bn_act(h, m.layer3[2].res1, fn), m.layer3[2].res2, fn)
    expected = h.amax(dim=(2, 3)) @ m.fc.weight.T * 0.125
    assert m.fc.bias is None and len(m.layer2) == 2
    torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=1e-5)


# =============================================================================== GPT vs GPT-2
def _gpt2_from_ours(ours):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = ours.cfg
    ref_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                         n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=int(cfg.mlp_ratio * cfg.n_embd),
                         activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    ref = GPT2LMHeadModel(ref_cfg).eval()
    sd = {"transformer.wte.weight": ours.wte.weight, "transformer.wpe.weight": ours.wpe.weight,
          "transformer.ln_f.weight": ours.norm.weight, "transformer.ln_f.bias": ours.norm.bias}
    for i, b in enumerate(ours.blocks):
        p = f"transformer.h.{i}."
        sd.update({  # GPT-2's Conv1D stores weights as (in, out): the transpose of nn.Linear's
            p + "ln_1.weight": b.norm1.weight, p + "ln_1.bias": b.norm1.bias,
            p + "attn.c_attn.weight": b.attn.qkv.weight.T, p + "attn.c_attn.bias": b.attn.qkv.bias,
            p + "attn.c_proj.weight": b.attn.proj.weight.T, p + "attn.c_proj.bias": b.attn.proj.bias,
            p + "ln_2.weight": b.norm2.weight, p + "ln_2.bias": b.norm2.bias,
            p + "mlp.c_fc.weight": b.mlp.fc1.weight.T, p + "mlp.c_fc.bias": b.mlp.fc1.bias,
            p + "mlp.c_proj.weight": b.mlp.fc2.weight.T, p + "mlp.c_proj.bias": b.mlp.fc2.bias,
        })
    with torch.no_grad():
        own = ref.state_dict()
        for k, v in sd.items():
            own[k].copy_(v)
    return ref


@torch.no_grad()
def test_gpt_equals_huggingface_gpt2():
    """Embeddings + positions, causal pre-norm blocks, final norm, tied head and the loss. GPT-2's
    LayerNorm eps is 1e-5; ours is 1e-6, so the norms get inputs of ordinary variance here."""
    ours = vitlens.create_model("gpt_nano", vocab_size=40, block_size=16, mlp_ratio=3.0).eval()
    _randomise(ours, scale=0.2)
    ref = _gpt2_from_ours(ours)
    idx = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(0))
    out = ref(idx, labels=idx)
    torch.testing.assert_close(ours(idx), out.logits, atol=2e-3, rtol=1e-3)
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100  # ignored position
    logits, loss = ours(idx, targets)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())  # HF's shifted loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-3)
    assert ours.norm.eps == 1e-6


def test_gpt_init_scaled_residual_projections_and_tying():
    torch.manual_seed(0)
    m = vitlens.create_model("gpt_nano", n_embd=256, n_head=4, n_layer=8, vocab_size=300)
    assert m.lm_head.weight is m.wte.weight
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert m.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.03)
    want = 0.02 / math.sqrt(2 * 8)  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
    assert m.blocks[3].attn.proj.weight.std().item() == pytest.approx(want, rel=0.03)
    assert m.blocks[3].mlp.fc2.weight.std().item() == pytest.approx(want, rel=0.03)
    assert m.blocks[3].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert all(torch.count_nonzero(p) == 0 for n, p in m.named_parameters() if n.endswith("bias"))
    untied = vitlens.create_model("gpt_nano", tie_weights=False)
    assert untied.lm_head.weight is not untied.wte.weight and untied.lm_head.bias is None
    assert vitlens.create_model("gpt_nano", bias=False).blocks[0].attn.qkv.bias is None


@torch.no_grad()
def test_gpt_positions_start_at_start_pos_and_context_limit():
    m = vitlens.create_model("gpt_nano", block_size=8).eval()
    seen = []
    m.hook_embed.register_forward_hook(lambda mod, i, o: seen.append(o))
    idx = torch.tensor([[3, 4]])
    m.forward_features(idx, kv_cache=m.new_cache(), start_pos=5)
    torch.testing.assert_close(seen[0][0], m.wte.weight[[3, 4]] + m.wpe.weight[[5, 6]])
    with pytest.raises(ValueError, match="exceeds the context"):
        m(torch.zeros(1, 9, dtype=torch.long))
    m(torch.zeros(1, 8, dtype=torch.long))  # exactly block_size is fine
    with pytest.raises(ValueError, match="one dict per block"):
        m.forward_features(idx, kv_cache=[{}])
    with pytest.raises(ValueError):
        m.generate(idx, 1, temperature=-1.0)


@torch.no_grad()
def test_gpt_generation_past_the_context_window_slides_it():
    """Past block_size, each step sees the last block_size tokens: greedy tokens equal argmax of a
    plain forward pass on that window (cached and uncached alike)."""
    m = _randomise(vitlens.create_model("gpt_nano", block_size=6, vocab_size=20), scale=0.5).eval()
    idx = torch.tensor([[1, 2, 3, 4]])
    for use_cache in (True, False):
        out = m.generate(idx, 6, temperature=0, use_cache=use_cache)
        assert out.shape == (1, 10) and torch.equal(out[:, :4], idx)
        for t in range(4, 10):
            window = out[:, max(0, t - 6):t]
            assert out[0, t].item() == m(window)[0, -1].argmax().item()


def test_sample_next_greedy_top_k_and_temperature():
    from vitlens.models.gpt import sample_next

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    assert sample_next(logits, 0).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next(logits.expand(2000, -1), 1.0, top_k=2, generator=g)]).flatten()
    assert set(draws.tolist()) == {1, 3}  # only the two largest logits
    # p(1)/p(3) = e^(3-2) at temperature 1; e^(1/2) at temperature 2
    frac = (draws == 1).float().mean().item()
    assert frac == pytest.approx(math.e / (1 + math.e), abs=0.03)
    hot = sample_next(logits.expand(4000, -1), 2.0, top_k=2, generator=g).flatten()
    assert (hot == 1).float().mean().item() == pytest.approx(math.exp(0.5) / (1 + math.exp(0.5)), abs=0.03)
    assert set(sample_next(logits.expand(500, -1), 1.0, top_k=1, generator=g).flatten().tolist()) == {1}
    assert sample_next(logits, 1.0, top_k=100, generator=g).shape == (1, 1)


# =============================================================================== BERT vs HF BERT
def _hf_bert_from_ours(ours):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    c = ours.cfg
    cfg = BertConfig(vocab_size=c.vocab_size, hidden_size=c.embed_dim, num_hidden_layers=c.depth,
                     num_attention_heads=c.num_heads, intermediate_size=int(c.embed_dim * c.mlp_ratio),
                     hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=c.max_len, type_vocab_size=1, layer_norm_eps=1e-6,
                     pad_token_id=c.pad_id)
    enc, mlm = BertModel(cfg).eval(), BertForMaskedLM(cfg).eval()
    D = c.embed_dim
    sd = {"embeddings.word_embeddings.weight": ours.tok_embed.weight,
          "embeddings.position_embeddings.weight": ours.pos_embed.weight,
          "embeddings.token_type_embeddings.weight": torch.zeros(1, D),
          "embeddings.LayerNorm.weight": ours.embed_norm.weight,
          "embeddings.LayerNorm.bias": ours.embed_norm.bias,
          "pooler.dense.weight": ours.pooler.weight, "pooler.dense.bias": ours.pooler.bias}
    for i, b in enumerate(ours.blocks):
        p = f"encoder.layer.{i}."
        for j, name in enumerate(("query", "key", "value")):
            sd[p + f"attention.self.{name}.weight"] = b.attn.qkv.weight[j * D:(j + 1) * D]
            sd[p + f"attention.self.{name}.bias"] = b.attn.qkv.bias[j * D:(j + 1) * D]
        sd.update({p + "attention.output.dense.weight": b.attn.proj.weight,
                   p + "attention.output.dense.bias": b.attn.proj.bias,
                   p + "attention.output.LayerNorm.weight": b.norm1.weight,
                   p + "attention.output.LayerNorm.bias": b.norm1.bias,
                   p + "intermediate.dense.weight": b.mlp.fc1.weight,
                   p + "intermediate.dense.bias": b.mlp.fc1.bias,
                   p + "output.dense.weight": b.mlp.fc2.weight, p + "output.dense.bias": b.mlp.fc2.bias,
                   p + "output.LayerNorm.weight": b.norm2.weight, p + "output.LayerNorm.bias": b.norm2.bias})
    head = {"cls.predictions.transform.dense.weight": ours.mlm_dense.weight,
            "cls.predictions.transform.dense.bias": ours.mlm_dense.bias,
            "cls.predictions.transform.LayerNorm.weight": ours.mlm_norm.weight,
            "cls.predictions.transform.LayerNorm.bias": ours.mlm_norm.bias,
            "cls.predictions.bias": ours.mlm_bias}
    with torch.no_grad():
        own = enc.state_dict()
        for k, v in sd.items():
            own[k].copy_(v)
        own = mlm.state_dict()
        for k, v in sd.items():
            if not k.startswith("pooler"):
                own["bert." + k].copy_(v)
        for k, v in head.items():
            own[k].copy_(v)
        mlm.cls.predictions.decoder.weight = mlm.bert.embeddings.word_embeddings.weight
        if hasattr(mlm.cls.predictions.decoder, "bias") and mlm.cls.predictions.decoder.bias is not None:
            mlm.cls.predictions.decoder.bias = mlm.cls.predictions.bias
    return enc, mlm


@torch.no_grad()
def test_bert_equals_huggingface_bert():
    """Post-norm blocks, embedding LayerNorm, padding never attended, tanh pooler, tied MLM head."""
    ours = vitlens.create_model("bert_nano", vocab_size=30, max_len=16).eval()
    _randomise(ours, scale=0.2)
    enc, mlm = _hf_bert_from_ours(ours)
    ids = torch.randint(1, 30, (2, 9), generator=torch.Generator().manual_seed(0))
    ids[1, 6:] = 0  # padding
    attn = (ids != 0).long()
    out = enc(input_ids=ids, attention_mask=attn, token_type_ids=torch.zeros_like(ids))
    feats = ours.forward_features(ids)
    keep = attn.bool()
    torch.testing.assert_close(feats[keep], out.last_hidden_state[keep], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours(ids), out.pooler_output, atol=1e-4, rtol=1e-4)
    logits = mlm(input_ids=ids, attention_mask=attn, token_type_ids=torch.zeros_like(ids)).logits
    torch.testing.assert_close(ours.forward_mlm(feats)[keep], logits[keep], atol=1e-4, rtol=1e-4)


def test_bert_init_padding_and_heads():
    torch.manual_seed(0)
    m = vitlens.create_model("bert_nano", embed_dim=256, num_heads=4, vocab_size=200, num_classes=3)
    assert torch.count_nonzero(m.tok_embed.weight[0]) == 0  # [PAD] row
    assert m.tok_embed.weight[1:].std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.head.out_features == 3 and torch.count_nonzero(m.mlm_bias) == 0
    assert isinstance(m.norm, nn.Identity) and not m.blocks[0].norm_first
    pre = vitlens.create_model("bert_nano", norm_first=True)
    assert isinstance(pre.norm, nn.LayerNorm) and pre.blocks[0].norm_first
    ids = torch.tensor([[5, 6, 0]])
    assert m.padding_mask(ids).tolist() == [[False, False, True]]
    with pytest.raises(ValueError, match="max_len"):
        vitlens.create_model("bert_nano")(torch.ones(1, 65, dtype=torch.long))


def test_mask_tokens_rates_and_specials():
    from vitlens.models.bert import mask_tokens

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 50, (200, 100), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    inputs, labels = mask_tokens(ids, vocab_size=50, mask_id=3, special_mask=special, mlm_prob=0.3,
                                 random_low=10, generator=g)
    chosen = labels != -100
    assert not chosen[:, 0].any()  # specials never chosen
    assert torch.equal(labels[chosen], ids[chosen])
    assert chosen[:, 1:].float().mean().item() == pytest.approx(0.3, abs=0.01)
    masked = (inputs == 3) & chosen
    assert masked.sum().item() / chosen.sum().item() == pytest.approx(0.8, abs=0.02)
    kept = (inputs == ids) & chosen  # 10% left as they are (+ the random draws that hit the same id)
    assert kept.sum().item() / chosen.sum().item() == pytest.approx(0.1 + 0.1 / 40, abs=0.015)
    swapped = (inputs != ids) & (inputs != 3) & chosen  # 10% random, from [random_low, vocab_size)
    assert swapped.sum().item() / chosen.sum().item() == pytest.approx(0.1 * 39 / 40, abs=0.015)
    assert torch.equal(inputs[~chosen], ids[~chosen])
    assert inputs.min().item() >= 3 and ((inputs >= 10) | (inputs == 3)).all() and inputs.max().item() < 50
    _, few = mask_tokens(ids, vocab_size=50, mask_id=3, generator=g)  # default rate: 15%
    assert (few != -100).float().mean().item() == pytest.approx(0.15, abs=0.01)


def test_bert_padding_row_gets_no_gradient():
    m = vitlens.create_model("bert_nano", vocab_size=20)
    ids = torch.tensor([[2, 5, 0, 0]])
    m.forward_features(ids).pow(2).sum().backward()  # the input side only (the MLM decoder is tied)
    assert torch.count_nonzero(m.tok_embed.weight.grad[0]) == 0
    assert torch.count_nonzero(m.tok_embed.weight.grad[5]) > 0


# =============================================================================== encoder-decoder
@torch.no_grad()
@pytest.mark.parametrize("norm_first", [True, False])
def test_seq2seq_equals_torch_transformer(norm_first):
    """Embeddings x sqrt(d) + Vaswani sinusoids (computed here from the formula), PyTorch's own
    encoder/decoder stacks with copied weights, final norms only for pre-norm, tied output layer."""
    D, H, V = 16, 2, 20
    ours = vitlens.create_model("transformer_nano", d_model=D, num_heads=H, mlp_dim=32, enc_layers=2,
                                dec_layers=2, src_vocab_size=V, tgt_vocab_size=V,
                                norm_first=norm_first).eval()
    _randomise(ours, scale=0.2)
    kw = dict(d_model=D, nhead=H, dim_feedforward=32, dropout=0.0, activation="gelu", batch_first=True,
              norm_first=norm_first, layer_norm_eps=1e-6)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(**kw), 2, enable_nested_tensor=False,
                                norm=nn.LayerNorm(D, eps=1e-6) if norm_first else None).eval()
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(**kw), 2,
                                norm=nn.LayerNorm(D, eps=1e-6) if norm_first else None).eval()
    for o, t in zip(ours.encoder, enc.layers):
        t.self_attn.in_proj_weight.copy_(o.attn.qkv.weight)
        t.self_attn.in_proj_bias.copy_(o.attn.qkv.bias)
        t.self_attn.out_proj.load_state_dict(o.attn.proj.state_dict())
        t.linear1.load_state_dict(o.mlp.fc1.state_dict())
        t.linear2.load_state_dict(o.mlp.fc2.state_dict())
        t.norm1.load_state_dict(o.norm1.state_dict())
        t.norm2.load_state_dict(o.norm2.state_dict())
    for o, t in zip(ours.decoder, dec.layers):
        t.self_attn.in_proj_weight.copy_(o.attn.qkv.weight)
        t.self_attn.in_proj_bias.copy_(o.attn.qkv.bias)
        t.self_attn.out_proj.load_state_dict(o.attn.proj.state_dict())
        t.multihead_attn.in_proj_weight.copy_(torch.cat([o.cross_attn.q.weight, o.cross_attn.kv.weight]))
        t.multihead_attn.in_proj_bias.copy_(torch.cat([o.cross_attn.q.bias, o.cross_attn.kv.bias]))
        t.multihead_attn.out_proj.load_state_dict(o.cross_attn.proj.state_dict())
        t.linear1.load_state_dict(o.mlp.fc1.state_dict())
        t.linear2.load_state_dict(o.mlp.fc2.state_dict())
        for a, b in ((o.norm1, t.norm1), (o.norm2, t.norm2), (o.norm3, t.norm3)):
            b.load_state_dict(a.state_dict())
    if norm_first:
        enc.norm.load_state_dict(ours.enc_norm.state_dict())
        dec.norm.load_state_dict(ours.dec_norm.state_dict())

    def sinusoids(T):
        pe = torch.zeros(T, D)
        for pos in range(T):
            for i in range(0, D, 2):
                pe[pos, i] = math.sin(pos / 10000 ** (i / D))
                pe[pos, i + 1] = math.cos(pos / 10000 ** (i / D))
        return pe

    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(1, V, (2, 7), generator=g), torch.randint(1, V, (2, 5), generator=g)
    src[1, 5:] = 0  # source padding
    emb = ours.tgt_embed.weight
    assert ours.src_embed is ours.tgt_embed and ours.head.weight is emb
    src_x = emb[src] * math.sqrt(D) + sinusoids(7)
    tgt_x = emb[tgt] * math.sqrt(D) + sinusoids(5)
    pad = src == 0
    memory = enc(src_x, src_key_padding_mask=pad)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    out = dec(tgt_x, memory, tgt_mask=causal, memory_key_padding_mask=pad)
    torch.testing.assert_close(ours(src, tgt), out @ emb.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.encode(src, pad)[~pad], memory[~pad], atol=1e-4, rtol=1e-4)
    # decoding the last 3 target tokens after a cached prefix of 2: positions 2..4, not 0..2
    cache, mem = ours.new_cache(), ours.encode(src, pad)
    ours.decode(tgt[:, :2], mem, pad, kv_cache=cache)
    tail = ours.decode(tgt[:, 2:], mem, pad, kv_cache=cache, start_pos=2)
    torch.testing.assert_close(ours.forward_head(tail), (out @ emb.T)[:, 2:], atol=1e-4, rtol=1e-4)


def test_seq2seq_init_embeddings_and_limits():
    torch.manual_seed(0)
    m = vitlens.create_model("transformer_nano", d_model=256, num_heads=4, src_vocab_size=500,
                             tgt_vocab_size=500)
    emb = m.tgt_embed.weight
    assert torch.count_nonzero(emb[0]) == 0  # pad row
    assert emb[1:].std().item() == pytest.approx(256**-0.5, rel=0.03)
    w = m.encoder[0].mlp.fc1.weight  # xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.95 * bound
    sep = vitlens.create_model("transformer_nano", share_src_tgt_embed=False, src_vocab_size=30)
    assert sep.src_embed is not sep.tgt_embed and sep.src_embed.num_embeddings == 30
    assert torch.count_nonzero(sep.src_embed.weight[0]) == 0
    with pytest.raises(ModelError, match="joint vocabulary"):
        vitlens.create_model("transformer_nano", src_vocab_size=30)
    with pytest.raises(ValueError, match="max_len"):
        m.decode(torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 2, 256), start_pos=62)
    assert m.padding_mask(torch.tensor([[4, 5]])) is None
    assert m.padding_mask(torch.tensor([[4, 0]])).tolist() == [[False, True]]


# =============================================================================== registry
def test_registry_overrides_and_errors():
    from vitlens.errors import ConfigError
    from vitlens.models.registry import list_models, model_config_fields, model_defaults

    m = vitlens.create_model("vit_micro_hybrid_32", tokenizer_args={"widths": (16, 32, 64)}, depth=1)
    assert m.cfg.tokenizer_args == {"layers": (1, 1, 1), "widths": (16, 32, 64)}  # dict fields merge
    assert m.model_name == "vit_micro_hybrid_32"
    assert "vit_micro_patch4_32" in list_models("vit_micro*") and "resnet20" not in list_models("vit_*")
    assert list_models() == sorted(list_models())
    assert "embed_dim" in model_config_fields("vit_micro_patch4_32")
    assert model_defaults("resnet20")["widths"] == (16, 32, 64)
    with pytest.raises(ConfigError, match="no config field"):
        vitlens.create_model("resnet20", embed_dim=3)
    with pytest.raises(ModelError, match="Did you mean"):
        vitlens.create_model("resnet2O")


# =============================================================================== pixel tokenizer (iGPT)
def test_uniform_palette_is_the_rgb_bin_centres():
    from vitlens.models.tokenizers.palette import uniform_palette

    pal = uniform_palette(8)  # 2 levels a channel: bin centres of [0, 128) and [128, 256)
    assert pal.shape == (8, 3)
    assert pal[0].tolist() == [63.5, 63.5, 63.5] and pal[7].tolist() == [191.5, 191.5, 191.5]
    assert pal[1].tolist() == [63.5, 63.5, 191.5] and pal[4].tolist() == [191.5, 63.5, 63.5]  # r-major order
    third = 256 / 3
    assert uniform_palette(27)[:3, 2].tolist() == pytest.approx([third / 2 - 0.5, 1.5 * third - 0.5,
                                                                  2.5 * third - 0.5])
    with pytest.raises(ModelError, match="cube"):
        uniform_palette(10)


@torch.no_grad()
def test_pixel_tokenizer_box_downsamples_then_picks_the_nearest_colour():
    from vitlens.models.tokenizers.palette import PixelTokenizer, uniform_palette

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    tok = PixelTokenizer(4, 6, uniform_palette(8), resolution=2, mean=mean, std=std)
    assert tok.grid_size == (2, 2) and tok.num_patches == 4 and tok.patch_size == (2, 2)
    rgb = torch.zeros(1, 3, 4, 4)  # in 0..255
    rgb[0, 0, :2, :2] = 200  # top-left box: red high -> colour index 4
    rgb[0, :, :2, 2:] = torch.tensor([100.0, 150.0, 180.0])[:, None, None]  # top-right: 0,1,1 -> 3
    rgb[0, 2, 2:, :2] = torch.tensor([[250.0, 0.0], [250.0, 10.0]])  # bottom-left mean 127.5 -> 0
    rgb[0, 2, 2:, 2:] = torch.tensor([[250.0, 10.0], [250.0, 10.0]])  # mean 130 -> blue high -> 1
    x = (rgb / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    idx = tok.tokenize(x)
    assert idx.tolist() == [[[4, 3], [0, 1]]]
    torch.testing.assert_close(tok(x), tok.embed.weight[idx.flatten(1)])
    torch.testing.assert_close(tok.decode(idx)[0, :, 0, 1], torch.tensor([63.5, 191.5, 191.5]) / 255)
    with pytest.raises(ValueError, match="built for"):
        tok.tokenize(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ModelError, match="multiple"):
        PixelTokenizer(6, 4, uniform_palette(8), resolution=4)


# =============================================================================== loading
@torch.no_grad()
def test_load_model_from_run_directory_last_and_best(tmp_path):
    from vitlens.errors import MissingFileError
    from vitlens.models.loading import find_checkpoint, load_model, save_pretrained

    run = tmp_path / "myrun"
    (run / "checkpoints").mkdir(parents=True)
    models = {}
    for which in ("last", "best"):
        m = _randomise(vitlens.create_model("resnet8_cifar", num_classes=3), seed=len(models))
        save_pretrained(m, run / "checkpoints" / f"{which}.safetensors")
        models[which] = m.eval()
    x = torch.randn(1, 3, 32, 32)
    for which in ("last", "best"):
        got, meta = load_model(run, which=which)
        assert not got.training and meta["label"] == "myrun" and meta["model"] == "resnet8_cifar"
        torch.testing.assert_close(got(x), models[which](x))
    assert load_model(run)[0].fc.weight.equal(models["last"].fc.weight)  # "last" by default
    single, meta = load_model(run / "checkpoints" / "best.safetensors")
    assert meta["label"] == "myrun"
    other = save_pretrained(models["best"], tmp_path / "weights.safetensors")
    assert load_model(other)[1]["label"] == "weights"
    assert find_checkpoint(run, "best") == run / "checkpoints" / "best.safetensors"
    with pytest.raises(MissingFileError, match="no checkpoints/first"):
        find_checkpoint(run, "first")
    with pytest.raises(MissingFileError):
        load_model(tmp_path / "nothing.safetensors")
    from vitlens.errors import CheckpointError

    with pytest.raises(CheckpointError, match="safetensors"):
        save_pretrained(models["best"], tmp_path / "w.pth")
    with pytest.raises(ModelError, match="give one"):
        vitlens.create_model("resnet8_cifar", checkpoint=other, pretrained=True)
    with pytest.raises(ModelError, match="brings its own weights"):
        load_model(run, checkpoint=other)
