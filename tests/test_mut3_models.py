"""Round-3 mutation gaps in models/: checkpoint interop (convert.py), peer names (hub.py), the
unknown-name error (loading.py), peer ResNet configs, the hybrid tokenizer, the uniform palette and
ViT.set_image_size. Whole messages are compared (the UX contract); numbers against timm or by hand.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _models import tiny_vit as _tiny_vit
from torch import nn

from vitlens.errors import CheckpointError, ModelError
from vitlens.models.convert import convert_state_dict, detect_format, load_state_dict_into


# ----------------------------------------------------------------------------- convert.py
def test_detect_format_unknown_layout_whole_message():
    sd = {"a.weight": torch.zeros(1), "b.bias": torch.zeros(1)}
    with pytest.raises(CheckpointError) as e:
        detect_format(sd)
    assert str(e.value) == (
        "unrecognised checkpoint layout (first keys: a.weight, b.bias); vitlens reads timm or "
        "torchvision ViTs, Hugging Face ViTForImageClassification, torchvision/timm ResNets and "
        "its own files"
    )


def test_position_table_into_a_model_without_positions_is_an_unexpected_key_not_a_crash():
    # A learned-position checkpoint (2x2 grid) into a pos_embed='none' model of another grid: the
    # table is simply not used (warned about with strict=False), the rest loads.
    src = _tiny_vit()
    model = _tiny_vit(img_size=12, pos_embed="none")
    with pytest.warns(UserWarning) as rec:
        load_state_dict_into(model, src.state_dict(), strict=False)
    assert [str(w.message) for w in rec] == [
        "loading state dict with strict=False: 0 missing keys (), 1 unexpected keys (pos_embed)"
    ]
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_position_table_is_not_resampled_for_a_fixed_sincos_model():
    src = _tiny_vit()  # learned 2x2 table
    model = _tiny_vit(img_size=12, pos_embed="sincos2d")  # 3x3 grid, fixed buffer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "resampling ..." warning either
        sd = convert_state_dict(src.state_dict(), "timm_vit", model)
    assert torch.equal(sd["pos_embed"], src.pos_embed.detach())


def _mismatch_error(model, sd) -> str:
    with pytest.raises(CheckpointError) as e:
        load_state_dict_into(model, sd)
    return str(e.value)


@pytest.mark.parametrize("n_bad", [20, 21])
def test_mismatch_message_lists_twenty_then_counts_the_rest(n_bad):
    model = _tiny_vit(depth=2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    block_keys = [k for k in sd if k.startswith("blocks.")]
    assert len(block_keys) == 24
    lines = ["checkpoint state dict (timm_vit layout) does not fit model VisionTransformer:"]
    for k in block_keys[:n_bad]:
        shape = tuple(sd[k].shape)
        sd[k] = torch.zeros(shape[0] + 1, *shape[1:])
        if len(lines) <= 20:
            lines.append(f"  {k}: checkpoint {(shape[0] + 1, *shape[1:])} vs model {shape}")
    if n_bad == 21:
        lines.append("  ... and 1 more shape mismatches")
    # same depth on both sides: no depth hint
    assert _mismatch_error(model, sd) == "\n".join(lines)


def test_hints_no_depth_hint_when_the_checkpoint_has_no_blocks():
    model = _tiny_vit(num_classes=3)
    sd = {k: v for k, v in _tiny_vit(num_classes=5).state_dict().items() if not k.startswith("blocks.")}
    msg = _mismatch_error(model, sd)
    assert "depth=" not in msg  # ckpt depth 0: unknown, not "pass depth=0"
    assert msg.splitlines()[1:3] == [
        "  head.weight: checkpoint (5, 16) vs model (3, 16)",
        "  head.bias: checkpoint (5,) vs model (3,)",
    ]


def test_strict_head_false_drops_a_classifier_head_for_a_headless_model():
    # A classifier checkpoint into a feature extractor (num_classes=0): the head is left out.
    src = _tiny_vit(num_classes=3)
    model = _tiny_vit(num_classes=0)
    with pytest.warns(UserWarning) as rec:
        load_state_dict_into(model, src.state_dict(), strict_head=False)
    assert [str(w.message) for w in rec] == [
        "checkpoint head [(3, 16), (3,)] does not fit the model; keeping the model's newly "
        "initialised head (strict_head=False)"
    ]
    assert torch.equal(model.norm.weight, src.norm.weight)
    with pytest.warns(UserWarning):
        sd = convert_state_dict(src.state_dict(), "timm_vit", model, strict_head=False)
    assert "head.weight" not in sd and "head.bias" not in sd


# ----------------------------------------------------------------------------- hub.py, loading.py
def test_peer_name_with_a_second_colon_gives_the_clean_unknown_model_error():
    from vitlens.models.hub import create_peer_model

    with pytest.raises(ModelError) as e:
        create_peer_model("timm:zz:zz")
    assert str(e.value) == "timm has no model 'zz:zz'; see timm.list_models('zz:zz*')"


def test_unknown_model_without_close_names_whole_message():
    from vitlens.models.loading import create_model

    with pytest.raises(ModelError) as e:
        create_model("qqqqqqqq")
    assert str(e.value) == (
        "unknown model 'qqqqqqqq'. It is neither a run directory, a checkpoint file, a registered "
        "model (`vitlens models` lists them) nor timm:NAME / torchvision:NAME / hf:REPO"
    )


# ----------------------------------------------------------------------------- peer_config.py
def test_bottleneck_resnet_with_a_biased_conv3_is_not_expressible():
    from torchvision.models.resnet import Bottleneck, ResNet

    from vitlens.models.peer_config import resnet_config

    m = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=3)
    assert resnet_config(m) is not None  # the plain one is
    blk = m.layer2[0]
    blk.conv3 = nn.Conv2d(blk.conv3.in_channels, blk.conv3.out_channels, 1, bias=True)
    assert resnet_config(m) is None  # a bias vitlens' Bottleneck does not have


# ----------------------------------------------------------------------------- hybrid tokenizer
def test_hybrid_grid_counts_tokens_along_the_height_of_a_non_square_image():
    m = _tiny_vit(img_size=(16, 32), tokenizer="hybrid",
                  tokenizer_args=dict(layers=(1, 1, 1), widths=(4, 4, 4), grid=4))
    # cifar stem, 3 stages: stride 4 -> a 4x8 feature map; 4 tokens along the height: patch 1
    assert tuple(m.patch_embed.grid_size) == (4, 8)
    assert m(torch.zeros(1, 3, 16, 32)).shape == (1, 3)


def test_hybrid_vit_unbatched_image_of_the_wrong_size_names_its_size():
    m = _tiny_vit(img_size=16, tokenizer="hybrid", tokenizer_args=dict(layers=(1,), widths=(4,)))
    with pytest.raises(ModelError) as e:
        m(torch.zeros(3, 8, 8))
    assert str(e.value) == (
        "VisionTransformer expects a batch of images (B, 3, H, W), got shape (3, 8, 8); add the batch "
        "dimension with x.unsqueeze(0)"
    )


# ----------------------------------------------------------------------------- palette
def test_uniform_palette_is_float32_like_a_saved_one_whatever_the_default_dtype():
    from vitlens.models.tokenizers.palette import uniform_palette

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pal = uniform_palette(8)
    finally:
        torch.set_default_dtype(old)
    assert pal.dtype == torch.float32  # save_palette stores float32: fixed and loaded palettes agree
    centres = [63.5, 191.5]  # (i + 0.5) * 256/2 - 0.5
    expected = torch.tensor([[r, g, b] for r in centres for g in centres for b in centres])
    assert torch.equal(pal, expected)


# ----------------------------------------------------------------------------- ViT.set_image_size
@pytest.mark.parametrize("kw, prefix", [(dict(distilled=True), 2), (dict(class_token=False, pool="gap"), 0)])
def test_set_image_size_keeps_every_prefix_row_like_timm(kw, prefix):
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    m = _tiny_vit(**kw)  # 2x2 grid
    assert m.num_pos_prefix == prefix
    table = torch.randn_like(m.pos_embed)
    with torch.no_grad():
        m.pos_embed.copy_(table)
    m.set_image_size(16)  # 4x4 grid
    ref = resample_abs_pos_embed(table, [4, 4], [2, 2], num_prefix_tokens=prefix)
    assert m.pos_embed.shape == (1, prefix + 16, 16)
    torch.testing.assert_close(m.pos_embed.detach(), ref, atol=1e-5, rtol=1e-5)
