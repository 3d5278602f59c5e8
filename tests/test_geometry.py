"""Geometry: the 2-D layout of position tables and probe maps is rows-then-columns everywhere.

A constant table or a square grid cannot tell rows from columns, so every check here uses a
random table, a non-square grid, or a signal planted off the diagonal.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from vitlens.analysis.probes import localization_probes
from vitlens.layers import resample_pos_embed, sincos_2d


# -- position-table resampling ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "old, new, prefix",
    [((4, 4), (6, 6), 1), ((4, 6), (7, 5), 1), ((3, 5), (5, 3), 0), ((6, 4), (3, 2), 2)],
)
def test_resample_equals_timm_on_a_random_table(old, new, prefix):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1, prefix + old[0] * old[1], 12, generator=g)
    ours = resample_pos_embed(table, new, old, num_prefix_tokens=prefix)
    ref = resample_abs_pos_embed(table, list(new), list(old), num_prefix_tokens=prefix)
    assert ours.shape == (1, prefix + new[0] * new[1], 12)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[:, :prefix], table[:, :prefix], rtol=0, atol=0)  # prefix kept as is


def test_resample_treats_each_channel_as_its_own_image():
    """Channel d of the output is channel d of the input grid, interpolated alone (no mixing of
    channels or positions, as a reshape in place of a permute would cause)."""
    old, new = (4, 6), (8, 3)
    table = torch.randn(1, 1 + 24, 5)
    out = resample_pos_embed(table, new, old)
    for d in range(5):
        img = table[0, 1:, d].reshape(1, 1, *old)  # row-major patch order -> (H, W) image
        ref = F.interpolate(img, size=new, mode="bicubic", align_corners=False, antialias=True)
        torch.testing.assert_close(out[0, 1:, d], ref.flatten(), rtol=0, atol=1e-6)


def test_resampled_sincos_keeps_rows_and_columns_apart():
    """A 2-D sin-cos table (first half: column code, second half: row code) resampled to a grid
    twice as wide keeps each row's row code constant along the row."""
    table = sincos_2d(4, 4, 16)[None]
    out = resample_pos_embed(table, (4, 8), (4, 4), num_prefix_tokens=0).view(4, 8, 16)
    row_code = out[..., 8:]  # depends on the row only
    torch.testing.assert_close(row_code, row_code[:, :1].expand(4, 8, 8), rtol=0, atol=1e-5)
    col_code = out[..., :8]
    assert (col_code[:, 0] - col_code[:, -1]).abs().max() > 0.1  # and the column code varies along it


def test_model_set_image_size_resamples_like_timm():
    import vitlens

    model = vitlens.create_model("vit_micro_patch4_32", depth=1)
    with torch.no_grad():
        model.pos_embed.normal_()  # random, not the tiny init
    old = model.pos_embed.detach().clone()
    model.set_image_size((32, 48))
    ref = resample_abs_pos_embed(old, [8, 12], [8, 8], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), ref, rtol=0, atol=1e-6)


# -- probe maps: a CNN feature map is read row-major -------------------------------------------------
K = 4  # classes
H, W = 3, 5  # a non-square map
SIGNAL_AT = (1, 3)  # row 1, column 3: off the diagonal, and (3, 1) does not even exist


class OneHotSpot(nn.Module):
    """A (B, K, H, W) feature map that holds the class one-hot at one pixel and noise elsewhere."""

    def __init__(self):
        super().__init__()
        self.fmap = nn.Identity()

    def forward(self, onehot):
        B = onehot.shape[0]
        m = 0.3 * torch.randn(B, K, H, W)
        m[:, :, SIGNAL_AT[0], SIGNAL_AT[1]] += 3 * onehot
        self.fmap(m)
        return onehot


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    return [(F.one_hot(y, K).float(), y)]


@pytest.mark.parametrize("class_probe", ["shared", "per_position"])
def test_cnn_probe_map_is_row_major(class_probe):
    res = localization_probes(OneHotSpot(), _data(256, 0), _data(256, 1), ["fmap"], class_probe=class_probe)
    r = res["fmap"]
    cmap = torch.as_tensor(r["class_acc_map"])
    assert r["grid_size"] == (H, W) and cmap.shape == (H, W)
    assert cmap[SIGNAL_AT] > 0.95  # the class is read where it was planted...
    others = cmap.clone()
    others[SIGNAL_AT] = 0
    assert others.max() < 0.5  # ...and nowhere else (chance 0.25)


class TokenSpot(nn.Module):
    """A ViT-like model on a 3x5 patch grid: one (B, 1 + 15, K) token layer ([CLS] first) whose
    patch token at (row 1, column 3) - sequence index 1 + 1 * 5 + 3 - holds the class one-hot."""

    num_prefix_tokens = 1

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.grid_size, self.patch_embed.patch_size = (H, W), (4, 4)
        self.tokens = nn.Identity()

    def forward(self, onehot):
        B = onehot.shape[0]
        t = 0.3 * torch.randn(B, 1 + H * W, K)
        t[:, 0] += 3 * onehot  # [CLS] knows the class too: it must be left out, not read as patch 0
        t[:, 1 + SIGNAL_AT[0] * W + SIGNAL_AT[1]] += 3 * onehot
        self.tokens(t)
        return onehot


def test_vit_token_probe_map_is_row_major_on_the_patch_grid():
    r = localization_probes(TokenSpot(), _data(256, 0), _data(256, 1), ["tokens"])["tokens"]
    cmap = torch.as_tensor(r["class_acc_map"])
    assert r["grid_size"] == (H, W) and cmap.shape == (H, W)
    assert cmap[SIGNAL_AT] > 0.95
    others = cmap.clone()
    others[SIGNAL_AT] = 0
    assert others.max() < 0.5
