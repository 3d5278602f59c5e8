"""The block library against independent references (issue 15, mutation gaps of ``vitlens.layers``).

Attention is checked against ``torch.nn.MultiheadAttention`` with the same weights (self and cross,
every mask kind, both the fused and the recording path, float64 so tolerances stay tight), the
blocks against ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer`` (pre- and
post-norm) and timm's ``Block``, the patch embedding against timm's ``PatchEmbed`` on non-square
images and patches, and the position tables against their formulas at positions far enough out
that a changed constant shows. Error messages are compared whole: they are the user's instructions.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitlens.errors import ModelError
from vitlens.layers import (
    Attention,
    Block,
    CrossBlock,
    LayerNorm,
    Mlp,
    PatchEmbed,
    build_attention_mask,
    check_divisible,
    resample_pos_embed,
    sincos_1d,
    sincos_2d,
)
from vitlens.layers import attention as attention_module

B, L, D, H = 2, 6, 16, 4  # batch, tokens, width, heads


def _padding(lengths, T):
    return torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]  # (B, T) True = padding


def _mha_like(attn: Attention) -> nn.MultiheadAttention:
    """torch's MultiheadAttention holding the weights of a vitlens self-attention."""
    ref = nn.MultiheadAttention(D, H, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn.qkv.weight)
        ref.in_proj_bias.copy_(attn.qkv.bias)
        ref.out_proj.weight.copy_(attn.proj.weight)
        ref.out_proj.bias.copy_(attn.proj.bias)
    return ref.eval()


def _recorded(attn: Attention, *args, **kw):
    seen = []
    handle = attn.attn_probs.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    attn.record_attn = True
    try:
        out = attn(*args, **kw)
    finally:
        attn.record_attn = False
        handle.remove()
    return out, seen


# ------------------------------------------------------------------------------ attention vs torch
def _masks():
    g = torch.Generator().manual_seed(1)
    allowed = torch.rand(L, L, generator=g).ge(0.5) | torch.eye(L, dtype=torch.bool)
    additive = torch.zeros(L, L, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    per_image = torch.stack([allowed, allowed.T])  # (B, L, S) bool, True = may attend
    causal = torch.ones(L, L).triu(1).bool()  # torch convention: True = masked
    pad = _padding([L, 3], L)
    # (our keyword arguments, torch's attn_mask (True = blocked), torch's key_padding_mask)
    return {
        "none": ({}, None, None),
        "padding": (dict(key_padding_mask=pad), None, pad),
        "causal": (dict(is_causal=True), causal, None),
        "causal+padding": (dict(is_causal=True, key_padding_mask=pad), causal, pad),
        "bool": (dict(attn_mask=allowed), ~allowed, None),
        "additive": (dict(attn_mask=additive), ~allowed, None),
        "per-image+padding": (
            dict(attn_mask=per_image, key_padding_mask=pad),
            (~per_image).repeat_interleave(H, dim=0),
            pad,
        ),
        "causal+bool": (dict(is_causal=True, attn_mask=allowed), causal | ~allowed, None),
    }


@pytest.mark.parametrize("record", [False, True])
@pytest.mark.parametrize("mask", list(_masks()))
def test_self_attention_equals_torch_multihead_attention(mask, record):
    torch.manual_seed(0)
    attn = Attention(D, H).double().eval()
    ref = _mha_like(attn)
    ours_kw, ref_mask, ref_pad = _masks()[mask]
    x = torch.randn(B, L, D, dtype=torch.float64)
    want, want_probs = ref(x, x, x, attn_mask=ref_mask, key_padding_mask=ref_pad, average_attn_weights=False)
    if record:
        got, (probs,) = _recorded(attn, x, **ours_kw)
        torch.testing.assert_close(probs, want_probs, rtol=1e-10, atol=1e-12)
    else:
        got = attn(x, **ours_kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("record", [False, True])
def test_cross_attention_equals_torch_multihead_attention(record):
    torch.manual_seed(0)
    C, S = 10, 5  # context width differs from the query width
    attn = Attention(D, H, cross=True, context_dim=C).double().eval()
    ref = nn.MultiheadAttention(D, H, kdim=C, vdim=C, batch_first=True, dtype=torch.float64).eval()
    with torch.no_grad():
        ref.q_proj_weight.copy_(attn.q.weight)
        ref.k_proj_weight.copy_(attn.kv.weight[:D])  # kv = [keys; values]
        ref.v_proj_weight.copy_(attn.kv.weight[D:])
        ref.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.kv.bias]))
        ref.out_proj.weight.copy_(attn.proj.weight)
        ref.out_proj.bias.copy_(attn.proj.bias)
    x, ctx = torch.randn(B, L, D, dtype=torch.float64), torch.randn(B, S, C, dtype=torch.float64)
    pad = _padding([S, 2], S)
    want, want_probs = ref(x, ctx, ctx, key_padding_mask=pad, average_attn_weights=False)
    if record:
        got, (probs,) = _recorded(attn, x, ctx, key_padding_mask=pad)
        assert probs.shape == (B, H, L, S)
        torch.testing.assert_close(probs, want_probs, rtol=1e-10, atol=1e-12)
    else:
        got = attn(x, ctx, key_padding_mask=pad)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_cross_attention_without_context_width_uses_the_query_width():
    attn = Attention(D, H, cross=True)
    assert (attn.q.weight.shape, attn.kv.weight.shape) == ((D, D), (2 * D, D))
    assert not hasattr(attn, "qkv")


