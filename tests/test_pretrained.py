"""Pretrained weights through the hubs' own caches, offline, with no network at all.

Each test fabricates a cache in the hub's own layout (Hugging Face: ``models--ORG--NAME/
snapshots/<rev>/...`` + ``refs/main``; torchvision: ``TORCH_HOME/hub/checkpoints/<file>``) from
random-initialised peer models, loads it through vitlens with offline mode on and sockets
disabled, and compares the logits with the peer library loading the same cache.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from _hub import hf_snapshot, randomise
from safetensors.torch import save_file

import vitlens
from vitlens.errors import CheckpointError, ModelError
from vitlens.models import registry
from vitlens.models.hub import eval_transform
from vitlens.models.peer_config import resnet_config, timm_vit_config

TOL = 1e-4


@torch.no_grad()
def _diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    out_a, out_b = a.eval()(x), b.eval()(x)
    return (getattr(out_a, "logits", out_a) - getattr(out_b, "logits", out_b)).abs().max().item()


# ----------------------------------------------------------------------------- timm
def test_timm_pretrained_from_the_hf_cache(hubs):
    name = "vit_small_patch16_224.augreg_in21k_ft_in1k"
    peer = randomise(timm.create_model(name, depth=1))  # 1 block keeps it small; 224 px as pretrained
    weights = {k: v.contiguous() for k, v in peer.state_dict().items()}
    save_file(weights, str(hf_snapshot(f"timm/{name}") / "model.safetensors"))
    model, meta = vitlens.load_model(f"timm:{name}", pretrained=True, depth=1)
    assert isinstance(model, vitlens.models.VisionTransformer)  # converted: our hooks and attention
    reference = timm.create_model(name, pretrained=True, depth=1)  # timm reading the same cache
    diff = _diff(model, reference, torch.randn(2, 3, 224, 224))
    print(f"timm:{name} from a fabricated cache: max |logit diff| = {diff:.2e}")
    assert diff < TOL
    # augreg's own preprocessing (timm pretrained_cfg): mean/std 0.5, bicubic, crop_pct 0.9
    pre = meta["preprocess"]
    assert pre["mean"] == [0.5] * 3 and pre["std"] == [0.5] * 3 and pre["interpolation"] == "bicubic"
    assert pre["crop"] == 224 and pre["resize"] == 248 and meta["img_size"] == 224
    # fine-tuning on 32 px images with other classes: the resampling is said, the head is new
    with pytest.warns(UserWarning, match="14x14 position table to the model's 2x2 grid"):
        tuned = vitlens.create_model(f"timm:{name}", pretrained=True, num_classes=10, img_size=32, depth=1)
    assert tuned.head.out_features == 10 and tuned.training and tuned.pos_embed.shape == (1, 5, 384)
    torch.testing.assert_close(tuned.blocks[0].mlp.fc2.weight, model.blocks[0].mlp.fc2.weight)


def test_registered_name_pretrained_goes_to_its_hub(hubs):
    small = dict(depth=1)
    peer = randomise(timm.create_model("deit_tiny_distilled_patch16_224", **small))
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()},
              str(hf_snapshot("timm/deit_tiny_distilled_patch16_224.fb_in1k") / "model.safetensors"))
    model = vitlens.create_model("deit_tiny_distilled_patch16_224", pretrained=True, **small)
    assert model.cfg.distilled and _diff(model, peer, torch.randn(2, 3, 224, 224)) < TOL
    with pytest.raises(ModelError, match="no pretrained weights on a hub"):
        vitlens.create_model("vit_micro_patch4_32", pretrained=True)


# ----------------------------------------------------------------------------- torchvision
def test_torchvision_pretrained_from_torch_home(hubs):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    peer = randomise(torchvision.models.resnet18())
    cache = hubs / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(peer.state_dict(), cache / Path(weights.url).name)  # torch.hub's own file name
    model, meta = vitlens.load_model("torchvision:resnet18", pretrained=True)
    assert isinstance(model, vitlens.models.ResNet)
    reference = torchvision.models.resnet18(weights="DEFAULT")  # torchvision reading the same cache
    diff = _diff(model, reference, torch.randn(2, 3, 64, 64))
    print(f"torchvision:resnet18 from a fabricated TORCH_HOME: max |logit diff| = {diff:.2e}")
    assert diff < TOL
    assert meta["preprocess"]["resize"] == 256 and meta["preprocess"]["crop"] == 224
    assert meta["preprocess"]["interpolation"] == "bilinear" and meta["preprocess"]["mean"][0] == 0.485
    same = vitlens.create_model("torchvision:resnet18", pretrained="IMAGENET1K_V1")
    assert _diff(same, reference, torch.randn(1, 3, 64, 64)) < TOL
    with pytest.raises(ModelError, match="no weights 'IMAGENET1K_V9'.*IMAGENET1K_V1"):
        vitlens.create_model("torchvision:resnet18", pretrained="IMAGENET1K_V9")


# ----------------------------------------------------------------------------- Hugging Face
def _hf_vit(repo: str, eps: float):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=5, layer_norm_eps=eps)
    folder = hf_snapshot(repo)
    randomise(ViTForImageClassification(cfg)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, resample=3).save_pretrained(folder)
    return folder


def test_hf_pretrained_keeps_layer_norm_eps(hubs):
    from transformers import ViTForImageClassification

    folder = _hf_vit("google/vit-base-patch16-224", eps=1e-12)
    model, meta = vitlens.load_model("hf:google/vit-base-patch16-224", pretrained=True)
    reference = ViTForImageClassification.from_pretrained("google/vit-base-patch16-224")
    assert isinstance(model, vitlens.models.VisionTransformer) and model.cfg.norm_eps == 1e-12
    x = torch.randn(2, 3, 32, 32)
    diff = _diff(model, reference, x)
    print(f"hf:google/vit-base-patch16-224 from a fabricated cache: max |logit diff| = {diff:.2e}")
    assert diff < TOL
    assert meta["preprocess"]["interpolation"] == "bicubic" and meta["preprocess"]["crop"] == 32
    # a local save_pretrained folder is the same model
    local, _ = vitlens.load_model(folder)
    assert _diff(local, reference, x) < TOL


def test_eval_transform_is_the_peers_preprocessing():
    from PIL import Image

    pre = {"resize": 40, "crop": 32, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.25] * 3}
    image = Image.fromarray(torch.randint(0, 256, (50, 60, 3), dtype=torch.uint8).numpy())
    out = eval_transform(pre)(image)
    resized = image.resize((48, 40), Image.BICUBIC)  # shorter side 40, aspect kept
    left, top = (48 - 32) // 2, (40 - 32) // 2
    crop = np.asarray(resized.crop((left, top, left + 32, top + 32)), dtype=np.float32)
    expected = (torch.from_numpy(crop).permute(2, 0, 1) / 255 - 0.5) / 0.25
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out, expected, atol=2 / 255 / 0.25, rtol=0)  # PIL vs tensor resize rounding


# ----------------------------------------------------------------------------- bad input, one line each
def test_missing_weights_offline_one_line(hubs):
    for spec in ("timm:vit_base_patch16_224.augreg2_in21k_ft_in1k", "torchvision:resnet50",
                 "hf:google/vit-large-patch16-224"):
        with pytest.raises(CheckpointError) as info:
            vitlens.load_model(spec, pretrained=True)
        msg = str(info.value)
        assert "\n" not in msg and "--checkpoint FILE" in msg and str(hubs) in msg, msg
    with pytest.raises(CheckpointError, match=r"resnet50-11ad3fa6\.pth .*torch/hub/checkpoints"):
        vitlens.load_model("torchvision:resnet50", pretrained=True)


def test_bad_pretrained_requests(hubs):
    with pytest.raises(ModelError, match="no pretrained tag 'nope'.*augreg_in21k_ft_in1k"):
        vitlens.create_model("timm:vit_base_patch16_224.nope", pretrained=True)
    with pytest.raises(ModelError, match="timm has no model 'vit_bsae_patch16_224'"):
        vitlens.create_model("timm:vit_bsae_patch16_224")
    (hf_snapshot("bert-base-uncased") / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelError, match="is a 'bert' model, not a ViT"):
        vitlens.create_model("hf:bert-base-uncased", pretrained=True)
    with pytest.raises(ModelError, match="give one"):
        vitlens.create_model("timm:vit_base_patch16_224", pretrained=True, checkpoint="w.safetensors")


# ----------------------------------------------------------------------------- the table = the peers
_TIMM_NAMED = [n for n in registry.list_models() if timm.is_model(n) and "cifar" not in n
               and n not in ("resnet20", "resnet56")]


@pytest.mark.parametrize("name", _TIMM_NAMED)
def test_registered_rows_equal_timm(name):
    """Each registered row whose name timm knows builds timm's network (read from timm's own module)."""
    with torch.device("meta"):  # shapes only: no memory, no init time
        peer = timm.create_model(name)
    expected = timm_vit_config(peer) or resnet_config(peer)
    assert expected is not None, f"timm's {name} uses something vitlens does not build"
    fields = dataclasses.asdict(registry.model_config_class(name)(**registry.model_defaults(name)))
    got = {k: fields[k] for k in expected if k != "init_values"}
    assert got == {k: v for k, v in expected.items() if k != "init_values"}
    assert (fields.get("init_values") is None) == (expected.get("init_values") is None)


# ----------------------------------------------------------------------------- command line
def test_cli_pretrained(hubs, capsys):
    from vitlens.cli import main

    name = "deit_tiny_patch16_224.fb_in1k"  # full size (5.7M parameters): the CLI has no size flags
    peer = randomise(timm.create_model(name))
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()},
              str(hf_snapshot(f"timm/{name}") / "model.safetensors"))
    out = hubs / "att"
    args = ["attention", f"timm:{name}", "--pretrained", "--out", str(out), "--max-images", "4",
            "--num-maps", "1", "--batch-size", "4", "--device", "cpu"]
    assert main(args) == 0
    stats = json.loads((out / "attention_stats.json").read_text())
    assert len(stats[f"timm:{name}"]["mean_distance_per_layer"]) == 12  # the pretrained model, 224 px
    capsys.readouterr()
    assert main([*args, "--checkpoint", str(hubs / "w.safetensors")]) == 2  # one clear line, no traceback
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--pretrained" in err and "--checkpoint FILE" in err


def test_train_starts_from_the_cached_weights(hubs):
    from vitlens.cli import main
    from vitlens.models.loading import load_run_model

    name = "deit_tiny_patch16_224"
    peer = randomise(timm.create_model(name, depth=1))
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()},
              str(hf_snapshot(f"timm/{name}.fb_in1k") / "model.safetensors"))
    out = hubs / "run"
    args = ["train", "--model", name, "--pretrained", "--model-args", '{"depth": 1}', "--epochs", "1",
            "--fraction", "0.1", "--batch-size", "25", "--lr", "1e-12", "--min-lr", "0",
            "--warmup-epochs", "0", "--no-augment", "--out", str(out), "--no-progress"]
    with pytest.warns(UserWarning, match="14x14 position table to the model's 2x2 grid"):  # 32 px CIFAR
        assert main(args) == 0
    model, meta = load_run_model(out)
    assert model.head.out_features == 10  # the data's classes, a new head
    # lr 1e-12: the body is still the cached one (to 1e-9), so fine-tuning started from it
    torch.testing.assert_close(model.blocks[0].mlp.fc2.weight, peer.blocks[0].mlp.fc2.weight)
