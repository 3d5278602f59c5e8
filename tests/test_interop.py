"""Checkpoint interop: timm, torchvision and Hugging Face weights give the same logits in vitlens.

Every reference model is randomly initialised (no downloads), saved as ``.safetensors`` and
as ``.pth``, loaded with ``vitlens.create_model(name, checkpoint=path)``, and compared on
the same input in eval mode.
"""

from __future__ import annotations

import pickle

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT
from transformers import ViTConfig as HFViTConfig
from transformers import ViTForImageClassification

import vitlens
from vitlens.models.convert import (
    convert_state_dict,
    detect_format,
    export_timm_state_dict,
    load_checkpoint_into,
    load_state_dict_file,
    model_from_checkpoint,
    save_pretrained,
    timm_model_kwargs,
)

TOL = 1e-4


def _save_both(sd: dict, tmp_path, stem: str):
    """The same weights as .safetensors and as a pickled .pth (wrapped like a training checkpoint)."""
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    st, pth = tmp_path / f"{stem}.safetensors", tmp_path / f"{stem}.pth"
    save_file(sd, str(st))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, pth)  # DDP + wrapper
    return [st, pth]


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model.eval()(x)
    return getattr(out, "logits", out)  # Hugging Face returns an output object


def _max_diff(expected: torch.Tensor, name: str, path, x: torch.Tensor, **overrides) -> float:
    got = _logits(vitlens.create_model(name, checkpoint=path, **overrides), x)
    assert got.shape == expected.shape
    return (got - expected).abs().max().item()


# -- parity with each source ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224"])
def test_timm_vit_parity(name, tmp_path):
    ref = timm.create_model(name, pretrained=False)
    torch.nn.init.normal_(ref.head.weight, std=0.02)  # timm zero-inits the head: give the logits content
    x = torch.randn(2, 3, 224, 224)
    expected = _logits(ref, x)
    for path in _save_both(ref.state_dict(), tmp_path, name):
        assert detect_format(load_state_dict_file(path)[0]) == "timm_vit"
        diff = _max_diff(expected, name, path, x)
        print(f"timm {name} {path.suffix}: max |logit diff| = {diff:.2e}")
        assert diff < TOL


@pytest.mark.parametrize("source,name", [("torchvision", "resnet18"), ("torchvision", "resnet50"),
                                         ("timm", "resnet18")])
def test_resnet_parity(source, name, tmp_path):
    ref = getattr(torchvision.models, name)() if source == "torchvision" else timm.create_model(name)
    ref.eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so running stats are checked too
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    expected = _logits(ref, x)
    for path in _save_both(ref.state_dict(), tmp_path, f"{source}_{name}"):
        assert detect_format(load_state_dict_file(path)[0]) == "torchvision_resnet"
        diff = _max_diff(expected, name, path, x)
        print(f"{source} {name} {path.suffix}: max |logit diff| = {diff:.2e}")
        assert diff < TOL


def test_torchvision_vit_parity(tmp_path):
    # A small instance of torchvision's ViT class (vit_b_16 itself is 86M parameters: slow to build and save).
    ref = TorchvisionViT(image_size=64, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=256,
                         num_classes=10)
    with torch.no_grad():  # torchvision zero-inits the head and the class token
        ref.heads.head.weight.normal_(0, 0.05)
        ref.class_token.normal_(0, 0.5)
    dims = dict(img_size=64, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    expected = _logits(ref, x)
    for path in _save_both(ref.state_dict(), tmp_path, "tv_vit"):
        assert detect_format(load_state_dict_file(path)[0]) == "torchvision_vit"
        diff = _max_diff(expected, "vit_tiny_patch16_224", path, x, **dims)
        print(f"torchvision ViT {path.suffix}: max |logit diff| = {diff:.2e}")
        assert diff < TOL


def test_torchvision_vit_b_16_keys_convert():
    """The real vit_b_16 layout converts to exactly the vitlens ViT-B/16 key set and shapes (no forward)."""
    with torch.device("meta"):  # shapes only: no memory, no init time
        tv = torchvision.models.vit_b_16()
    ours = vitlens.create_model("vit_base_patch16_224")
    sd = convert_state_dict(tv.state_dict(), "torchvision_vit")
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("eps", [1e-6, 1e-12])
def test_hf_vit_parity(eps, tmp_path):
    # eps: 1e-6 is the original ViT's LayerNorm eps (= vitlens, timm); 1e-12 is transformers' default.
    cfg = HFViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                      image_size=32, patch_size=4, num_labels=10, layer_norm_eps=eps)
    ref = ViTForImageClassification(cfg).eval()
    with torch.no_grad():
        ref.vit.embeddings.cls_token.normal_(0, 0.5)
    ref.save_pretrained(tmp_path / "hf")  # the Hub layout: encoder.layer.i.attention.attention.query ...
    paths = [tmp_path / "hf"]  # the folder: its model.safetensors is read
    paths += _save_both(ref.state_dict(), tmp_path, "hf_vit")  # transformers 5's in-memory names
    x = torch.randn(2, 3, 32, 32)
    expected = _logits(ref, x)
    dims = dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0, num_classes=10)
    for path in paths:
        assert detect_format(load_state_dict_file(path)[0]) == "hf_vit"
        diff = _max_diff(expected, "vit_micro_patch4_32", path, x, **dims)
        print(f"HF ViT eps={eps} {path.name}: max |logit diff| = {diff:.2e}")
        assert diff < TOL


