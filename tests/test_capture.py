"""Activation capture: default layers, hook lifetime, detaching, token policies."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from vitlens.analysis import (
    ActivationCapture,
    default_layers,
    infer_num_prefix_tokens,
    layer_prefix_tokens,
    reduce_activation,
)


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    # timm's vit_tiny at CIFAR size, random init: 12 blocks, D=192, 1 + 64 tokens
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10).eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10).eval()


def images(b: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, size, size)


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# --------------------------------------------------------------------------- default layers
def test_default_layers_vit(vit):
    assert default_layers(vit) == ["patch_embed"] + [f"blocks.{i}" for i in range(12)]


def test_default_layers_resnets(resnet):
    expected = ["maxpool"] + [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert default_layers(resnet) == expected
    r50 = torchvision.models.resnet50()
    blocks = [n for n in default_layers(r50) if n != "maxpool"]
    assert len(blocks) == 16 and blocks[0] == "layer1.0" and blocks[-1] == "layer4.2"


def test_default_layers_huggingface_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=32,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
    )
    hf = ViTForImageClassification(cfg).eval()
    layers = default_layers(hf)
    assert len(layers) == 4 and layers[0] == "vit.embeddings"
    assert all(n.startswith(("vit.layers.", "vit.encoder.layer.")) for n in layers[1:])
    assert infer_num_prefix_tokens(hf) == 1
    with ActivationCapture(hf, layers, "cls") as cap:
        acts = cap.run(images(2))  # HF layers may return tuples: the hook takes element 0
    assert [a.shape for a in acts.values()] == [torch.Size([2, 32])] * 4


def test_default_layers_vitlens_models():
    import vitlens.models as vm

    vit = vm.create_model("vit_micro_patch4_32", num_classes=10).eval()
    layers = default_layers(vit)
    assert layers[0] == "patch_embed" and layers[1:] == [f"blocks.{i}" for i in range(len(vit.blocks))]
    assert infer_num_prefix_tokens(vit) == vit.num_prefix_tokens
    cnn = vm.create_model("resnet8_cifar", num_classes=10).eval()
    assert default_layers(cnn) == ["maxpool", "layer1.0", "layer2.0", "layer3.0"]  # 3-stage CIFAR ResNet
    with ActivationCapture(vit, token_policy="mean") as cv, ActivationCapture(cnn, token_policy="mean") as cc:
        assert all(a.dim() == 2 and a.shape[0] == 2 for a in cv.run(images(2)).values())
        assert all(a.dim() == 2 and a.shape[0] == 2 for a in cc.run(images(2)).values())


def test_default_layers_unknown_model_asks_for_layers():
    with pytest.raises(ValueError, match="pass layers=\\[...\\] explicitly"):
        default_layers(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


# --------------------------------------------------------------------------- hooks
def test_hooks_removed_after_context_even_on_error(vit):
    before = all_hooks(vit)
    with ActivationCapture(vit) as cap:
        assert all_hooks(vit) == before + 13
        cap.run(images())
    assert all_hooks(vit) == before and cap.activations == {}
    with pytest.raises(RuntimeError, match="boom"), ActivationCapture(vit):
        raise RuntimeError("boom")
    assert all_hooks(vit) == before


def test_run_outside_context_is_an_error(vit):
    with pytest.raises(RuntimeError, match="inside `with ActivationCapture"):
        ActivationCapture(vit, ["blocks.0"]).run(images())


def test_unknown_layer_lists_close_names(vit):
    with pytest.raises(ValueError, match=r"no module named 'block.3' \(did you mean 'blocks.3'"):
        ActivationCapture(vit, ["block.3"])
    with pytest.raises(ValueError, match="duplicate"):
        ActivationCapture(vit, ["blocks.0", "blocks.0"])
    with pytest.raises(ValueError, match="empty"):
        ActivationCapture(vit, [])


def test_activations_are_detached_even_with_grad_enabled(vit):
    with ActivationCapture(vit, ["blocks.0", "norm"]) as cap:
        with torch.enable_grad():
            vit(images())  # a plain forward with autograd on; hooks still store detached tensors
        acts = cap.collect()
    for a in acts.values():
        assert not a.requires_grad and a.grad_fn is None


def test_only_current_batch_is_kept(vit):
    with ActivationCapture(vit, ["blocks.5"], "cls") as cap:
        first = cap.run(images(4))["blocks.5"]
        second = cap.run(images(2))["blocks.5"]
        assert first.shape == (4, 192) and second.shape == (2, 192)
        assert list(cap.activations) == ["blocks.5"]


def test_unused_module_is_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    with (
        ActivationCapture(Net(), ["used", "unused"]) as cap,
        pytest.raises(RuntimeError, match="did not run"),
    ):
        cap.run(torch.randn(2, 4))


def test_module_called_twice_warns(resnet):
    with ActivationCapture(resnet, ["layer1.0.relu"]) as cap, pytest.warns(UserWarning, match="ran 2 times"):
        cap.run(images(2))  # torchvision's BasicBlock reuses one ReLU twice


def test_stored_view_survives_later_inplace_op(resnet):
    # torchvision applies ReLU(inplace=True) to bn1's output right after the hook fires
    with ActivationCapture(resnet, ["bn1"], "flatten") as cap:
        act = cap.run(images(2))["bn1"]
    assert (act < 0).any()  # still the pre-ReLU values


def test_tuple_outputs_take_first_element():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, "extra"

    model = nn.Sequential(Pair())
    with ActivationCapture(model, ["0"]) as cap:
        x = torch.randn(3, 5)
        assert torch.equal(cap.run(x)["0"], 2 * x)


# --------------------------------------------------------------------------- token policies
def test_token_policy_shapes_vit(vit):
    x = images(2)
    layers = ["patch_embed", "blocks.3"]
    with ActivationCapture(vit, layers, "flatten") as cap:
        acts = cap.run(x)
    assert acts["patch_embed"].shape == (2, 64 * 192) and acts["blocks.3"].shape == (2, 65 * 192)
    with ActivationCapture(vit, layers, "mean") as cap:
        acts = cap.run(x)
    assert acts["patch_embed"].shape == (2, 192) and acts["blocks.3"].shape == (2, 192)
    with ActivationCapture(vit, ["blocks.3"], "cls") as cap:
        assert cap.run(x)["blocks.3"].shape == (2, 192)
    with (
        ActivationCapture(vit, ["patch_embed"], "cls") as cap,
        pytest.raises(ValueError, match="without a class"),
    ):
        cap.run(x)


def test_token_policy_values_exclude_prefix_tokens(vit):
    x = images(2)
    raw = {}
    handle = vit.blocks[2].register_forward_hook(lambda m, i, o: raw.setdefault("out", o.detach().clone()))
    try:
        with (
            ActivationCapture(vit, ["blocks.2"], "mean") as cm,
            ActivationCapture(vit, ["blocks.2"], "cls") as cc,
        ):
            vit(x)
            mean, cls = cm.collect()["blocks.2"], cc.collect()["blocks.2"]
    finally:
        handle.remove()
    assert layer_prefix_tokens(vit, "blocks.2") == 1 and layer_prefix_tokens(vit, "patch_embed") == 0
    assert torch.allclose(mean, raw["out"][:, 1:].mean(1))
    assert torch.equal(cls, raw["out"][:, 0])


def test_token_policy_shapes_resnet(resnet):
    x = images(2)
    with ActivationCapture(resnet, ["layer2.1", "layer4.1"], "flatten") as cap:
        acts = cap.run(x)
    assert acts["layer2.1"].shape == (2, 128 * 4 * 4) and acts["layer4.1"].shape == (2, 512 * 1 * 1)
    with ActivationCapture(resnet, ["layer2.1"], "mean") as cap:
        assert cap.run(x)["layer2.1"].shape == (2, 128)
    with (
        ActivationCapture(resnet, ["layer2.1"], "cls") as cap,
        pytest.raises(ValueError, match="feature map"),
    ):
        cap.run(x)


def test_reduce_activation_unit():
    t3 = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    assert torch.equal(reduce_activation(t3, "all"), t3.flatten(1))
    assert torch.equal(reduce_activation(t3, "mean", num_prefix_tokens=2), t3[:, 2:].mean(1))
    assert torch.equal(reduce_activation(t3, "cls", num_prefix_tokens=1), t3[:, 0])
    t4 = torch.randn(2, 4, 3, 3)
    assert torch.allclose(reduce_activation(t4, "mean"), t4.mean((2, 3)))
    v = torch.randn(2, 7)
    assert reduce_activation(v, "cls") is v  # vectors pass through
    assert reduce_activation(t3, lambda t: t[:, -1]).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown token policy"):
        reduce_activation(t3, "max")
    with pytest.raises(ValueError, match="patch tokens after the 5 prefix"):
        reduce_activation(t3, "mean", num_prefix_tokens=5)
    with pytest.raises(ValueError, match="cannot reduce"):
        reduce_activation(torch.randn(2, 1, 2, 2, 2), "flatten")


def test_prefix_tokens_with_registers():
    reg = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, reg_tokens=4, depth=1)
    assert infer_num_prefix_tokens(reg) == 5
    assert infer_num_prefix_tokens(torchvision.models.resnet18()) == 0
    with ActivationCapture(reg, ["blocks.0"], "mean", num_prefix_tokens={"blocks.0": 3}) as cap:
        assert cap.prefix["blocks.0"] == 3


def test_patch_embedding_submodules_have_no_prefix_tokens(vit):
    assert layer_prefix_tokens(vit, "patch_embed") == 0
    assert layer_prefix_tokens(vit, "patch_embed.proj") == layer_prefix_tokens(vit, "patch_embed.norm") == 0
    assert layer_prefix_tokens(vit, "blocks.0.norm1") == 1


def test_cls_policy_default_layers_skip_the_patch_embedding(vit):
    assert default_layers(vit, "cls") == [f"blocks.{i}" for i in range(12)]
    with ActivationCapture(vit, None, "cls") as cap:
        assert list(cap.run(images(2))) == [f"blocks.{i}" for i in range(12)]


def test_captured_activations_can_train_a_probe(vit):
    """Captures are plain tensors (no_grad, not inference_mode): a probe can be trained on them."""
    with ActivationCapture(vit, ["blocks.3"], "cls") as cap:
        feats = cap.run(images(4))["blocks.3"]
    feats += 0  # in-place use is allowed
    probe = nn.Linear(feats.shape[1], 2)
    loss = nn.functional.cross_entropy(probe(feats), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert probe.weight.grad is not None and probe.weight.grad.abs().sum() > 0
