"""Each hub model sees images through its OWN evaluation transform (resize, crop, interpolation, mean/std).

The references are the peers' own pipelines, run on a real non-square photo (a CIFAR-10 JPEG of the
embedded subset, resized to 300 x 200): timm's ``create_transform(**resolve_data_config(model))``,
torchvision's ``weights.transforms()`` and the Hugging Face image processors (their PIL backend, the
one the checkpoints were evaluated with). The CLI tests spy on the pixels that reach the model in
``vitlens eval`` and ``vitlens cka`` on fabricated, offline hub caches (tests/test_pretrained.py).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from _hub import randomise
from PIL import Image
from test_pretrained_study import fabricate_timm, fabricate_torchvision
from timm.data import create_transform, resolve_data_config
from torchvision.transforms.functional import pil_to_tensor

import vitlens
from vitlens.cli import main
from vitlens.data import build_data
from vitlens.data.catalog import EMBEDDED_CIFAR10_MINI
from vitlens.data.preprocess import eval_transform
from vitlens.errors import ConfigError

ATOL = 1e-6


def photo(size=(300, 200), member: str = "test/airplane/0000.jpg") -> Image.Image:
    """A real photo, not square: one embedded CIFAR-10 JPEG resized with PIL to ``size`` (W, H)."""
    with tarfile.open(EMBEDDED_CIFAR10_MINI) as tar:
        image = Image.open(tar.extractfile(member)).convert("RGB")
        image.load()
    return image.resize(size, Image.BICUBIC)


def assert_same_pixels(pre: dict, peer_transform, image: Image.Image) -> None:
    """Our transform of ``image`` (as PIL, and as the uint8 tensor vitlens' datasets yield) = the peer's."""
    expected = peer_transform(image)
    for given in (image, pil_to_tensor(image)):
        torch.testing.assert_close(eval_transform(pre)(given), expected, rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- the builder vs the peers
TIMM = {  # name: overrides that keep it small  # what its preprocessing exercises
    "vit_tiny_patch16_224.augreg_in21k_ft_in1k": {"depth": 1},  # bicubic, crop_pct 0.9, mean/std 0.5
    "deit_tiny_patch16_224.fb_in1k": {"depth": 1},  # bicubic, crop_pct 0.875, ImageNet mean/std
    "resnet18.tv_in1k": {},  # bilinear
    "vit_base_patch32_clip_384.openai_ft_in12k_in1k": {"depth": 1},  # crop_mode squash, crop_pct 0.95
}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_models_see_timms_own_transform(name, hubs):  # noqa: F811
    model, meta = vitlens.load_model(f"timm:{name}", **TIMM[name])  # random weights: no download
    pre = meta["preprocess"]
    cfg = resolve_data_config({}, model=model)
    assert pre["resize"] > pre["crop"] == cfg["input_size"][-1]  # the centre crop cuts something
    assert pre["interpolation"] == cfg["interpolation"]
    assert_same_pixels(pre, create_transform(**cfg), photo())
    assert_same_pixels(pre, create_transform(**cfg), photo((200, 300)))  # portrait too


def test_torchvision_models_see_their_weights_transforms(hubs):  # noqa: F811
    fabricate_torchvision("resnet18")
    _, meta = vitlens.load_model("torchvision:resnet18", pretrained=True)
    peer = torchvision.models.get_model_weights("resnet18")["DEFAULT"].transforms()
    assert (meta["preprocess"]["resize"], meta["preprocess"]["crop"]) == (256, 224)
    assert_same_pixels(meta["preprocess"], peer, photo())


HF_PROCESSORS = {  # preprocessor_config.json of three kinds, for a 32 px ViT
    "vit squash": {"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32},
                   "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
    "dinov2 shortest edge + crop": {
        "image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 40}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
    "deit squash + crop": {
        "image_processor_type": "DeiTImageProcessor", "size": {"height": 40, "width": 40}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
}


@pytest.mark.parametrize("kind", list(HF_PROCESSORS))
def test_hf_models_see_their_image_processor(kind, tmp_path, hubs):  # noqa: F811
    from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification

    folder = tmp_path / "vit"
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=5)
    randomise(ViTForImageClassification(cfg)).save_pretrained(folder)
    processor = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 **HF_PROCESSORS[kind]}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    _, meta = vitlens.load_model(folder)
    # the PIL backend: the processors' reference implementation (transformers 5's default torchvision
    # backend resizes tensors, within ~2/255 of it)
    peer = AutoImageProcessor.from_pretrained(folder, backend="pil")
    image = photo()
    expected = peer(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(eval_transform(meta["preprocess"])(image), expected, rtol=0, atol=ATOL)


def test_a_bad_description_is_one_clear_line():
    pre = {"resize": 40, "crop": 32, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(ConfigError, match="interpolation 'cubic' is not one of nearest, .*bicubic"):
        eval_transform({**pre, "interpolation": "cubic"})
    with pytest.raises(ConfigError, match="missing crop"):
        build_data("cifar10-mini", preprocess={k: v for k, v in pre.items() if k != "crop"})


# ----------------------------------------------------------------------------- the CLI path
def non_square_folder(root: Path) -> tuple[Path, list[Path]]:
    """An ImageFolder (train/ and test/, two classes) of real photos, landscape and portrait, as PNG.

    Larger than the models' resize (256, 248): shrinking a PIL image and shrinking a tensor differ
    (by up to ~0.03 after normalising), enlarging them does not, so this also tells the two apart.
    """
    files = []
    for split in ("train", "test"):
        for cls, member in [("airplane", "test/airplane/0001.jpg"), ("cat", "test/cat/0002.jpg")]:
            (root / split / cls).mkdir(parents=True)
            for i, size in enumerate([(450, 320), (320, 450)]):
                path = root / split / cls / f"{i}.png"
                photo(size, member).save(path)
                files += [path] if split == "test" else []
    return root, files


@pytest.fixture
def fed(monkeypatch):
    """The batches every model loaded by the CLI is given (a forward pre-hook on it)."""
    import vitlens.models.loading as loading

    seen, load = [], loading.load_model

    def spy(*args, **kwargs):
        model, meta = load(*args, **kwargs)
        model.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach().clone()))
        return model, meta

    monkeypatch.setattr(loading, "load_model", spy)
    return seen


def test_eval_feeds_a_timm_model_its_own_pixels(hubs, tmp_path, monkeypatch, fed, capsys):  # noqa: F811
    monkeypatch.setenv("VITLENS_CACHE", str(tmp_path / "cache"))
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # bicubic, resize 248, crop 224, mean/std 0.5
    fabricate_timm(name)
    root, files = non_square_folder(tmp_path / "images")
    assert main(["eval", f"timm:{name}", "--pretrained", "--data", "imagefolder", "--data-dir", str(root),
                 "--device", "cpu", "--batch-size", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4
    peer = create_transform(**resolve_data_config({}, model=timm.create_model(name, pretrained=False)))
    expected = torch.stack([peer(Image.open(f).convert("RGB")) for f in files])
    torch.testing.assert_close(torch.cat(fed), expected, rtol=0, atol=ATOL)


def test_cka_feeds_a_torchvision_model_its_own_pixels(hubs, tmp_path, monkeypatch, fed):  # noqa: F811
    monkeypatch.setenv("VITLENS_CACHE", str(tmp_path / "cache"))
    fabricate_torchvision("resnet18")  # bilinear, resize 256, crop 224, ImageNet mean/std
    root, files = non_square_folder(tmp_path / "images")
    assert main(["cka", "torchvision:resnet18", "--pretrained", "--data", "imagefolder", "--data-dir",
                 str(root), "--out", str(tmp_path / "out"), "--device", "cpu", "--batch-size", "8"]) == 0
    peer = torchvision.models.get_model_weights("resnet18")["DEFAULT"].transforms()
    expected = torch.stack([peer(Image.open(f).convert("RGB")) for f in files])
    torch.testing.assert_close(torch.cat(fed), expected, rtol=0, atol=ATOL)
