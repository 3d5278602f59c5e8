"""Small helpers shared by the model tests."""

from __future__ import annotations

import pytest

from vitlens.models.vit import VisionTransformer, ViTConfig


def raises_exactly(exc, message, fn, *args, **kwargs):
    """The whole message, not a substring: a message with text around it is a different message."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert str(info.value) == message
    return info.value


def tiny_vit(**kw) -> VisionTransformer:
    """The smallest ViT: 8 px images, 4 px patches (2x2 grid), width 16, one block, 3 classes."""
    base = dict(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    return VisionTransformer(ViTConfig(**{**base, **kw}))
