"""ViT token layout: [CLS] first, then the registers, then the patches; position only on [CLS] + patches.

Checked two independent ways: token by token against hand-set [CLS] / register / position
values, and end to end against timm's ``VisionTransformer`` with ``reg_tokens`` and a [CLS]
head (where a register read as [CLS] would change the logits).
"""

from __future__ import annotations

import pytest
import timm
import torch

import vitlens

D, GRID = 128, 64  # vit_micro_patch4_32: width, patches of a 32 px image


def _micro(**kw):
    return vitlens.create_model("vit_micro_patch4_32", depth=2, **kw).eval()


def _set_prefix(model, seed=0):
    """Distinct, recognisable values for [CLS], registers and the position table."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if model.cls_token is not None:
            model.cls_token.copy_(torch.randn(1, 1, D, generator=g) + 5.0)
        if model.reg_token is not None:
            model.reg_token.copy_(torch.randn(model.reg_token.shape, generator=g) - 5.0)
        model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=g))


@torch.no_grad()
@pytest.mark.parametrize("class_token", [True, False])
def test_registers_come_after_cls_and_carry_no_position(class_token):
    kw = dict(num_registers=3) if class_token else dict(num_registers=3, class_token=False, pool="gap")
    model = _micro(**kw)
    _set_prefix(model)
    x = torch.randn(2, 3, 32, 32)
    seen = []
    handle = model.hook_embed.register_forward_hook(lambda m, i, o: seen.append(o))
    model(x)
    handle.remove()
    tokens = seen[0]  # the residual stream entering block 0
    patches = model.patch_embed(x)  # (B, 64, D)
    pos = model.pos_embed[0]  # (int(class_token) + 64, D)
    expected = []
    if class_token:
        expected.append((model.cls_token[0] + pos[:1]).expand(2, 1, D))  # token 0: [CLS] + its position
    expected.append(model.reg_token.expand(2, 3, D))  # then the 3 registers, no position added
    expected.append(patches + pos[int(class_token) :])  # then the patches in raster order
    expected = torch.cat(expected, dim=1)
    assert tokens.shape == (2, int(class_token) + 3 + GRID, D)
    torch.testing.assert_close(tokens, expected)


@torch.no_grad()
def test_cls_head_with_registers_equals_timm():
    """timm with reg_tokens and no_embed_class lays tokens out as [CLS], registers, patches and
    pools token 0: our [CLS]-plus-position becomes its class token, our patch positions its table."""
    ours = _micro(num_registers=2)
    _set_prefix(ours, seed=1)
    with torch.no_grad():
        ours.head.weight.normal_(0, 0.05)
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=32,
        patch_size=4,
        embed_dim=D,
        depth=2,
        num_heads=4,
        mlp_ratio=2.0,
        num_classes=10,
        reg_tokens=2,
        no_embed_class=True,
        class_token=True,
        global_pool="token",
    ).eval()
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    sd["cls_token"] = ours.cls_token + ours.pos_embed[:, :1]
    sd["pos_embed"] = ours.pos_embed[:, 1:]
    ref.load_state_dict(sd)  # strict: the remaining names are timm's
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    # the comparison can see token order: with the registers first, timm's logits differ
    swapped = ref.state_dict()
    swapped["cls_token"], swapped["reg_token"] = (
        swapped["reg_token"][:, :1].clone(),
        torch.cat([swapped["cls_token"], swapped["reg_token"][:, 1:]], dim=1),
    )
    ref.load_state_dict(swapped)
    assert not torch.allclose(ours(x), ref(x), atol=1e-3)


@torch.no_grad()
def test_num_prefix_tokens_and_pooling_skip_exactly_cls_and_registers():
    model = _micro(pool="gap", num_registers=2)
    feats = torch.randn(2, 1 + 2 + GRID, D)
    feats[:, :3] = 1e3  # prefix tokens: any leak into the patch average shows
    torch.testing.assert_close(model.pool(feats), feats[:, 3:].mean(1))
    cls_model = _micro(num_registers=2)
    torch.testing.assert_close(cls_model.pool(feats), feats[:, 0])