def test_qkv_bias_off_drops_only_the_input_projection_bias():
    """timm's layout: ``qkv_bias=False`` leaves q/k/v without bias, the output projection keeps one."""
    self_attn, cross = Attention(D, H, qkv_bias=False), Attention(D, H, qkv_bias=False, cross=True)
    assert self_attn.qkv.bias is None and self_attn.proj.bias is not None
    assert cross.q.bias is None and cross.kv.bias is None and cross.proj.bias is not None
    assert Attention(D, H).qkv.bias is not None


def test_fully_masked_rows_give_zero_probabilities_and_output_the_projection_bias():
    """A query that may see no key (e.g. a padded query under a custom mask) attends to nothing."""
    attn = Attention(D, H).double().eval()
    allowed = torch.ones(L, L, dtype=torch.bool)
    allowed[2] = False  # query 2 sees no key
    x = torch.randn(1, L, D, dtype=torch.float64)
    out, (probs,) = _recorded(attn, x, attn_mask=allowed)
    assert torch.isfinite(probs).all() and (probs[0, :, 2] == 0).all()
    torch.testing.assert_close(out[0, 2], attn.proj.bias)  # softmax of no key: 0 @ v = 0, then proj


def test_recording_in_bfloat16_keeps_the_dtype_and_the_values():
    """The softmax runs in fp32 for accuracy; probabilities and output come back in the input dtype."""
    torch.manual_seed(0)
    attn = Attention(D, H).eval()
    x = torch.randn(B, L, D)
    ref_out, (ref_probs,) = _recorded(attn, x, is_causal=True)
    attn16 = Attention(D, H).eval().to(torch.bfloat16)
    attn16.load_state_dict(attn.state_dict())
    out, (probs,) = _recorded(attn16, x.bfloat16(), is_causal=True)
    assert probs.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    torch.testing.assert_close(probs.float(), ref_probs, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), ref_out, atol=3e-2, rtol=3e-2)


def test_attention_errors_name_the_problem_and_the_fix():
    with pytest.raises(ModelError) as e:
        Attention(30, 4)
    assert str(e.value) == "dim 30 is not divisible by num_heads 4; pick a head count that divides it"
    with pytest.raises(ModelError) as e:
        Attention(D, H, cross=True)(torch.randn(1, 2, D))
    assert str(e.value) == "cross-attention needs a context (the encoder output); pass it as context=..."
    with pytest.raises(TypeError) as e:
        build_attention_mask(3, 3, key_padding_mask=torch.zeros(1, 3))
    assert str(e.value) == "key_padding_mask must be a bool tensor (True = padding)"


