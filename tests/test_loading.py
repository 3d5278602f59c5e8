"""The registry table, the one loader (load_model / create_model), unreadable files, stale temp files."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import vitlens
from vitlens.errors import CheckpointError, ConfigError, ModelError
from vitlens.io import (
    atomic_write,
    load_checkpoint,
    load_state_dict_file,
    remove_stale_temp_files,
    save_checkpoint,
)
from vitlens.models import registry
from vitlens.models.loading import load_model, load_run_model, save_pretrained
from vitlens.models.tokenizers import HybridEmbed


# ----------------------------------------------------------------------------- registry table
def test_model_config_fields_known_without_building(monkeypatch):
    vit_fields = {f.name for f in dataclasses.fields(vitlens.models.ViTConfig)}
    assert registry.model_config_fields("vit_base_patch16_224") == vit_fields
    assert "img_size" in vit_fields and "img_size" not in registry.model_config_fields("resnet50")
    assert {"n_layer", "n_embd"} <= registry.model_config_fields("gpt_nano")
    assert registry.model_config_class("bert_nano").__name__ == "BertConfig"

    def refuse(*a, **k):
        raise AssertionError("model_config_fields must not build the model")

    monkeypatch.setattr(vitlens.models.VisionTransformer, "__init__", refuse)
    assert registry.model_config_fields("vit_base_patch16_224") == vit_fields


def test_builder_without_config_class_and_unknown_fields(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))  # leave the real table untouched

    @registry.register_model
    def custom_linear(**kw):
        return nn.Linear(2, kw.get("out", 3))

    assert vitlens.create_model("custom_linear", out=5).out_features == 5
    with pytest.raises(ModelError, match="without a config dataclass"):
        registry.model_config_fields("custom_linear")
    with pytest.raises(ModelError, match="registered twice"):
        registry.register_model(custom_linear)
    with pytest.raises(ConfigError, match=r"no config field\(s\) depht; valid fields: .*depth"):
        vitlens.create_model("vit_micro_patch4_32", depht=2)


def test_registry_is_below_convert_and_loading():
    tree = ast.parse(Path(registry.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"convert", "loading", "hub"}, imported  # no lazy import back up either
    for module in ("registry", "convert", "loading", "tokenizers.hybrid"):  # any entry point, no circle
        out = subprocess.run([sys.executable, "-c", f"import vitlens.models.{module}"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr


# ----------------------------------------------------------------------------- load_model
def _train_like_run(tmp_path, name="resnet8_cifar"):
    model = vitlens.create_model(name, num_classes=3)
    meta = {"model": name, "model_args": {"num_classes": 3}, "data": "cifar10-mini", "img_size": 32}
    for which in ("last", "best"):
        path = tmp_path / "run" / "checkpoints" / f"{which}.safetensors"
        save_checkpoint(path, model.state_dict(), meta=meta, state={"epoch": 1})
    (tmp_path / "run" / "model.json").write_text(json.dumps(meta))
    return tmp_path / "run", model.eval()


def test_load_model_every_spec(tmp_path):
    run, ref = _train_like_run(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    model, meta = load_model(run, which="best")
    assert meta["label"] == "run" and meta["data"] == "cifar10-mini" and not model.training
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    model, meta = load_run_model(run)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    # save_pretrained file: the file alone rebuilds the model
    path = save_pretrained(ref, tmp_path / "pre.safetensors")
    model, meta = load_model(path)
    assert meta["label"] == "pre" and meta["model"] == "resnet8_cifar"
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    # a foreign torchvision file with the architecture named
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    model, meta = load_model(tmp_path / "tv.pth", model_name="resnet8_cifar", num_classes=3)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    # names: registered, with a checkpoint; create_model keeps training mode, load_model evaluates
    created = vitlens.create_model("resnet8_cifar", checkpoint=path, num_classes=3)
    assert created.training and created.model_name == "resnet8_cifar"
    torch.testing.assert_close(created.eval()(x), ref(x), rtol=0, atol=0)
    model, meta = load_model("torchvision:resnet18", num_classes=4)
    assert isinstance(model, torchvision.models.ResNet) and meta["label"] == "torchvision:resnet18"


def test_load_model_clear_errors(tmp_path):
    run, _ = _train_like_run(tmp_path)
    with pytest.raises(ModelError, match="brings its own weights"):
        load_model(run, checkpoint=run / "checkpoints" / "last.safetensors")
    with pytest.raises(ModelError, match="give one: --pretrained .* or --checkpoint FILE"):
        load_model("vit_micro_patch4_32", pretrained=True, checkpoint="x.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_model(tmp_path / "missing.pth", model_name="resnet8_cifar")
    with pytest.raises(FileNotFoundError, match="no checkpoints/best.safetensors"):
        load_model(tmp_path, which="best")
    with pytest.raises(ModelError, match="unknown model 'resnet8_cifr'.*Did you mean resnet8_cifar"):
        load_model("resnet8_cifr")


# ----------------------------------------------------------------------------- unreadable files
def _bad_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, {"w": torch.randn(64, 64)}, meta={"model": "x"})
    data = good.read_bytes()
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "header_only.safetensors").write_bytes(data[:12])
    (tmp_path / "text.safetensors").write_text("not a checkpoint at all")
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "good.pt")
    pt = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(pt[: len(pt) // 2])
    (tmp_path / "text.pth").write_text("hello")
    return [p for p in sorted(tmp_path.iterdir()) if not p.name.startswith("good")]


def test_unreadable_weights_are_one_checkpoint_error(tmp_path):
    for path in _bad_files(tmp_path):
        readers = [load_state_dict_file, lambda p: vitlens.create_model("resnet8_cifar", checkpoint=p),
                   lambda p: load_model(p, model_name="resnet8_cifar")]
        if path.suffix == ".safetensors":
            readers.append(load_checkpoint)
        for read in readers:
            with pytest.raises(CheckpointError) as info:
                read(path)
            message = str(info.value)
            assert str(path) in message and "\n" not in message, message
            assert any(fix in message for fix in ("again", "retrain", "another checkpoint")), message


def test_remove_stale_temp_files(tmp_path):
    (tmp_path / "last.safetensors").write_bytes(b"x")
    (tmp_path / ".last.safetensors.k2j4h1.tmp").write_bytes(b"partial")
    (tmp_path / ".metrics.jsonl.abc.tmp").write_bytes(b"partial")
    (tmp_path / ".hidden").write_bytes(b"keep")
    (tmp_path / "notes.tmp").write_bytes(b"keep: not ours")

    def crash(tmp):
        open(tmp, "wb").write(b"half")
        raise KeyboardInterrupt  # an interrupted writer: atomic_write still removes its own temp file

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "best.safetensors", crash)
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == [".last.safetensors.k2j4h1.tmp", ".metrics.jsonl.abc.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "last.safetensors", "notes.tmp"]
    assert remove_stale_temp_files(tmp_path / "nope") == []


# ----------------------------------------------------------------------------- hybrid stem
def test_hybrid_embed_takes_any_backbone():
    tv = torchvision.models.resnet18().eval()
    trunk = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool, tv.layer1, tv.layer2)  # stride 8, 128 wide
    embed = HybridEmbed(trunk, img_size=64, embed_dim=24, patch=2).eval()
    assert embed.feature_stride == 8 and embed.patch_size == (16, 16) and embed.grid_size == (4, 4)
    x = torch.randn(2, 3, 64, 64)
    expected = embed.proj(trunk(x)).flatten(2).transpose(1, 2)  # timm's HybridEmbed, by hand
    torch.testing.assert_close(embed(x), expected, rtol=0, atol=0)
    assert embed(x).shape == (2, 16, 24)
