"""`vitlens study --preset pretrained` end to end on fabricated hub caches, offline, sockets blocked.

The caches hold random-initialised weights written in each hub's own layout (see
tests/test_pretrained.py's ``hubs`` fixture); the images are the embedded cifar10-mini subset,
upsampled by each model's own preprocessing. Numbers are checked against independent
computations: CKA against ``cka_matrix`` run jointly on the same images, top-1 against a plain
forward pass with the ImageNet wnid mapping, the report in headless Chromium.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
import yaml
from _hub import hf_snapshot, randomise
from PIL import Image
from safetensors.torch import save_file
from test_report import _chromium

import vitlens
from vitlens.cli import main
from vitlens.study.config import StudyConfig

HEADINGS = ["1. The pretrained models and their ImageNet top-1", "2. Representation structure",
            "3. Local vs global attention, and how much pretraining data",
            "4. [CLS] token vs global average pooling"]


def _favour(head: torch.nn.Linear, favoured: int | None) -> None:
    """A head that answers ``favoured`` for every image (zero weights, a one-hot bias), or unchanged."""
    if favoured is not None:
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.bias[favoured] = 1.0


def fabricate_timm(name: str, favoured: int | None = None, **small) -> None:
    """Random weights of timm's ``name`` (``arch.tag``) in the HF cache where timm looks for them."""
    hub_id = timm.models.get_pretrained_cfg(name).hf_hub_id
    peer = randomise(timm.create_model(name, **small))
    _favour(peer.head, favoured)
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()},
              str(hf_snapshot(hub_id) / "model.safetensors"))


def fabricate_torchvision(name: str, favoured: int | None = None) -> None:
    """Random weights of torchvision's ``name`` (DEFAULT) in TORCH_HOME/hub/checkpoints, torch.hub's name."""
    weights = torchvision.models.get_model_weights(name)["DEFAULT"]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    peer = randomise(torchvision.models.get_model(name))
    _favour(peer.fc, favoured)
    torch.save(peer.state_dict(), cache / Path(weights.url).name)


TWO_BLOCKS = {"depth": 2}
SMALL = [  # the preset's families, small: 2 blocks, tiny widths, ResNet-18
    {"label": "ViT-CLS", "model": "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k", "model_args": TWO_BLOCKS},
    {"label": "ViT-1k", "model": "timm:deit_tiny_patch16_224.fb_in1k", "model_args": TWO_BLOCKS},
    {"label": "ViT-GAP", "model": "timm:vit_medium_patch16_gap_256.sw_in12k_ft_in1k",
     "model_args": TWO_BLOCKS},
    {"label": "ResNet", "model": "torchvision:resnet18"},
]


def small_config(tmp: Path, out: Path, models=SMALL, **analysis) -> Path:
    cfg = yaml.safe_load((Path(vitlens.__file__).parent / "configs" / "study_pretrained.yaml").read_text())
    cfg.update(models=models, out=str(out))
    cfg["analysis"] = {**cfg["analysis"], "max_images": 24, "attention_images": 8, "probe_train_images": 12,
                       "probe_test_images": 8, "batch_size": 8, **analysis}
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def imagenet_folder(root: Path, n_per_class: int = 4) -> tuple[Path, list[str]]:
    """A tiny ImageFolder of the embedded images under two ImageNet wnid folder names."""
    from vitlens.data.catalog import build_dataset

    test = build_dataset("cifar10-mini", "test")
    wnids = ["n01440764", "n02102040"]  # tench, English springer: ImageNet-1k indices 0 and 217
    for c, wnid in enumerate(wnids):
        (root / wnid).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = test[c * n_per_class + i][0].permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(root / wnid / f"{i}.png")
    return root, wnids