# -- vitlens -> timm, vitlens -> vitlens -----------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, dict(pool="gap", num_registers=2, init_values=1e-2)])
def test_export_to_timm(overrides, tmp_path):
    ours = vitlens.create_model("vit_micro_patch4_32", **overrides).eval()
    with torch.no_grad():
        ours.head.weight.normal_(0, 0.05)
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, **timm_model_kwargs(ours))
    ref.load_state_dict(export_timm_state_dict(ours))  # strict: every timm key present, none extra
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (ref.eval()(x) - ours(x)).abs().max().item()
    print(f"vitlens -> timm {overrides}: max |logit diff| = {diff:.2e}")
    assert diff < TOL
    # ... and back: timm's layout (no_embed_class when there are registers) loads into vitlens.
    (path,) = _save_both(ref.state_dict(), tmp_path, "timm")[:1]
    back = vitlens.create_model("vit_micro_patch4_32", checkpoint=path, **overrides).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x))


@pytest.mark.parametrize("name", ["vit_micro_patch4_32", "resnet8_cifar"])
def test_save_pretrained_roundtrip(name, tmp_path):
    ours = vitlens.create_model(name, num_classes=7).eval()
    path = save_pretrained(ours, tmp_path / "m.safetensors")
    back = model_from_checkpoint(path).eval()  # no name given: read from the file
    assert back.model_name == name and back.cfg.num_classes == 7
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), back(x))
    again = vitlens.create_model(name, checkpoint=path, num_classes=7).eval()
    assert detect_format(*load_state_dict_file(path)) == "vitlens"
    with torch.no_grad():
        assert torch.equal(ours(x), again(x))


def test_trainer_checkpoint_loads(tmp_path):
    """A training checkpoint (model + optimizer state, meta with the trainer's model_args) is read too."""
    from vitlens.io import save_checkpoint

    ours = vitlens.create_model("vit_micro_patch4_32", num_classes=5, depth=2).eval()
    opt = torch.optim.AdamW(ours.parameters())
    ours(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, ours.state_dict(), meta={"model": "vit_micro_patch4_32",
                                                   "model_args": {"num_classes": 5, "depth": 2}},
                    state={"optimizer": opt.state_dict(), "epoch": 1})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ours(x)
        assert torch.equal(model_from_checkpoint(path).eval()(x), expected)
        again = vitlens.create_model("vit_micro_patch4_32", num_classes=5, depth=2, checkpoint=path)
        assert torch.equal(again.eval()(x), expected)


@pytest.mark.parametrize("name", ["gpt_nano", "transformer_nano"])
def test_plain_weights_of_text_models_load(name, tmp_path):
    """Weights saved without metadata (safetensors.torch.save_model) load by key match."""
    from safetensors.torch import save_model

    ours = vitlens.create_model(name).eval()
    save_model(ours, str(tmp_path / "w.safetensors"))  # handles the tied embedding / output weights
    back = vitlens.create_model(name, checkpoint=tmp_path / "w.safetensors").eval()
    for (k, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


# -- adapting and refusing -----------------------------------------------------------------------------
def test_pos_embed_resampled_to_new_grid(tmp_path):
    src = vitlens.create_model("vit_micro_patch4_32").eval()
    path = save_pretrained(src, tmp_path / "m.safetensors")
    big = vitlens.create_model("vit_micro_patch4_32", img_size=48, checkpoint=path).eval()
    src.set_image_size(48)  # the same bicubic resampling, applied to the model in memory
    assert big.pos_embed.shape == (1, 1 + 12 * 12, 128)
    torch.testing.assert_close(big.pos_embed, src.pos_embed)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(big(x), src(x))


def test_shape_mismatch_lists_keys(tmp_path):
    small = dict(img_size=32, patch_size=4)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=100, **small)
    (path,) = _save_both(ref.state_dict(), tmp_path, "t")[:1]
    with pytest.raises(ValueError) as e:
        vitlens.create_model("vit_tiny_patch16_224", num_classes=10, checkpoint=path, **small)
    msg = str(e.value)
    assert "head.weight: checkpoint (100, 192) vs model (10, 192)" in msg
    assert "head.bias: checkpoint (100,) vs model (10,)" in msg
    assert "num_classes=100" in msg and "strict_head=False" in msg
    # Several problems at once: all listed, with the depth hint.
    with pytest.raises(ValueError) as e:
        vitlens.create_model("vit_micro_patch4_32", checkpoint=path)
    msg = str(e.value)
    assert "patch_embed.proj.weight: checkpoint (192, 3, 4, 4) vs model (128, 3, 4, 4)" in msg
    assert "not in model (96): blocks.4." in msg and "depth=12" in msg and "more shape mismatches" in msg


def test_strict_head_false_keeps_new_head(tmp_path):
    src = vitlens.create_model("vit_micro_patch4_32", num_classes=100)
    path = save_pretrained(src, tmp_path / "m.safetensors")
    dst = vitlens.create_model("vit_micro_patch4_32", num_classes=10)
    head = dst.head.weight.detach().clone()
    with pytest.warns(UserWarning, match="newly initialised head"):
        load_checkpoint_into(dst, path, strict_head=False)
    assert torch.equal(dst.head.weight, head)
    assert torch.equal(dst.blocks[3].mlp.fc2.weight, src.blocks[3].mlp.fc2.weight)


class Payload:
    """Stands in for arbitrary code in a pickle: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_untrusted_pickle_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f, protocol=2)
    with pytest.raises(ValueError, match="never unpickles untrusted files.*safetensors"):
        vitlens.create_model("vit_micro_patch4_32", checkpoint=path)
    assert "must never run" not in capsys.readouterr().out


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        vitlens.create_model("vit_micro_patch4_32", checkpoint=tmp_path / "nope.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        vitlens.create_model("vit_micro_patch4_32", checkpoint=tmp_path / "odd.safetensors")
    with pytest.raises(ValueError, match="no vitlens metadata"):
        model_from_checkpoint(tmp_path / "odd.safetensors")
