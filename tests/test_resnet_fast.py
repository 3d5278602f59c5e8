"""ResNet-9 (Page's DAWNBench net) for the fast GPU recipe: shape, size and head, counted by hand."""

from __future__ import annotations

import pytest
import torch

from vitlens.errors import ModelError
from vitlens.models import create_model


def _page_resnet9_params(w=(64, 128, 256, 512), classes=10) -> int:
    """Conv 3x3 weights (no bias) + BN scale/shift per conv, and a bias-free linear head."""
    convs = [
        (3, w[0]),
        (w[0], w[1]),
        (w[1], w[1]),
        (w[1], w[1]),
        (w[1], w[2]),
        (w[2], w[3]),
        (w[3], w[3]),
        (w[3], w[3]),
    ]
    return sum(9 * cin * cout + 2 * cout for cin, cout in convs) + w[3] * classes


def test_resnet9_matches_pages_architecture():
    model = create_model("resnet9_fast")
    assert sum(p.numel() for p in model.parameters()) == _page_resnet9_params() == 6_573_120
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 512, 4, 4)  # three max-pools: 32 -> 4
    pooled = model.forward_head(feats, pre_logits=True)
    assert torch.equal(pooled, feats.amax(dim=(2, 3)))  # global max-pool
    assert torch.allclose(model(x), model.fc(pooled) * 0.125)


def test_resnet9_variants_and_errors():
    half = create_model("resnet9_fast_half", num_classes=100)
    assert sum(p.numel() for p in half.parameters()) == _page_resnet9_params((32, 64, 128, 256), 100)
    with pytest.raises(ModelError, match="widths"):
        create_model("resnet9_fast", widths=[64, 128])
    with pytest.raises(ModelError, match="act"):
        create_model("resnet9_fast", act="swish")
