"""Checkpoint interop: timm, torchvision and Hugging Face weights give the same logits in vitlens.

Every reference model is randomly initialised (no downloads), saved as ``.safetensors`` and
as ``.pth``, loaded with ``vitlens.create_model(name, checkpoint=path)``, and compared on
the same input in eval mode.
"""

from __future__ import annotations

import pickle
import warnings

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT
from transformers import ViTConfig as HFViTConfig
from transformers import ViTForImageClassification

import vitlens
from vitlens.io import load_state_dict_file
from vitlens.models.convert import (
    convert_state_dict,
    detect_format,
    export_timm_state_dict,
    load_checkpoint_into,
    timm_model_kwargs,
)
from vitlens.models.loading import load_model, save_pretrained


def model_from_checkpoint(path):
    """The model a vitlens file rebuilds from its own metadata (no name given)."""
    return load_model(path)[0]

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


# -- every variant family, by the peer's own name ----------------------------------------------------
_SMALL_VIT = dict(depth=2, embed_dim=64, num_heads=4, img_size=32)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (timm zero-inits heads, tokens and LayerScale): every path counts."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("name,overrides", [
    ("vit_small_patch32_224", dict(depth=2, img_size=64)),
    ("vit_base_patch16_gap_224", _SMALL_VIT),  # no [CLS], norm before average pooling (fc_norm=False)
    ("vit_medium_patch16_gap_256", _SMALL_VIT),  # + no qkv bias, LayerScale
    ("vit_base_patch16_clip_224", _SMALL_VIT),  # norm_pre, patch embedding without bias, eps 1e-5
    ("vit_base_patch16_clip_quickgelu_224", _SMALL_VIT),  # + QuickGELU
    ("deit_small_distilled_patch16_224", _SMALL_VIT),  # distillation token + head, averaged logits
    ("vit_small_patch14_dinov2", dict(_SMALL_VIT, img_size=28)),  # LayerScale, no head
    ("vit_small_patch14_reg4_dinov2", dict(_SMALL_VIT, img_size=28)),  # + 4 registers, no [CLS] position
])
def test_timm_variant_parity(name, overrides, tmp_path):
    ref = _perturbed(timm.create_model(name, pretrained=False, **overrides))
    side = overrides["img_size"]
    x = torch.randn(2, 3, side, side)
    expected = _logits(ref, x)
    path = _save_both(ref.state_dict(), tmp_path, name)[0]
    ours = vitlens.create_model(name, checkpoint=path, **overrides)
    assert type(ours).__name__ == "VisionTransformer"
    diff = (_logits(ours, x) - expected).abs().max().item()
    print(f"timm {name}: max |logit diff| = {diff:.2e}")
    assert diff < TOL


def test_deit_distilled_heads_averaged_in_training_mode_too(tmp_path):
    ref = _perturbed(timm.create_model("deit_small_distilled_patch16_224", **_SMALL_VIT))
    path = _save_both(ref.state_dict(), tmp_path, "deit")[0]
    ours = vitlens.create_model("deit_small_distilled_patch16_224", checkpoint=path, **_SMALL_VIT)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # timm averages unless distilled_training is set; dropout is 0 here
        torch.testing.assert_close(ours.train()(x), ref.train()(x), atol=TOL, rtol=0)
        feats = ours.forward_features(x)
        expected = (ours.head(feats[:, 0]) + ours.head_dist(feats[:, 1])) / 2  # DeiT paper, eval rule
        torch.testing.assert_close(ours.forward_head(feats), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_wide_resnet_parity(source, tmp_path):
    build = torchvision.models.wide_resnet50_2 if source == "torchvision" else timm.create_model
    ref = _perturbed(build() if source == "torchvision" else build("wide_resnet50_2"))
    x = torch.randn(1, 3, 32, 32)
    expected = _logits(ref, x)
    path = _save_both(ref.state_dict(), tmp_path, "wrn")[0]
    diff = _max_diff(expected, "wide_resnet50_2", path, x)
    print(f"{source} wide_resnet50_2: max |logit diff| = {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("head", [False, True])
def test_hf_dinov2_parity(head, tmp_path):
    from transformers import Dinov2Config, Dinov2ForImageClassification, Dinov2Model

    cfg = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                       patch_size=14, num_labels=7)
    ref = _perturbed(Dinov2ForImageClassification(cfg) if head else Dinov2Model(cfg))
    ref.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = ref(pixel_values=x)
        expected = out.logits if head else out.last_hidden_state[:, 0]  # [CLS] after the final norm
    dims = dict(img_size=28, embed_dim=64, depth=2, num_heads=4, num_classes=7 if head else 0,
                pool="cls+gap" if head else "cls")  # the classifier reads [CLS] ++ mean(patches)
    diff = _max_diff(expected, "vit_small_patch14_dinov2", tmp_path / "hf", x, **dims)
    print(f"HF DINOv2 head={head}: max |diff| = {diff:.2e}")
    assert diff < TOL


def test_hf_deit_distilled_parity(tmp_path):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    cfg = DeiTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                     image_size=32, patch_size=16, num_labels=5, layer_norm_eps=1e-12)
    ref = _perturbed(DeiTForImageClassificationWithTeacher(cfg))
    ref.save_pretrained(tmp_path / "hf")
    x = torch.randn(2, 3, 32, 32)
    expected = _logits(ref, x)
    dims = dict(embed_dim=64, depth=2, num_heads=4, img_size=32, num_classes=5, norm_eps=1e-12)
    diff = _max_diff(expected, "deit_small_distilled_patch16_224", tmp_path / "hf", x, **dims)
    print(f"HF DeiT distilled: max |logit diff| = {diff:.2e}")
    assert diff < TOL


def test_pos_embed_resampling_warns_once_with_both_grids(tmp_path):
    path = save_pretrained(vitlens.create_model("vit_micro_patch4_32"), tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match=r"8x8 position table to the model's 12x12 grid") as record:
        vitlens.create_model("vit_micro_patch4_32", img_size=48, checkpoint=path)
    assert sum("position table" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same grid: silent
        vitlens.create_model("vit_micro_patch4_32", checkpoint=path)


def test_num_classes_hint_only_when_the_head_is_the_mismatch(tmp_path):
    src = vitlens.create_model("vit_micro_patch4_32", num_classes=100)
    path = save_pretrained(src, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="pass num_classes=100"):
        vitlens.create_model("vit_micro_patch4_32", checkpoint=path)
    with pytest.raises(ValueError) as e:  # another width: the head differs too, but not in its classes
        vitlens.create_model("vit_micro_patch4_32", embed_dim=64, num_classes=100, checkpoint=path)
    assert "pass num_classes" not in str(e.value) and "embed_dim" in str(e.value)


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
