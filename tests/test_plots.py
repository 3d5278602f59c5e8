"""Analysis figures (PNG + numbers), model loading for analysis, and the cka/attention/probe commands."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from matplotlib.image import imread

import vitlens
from vitlens.analysis.plots import (
    plot_attention_distance,
    plot_attention_maps,
    plot_cka_heatmap,
    plot_probe_accuracy,
)
from vitlens.cli import main
from vitlens.io import save_checkpoint
from vitlens.models.loading import load_model


def _png_ok(path):
    assert path.suffix == ".png" and path.is_file()
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels[..., :3].var() > 0  # not blank


# ----------------------------------------------------------------------------- plots
def test_cka_heatmap_writes_png_json_csv(tmp_path):
    m = np.array([[1.0, 0.25, 0.5], [0.125, 0.75, 0.875]])
    png = plot_cka_heatmap(m, ["a0", "a1"], ["b0", "b1", "b2"], tmp_path / "sub" / "cka", "ViT vs ResNet")
    _png_ok(png)
    data = json.loads((tmp_path / "sub" / "cka.json").read_text())
    assert data["names_a"] == ["a0", "a1"] and data["names_b"] == ["b0", "b1", "b2"]
    np.testing.assert_array_equal(np.array(data["matrix"]), m)
    rows = list(csv.reader(open(tmp_path / "sub" / "cka.csv")))
    assert rows[0] == ["", "b0", "b1", "b2"] and rows[2][0] == "a1" and float(rows[2][3]) == 0.875
    with pytest.raises(ValueError, match="does not match"):
        plot_cka_heatmap(m, ["a0"], ["b0", "b1", "b2"], tmp_path / "bad")


def test_attention_distance_plot_overlays_runs(tmp_path):
    runs = {"vit-cls": np.arange(12.0).reshape(4, 3), "vit-gap": np.full((6, 2), 7.5)}
    png = plot_attention_distance(runs, tmp_path / "mad.png")  # a .png suffix is accepted too
    _png_ok(png)
    data = json.loads((tmp_path / "mad.json").read_text())
    assert data["unit"] == "pixels"
    np.testing.assert_array_equal(np.array(data["runs"]["vit-cls"]), runs["vit-cls"])
    np.testing.assert_array_equal(np.array(data["runs"]["vit-gap"]), runs["vit-gap"])


def test_attention_maps_plot(tmp_path):
    maps = vitlens.analysis.attention_maps(
        vitlens.create_model("vit_micro_patch4_32").eval(), torch.randn(3, 32, 32)
    )
    png = plot_attention_maps(
        torch.randn(3, 32, 32), maps, tmp_path / "maps", mean=(0.5,) * 3, std=(0.25,) * 3
    )
    _png_ok(png)
    data = json.loads((tmp_path / "maps.json").read_text())
    assert sorted(data["maps"]) == ["head 0", "head 1", "head 2", "head 3", "mean of heads", "rollout"]
    np.testing.assert_allclose(np.array(data["maps"]["rollout"]), maps["rollout"])


def test_probe_accuracy_plot(tmp_path):
    runs = {
        "vit": {"blocks.0": 0.5, "blocks.1": 0.625},
        "resnet": {"layer1.0": 0.25, "layer2.0": 0.75, "x": 1.0},
    }
    png = plot_probe_accuracy(runs, tmp_path / "probe", chance=0.1)
    _png_ok(png)
    assert json.loads((tmp_path / "probe.json").read_text())["runs"] == runs


# ----------------------------------------------------------------------------- loading
def _run_dir(tmp_path, name="vit_micro_patch4_32", label="run_vit"):
    """A run directory as ``vitlens train`` leaves it (checkpoint metadata as the trainer writes it)."""
    model = vitlens.create_model(name)
    meta = {
        "model": name,
        "model_args": {"num_classes": 10},
        "data": "cifar10-mini",
        "img_size": 32,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    save_checkpoint(tmp_path / label / "checkpoints" / "last.safetensors", model.state_dict(), meta=meta)
    (tmp_path / label / "model.json").write_text(json.dumps(meta))
    return tmp_path / label, model


def test_load_run_dir_checkpoint_and_names(tmp_path):
    run, ref = _run_dir(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    model, meta = load_model(run)
    assert meta["label"] == "run_vit" and meta["data"] == "cifar10-mini" and not model.training
    torch.testing.assert_close(model(x), ref.eval()(x))
    model, meta = load_model(run / "checkpoints" / "last.safetensors")
    assert meta["label"] == "run_vit"
    torch.testing.assert_close(model(x), ref(x))
    # a foreign (timm-layout .pth) checkpoint needs the architecture name
    torch.save(ref.state_dict(), tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="--model"):
        load_model(tmp_path / "weights.pth")
    model, meta = load_model(tmp_path / "weights.pth", model_name="vit_micro_patch4_32")
    assert meta["label"] == "weights"
    torch.testing.assert_close(model(x), ref(x))
    # names: registered (random init), timm:, torchvision:
    assert load_model("resnet8_cifar", num_classes=3)[0].fc.out_features == 3
    assert type(load_model("torchvision:resnet18", num_classes=4)[0]).__name__ == "ResNet"
    with pytest.raises(ValueError, match="neither"):
        load_model("no_such_model")


# ----------------------------------------------------------------------------- CLI
def test_cli_attention_probe_cka_end_to_end(tmp_path, capsys):
    vit_run, _ = _run_dir(tmp_path)
    cnn_run, _ = _run_dir(tmp_path, "resnet8_cifar", "run_cnn")
    common = ["--max-images", "32", "--batch-size", "16", "--device", "cpu"]

    assert main(["attention", str(vit_run), "--out", str(tmp_path / "att"), "--num-maps", "1", *common]) == 0
    stats = json.loads((tmp_path / "att" / "attention_stats.json").read_text())["run_vit"]
    assert stats["layers"] == [f"blocks.{i}.attn" for i in range(4)]
    dist = np.array(stats["distance"])
    assert dist.shape == (4, 4) and np.all((dist > 0) & (dist < 32 * np.sqrt(2)))
    assert np.all(np.array(stats["entropy"]) <= np.log(65) + 1e-9)
    _png_ok(tmp_path / "att" / "attention_distance.png")
    _png_ok(tmp_path / "att" / "maps" / "run_vit_img0.png")

    assert (
        main(["probe", str(vit_run), str(cnn_run), "--out", str(tmp_path / "probe"), "--grid", "8", *common])
        == 0
    )
    probes = json.loads((tmp_path / "probe" / "probes.json").read_text())
    assert list(probes) == ["run_vit", "run_cnn"]
    assert list(probes["run_vit"]["layers"]) == ["patch_embed"] + [f"blocks.{i}" for i in range(4)]
    assert probes["run_cnn"]["layers"]["layer1.0"]["grid_size"] == [8, 8]
    assert probes["run_vit"]["layers"]["blocks.0"]["position_acc"] > 0.9  # learned pos. embedding at init
    # what the numbers were made from: 32 of the 500 test images, one process
    run = probes["run_vit"]["run"]["test"]
    assert run["world_size"] == 1 and run["images"] == 32 and run["images_per_rank"] == [32]
    assert run["indices_fingerprint"].startswith("sha256:") and run["seed"] == 0
    _png_ok(tmp_path / "probe" / "probe_class.png")
    _png_ok(tmp_path / "probe" / "probe_position.png")

    assert main(["cka", str(vit_run), str(cnn_run), "--out", str(tmp_path / "cka"), *common]) == 0
    cka = json.loads((tmp_path / "cka" / "cka.json").read_text())
    assert cka["names_a"][0] == "patch_embed" and cka["names_b"][-1] == "layer3.0"
    m = np.array(cka["matrix"])
    assert m.shape == (5, 4) and np.all(np.isfinite(m))
    _png_ok(tmp_path / "cka" / "cka.png")
    assert (tmp_path / "cka" / "cka.csv").is_file()

    assert main(["cka", str(vit_run), "--out", str(tmp_path / "self"), *common]) == 0
    self_m = np.array(json.loads((tmp_path / "self" / "cka.json").read_text())["matrix"])
    np.testing.assert_allclose(np.diag(self_m), 1.0, rtol=1e-6)  # a layer is identical to itself

    assert main(["attention", str(cnn_run), "--out", str(tmp_path / "x"), *common]) == 2  # one clear line
    assert "no attention layers" in capsys.readouterr().err


def test_cli_cka_timm_name_with_checkpoint_and_cls_mean_policy(tmp_path, capsys):
    """`vitlens cka timm:NAME torchvision:NAME --checkpoint W --checkpoint-b W2 --token-policy cls,mean`:
    the weights are really loaded (the matrix differs from random init), and the patch embedding,
    which has no [CLS], is left out of the default layers instead of failing."""
    import timm
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    cnn = torchvision.models.resnet18(num_classes=10)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp_path / "vit.safetensors")
    torch.save(cnn.state_dict(), tmp_path / "cnn.pth")
    common = ["--max-images", "16", "--batch-size", "8", "--device", "cpu", "--num-classes", "10"]
    names = ["cka", "timm:vit_tiny_patch16_224", "torchvision:resnet18", "--token-policy", "cls,mean"]
    weights = ["--checkpoint", str(tmp_path / "vit.safetensors"), "--checkpoint-b", str(tmp_path / "cnn.pth")]
    assert main([*names, *weights, "--out", str(tmp_path / "loaded"), *common]) == 0
    assert main([*names, "--out", str(tmp_path / "random"), *common]) == 0
    loaded = json.loads((tmp_path / "loaded" / "cka.json").read_text())
    assert loaded["names_a"] == [f"blocks.{i}" for i in range(12)] and loaded["names_b"][0] == "maxpool"
    m_loaded = np.array(loaded["matrix"])
    m_random = np.array(json.loads((tmp_path / "random" / "cka.json").read_text())["matrix"])
    assert m_loaded.shape == (12, 9) and np.isfinite(m_loaded).all()
    assert not np.allclose(m_loaded, m_random, atol=1e-3)  # the checkpoints were used
    # a checkpoint next to a run directory (which has its own weights) is one clear error line
    run, _ = _run_dir(tmp_path)
    bad = ["cka", str(run), "--checkpoint", str(tmp_path / "cnn.pth"), "--out", str(tmp_path / "x"), *common]
    assert main(bad) == 2
    assert "brings its own weights" in capsys.readouterr().err
