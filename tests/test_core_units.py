"""Small unit tests that close one-line bugs the rest of the suite let through (found by planting
them by hand and with mutmut; see scripts/mutation.sh). Each test names the bug it catches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitlens.layers import resample_pos_embed, sincos_1d, sincos_2d


# -- position tables: computed in float64, so long sequences and big grids stay exact ----------------
def test_sincos_1d_is_exact_far_along_the_sequence():
    """Catches float32 positions or frequencies: at position ~4000 their rounding error moves the
    angle by ~1e-4, far above float32's resolution of the table values."""
    length, dim = 4096, 64
    pos = np.arange(length, dtype=np.float64)[:, None]
    freq = np.exp(np.arange(0, dim, 2, dtype=np.float64) * (-math.log(10000.0) / dim))
    expected = np.empty((length, dim))
    expected[:, 0::2], expected[:, 1::2] = np.sin(pos * freq), np.cos(pos * freq)
    table = sincos_1d(length, dim)
    assert table.dtype == torch.float32
    np.testing.assert_allclose(table.numpy(), expected, rtol=0, atol=2e-7)


def test_sincos_2d_is_exact_on_a_large_grid():
    gh, gw, dim = 300, 2, 64  # float32 frequencies would be off by ~1e-5 at row 299
    q = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(q, dtype=np.float64) / q)
    ys, xs = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")
    ox, oy = xs.reshape(-1, 1) * omega, ys.reshape(-1, 1) * omega
    expected = np.concatenate([np.sin(ox), np.cos(ox), np.sin(oy), np.cos(oy)], axis=1)
    np.testing.assert_allclose(sincos_2d(gh, gw, dim).numpy(), expected, rtol=0, atol=2e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_resample_keeps_the_table_dtype(dtype):
    """Catches a dropped ``.to(pos_embed.dtype)``: the interpolation itself runs in float32."""
    table = torch.randn(1, 1 + 9, 4).to(dtype)
    out = resample_pos_embed(table, (4, 4), (3, 3))
    assert out.dtype == dtype
    ref = resample_pos_embed(table.float(), (4, 4), (3, 3)).to(dtype)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_resample_error_names_the_counts():
    with pytest.raises(ValueError, match=r"pos_embed has 12 patch positions, expected 3x5"):
        resample_pos_embed(torch.zeros(1, 1 + 12, 4), (6, 6), (3, 5))


# -- image transforms: the recipe's numbers reach torchvision --------------------------------------
def _ops(tf) -> dict:
    return {type(t).__name__: t for t in tf.transforms}


def test_randaugment_spec_reaches_the_transform_unswapped():
    """Catches num_ops and magnitude swapped (the names-only test cannot see it)."""
    from vitlens.data.transforms import build_transforms

    ra = _ops(build_transforms(True, img_size=32, src_size=32, randaugment="rand-m9-n2"))["RandAugment"]
    assert (ra.num_ops, ra.magnitude) == (2, 9)
    ra = _ops(build_transforms(True, img_size=32, src_size=32, randaugment=(3, 15)))["RandAugment"]
    assert (ra.num_ops, ra.magnitude) == (3, 15)


def test_random_erasing_probability_and_fill():
    """The configured probability, and erased pixels become 0 after Normalize (the dataset mean)."""
    from vitlens.data.transforms import build_transforms

    tf = build_transforms(
        True,
        img_size=32,
        src_size=32,
        random_erasing=1.0,
        hflip=False,
        crop_padding=0,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )
    assert (
        _ops(build_transforms(True, img_size=32, src_size=32, random_erasing=0.3))["RandomErasing"].p == 0.3
    )
    img = torch.full((3, 32, 32), 255, dtype=torch.uint8)  # normalises to (1 - 0.5) / 0.25 = 2
    out = tf(img)
    erased = (out == 0).all(0)
    assert erased.any() and torch.all(out[:, ~erased] == 2.0)  # p=1: always erased, with zeros


@pytest.mark.parametrize("img_size, resized", [(224, 256), (96, 110)])  # round(size / 0.875)
def test_eval_rrc_recipe_resizes_to_size_over_crop_pct_then_center_crops(img_size, resized):
    from vitlens.data.transforms import build_transforms

    ops = _ops(build_transforms(False, img_size=img_size))
    assert list(ops["Resize"].size) == [resized] and tuple(ops["CenterCrop"].size) == (img_size, img_size)
    # and on an image whose pixel value is its column: the crop keeps source columns
    # 100 +- img_size / 2 * (150 / resized) (the short side 150 is resized to `resized`)
    img = torch.arange(200, dtype=torch.uint8).repeat(3, 150, 1)  # (3, 150, 200)
    out = build_transforms(False, img_size=img_size, mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))(img)
    assert out.shape == (3, img_size, img_size)
    half = img_size / 2 * 150 / resized  # 65.6 source columns
    assert out[0, 0, 0].item() == pytest.approx(100 - half, abs=2)
    assert out[0, 0, -1].item() == pytest.approx(100 + half, abs=2)


def test_small_sources_up_to_64px_get_the_pad_recipe():
    from vitlens.data.transforms import SMALL_IMAGE_MAX, build_transforms

    assert SMALL_IMAGE_MAX == 64
    assert "RandomCrop" in _ops(build_transforms(True, img_size=64, src_size=64))
    assert "RandomResizedCrop" in _ops(build_transforms(True, img_size=65, src_size=65))