def test_pretrained_preset_end_to_end(hubs, tmp_path, capsys):  # noqa: F811
    for spec in SMALL[:3]:
        fabricate_timm(spec["model"].split(":", 1)[1], **spec["model_args"])
    fabricate_torchvision("resnet18")
    out = tmp_path / "study"
    config = small_config(tmp_path, out)
    assert main(["study", "--config", str(config)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "pretrained" and results["dataset"]["images"] == 24
    assert results["vit_labels"] == ["ViT-CLS", "ViT-1k", "ViT-GAP"]
    assert [r["test_top1"] for r in results["runs"]] == [None] * 4  # CIFAR folders are not ImageNet wnids
    # each model its own preprocessing: augreg 0.5/0.5 bicubic, DeiT ImageNet stats, torchvision's bilinear
    pre = {r["label"]: r["preprocess"] for r in results["runs"]}
    assert pre["ViT-CLS"]["mean"] == [0.5] * 3 and pre["ViT-CLS"]["interpolation"] == "bicubic"
    assert pre["ViT-1k"]["mean"][0] == pytest.approx(0.485) and pre["ViT-GAP"]["crop"] == 256
    assert pre["ResNet"]["resize"] == 256 and pre["ResNet"]["interpolation"] == "bilinear"
    assert {r["label"]: r["model_args"].get("pool") for r in results["runs"][:3]} == {
        "ViT-CLS": "cls", "ViT-1k": "cls", "ViT-GAP": "gap"}
    # attention: (layers, heads) of every head; probes of every model
    att = results["attention_distance"]
    assert np.asarray(att["ViT-CLS"]["pretrained"]).shape == (2, 3)
    assert np.asarray(att["ViT-GAP"]["pretrained"]).shape == (2, 8)
    assert set(results["probes"]) == {"ViT-CLS", "ViT-1k", "ViT-GAP", "ResNet"}

    # CKA from the cached per-model Grams = cka_matrix run jointly on the same 24 preprocessed images
    # (fp32 here so the two agree to rounding; bf16 is the default)
    from vitlens.analysis import cka_matrix
    from vitlens.analysis.common import image_subset
    from vitlens.models.hub import eval_transform
    from vitlens.study.pretrained import _Preprocessed, image_pool

    pool = image_subset(image_pool("imagefolder", None)[0], 24, seed=0)
    cross = next(c for c in results["cka"]["cross"] if c["a"] == "ViT-1k" and c["b"] == "ResNet")
    vit, vit_meta = vitlens.load_model(SMALL[1]["model"], pretrained=True, depth=2)
    cnn, cnn_meta = vitlens.load_model("torchvision:resnet18", pretrained=True)
    xa = torch.stack([x for x, _ in _Preprocessed(pool, eval_transform(vit_meta["preprocess"]))])
    xb = torch.stack([x for x, _ in _Preprocessed(pool, eval_transform(cnn_meta["preprocess"]))])

    # cka_matrix feeds one tensor to both models; both crops are 224 px, so stack them channel-wise
    # and let each model read its own three channels
    vit_fwd, cnn_fwd = vit.forward, cnn.forward
    vit.forward = lambda x: vit_fwd(x[:, :3])
    cnn.forward = lambda x: cnn_fwd(x[:, 3:])
    both = torch.cat([xa, xb], dim=1)
    ref, names_a, names_b = cka_matrix(vit, cnn, [both[i:i + 8] for i in range(0, 24, 8)], progress=False)
    assert names_a == cross["names_a"] and names_b == cross["names_b"]
    np.testing.assert_allclose(cross["matrix"], ref, atol=0.03)  # the study ran in bf16
    within = np.asarray(results["cka"]["within"]["ResNet"]["matrix"])
    np.testing.assert_allclose(np.diagonal(within), 1.0, atol=1e-6)

    page = (out / "report.html").read_text()
    for h in HEADINGS:
        assert h in page, h
    assert page.count("Not measured in this study") == 0 and "top-1 is not measured" in page
    assert len(re.findall(r'<p class="finding">', page)) == 4
    figures = 4 + 3 + 1 + 1 + 1  # CKA within x4, ViT x ResNet x3, attention 21k vs 1k, ViT-GAP's, probes
    assert page.count("data:image/png;base64,") == figures
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", (out / "report.html").resolve().as_uri(),
                    tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f'data-figures-loaded="{figures}/{figures}"' in dom.stdout
    assert all(h in dom.stdout for h in HEADINGS)

    # resumable: a second run reuses every model's statistics and computes nothing
    capsys.readouterr()
    assert main(["study", "--config", str(config)]) == 0
    assert capsys.readouterr().out.count("statistics reused") == 4


def test_top1_on_imagenet_wnid_folders(hubs, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Folders named by wnids are scored with the ImageNet-1k indices: heads that always answer
    class 217 (English springer, n02102040) or 0 (tench, n01440764) are right on exactly half."""
    folder, wnids = imagenet_folder(tmp_path / "val")
    fabricate_timm("deit_tiny_patch16_224.fb_in1k", favoured=217, depth=1)
    fabricate_torchvision("resnet18", favoured=0)
    models = [{"label": "ViT-1k", "model": "timm:deit_tiny_patch16_224.fb_in1k", "model_args": {"depth": 1}},
              {"label": "ResNet", "model": "torchvision:resnet18"}]
    out = tmp_path / "study"
    config = small_config(tmp_path, out, models, max_images=100, probe_train_images=4, probe_test_images=4)
    assert main(["study", "--config", str(config), "--data-dir", str(tmp_path), "--max-images", "6"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["imagenet_labelled"] and results["dataset"]["images"] == 6
    # which 6 of the 8 images: the seeded subset; 4 per class, class 0 first (ImageFolder sorts wnids)
    from vitlens.analysis.common import subset_indices

    picked = subset_indices(8, 6, seed=0)
    tench = sum(i < 4 for i in picked)
    top1 = {r["label"]: r["test_top1"] for r in results["runs"]}
    assert top1 == pytest.approx({"ViT-1k": 100 * (6 - tench) / 6, "ResNet": 100 * tench / 6})
    page = (out / "report.html").read_text()
    assert "top-1 is" in page and "not measured" not in page.split("2. Representation")[0]

    # statistics cached by another version of the statistics' code (e.g. before each hub model's own
    # preprocessing) are recomputed, never reused; the same version reuses them
    import vitlens.study.pretrained as pretrained

    args = ["study", "--config", str(config), "--data-dir", str(tmp_path), "--max-images", "6"]
    capsys.readouterr()
    assert main(args) == 0 and capsys.readouterr().out.count("statistics reused") == 2
    monkeypatch.setattr(pretrained, "STATISTICS_VERSION", pretrained.STATISTICS_VERSION + 1)
    assert main(args) == 0 and capsys.readouterr().out.count("statistics reused") == 0



def test_max_images_is_for_the_pretrained_preset(tmp_path, capsys):
    assert main(["study", "--preset", "default", "--max-images", "6", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--preset pretrained" in err
    cfg = StudyConfig.load(preset="pretrained")
    assert cfg.pretrained and [m.model for m in cfg.models] == [
        "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k", "timm:vit_base_patch16_224.augreg_in1k",
        "timm:vit_medium_patch16_gap_256.sw_in12k_ft_in1k", "torchvision:resnet50"]


@pytest.mark.slow
def test_the_presets_own_models_on_four_images(hubs, tmp_path):  # noqa: F811
    """The preset as shipped (full-size ViT-B/16 21k and 1k, ViT-M/16 GAP, ResNet-50), random
    weights in the caches, on four embedded images: every default name loads and is analysed."""
    cfg = StudyConfig.load(preset="pretrained")
    for spec in cfg.models:
        lib, name = spec.model.split(":", 1)
        fabricate_timm(name) if lib == "timm" else fabricate_torchvision(name)
    out = tmp_path / "study"
    config = small_config(tmp_path, out, models=[dict(label=m.label, model=m.model) for m in cfg.models],
                          max_images=4, attention_images=4, probe_train_images=2, probe_test_images=2,
                          batch_size=4)
    assert main(["study", "--config", str(config)]) == 0
    results = json.loads((out / "results.json").read_text())
    att = results["attention_distance"]
    for vit in ("ViT-CLS", "ViT-1k"):  # ViT-B/16: 12 layers x 12 heads
        assert np.asarray(att[vit]["pretrained"]).shape == (12, 12)
    within = {k: len(v["names"]) for k, v in results["cka"]["within"].items()}
    # patch embedding + 12 blocks; ResNet-50: stem + 3 + 4 + 6 + 3 bottleneck blocks
    assert within == {"ViT-CLS": 13, "ViT-1k": 13, "ViT-GAP": 13, "ResNet": 17}
    page = (out / "report.html").read_text()
    assert all(h in page for h in HEADINGS) and "Not measured in this study" not in page


@pytest.mark.parametrize("name", ["vit_micro_patch4_32", "resnet8_cifar"])
def test_one_pass_equals_each_analysis_on_its_own(name):
    """The study's single forward pass per batch (Grams, attention distance, probes from hooks; batches
    that straddle the probe train/test and attention boundaries) equals, in fp32, each analysis run
    on its own: Grams from captured activations in float64, vitlens' mean_attention_distance
    (float64), and the probes' plain float64 ridge reference on captured tokens."""
    from test_probes import ridge_probe_reference

    from vitlens.analysis import default_layers, mean_attention_distance
    from vitlens.analysis.cka import feature_gram
    from vitlens.analysis.common import image_subset
    from vitlens.models.hub import eval_transform
    from vitlens.study.pretrained import _model_pass, _Pixels, _Preprocessed, image_pool

    torch.manual_seed(0)
    model = vitlens.create_model(name).eval()
    pre = {"resize": 32, "crop": 32, "interpolation": "bilinear", "mean": [0.5, 0.4, 0.3], "std": [0.2] * 3}
    pool = image_subset(image_pool("imagefolder", None)[0], 20, seed=0)
    pixels = _Pixels(pool, pre)
    a = {"batch_size": 8, "probe_train_images": 10, "probe_test_images": 7, "attention_images": 12,
         "autocast": "fp32"}
    res = _model_pass(model, pixels, pre, None, a)

    batches = [pixels.batch(lo, min(lo + 8, 20), pre["mean"], pre["std"]) for lo in range(0, 20, 8)]
    images, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    # the batches are exactly the model's own transform (eval_transform), image by image
    reference = _Preprocessed(pool, eval_transform(pre))
    torch.testing.assert_close(images, torch.stack([reference[i][0] for i in range(20)]), rtol=0, atol=0)
    assert labels.tolist() == [reference[i][1] for i in range(20)]
    layers = default_layers(model)
    assert res["names"] == layers and len(res["grams"]) == 3
    modules, raw = dict(model.named_modules()), {}
    keep = lambda n: lambda _m, _i, out: raw.__setitem__(n, out.detach().clone())  # noqa: E731
    hooks = [modules[n].register_forward_hook(keep(n)) for n in layers]
    try:
        outputs = []
        with torch.no_grad():
            for x, _ in batches:
                model(x)
                outputs.append(dict(raw))
    finally:
        for h in hooks:
            h.remove()
    for b, got in enumerate(res["grams"]):
        ref = torch.stack([feature_gram(outputs[b][n].flatten(1).double()) for n in layers])
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # probes: fitted on images 0-9 (batch 1 straddles), scored on 10-16; tokens = positions of a map,
    # or the patch tokens of a sequence ([CLS] dropped after the patch embedding)
    for layer in layers:
        out = torch.cat([o[layer] for o in outputs])
        if out.dim() == 4:
            tokens = out.flatten(2).transpose(1, 2)
        else:
            tokens = out[:, 0 if layer == "patch_embed" else model.num_prefix_tokens :]
        cls_ref, pos_ref = ridge_probe_reference(tokens[:10], labels[:10], tokens[10:17], labels[10:17])
        # float32 products (the study's) vs float64 (the reference's): at most one near-tie token flips
        one_token = 1.0 / (7 * tokens.shape[1]) + 1e-9
        assert res["probes"][layer]["class_acc"] == pytest.approx(cls_ref.mean(), abs=one_token)
        assert res["probes"][layer]["position_acc"] == pytest.approx(pos_ref.mean(), abs=one_token)
    if name.startswith("vit"):  # attention on the first 12 images: batch 1 straddles
        ref = mean_attention_distance(model, [images[:8], images[8:12]])
        np.testing.assert_allclose(res["attention"], ref, rtol=1e-5)
        assert np.asarray(res["attention"]).shape == (4, 4)  # layers x heads
    else:
        assert res["attention"] is None


def test_the_study_sees_images_through_each_peers_own_transform(hubs):  # noqa: F811
    """The study's pixels (resize, centre crop, interpolation, mean/std from meta["preprocess"], then
    one batched normalisation) equal the peers' own eval transforms on a real, non-square image:
    timm's create_transform(resolve_data_config(model)) (bicubic, crop_pct 0.9) and
    torchvision's weights.transforms() (bilinear, resize 256, crop 224)."""
    from timm.data import create_transform, resolve_data_config

    from vitlens.data.catalog import build_dataset
    from vitlens.study.pretrained import _Pixels

    test = build_dataset("cifar10-mini", "test")
    pixels = torch.cat([test[0][0], test[1][0]], dim=2)  # two real photos side by side: 32 x 64
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    for name in ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", "deit_tiny_patch16_224.fb_in1k"):
        fabricate_timm(name, depth=1)
        _, meta = vitlens.load_model(f"timm:{name}", pretrained=True, depth=1)
        peer = create_transform(**resolve_data_config({}, model=timm.create_model(name, depth=1)))
        pre = meta["preprocess"]
        ours, _ = _Pixels([(image, 0)], pre).batch(0, 1, pre["mean"], pre["std"])
        torch.testing.assert_close(ours[0], peer(image), rtol=0, atol=1e-6)
    assert pre["resize"] == 248 and pre["crop"] == 224  # crop_pct 0.9: the centre crop is exercised
    fabricate_torchvision("resnet18")
    _, meta = vitlens.load_model("torchvision:resnet18", pretrained=True)
    peer = torchvision.models.get_model_weights("resnet18")["DEFAULT"].transforms()
    pre = meta["preprocess"]
    ours, _ = _Pixels([(image, 0)], pre).batch(0, 1, pre["mean"], pre["std"])
    torch.testing.assert_close(ours[0], peer(image), rtol=0, atol=1e-6)