def test_attention_scale_is_one_over_root_head_dim():
    attn = Attention(24, 3)
    assert attn.num_heads == 3 and attn.head_dim == 8 and attn.scale == pytest.approx(1 / math.sqrt(8))


# ------------------------------------------------------------------------------ dropout
def test_attention_dropout_acts_in_training_only_and_after_the_recorded_probabilities():
    torch.manual_seed(0)
    attn = Attention(D, H, attn_drop=0.5)
    x = torch.randn(B, L, D)
    eval_out = attn.eval()(x)
    clean = Attention(D, H).eval()
    clean.load_state_dict(attn.state_dict())
    torch.testing.assert_close(eval_out, clean(x))  # eval: no attention dropout
    attn.train()
    torch.manual_seed(3)
    out, (probs,) = _recorded(attn, x)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, H, L))  # recorded before the dropout
    # The same draw by hand: probabilities dropped with p = 0.5 (kept ones doubled), then @ v, proj.
    torch.manual_seed(3)
    dropped = F.dropout(probs, 0.5, True)
    assert (dropped == 0).any() and (dropped.max() > 1.0 or (dropped == 2 * probs).any())
    v = attn.qkv(x)[..., 2 * D :].view(B, L, H, D // H).transpose(1, 2)
    want = attn.proj((dropped @ v).transpose(1, 2).reshape(B, L, D))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # The fused path drops attention too in training: two calls differ, eval calls do not.
    assert not torch.allclose(attn(x), attn(x))


def test_output_dropout_of_attention_and_mlp():
    x = torch.randn(B, L, D)
    attn = Attention(D, H, proj_drop=1.0)
    assert (attn.train()(x) == 0).all() and (attn.eval()(x) != 0).any()
    mlp = Mlp(D, 8, drop=1.0)
    assert (mlp.train()(x) == 0).all() and (mlp.eval()(x) != 0).any()


def test_mlp_drops_the_hidden_activations_and_the_output_each_with_p():
    torch.manual_seed(0)
    mlp = Mlp(D, 64, drop=0.5).train()
    seen = {}
    mlp.act.register_forward_hook(lambda m, i, o: seen.__setitem__("act", o.detach()))
    mlp.fc2.register_forward_hook(lambda m, i, o: seen.update(fc2_in=i[0].detach(), fc2_out=o.detach()))
    out = mlp(torch.randn(B, L, D))
    for before, after in ((seen["act"], seen["fc2_in"]), (seen["fc2_out"], out.detach())):
        kept = after != 0
        assert 0.3 < kept.float().mean() < 0.7  # about half of the entries dropped
        torch.testing.assert_close(after[kept], 2 * before[kept])  # the rest scaled by 1 / (1 - p)


def test_mlp_is_fc1_activation_fc2():
    mlp = Mlp(D, 24, act_layer=nn.ReLU).eval()
    assert mlp.fc1.weight.shape == (24, D) and mlp.fc2.weight.shape == (D, 24)
    x = torch.randn(B, L, D)
    want = F.linear(F.relu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    torch.testing.assert_close(mlp(x), want)
    assert isinstance(Mlp(D, 8).act, nn.GELU)  # the default activation (ViT, BERT, GPT-2)


# ------------------------------------------------------------------------------ masks
def test_mask_builder_layouts():
    allowed = torch.tensor([[True, False, True], [True, True, False]])
    m = build_attention_mask(2, 3, attn_mask=allowed)
    assert m.shape == (1, 1, 2, 3) and torch.equal(m[0, 0], allowed)
    additive = torch.zeros(2, 3).masked_fill(~allowed, float("-inf"))
    assert torch.equal(build_attention_mask(2, 3, attn_mask=additive), m)  # 0 / -inf -> allowed / not
    per_image = torch.stack([allowed, ~allowed])
    assert torch.equal(build_attention_mask(2, 3, attn_mask=per_image), per_image[:, None])
    pad = torch.tensor([[False, False, True], [False, True, True]])
    only_pad = build_attention_mask(2, 3, key_padding_mask=pad)
    assert only_pad.shape == (2, 1, 1, 3) and torch.equal(only_pad[:, 0, 0], ~pad)
    both = build_attention_mask(2, 3, attn_mask=allowed, key_padding_mask=pad, is_causal=True)
    causal = torch.tensor([[True, True, False], [True, True, True]])  # queries at positions 1 and 2
    assert both.shape == (2, 1, 2, 3)
    assert torch.equal(both[:, 0], allowed[None] & causal[None] & ~pad[:, None, :])
    four_d = per_image[:, None]
    assert torch.equal(build_attention_mask(2, 3, attn_mask=four_d), four_d)  # (B, 1, L, S) as given
    square = build_attention_mask(3, 3, is_causal=True)
    assert torch.equal(square[0, 0], torch.ones(3, 3, dtype=torch.bool).tril())


def test_mask_builder_puts_the_causal_mask_on_the_given_device():
    """A user who set a default device (here meta) and runs on CPU tensors gets a CPU mask."""
    with torch.device("meta"):
        m = build_attention_mask(2, 4, is_causal=True, device=torch.device("cpu"))
    assert m.device.type == "cpu"
    assert m[0, 0].tolist() == [[True, True, True, False], [True, True, True, True]]


def test_causal_attention_on_cpu_under_a_meta_default_device():
    attn = Attention(D, H).eval()
    x = torch.randn(1, L, D)
    want = attn(x, is_causal=True)
    with torch.device("meta"):
        got = attn(x, is_causal=True)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "dtype, grad, keys, spelt_out",
    [
        (torch.bfloat16, True, 128, True),
        (torch.float16, True, 128, True),
        (torch.bfloat16, True, 129, False),
        (torch.float32, True, 16, False),
        (torch.bfloat16, False, 16, False),
    ],
)
def test_cpu_half_training_path_choice(dtype, grad, keys, spelt_out, monkeypatch):
    """CPU bf16/fp16 training spells attention out up to CPU_HALF_MATH_MAX_KEYS keys (inclusive)."""
    assert attention_module.CPU_HALF_MATH_MAX_KEYS == 128
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(
        attention_module.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    attn = Attention(8, 2).to(dtype)
    attn.requires_grad_(grad)
    cache = {
        "k": torch.zeros(1, 2, keys - 1, 4, dtype=dtype),
        "v": torch.zeros(1, 2, keys - 1, 4, dtype=dtype),
    }
    out = attn(torch.randn(1, 1, 8, dtype=dtype), kv_cache=cache)  # one query, `keys` keys
    assert out.dtype == dtype and cache["k"].shape[2] == keys
    assert calls == ([] if spelt_out else [1])


# ------------------------------------------------------------------------------ blocks vs torch / timm
def _copy_encoder_layer(blk: Block, ref: nn.TransformerEncoderLayer) -> None:
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(blk.attn.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(blk.attn.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(blk.attn.proj.weight)
        ref.self_attn.out_proj.bias.copy_(blk.attn.proj.bias)
        for ours, theirs in ((blk.mlp.fc1, ref.linear1), (blk.mlp.fc2, ref.linear2)):
            theirs.weight.copy_(ours.weight), theirs.bias.copy_(ours.bias)
        for ours, theirs in ((blk.norm1, ref.norm1), (blk.norm2, ref.norm2)):
            (
                theirs.weight.copy_(ours.weight.detach().normal_()),
                theirs.bias.copy_(ours.bias.detach().normal_()),
            )


@pytest.mark.parametrize("norm_first", [True, False])
def test_block_equals_torch_transformer_encoder_layer(norm_first):
    """Pre-norm (ViT, GPT-2) and post-norm (BERT, Vaswani et al.), LayerNorm eps 1e-6, GELU, 4x MLP."""
    torch.manual_seed(0)
    blk = (
        (Block(D, H) if norm_first else Block(D, H, norm_first=False)).double().eval()
    )  # pre-norm by default
    ref = nn.TransformerEncoderLayer(
        D, H, 4 * D, dropout=0.0, activation="gelu", layer_norm_eps=1e-6, batch_first=True,
        norm_first=norm_first, dtype=torch.float64,
    ).eval()  # fmt: skip
    _copy_encoder_layer(blk, ref)
    x = 0.01 * torch.randn(B, L, D, dtype=torch.float64)  # small activations: the norms' eps matters
    pad = _padding([L, 4], L)
    mids = []
    blk.hook_resid_mid.register_forward_hook(lambda m, i, o: mids.append(o))
    torch.testing.assert_close(blk(x, key_padding_mask=pad), ref(x, src_key_padding_mask=pad))
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    torch.testing.assert_close(blk(x, is_causal=True), ref(x, src_mask=causal, is_causal=True))
    # hook_resid_mid: the residual stream between the two sub-layers
    a = ref.self_attn(*(3 * [ref.norm1(x) if norm_first else x]), key_padding_mask=pad)[0]
    torch.testing.assert_close(mids[0], x + a if norm_first else ref.norm1(x + a))


@pytest.mark.parametrize("qkv_bias, init_values, mlp_ratio", [(True, None, 4.0), (False, 0.5, 2.5)])
def test_block_loads_a_timm_block_and_computes_the_same(qkv_bias, init_values, mlp_ratio):
    from timm.models.vision_transformer import Block as TimmBlock

    torch.manual_seed(0)
    ref = TimmBlock(
        D, H, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, init_values=init_values,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ).double().eval()  # fmt: skip
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    blk = Block(D, H, mlp_ratio, qkv_bias=qkv_bias, init_values=init_values).double().eval()
    blk.load_state_dict(ref.state_dict())  # strict: the same names and shapes
    x = 0.01 * torch.randn(B, L, D, dtype=torch.float64)
    torch.testing.assert_close(blk(x), ref(x))
    assert blk.mlp.fc1.out_features == int(D * mlp_ratio)


def test_layerscale_starts_at_init_values_and_default_is_1e_5():
    from vitlens.layers import LayerScale

    assert torch.equal(Block(D, H, init_values=0.25).ls2.gamma.detach(), torch.full((D,), 0.25))
    assert torch.equal(LayerScale(3).gamma.detach(), torch.full((3,), 1e-5))
    assert isinstance(Block(D, H).ls1, nn.Identity) and isinstance(Block(D, H).ls2, nn.Identity)


def test_layer_norm_is_torch_layer_norm_with_eps_1e_6():
    assert LayerNorm(D).eps == 1e-6 and isinstance(LayerNorm(D), nn.LayerNorm)  # timm ViT's norm


def test_block_options_reach_their_sub_layers():
    blk = Block(D, H, qkv_bias=False, proj_drop=0.25, attn_drop=0.5, act_layer=nn.ReLU)
    assert blk.attn.qkv.bias is None and blk.attn.attn_drop == 0.5 and blk.attn.proj_drop.p == 0.25
    assert isinstance(blk.mlp.act, nn.ReLU) and blk.mlp.drop1.p == 0.25 and blk.mlp.drop2.p == 0.25
    assert blk.attn.num_heads == H
    assert isinstance(Block(D, H, norm_layer=nn.Identity).norm2, nn.Identity)


def test_block_passes_padding_and_cache_to_attention():
    torch.manual_seed(0)
    blk = Block(D, H).eval()
    x = torch.randn(B, L, D)
    full = blk(x, is_causal=True)
    cache: dict = {}
    steps = [blk(x[:, :2], is_causal=True, kv_cache=cache)] + [
        blk(x[:, t : t + 1], is_causal=True, kv_cache=cache) for t in range(2, L)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    allowed = torch.ones(L, L, dtype=torch.bool).tril()
    torch.testing.assert_close(blk(x, attn_mask=allowed), full, atol=1e-6, rtol=1e-6)


def _copy_decoder_layer(blk: CrossBlock, ref: nn.TransformerDecoderLayer) -> None:
    with torch.no_grad():
        sa, ca = ref.self_attn, ref.multihead_attn
        sa.in_proj_weight.copy_(blk.attn.qkv.weight), sa.in_proj_bias.copy_(blk.attn.qkv.bias)
        ca.in_proj_weight.copy_(torch.cat([blk.cross_attn.q.weight, blk.cross_attn.kv.weight]))
        ca.in_proj_bias.copy_(torch.cat([blk.cross_attn.q.bias, blk.cross_attn.kv.bias]))
        for ours, theirs in (
            (blk.attn.proj, sa.out_proj), (blk.cross_attn.proj, ca.out_proj),
            (blk.mlp.fc1, ref.linear1), (blk.mlp.fc2, ref.linear2),
        ):  # fmt: skip
            theirs.weight.copy_(ours.weight), theirs.bias.copy_(ours.bias)
        for ours, theirs in ((blk.norm1, ref.norm1), (blk.norm2, ref.norm2), (blk.norm3, ref.norm3)):
            (
                theirs.weight.copy_(ours.weight.detach().normal_()),
                theirs.bias.copy_(ours.bias.detach().normal_()),
            )


@pytest.mark.parametrize("norm_first", [True, False])
def test_cross_block_equals_torch_transformer_decoder_layer(norm_first):
    """Causal by default (the decoder's own masking), padding of both sequences, eps 1e-6."""
    torch.manual_seed(0)
    blk = (CrossBlock(D, H) if norm_first else CrossBlock(D, H, norm_first=False)).double().eval()
    ref = nn.TransformerDecoderLayer(
        D, H, 4 * D, dropout=0.0, activation="gelu", layer_norm_eps=1e-6, batch_first=True,
        norm_first=norm_first, dtype=torch.float64,
    ).eval()  # fmt: skip
    _copy_decoder_layer(blk, ref)
    S = 5
    x = 0.01 * torch.randn(B, L, D, dtype=torch.float64)
    ctx = torch.randn(B, S, D, dtype=torch.float64)
    tgt_pad, ctx_pad = _padding([L, 4], L), _padding([S, 2], S)
    causal = torch.ones(L, L).triu(1).bool()  # torch convention: True = masked
    want = ref(x, ctx, tgt_mask=causal, tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=ctx_pad)
    got = blk(x, ctx, key_padding_mask=tgt_pad, context_padding_mask=ctx_pad)
    keep = ~tgt_pad
    torch.testing.assert_close(got[keep], want[keep])
    torch.testing.assert_close(blk(x, ctx, is_causal=False), ref(x, ctx))


def test_cross_block_options_and_cache():
    torch.manual_seed(0)
    blk = CrossBlock(
        D, H, mlp_ratio=2.0, qkv_bias=False, proj_drop=0.25, attn_drop=0.5, context_dim=10, act_layer=nn.ReLU
    )
    assert blk.mlp.fc1.out_features == 2 * D and isinstance(blk.mlp.act, nn.ReLU)
    assert blk.attn.qkv.bias is None and blk.cross_attn.q.bias is None and blk.cross_attn.kv.in_features == 10
    assert blk.attn.attn_drop == blk.cross_attn.attn_drop == 0.5 and blk.mlp.drop1.p == 0.25
    assert blk.cross_attn.proj_drop.p == 0.25 and blk.cross_attn.cross and not blk.attn.cross
    blk.eval()
    x, ctx = torch.randn(1, L, D), torch.randn(1, 3, 10)
    full = blk(x, ctx)
    cache: dict = {}
    steps = [blk(x[:, t : t + 1], ctx, kv_cache=cache) for t in range(L)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_drop_path_of_cross_block_and_block():
    x, ctx = torch.randn(4, L, D), torch.randn(4, 3, D)
    dead = CrossBlock(D, H, drop_path=1.0).train()
    torch.testing.assert_close(dead(x, ctx), x)  # every branch dropped: the identity
    live = CrossBlock(D, H, drop_path=0.0).train()
    assert isinstance(live.drop_path, nn.Identity) and not torch.allclose(live(x, ctx), x)
    from torchvision.ops import StochasticDepth

    sd = Block(D, H, drop_path=0.3).drop_path2
    assert isinstance(sd, StochasticDepth) and sd.p == 0.3 and sd.mode == "row"


# ------------------------------------------------------------------------------ patch embedding
@pytest.mark.parametrize("img, patch", [((16, 32), (4, 8)), ((32, 16), (8, 4)), (24, 8), ((12, 20), 4)])
def test_patch_embed_equals_timm_on_non_square_images_and_patches(img, patch):
    from timm.layers import PatchEmbed as TimmPatchEmbed

    ref = TimmPatchEmbed(img, patch, in_chans=2, embed_dim=D)
    ours = PatchEmbed(img, patch, in_chans=2, embed_dim=D)
    ours.load_state_dict(ref.state_dict())
    assert (ours.grid_size, ours.num_patches, ours.patch_size) == (
        ref.grid_size,
        ref.num_patches,
        ref.patch_size,
    )
    assert ours.img_size == tuple(ref.img_size)
    x = torch.randn(B, 2, *ours.img_size)
    torch.testing.assert_close(ours(x), ref(x))


def test_patch_embed_defaults_and_bias():
    pe = PatchEmbed()
    assert (pe.img_size, pe.patch_size, pe.grid_size, pe.num_patches) == ((224, 224), (16, 16), (14, 14), 196)
    assert pe.proj.in_channels == 3 and pe.proj.out_channels == 768 and pe.proj.bias is not None
    assert PatchEmbed(8, 4, embed_dim=4, bias=False).proj.bias is None


def _divisibility_message(h, w, ph, pw):
    return (
        f"image size {h}x{w} is not divisible by patch size {ph}x{pw}; resize the images (e.g. --img-size) "
        "or choose a patch size that divides them"
    )


@pytest.mark.parametrize(
    "img, patch",
    [((30, 32), (4, 4)), ((32, 30), (4, 4)), ((32, 32), (5, 4)), ((32, 32), (4, 6)), ((12, 8), (8, 4))],
)
def test_check_divisible_checks_each_side_on_its_own(img, patch):
    with pytest.raises(ModelError) as e:
        check_divisible(img, patch)
    assert str(e.value) == _divisibility_message(*img, *patch)
    check_divisible((img[0] - img[0] % patch[0], img[1] - img[1] % patch[1]), patch)  # divisible: fine


def test_patch_embed_checks_its_input_and_new_sizes():
    pe = PatchEmbed((16, 24), (4, 8), in_chans=1, embed_dim=4)
    assert pe(torch.randn(1, 1, 8, 16)).shape == (1, 2 * 2, 4)  # another divisible size works
    with pytest.raises(ModelError) as e:
        pe(torch.randn(1, 1, 16, 20))
    assert str(e.value) == _divisibility_message(16, 20, 4, 8)
    with pytest.raises(ModelError) as e:
        PatchEmbed((16, 20), (4, 8))
    assert str(e.value) == _divisibility_message(16, 20, 4, 8)
    pe.set_image_size((12, 32))
    assert (pe.img_size, pe.grid_size, pe.num_patches) == ((12, 32), (3, 4), 12)
    pe.set_image_size(8)
    assert (pe.img_size, pe.grid_size, pe.num_patches) == ((8, 8), (2, 1), 2)
    with pytest.raises(ModelError) as e:
        pe.set_image_size((8, 12))
    assert str(e.value) == _divisibility_message(8, 12, 4, 8)


# ------------------------------------------------------------------------------ position tables
def test_sincos_1d_far_positions_and_temperature():
    """Positions up to 999 show a changed base constant; a custom temperature replaces 10000."""
    for temperature, table in ((10000.0, sincos_1d(1000, 8)), (50.0, sincos_1d(1000, 8, temperature=50.0))):
        assert table.dtype == torch.float32 and table.shape == (1000, 8)
        pos = torch.arange(1000, dtype=torch.float64)[:, None]
        i = torch.arange(4, dtype=torch.float64)
        angle = pos / temperature ** (2 * i / 8)
        torch.testing.assert_close(table[:, 0::2].double(), angle.sin(), atol=1e-6, rtol=0)
        torch.testing.assert_close(table[:, 1::2].double(), angle.cos(), atol=1e-6, rtol=0)
    with pytest.raises(ModelError) as e:
        sincos_1d(4, 7)
    assert str(e.value) == "sinusoidal embedding needs an even dim, got 7"


def _mae_2d_sincos(grid_h, grid_w, dim, temperature=10000.0):
    """MAE's get_2d_sincos_pos_embed layout in numpy terms: [sin x, cos x, sin y, cos y] per position."""
    q = dim // 4
    omega = 1.0 / temperature ** (torch.arange(q, dtype=torch.float64) / q)
    rows = []
    for y in range(grid_h):
        for x in range(grid_w):
            rows.append(
                torch.cat([(x * omega).sin(), (x * omega).cos(), (y * omega).sin(), (y * omega).cos()])
            )
    return torch.stack(rows)


def test_sincos_2d_far_positions_and_temperature():
    for kw in ({}, {"temperature": 30.0}):
        table = sincos_2d(40, 30, 8, **kw)
        assert table.dtype == torch.float32 and table.shape == (1200, 8)
        torch.testing.assert_close(table.double(), _mae_2d_sincos(40, 30, 8, **kw), atol=1e-6, rtol=0)
    with pytest.raises(ModelError) as e:
        sincos_2d(2, 2, 6)
    assert str(e.value) == "2D sin-cos embedding needs dim divisible by 4, got 6"


def test_resample_pos_embed_keeps_the_dtype_and_one_prefix_token_by_default():
    from timm.layers import resample_abs_pos_embed

    g = torch.Generator().manual_seed(0)
    table = torch.randn(1, 1 + 6 * 4, 8, generator=g)
    out = resample_pos_embed(table.bfloat16(), (3, 5), (6, 4))  # downsampling rows (antialiased)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 1 + 15, 8)
    ref = resample_abs_pos_embed(table, [3, 5], [6, 4], num_prefix_tokens=1)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=2e-2)
    assert torch.equal(out[:, 0], table[:, 0].bfloat16())
    ref64 = resample_abs_pos_embed(table.double(), [3, 5], [6, 4], num_prefix_tokens=1)
    torch.testing.assert_close(resample_pos_embed(table.double(), (3, 5), (6, 4)), ref64, atol=1e-6, rtol=0)
    with pytest.raises(ValueError) as e:
        resample_pos_embed(table, (5, 5), (5, 4))
    assert str(e.value) == "pos_embed has 24 patch positions, expected 5x4"
    same = resample_pos_embed(table, [6, 4], (6, 4))  # a list grid equal to the old one: untouched
    assert same is table


def test_defaults_train_exactly_like_eval():
    """No dropout, drop path or LayerScale unless asked: train mode computes what eval mode does."""
    torch.manual_seed(0)
    x = torch.randn(B, L, D)
    ctx = torch.randn(B, 3, D)
    attn = Attention(64)
    assert attn.num_heads == 8 and attn.head_dim == 8 and attn.qkv.bias is not None and not attn.cross
    assert attn.record_attn is False
    for module, args in (
        (Attention(D), (x,)),
        (Block(D, H), (x,)),
        (Mlp(D, 8), (x,)),
        (CrossBlock(D, H), (x, ctx)),
    ):
        torch.testing.assert_close(module.train()(*args), module.eval()(*args))
    blk = Block(D, H)
    assert blk.mlp.fc1.out_features == 4 * D and isinstance(blk.mlp.act, nn.GELU) and blk.norm1.eps == 1e-6
    cb = CrossBlock(D, H)
    assert cb.mlp.fc1.out_features == 4 * D and isinstance(cb.mlp.act, nn.GELU) and cb.norm3.eps == 1e-6
    assert cb.attn.qkv.bias is not None and cb.cross_attn.kv.in_features == D