# -- attention rollout: discard_ratio drops the weakest links ----------------------------------------
def test_rollout_discard_zeroes_the_smallest_entries():
    """Catches ``largest=True`` (the strongest attention thrown away): expected by numpy argsort."""
    from vitlens.analysis.attention import attention_rollout

    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(1, 2, 6, 6, generator=g) * 3, -1)
    a = probs.double().mean(1)[0].numpy()  # heads fused by the mean
    flat = a.reshape(-1).copy()
    flat[np.argsort(flat)[:18]] = 0.0  # discard_ratio 0.5 of 36 entries: the 18 smallest
    m = 0.5 * flat.reshape(6, 6) + 0.5 * np.eye(6)
    expected = m / m.sum(-1, keepdims=True)
    got = attention_rollout([probs], discard_ratio=0.5)[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


# -- translation batches: as full as the token budget allows -----------------------------------------
def test_token_batches_fill_the_budget_exactly():
    """Catches ``>=`` for ``>`` (or an off-by-one in the padded count): batches one sentence short."""
    from vitlens.text.data import token_batches

    assert token_batches([10] * 30, 100) == [list(range(10)), list(range(10, 20)), list(range(20, 30))]
    # sorted by length without a seed; the padded size is longest * count: 3 * 4 = 12 fits, 5 * 3 = 15 not
    lengths = [5, 3, 1, 3, 5, 2]
    assert token_batches(lengths, 12) == [[2, 5, 1, 3], [0, 4]]
    seeded = token_batches([7, 1, 4, 4, 2, 9, 3, 3, 5, 6] * 5, 20, seed=3)
    assert sorted(i for b in seeded for i in b) == list(range(50))
    assert seeded == token_batches([7, 1, 4, 4, 2, 9, 3, 3, 5, 6] * 5, 20, seed=3)


# -- blocks: pre-norm and post-norm composition equal PyTorch's own Transformer layers -----------------
def _copy_self_attn(ours, theirs):
    theirs.in_proj_weight.copy_(ours.qkv.weight)
    theirs.in_proj_bias.copy_(ours.qkv.bias)
    theirs.out_proj.weight.copy_(ours.proj.weight)
    theirs.out_proj.bias.copy_(ours.proj.bias)


def _copy_common(ours, theirs, norms):
    theirs.linear1.load_state_dict(ours.mlp.fc1.state_dict())
    theirs.linear2.load_state_dict(ours.mlp.fc2.state_dict())
    for ours_norm, their_norm in norms:
        their_norm.load_state_dict(ours_norm.state_dict())


def _randomise(module):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():  # norm gains around 1, everything else around 0
            p.copy_(
                torch.randn(p.shape, generator=g) * 0.3 + float(name.startswith("norm") and "weight" in name)
            )


def _torch_layer(cls, dim: int, heads: int, norm_first: bool):
    """PyTorch's own encoder/decoder layer configured as our blocks are (GELU, MLP 2x, eps 1e-6)."""
    return cls(dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True,
               norm_first=norm_first, layer_norm_eps=1e-6).eval()


@pytest.mark.parametrize("norm_first", [True, False])
def test_block_equals_torch_encoder_layer(norm_first):
    """Catches a norm moved or dropped in either the pre-norm (ViT/GPT) or post-norm (BERT) path."""
    from torch import nn

    from vitlens.layers import Block

    D, H = 16, 4
    ours = Block(D, H, mlp_ratio=2.0, norm_first=norm_first).eval()
    _randomise(ours)
    ref = _torch_layer(nn.TransformerEncoderLayer, D, H, norm_first)
    with torch.no_grad():
        _copy_self_attn(ours.attn, ref.self_attn)
        _copy_common(ours, ref, [(ours.norm1, ref.norm1), (ours.norm2, ref.norm2)])
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        causal = nn.Transformer.generate_square_subsequent_mask(5)
        torch.testing.assert_close(ours(x, is_causal=True), ref(x, src_mask=causal), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_first", [True, False])
def test_cross_block_equals_torch_decoder_layer(norm_first):
    """Catches the decoder block's norms dropped or misplaced (the seq2seq tests cannot see it:
    they compare the model with itself, cached against uncached)."""
    from torch import nn

    from vitlens.layers import CrossBlock

    D, H = 16, 4
    ours = CrossBlock(D, H, mlp_ratio=2.0, norm_first=norm_first).eval()
    _randomise(ours)
    ref = _torch_layer(nn.TransformerDecoderLayer, D, H, norm_first)
    with torch.no_grad():
        _copy_self_attn(ours.attn, ref.self_attn)
        ca = ref.multihead_attn  # queries from x; keys and values from the context, in that order
        ca.in_proj_weight.copy_(torch.cat([ours.cross_attn.q.weight, ours.cross_attn.kv.weight]))
        ca.in_proj_bias.copy_(torch.cat([ours.cross_attn.q.bias, ours.cross_attn.kv.bias]))
        ca.out_proj.load_state_dict(ours.cross_attn.proj.state_dict())
        _copy_common(ours, ref, [(ours.norm1, ref.norm1), (ours.norm2, ref.norm2), (ours.norm3, ref.norm3)])
    x, ctx = torch.randn(2, 5, D), torch.randn(2, 7, D)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, ctx), ref(x, ctx, tgt_mask=causal), rtol=1e-5, atol=1e-5)
