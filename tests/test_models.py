"""Models: shapes of every registered model, ViT pooling / resizing / registers, clear errors,
and a tiny-batch overfit on real CIFAR-10 images for the two quickstart models."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import vitlens
from vitlens.errors import ModelError
from vitlens.models import ResNet, ResNetConfig, VisionTransformer, ViTConfig, registry
from vitlens.models.bert import Bert
from vitlens.models.gpt import GPT
from vitlens.models.resnet_fast import ResNetFast
from vitlens.models.seq2seq import Seq2SeqTransformer


# -- every registered model: output shapes on small inputs ----------------------------------------------
def _small_enough(name: str) -> dict:
    """Overrides that keep an ImageNet-scale row fast: 2 blocks on a 4x4 grid, one block per stage."""
    try:
        cfg = registry.model_config_class(name)(**registry.model_defaults(name))
    except ModelError:  # a builder without a config class
        return {}
    if isinstance(cfg, ViTConfig) and cfg.img_size > 64 and cfg.tokenizer == "patch":
        return dict(depth=2, img_size=4 * cfg.patch_size)
    if isinstance(cfg, ResNetConfig) and sum(cfg.layers) > 8:
        return dict(layers=(1,) * len(cfg.layers))
    return {}


@pytest.mark.parametrize("name", vitlens.list_models())
def test_registered_model_shapes(name):
    model = vitlens.create_model(name, **_small_enough(name)).eval()
    assert model.model_name == name
    with torch.no_grad():
        if isinstance(model, VisionTransformer):
            size = model.patch_embed.img_size
            out = model(torch.randn(2, model.cfg.in_chans, *size))
            assert out.shape == (2, model.cfg.num_classes or model.num_features)  # 0 classes: features
            tokens = model.num_prefix_tokens + model.patch_embed.num_patches
            feats = model.forward_features(torch.randn(1, 3, *size))
            assert feats.shape == (1, tokens, model.cfg.embed_dim)
        elif isinstance(model, (ResNet, ResNetFast)):
            out = model(torch.randn(2, model.cfg.in_chans, 32, 32))
            assert out.shape == (2, model.cfg.num_classes)
            pooled = model.forward_head(model.forward_features(torch.randn(2, 3, 32, 32)), pre_logits=True)
            assert pooled.shape == (2, model.num_features)
        elif isinstance(model, GPT):
            out = model(torch.randint(0, model.cfg.vocab_size, (2, 9)))
            assert out.shape == (2, 9, model.cfg.vocab_size)
        elif isinstance(model, Bert):
            ids = torch.randint(1, model.cfg.vocab_size, (2, 9))
            out = model(ids)
            assert out.shape == (2, model.cfg.num_classes or model.cfg.embed_dim)
            assert model.forward_mlm(model.forward_features(ids)).shape == (2, 9, model.cfg.vocab_size)
        elif isinstance(model, Seq2SeqTransformer):
            src = torch.randint(1, model.cfg.src_vocab_size, (2, 7))
            tgt = torch.randint(1, model.cfg.tgt_vocab_size, (2, 5))
            out = model(src, tgt)
            assert out.shape == (2, 5, model.cfg.tgt_vocab_size)
        else:
            pytest.fail(f"no shape check for {type(model).__name__}: add one")
    assert torch.isfinite(out).all()


# -- ViT internals -------------------------------------------------------------------------------------
def _capture(model, x, name: str) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return seen[0], logits


def _micro(**kw) -> VisionTransformer:
    return vitlens.create_model("vit_micro_patch4_32", depth=2, **kw).eval()


@torch.no_grad()
def test_cls_pooling_reads_token_0_after_norm():
    model = _micro(num_registers=2)
    x = torch.randn(2, 3, 32, 32)
    pre, logits = _capture(model, x, "hook_pre_logits")
    feats = model.forward_features(x)  # (B, 1 + 2 + 64, D), after the final norm
    torch.testing.assert_close(pre, feats[:, 0])
    torch.testing.assert_close(logits, model.head(pre))


@torch.no_grad()
def test_gap_pooling_averages_patch_tokens_then_fc_norm():
    model = _micro(pool="gap", num_registers=2)
    x = torch.randn(2, 3, 32, 32)
    pre, logits = _capture(model, x, "hook_pre_logits")
    tokens = model.forward_features(x)  # no final norm on tokens with GAP (timm: fc_norm after pooling)
    assert isinstance(model.norm, torch.nn.Identity)
    expected = model.fc_norm(tokens[:, 3:].mean(dim=1))  # patches only: [CLS] and 2 registers excluded
    torch.testing.assert_close(pre, expected)
    torch.testing.assert_close(logits, model.head(pre))
    assert not torch.allclose(pre, model.fc_norm(tokens.mean(dim=1)))


@torch.no_grad()
def test_registers():
    for kw, prefix in [(dict(num_registers=4), 5), (dict(num_registers=3, class_token=False, pool="gap"), 3)]:
        model = _micro(**kw)
        assert model.num_prefix_tokens == prefix
        assert model.reg_token.shape == (1, kw["num_registers"], 128)
        assert model.pos_embed.shape[1] == 64 + int(model.cfg.class_token)  # registers carry no position
        x = torch.randn(2, 3, 32, 32)
        assert model.forward_features(x).shape == (2, prefix + 64, 128)
        assert model(x).shape == (2, 10)


@torch.no_grad()
def test_set_image_size():
    model = _micro()
    x = torch.randn(2, 3, 32, 32)
    before, pos = model(x), model.pos_embed.detach().clone()
    model.set_image_size(32)  # same size: identity
    torch.testing.assert_close(model.pos_embed, pos)
    torch.testing.assert_close(model(x), before)
    model.set_image_size(48)
    assert model.pos_embed.shape == (1, 1 + 12 * 12, 128) and model.grid_size == (12, 12)
    torch.testing.assert_close(model.pos_embed[:, 0], pos[:, 0])  # [CLS] position untouched
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 10)
    with pytest.raises(ValueError, match="set_image_size"):
        model(x)  # the old size no longer fits
    fixed = _micro(pos_embed="sincos2d")
    fixed.set_image_size(48)  # a fixed table is recomputed for the new grid, not interpolated
    torch.testing.assert_close(fixed.pos_embed, _micro(pos_embed="sincos2d", img_size=48).pos_embed)


# -- clear errors ---------------------------------------------------------------------------------------
def test_clear_errors():
    with pytest.raises(ValueError, match=r"30x30 is not divisible by patch size 4x4"):
        vitlens.create_model("vit_micro_patch4_32", img_size=30)
    model = _micro()
    with pytest.raises(ValueError, match=r"30x30 is not divisible by patch size 4x4"):
        model(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"built for 32x32 images, got 64x64.*set_image_size"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"expects a batch of images \(B, 3, H, W\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"built for 3-channel images, got 1-channel images.*in_chans=1"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"unknown model 'vit_micro_patch4_23'.*mean vit_micro_patch4_32"):
        vitlens.create_model("vit_micro_patch4_23")
    with pytest.raises(ValueError, match=r"unknown model 'resnet_18'.*resnet18"):
        vitlens.create_model("resnet_18")
    with pytest.raises(ValueError, match=r"built for 3-channel images, got 1-channel images"):
        vitlens.create_model("resnet8_cifar")(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="pool must be"):
        _micro(pool="max")


# -- tiny-batch overfit on real images ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cifar() -> tuple[torch.Tensor, torch.Tensor]:
    """64 real CIFAR-10 training images (6-7 per class) from the embedded subset, normalised."""
    from vitlens.data import CIFAR10_MEAN, CIFAR10_STD, build_dataset

    ds = build_dataset("cifar10-mini", "train", cache_dir=False)
    targets = torch.tensor(ds.targets)
    idx = torch.cat([torch.nonzero(targets == c).flatten()[:7] for c in range(10)])[:64]
    x = ds.images[idx].float() / 255
    x = (x - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[:, None, None]
    return x, targets[idx]


@pytest.mark.parametrize("name,lr", [("vit_micro_patch4_32", 1e-3), ("resnet8_cifar", 3e-3)])
def test_overfits_a_tiny_batch(name, lr, tiny_cifar):
    x, y = tiny_cifar
    model = vitlens.create_model(name).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start, acc, step = time.perf_counter(), 0.0, 0
    for step in range(80):  # noqa: B007 - step is reported below
        logits = model(x)  # full batch; train accuracy is read off the training forward pass
        acc = (logits.argmax(1) == y).float().mean().item()
        if acc >= 0.99:
            break
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"{name}: train accuracy {acc:.3f} after {step} AdamW steps, {time.perf_counter() - start:.1f} s")
    assert acc >= 0.99, f"{name} reached only {acc:.2f} train accuracy on 64 images in {step} steps"
