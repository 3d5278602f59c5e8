"""Gaps found by mutation testing in models/ and layers/: hub loading paths, peer configs, error
messages that must keep the information the user needs, tokenizer options.

Hub caches are fabricated (or the hub loader replaced) as in test_pretrained.py; no network.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from _hub import hf_snapshot, randomise

import vitlens
from vitlens.errors import CheckpointError, MissingFileError, ModelError
from vitlens.models import hub
from vitlens.models.convert import convert_state_dict, load_state_dict_into, timm_model_kwargs
from vitlens.models.loading import find_checkpoint
from vitlens.models.peer_config import hf_vit_config, torchvision_vit_config
from vitlens.models.resnet import BasicBlock
from vitlens.models.tokenizers.palette import fit_palette
from vitlens.models.tokenizers.vqvae import VQVAE, VQVAEConfig

TOL = 1e-4




@torch.no_grad()
def _logits(model, x):
    out = model.eval()(x)
    return getattr(out, "logits", out)


# ----------------------------------------------------------------------------- timm error messages
def test_timm_unknown_model_lists_five_similar_names(hubs):
    similar = timm.list_models("vit_base*")[:5]
    assert len(timm.list_models("vit_base*")) > 5  # so the limit is exercised
    with pytest.raises(ModelError) as info:
        vitlens.create_model("timm:vit_base_nope")
    assert f"similar: {', '.join(similar)}; see timm.list_models('vit_b*')" in str(info.value)


def test_timm_bad_tag_lists_the_tags_comma_separated(hubs):
    tags = [t.split(".", 1)[1] for t in timm.list_pretrained("vit_small_patch16_224.*")]
    with pytest.raises(ModelError) as info:
        vitlens.create_model("timm:vit_small_patch16_224.nope", pretrained=True)
    assert str(info.value).endswith("its tags: " + ", ".join(tags))


def test_timm_model_without_weights_says_so(hubs):
    assert timm.is_model("vit_base_patch16_18x2_224") and not timm.list_pretrained(
        "vit_base_patch16_18x2_224.*"
    )
    with pytest.raises(ModelError, match="timm has no pretrained weights for vit_base_patch16_18x2_224"):
        vitlens.create_model("timm:vit_base_patch16_18x2_224", pretrained=True)


def test_timm_missing_weights_names_the_hub_repo_and_file(hubs):
    name = "vit_small_patch16_224.augreg_in21k_ft_in1k"
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    assert repo == f"timm/{name}"
    with pytest.raises(CheckpointError) as info:
        vitlens.load_model(f"timm:{name}", pretrained=True, depth=1)
    assert f"{repo} (model.safetensors) is not in {hubs / 'hf' / 'hub'}" in str(info.value)


# ----------------------------------------------------------------------------- torchvision
def test_torchvision_pretrained_with_new_classes_keeps_the_body(hubs):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    peer = randomise(torchvision.models.resnet18())
    cache = hubs / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(peer.state_dict(), cache / Path(weights.url).name)
    model = vitlens.create_model("torchvision:resnet18", pretrained=True, num_classes=10)
    assert isinstance(model, vitlens.models.ResNet) and model.fc.out_features == 10
    assert model.cfg.num_classes == 10
    torch.testing.assert_close(model.conv1.weight, peer.conv1.weight)
    torch.testing.assert_close(model.layer4[1].conv2.weight, peer.layer4[1].conv2.weight)


def _small_tv_vit(**kw):
    from torchvision.models.vision_transformer import VisionTransformer

    return randomise(
        VisionTransformer(
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=7,
            **kw,
        )
    )


def test_torchvision_vit_pretrained_is_converted(hubs, monkeypatch):
    """The torchvision ViT path (config from torchvision_vit_config) with the hub loader replaced
    by a small random ViT: our module, the peer's logits."""
    weights = torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1
    cache = hubs / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / Path(weights.url).name).write_bytes(b"present")  # offline check: the file is cached
    peer = _small_tv_vit()
    monkeypatch.setattr(torchvision.models, "get_model", lambda name, weights=None, **kw: peer)
    model, meta = vitlens.load_model("torchvision:vit_b_16", pretrained=True)
    assert isinstance(model, vitlens.models.VisionTransformer)
    assert model.cfg.img_size in (32, (32, 32)) and model.cfg.depth == 2 and model.cfg.num_classes == 7
    x = torch.randn(2, 3, 32, 32)
    assert (_logits(model, x) - _logits(peer, x)).abs().max() < TOL
    assert meta["pretrained"] == "torchvision:vit_b_16.IMAGENET1K_V1"
    # a pre-logits layer (representation_size) is not ours: the peer itself comes back
    other = _small_tv_vit(representation_size=16)
    assert torchvision_vit_config(other) is None
    monkeypatch.setattr(torchvision.models, "get_model", lambda name, weights=None, **kw: other)
    same, _ = vitlens.load_model("torchvision:vit_b_16", pretrained=True)
    assert same is other


def test_torchvision_download_failure_names_the_torch_cache(hubs, monkeypatch):
    monkeypatch.setattr(hub, "offline", lambda: False)

    def unreachable(name, weights=None, **kw):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.models, "get_model", unreachable)
    with pytest.raises(CheckpointError) as info:
        vitlens.load_model("torchvision:resnet18", pretrained=True)
    msg = str(info.value)
    assert f"is not in {hubs / 'torch' / 'hub' / 'checkpoints'}" in msg and "URLError" in msg


# ----------------------------------------------------------------------------- Hugging Face
def test_hf_deit_single_head_is_returned_as_the_peer(hubs):
    from transformers import DeiTConfig, DeiTForImageClassification, ViTImageProcessor

    cfg = DeiTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    folder = hf_snapshot("facebook/deit-tiny-patch16-224")
    randomise(DeiTForImageClassification(cfg)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    model, meta = vitlens.load_model("hf:facebook/deit-tiny-patch16-224", pretrained=True)
    assert type(model).__name__ == "DeiTForImageClassification"  # one head on [CLS]+dist: not ours
    reference = DeiTForImageClassification.from_pretrained("facebook/deit-tiny-patch16-224")
    x = torch.randn(2, 3, 32, 32)
    assert (_logits(model, x) - _logits(reference, x)).abs().max() < TOL
    assert meta["img_size"] == 32
    with pytest.raises(ModelError, match="not a model vitlens converts"):
        vitlens.load_model("hf:facebook/deit-tiny-patch16-224", pretrained=True, num_classes=5)


def test_hf_dinov2_pooling_with_and_without_head():
    from transformers import Dinov2Config

    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    assert hf_vit_config(cfg, with_head=False)["pool"] == "cls"
    assert hf_vit_config(cfg, with_head=True)["pool"] == "cls+gap"
    model = vitlens.models.VisionTransformer(vitlens.models.ViTConfig(**hf_vit_config(cfg, with_head=False)))
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 32)  # no head: the [CLS] features


def test_missing_weights_recognised_by_hub_error_name():
    # httpx/huggingface errors that are not OSError are recognised by their class name
    for name in ("ConnectError", "TimeoutException", "OfflineModeIsEnabled", "LocalEntryNotFoundError"):
        assert hub._is_missing_weights(type(name, (Exception,), {})("x")), name
    assert not hub._is_missing_weights(ValueError("a real bug"))
    assert hub._is_missing_weights(FileNotFoundError("gone"))


# ----------------------------------------------------------------------------- convert / loading messages
def test_mismatch_message_names_the_registered_model_and_embed_dim(tmp_path):
    model = vitlens.create_model("vit_micro_patch4_32")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    d = model.cfg.embed_dim
    sd["cls_token"] = torch.zeros(1, 1, d + 8)  # only the class token is another width
    with pytest.raises(CheckpointError) as info:
        load_state_dict_into(model, sd, source="w.safetensors")
    msg = str(info.value)
    assert "does not fit model vit_micro_patch4_32:" in msg
    assert f"hint: the checkpoint's embed_dim is {d + 8}" in msg


def test_timm_model_kwargs_refuses_what_timm_cannot_express():
    model = vitlens.create_model("vit_micro_patch4_32", distilled=True)
    with pytest.raises(
        ModelError,
        match="timm's VisionTransformer has no equivalent of this config.*export the state dict instead",
    ):
        timm_model_kwargs(model)


def test_find_checkpoint_missing_path_message(tmp_path):
    with pytest.raises(
        MissingFileError, match=r"nope\.safetensors does not exist \(expected a run directory"
    ):
        find_checkpoint(tmp_path / "nope.safetensors")


def test_basic_block_default_width_and_wide_refusal():
    block = BasicBlock(8, 8)  # the default base_width is the plain one
    assert block(torch.randn(1, 8, 4, 4)).shape == (1, 8, 4, 4)
    with pytest.raises(ModelError, match="base_width .* needs block='bottleneck'"):
        BasicBlock(8, 8, base_width=128)


# ----------------------------------------------------------------------------- tokenizers
def test_vqvae_downsample_one_is_a_power_of_two():
    for ok in (1, 2, 4, 8):
        VQVAEConfig(downsample=ok)
    for bad in (0, 3, 6, 12):
        with pytest.raises(ModelError, match=f"power of 2.*got {bad}"):
            VQVAEConfig(downsample=bad)
    vq = VQVAE(
        VQVAEConfig(downsample=1, hidden=8, res_hidden=4, num_res_blocks=1, code_dim=4, codebook_size=4)
    )
    out = vq(torch.randn(1, 3, 8, 8))
    recon = out[0] if isinstance(out, tuple) else getattr(out, "recon", out)
    assert recon.shape == (1, 3, 8, 8)


def test_vq_tokenizer_warning_says_how_to_pass_the_checkpoint():
    with pytest.warns(
        UserWarning,
        match=r"tokenizer_args=\{'checkpoint': 'DIR/tokenizer\.safetensors'\} "
        r"\(fine if a trained state dict is loaded next\)",
    ):
        vitlens.create_model("vit_micro_patch4_32", tokenizer="vq")


def test_hybrid_stem_option_and_unknown_args():
    m = vitlens.create_model(
        "vit_micro_patch4_32", tokenizer="hybrid", tokenizer_args={"stem": "imagenet", "grid": 2}
    )
    tok = m.patch_embed
    assert tok.grid_size == (2, 2) and tok.feature_stride == 16  # stride-4 stem, two stride-2 stages
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ModelError, match="stem must be 'cifar' or 'imagenet', got 'bogus'"):
        vitlens.create_model("vit_micro_patch4_32", tokenizer="hybrid", tokenizer_args={"stem": "bogus"})
    with pytest.raises(
        ModelError,
        match=r"unknown hybrid tokenizer_args \['depth'\]; valid: \['block', 'grid', "
        r"'layers', 'patch', 'stem', 'widths'\]",
    ):
        vitlens.create_model("vit_micro_patch4_32", tokenizer="hybrid", tokenizer_args={"depth": 2})


def test_fit_palette_clusters_a_seeded_subsample():
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)  # 1024 random colours
    pixels = {tuple(p) for p in images.reshape(-1, 3).tolist()}
    torch.manual_seed(1)
    a = fit_palette(images, k=4, sample=4, iters=2, seed=3)
    torch.manual_seed(2)  # the global generator must not matter: the seed picks the sample
    b = fit_palette(images, k=4, sample=4, iters=2, seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # 4 sampled pixels, 4 clusters: each centroid is one of the image's colours (not a mean of many)
    assert all(tuple(int(v) for v in c) in pixels for c in a.round())
    torch.testing.assert_close(a, a.round())


# ----------------------------------------------------------------------------- siblings: hub errors and heads
def test_torchvision_errors_name_the_problem(hubs, monkeypatch):
    with pytest.raises(
        ModelError, match=r"torchvision has no model 'resnet999'; see torchvision\.models\.list_models"
    ):
        vitlens.create_model("torchvision:resnet999")
    file = Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    with pytest.raises(
        CheckpointError, match=rf"torchvision:resnet18 are not cached: {file} .*HF_HUB_OFFLINE=1 is set"
    ):
        vitlens.load_model("torchvision:resnet18", pretrained=True)
    # a cached file of another variant: one CheckpointError naming the file, the cache and the fix
    monkeypatch.setattr(hub, "offline", lambda: False)

    def wrong_variant(name, weights=None, **kw):
        raise RuntimeError("Error(s) in loading state_dict for ResNet:\n\tsize mismatch for fc.weight")

    monkeypatch.setattr(torchvision.models, "get_model", wrong_variant)
    with pytest.raises(
        CheckpointError,
        match=rf"cached weights for torchvision:resnet18 \({file} .* in "
        rf".*checkpoints\) do not fit the model \(size mismatch for fc"
        rf"\.weight\.\.\.\); .*delete it",
    ):
        vitlens.load_model("torchvision:resnet18", pretrained=True)

    def bug(name, weights=None, **kw):
        raise RuntimeError("CUDA error: something else")

    monkeypatch.setattr(torchvision.models, "get_model", bug)
    with pytest.raises(RuntimeError, match="CUDA error"):  # other errors stay bugs, not "missing"
        vitlens.load_model("torchvision:resnet18", pretrained=True)


def test_hf_errors_name_the_fix(hubs):
    with pytest.raises(ModelError, match=r"hf:org/x loads the Hugging Face weights; pass pretrained=True"):
        vitlens.create_model("hf:org/x")
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=8,
    )
    ViTModel(cfg).save_pretrained(hf_snapshot("org/tiny-vit"))
    with pytest.raises(ModelError, match=r"takes its architecture from config\.json; drop depth"):
        vitlens.create_model("hf:org/tiny-vit", pretrained=True, depth=2)
    model, meta = vitlens.load_model("hf:org/tiny-vit", pretrained=True)  # no image processor saved
    assert isinstance(model, vitlens.models.VisionTransformer) and model.cfg.num_classes == 0
    pre = meta["preprocess"]
    assert (pre["resize"], pre["crop"], pre["interpolation"], pre["mean"]) == (16, 16, "bilinear", [0.5] * 3)


def test_pretrained_head_kept_resized_or_removed(hubs, monkeypatch):
    weights = torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1
    cache = hubs / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / Path(weights.url).name).write_bytes(b"present")
    peer = _small_tv_vit()
    monkeypatch.setattr(torchvision.models, "get_model", lambda name, weights=None, **kw: peer)
    same = vitlens.create_model("torchvision:vit_b_16", pretrained=True, num_classes=7)  # the same count
    torch.testing.assert_close(same.head.weight, peer.heads.head.weight)
    torch.manual_seed(0)
    new = vitlens.create_model("torchvision:vit_b_16", pretrained=True, num_classes=3)
    assert new.head.out_features == 3 and new.cfg.num_classes == 3
    assert 0.01 < new.head.weight.std() < 0.03  # trunc_normal(std=0.02), not the peer's head
    assert torch.count_nonzero(new.head.bias) == 0
    torch.testing.assert_close(new.blocks[1].mlp.fc1.weight, same.blocks[1].mlp.fc1.weight)
    bare = vitlens.create_model("torchvision:vit_b_16", pretrained=True, num_classes=0)
    assert isinstance(bare.head, torch.nn.Identity) and bare(torch.randn(1, 3, 32, 32)).shape == (1, 32)


def test_hf_vit_config_refuses_what_vitlens_cannot_build():
    from transformers import DeiTConfig, Dinov2Config, ViTConfig

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    assert hf_vit_config(ViTConfig(**small, hidden_act="relu"), with_head=False) is None
    assert hf_vit_config(Dinov2Config(**small, use_swiglu_ffn=True), with_head=False) is None
    dino = hf_vit_config(Dinov2Config(**small, mlp_ratio=3, layerscale_value=0.5), with_head=False)
    assert dino["mlp_ratio"] == 3 and dino["init_values"] == 0.5 and dino["num_classes"] == 0
    vit = hf_vit_config(
        ViTConfig(**small, intermediate_size=64, num_labels=5, qkv_bias=False), with_head=True
    )
    assert vit["mlp_ratio"] == 2 and vit["num_classes"] == 5 and vit["qkv_bias"] is False
    assert "distilled" not in vit and "pool" not in vit
    assert hf_vit_config(DeiTConfig(**small), with_head=True)["distilled"] is True
    assert "distilled" not in hf_vit_config(DeiTConfig(**small), with_head=False)


def test_registered_resnet_goes_to_torchvision_not_timm(hubs):
    file = Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    assert timm.list_pretrained("resnet18.*")  # timm has a namesake too: the routing decides
    with pytest.raises(
        CheckpointError, match=rf"pretrained weights for torchvision:resnet18 are not cached: {file}"
    ):
        vitlens.create_model("resnet18", pretrained=True)
    assert "resnet20" not in torchvision.models.list_models() and not timm.is_model("resnet20")
    with pytest.raises(ModelError, match="resnet20 is a vitlens-only model with no pretrained weights"):
        vitlens.create_model("resnet20", pretrained=True)


def test_is_hf_folder_needs_config_and_weights(tmp_path):
    for files, expected in (
        (("config.json", "model.safetensors"), True),
        (("config.json", "pytorch_model.bin"), True),
        (("config.json",), False),
        (("model.safetensors",), False),
    ):
        folder = tmp_path / "_".join(files)
        folder.mkdir()
        for f in files:
            (folder / f).write_text("{}")
        assert hub.is_hf_folder(folder) is expected, files


@pytest.mark.parametrize(
    "size, crop, do_crop, resample, expected",
    [
        ({"shortest_edge": 40}, {"height": 32, "width": 32}, True, 2, (40, 32, "shorter", "bilinear")),
        ({"shortest_edge": 40}, {"height": 32, "width": 32}, False, 1, (40, 40, "shorter", "lanczos")),
        ({"height": 36, "width": 36}, {"height": 32, "width": 32}, True, 0, (36, 32, "squash", "nearest")),
        ({"height": 36, "width": 36}, None, False, 3, (36, 36, "squash", "bicubic")),
    ],
)
def test_hf_preprocess_reads_the_image_processor(tmp_path, size, crop, do_crop, resample, expected):
    from transformers import BitImageProcessor

    kw = dict(crop_size=crop) if crop else {}
    BitImageProcessor(
        size=size,
        do_center_crop=do_crop,
        resample=resample,
        image_mean=[0.1, 0.2, 0.3],
        image_std=[0.4, 0.5, 0.6],
        **kw,
    ).save_pretrained(tmp_path)
    pre = hub._hf_preprocess(str(tmp_path), None)
    assert (pre["resize"], pre["crop"], pre["resize_mode"], pre["interpolation"]) == expected
    assert pre["mean"] == pytest.approx([0.1, 0.2, 0.3]) and pre["std"] == pytest.approx([0.4, 0.5, 0.6])
    assert pre["img_size"] == expected[1]


def test_mismatch_message_lists_counts_and_hints():
    model = vitlens.create_model("vit_micro_patch4_32")
    depth, own = model.cfg.depth, model.state_dict()
    other = vitlens.create_model("vit_micro_patch4_32", depth=depth + 2, embed_dim=64, num_heads=2)
    sd = other.state_dict()
    mismatched = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    unexpected = [k for k in sd if k not in own]
    assert len(mismatched) > 20
    with pytest.raises(CheckpointError) as info:
        load_state_dict_into(model, sd, source="w.safetensors")
    lines = str(info.value).splitlines()
    assert lines[0] == "checkpoint w.safetensors (timm_vit layout) does not fit model vit_micro_patch4_32:"
    assert f"  ... and {len(mismatched) - 20} more shape mismatches" in lines
    assert sum(": checkpoint (" in line for line in lines) == 20  # at most 20 listed one per line
    assert any(line.startswith(f"  not in model ({len(unexpected)}): blocks.{depth}.") for line in lines)
    assert "hint: the checkpoint's patch embedding is embed_dim=64, in_chans=3, patch_size=4" in lines
    assert f"hint: the checkpoint has depth={depth + 2}, the model {depth}: pass depth={depth + 2}" in lines
    # most of the model's keys absent: the few listed, the count, and the other-architecture hint
    kept = {k: v for k, v in own.items() if k in ("cls_token", "pos_embed", "patch_embed.proj.weight")}
    with pytest.raises(CheckpointError) as info:
        load_state_dict_into(model, kept, source="w.safetensors")
    missing = [k for k in own if k not in kept]
    msg = str(info.value)
    assert (
        f"  missing in checkpoint ({len(missing)}): {', '.join(missing[:5])}, ... ({len(missing) - 5} more)"
        in msg
    )
    assert msg.endswith("hint: most keys do not match: is this checkpoint for another architecture?")


# ----------------------------------------------------------------------------- tokenizer options and errors
def test_uniform_palette_is_the_bin_centres():
    from vitlens.models.tokenizers.palette import uniform_palette

    centres = [63.5, 191.5]  # 2 levels: bins of 128, centres 64 - 0.5 and 192 - 0.5
    expected = torch.tensor([[r, g, b] for r in centres for g in centres for b in centres])
    torch.testing.assert_close(uniform_palette(8), expected)
    assert uniform_palette(512).shape == (512, 3) and uniform_palette().shape == (512, 3)
    torch.testing.assert_close(uniform_palette(64)[:4, 2], torch.tensor([31.5, 95.5, 159.5, 223.5]))
    with pytest.raises(ModelError, match=r"cube number of colours \(8, 64, 512, \.\.\.\), got k=10"):
        uniform_palette(10)


def test_pixel_tokenizer_options_and_messages(tmp_path):
    from vitlens.models.tokenizers.palette import save_palette, uniform_palette

    with pytest.warns(
        UserWarning,
        match=r"fixed uniform 512-colour RGB palette.*tokenizer_args=\{'palette': "
        r"'DIR/palette\.safetensors'\}",
    ):
        m = vitlens.create_model("vit_micro_patch4_32", tokenizer="pixel")
    assert m.patch_embed.grid_size == (16, 16) and m.patch_embed.palette.shape == (512, 3)
    with pytest.warns(UserWarning, match="uniform 8-colour"):
        m = vitlens.create_model(
            "vit_micro_patch4_32", tokenizer="pixel", tokenizer_args={"k": 8, "resolution": 8}
        )
    assert m.patch_embed.grid_size == (8, 8) and m.patch_embed.num_patches == 64
    with (
        pytest.warns(UserWarning),
        pytest.raises(ModelError, match=r"\(32, 32\) is not a multiple of resolution 12; .*\(e\.g\. 16\)"),
    ):
        vitlens.create_model(
            "vit_micro_patch4_32", tokenizer="pixel", tokenizer_args={"k": 8, "resolution": 12}
        )
    save_palette(tmp_path / "p.safetensors", uniform_palette(8))
    with pytest.raises(CheckpointError, match=r"has 8 colours but tokenizer_args k=64; drop k"):
        vitlens.create_model(
            "vit_micro_patch4_32",
            tokenizer="pixel",
            tokenizer_args={"palette": str(tmp_path / "p.safetensors"), "k": 64},
        )


def test_tokenizer_stats_and_config_errors():
    from vitlens.data.transforms import CIFAR10_MEAN, CIFAR10_STD
    from vitlens.models.tokenizers.common import input_stats

    assert input_stats() == (tuple(CIFAR10_MEAN), tuple(CIFAR10_STD))
    assert input_stats({"mean": [0.5] * 3, "std": [0.25] * 3}) == ((0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ModelError, match=r"need 3 values \(RGB\), got mean=\(0\.5, 0\.5\)"):
        input_stats({"mean": [0.5, 0.5]})
    with pytest.raises(
        ModelError, match=r"unknown tokenizer 'pixels'; choose one of patch, pixel, vq, hybrid"
    ):
        vitlens.create_model("vit_micro_patch4_32", tokenizer="pixels")
    with pytest.raises(ModelError, match="codebook_size must be at least 2, got 1"):
        VQVAEConfig(codebook_size=1)
    VQVAEConfig(codebook_size=2)
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            ModelError,
            match=r"unknown vq_config keys \['depth'\]; valid: "
            r"\['code_dim', 'codebook_size'",
        ),
    ):
        vitlens.create_model(
            "vit_micro_patch4_32", tokenizer="vq", tokenizer_args={"vq_config": {"depth": 1}}
        )
    with pytest.warns(UserWarning):
        m = vitlens.create_model(
            "vit_micro_patch4_32", tokenizer="vq", tokenizer_args={"vq_config": {"downsample": 8}}
        )
    assert m.patch_embed.grid_size == (4, 4)
    with pytest.raises(
        ModelError, match=r"image size \(36, 36\) is not divisible by the VQ-VAE's downsampling 8"
    ):
        m.patch_embed.set_image_size(36)


def test_tokenizer_files_roundtrip_and_refuse_the_other_kind(tmp_path):
    from vitlens.models.tokenizers.palette import load_palette, save_palette, uniform_palette
    from vitlens.models.tokenizers.vqvae import load_vqvae, save_vqvae

    palette = uniform_palette(8)
    save_palette(tmp_path / "p.safetensors", palette.double())
    torch.testing.assert_close(load_palette(tmp_path / "p.safetensors"), palette)  # stored as float32
    vq = VQVAE(
        VQVAEConfig(downsample=2, hidden=8, res_hidden=4, num_res_blocks=1, code_dim=4, codebook_size=4)
    )
    save_vqvae(tmp_path / "vq.safetensors", vq, meta={"note": "x"})
    back, meta = load_vqvae(tmp_path / "vq.safetensors")
    assert meta["kind"] == "vqvae" and meta["note"] == "x" and back.cfg.downsample == 2 and not back.training
    for k, v in vq.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    with pytest.raises(
        CheckpointError,
        match=r"vq\.safetensors holds no palette \(kind 'vqvae'\); make one with "
        r"`vitlens train-tokenizer --kind palette`",
    ):
        load_palette(tmp_path / "vq.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"p\.safetensors is not a VQ-VAE tokenizer \(kind 'palette'\); "
        r"train one with .*DIR/tokenizer\.safetensors",
    ):
        load_vqvae(tmp_path / "p.safetensors")


def test_run_paths_name_what_is_missing(tmp_path):
    from vitlens.models.loading import load_run_model

    with pytest.raises(
        MissingFileError, match=r"nope does not exist \(expected a run directory or a \.safetensors"
    ):
        load_run_model(tmp_path / "nope")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.safetensors").write_text("x")
    assert find_checkpoint(run, "best") == run / "checkpoints" / "best.safetensors"
    with pytest.raises(
        MissingFileError, match=r"run has no checkpoints/last\.safetensors; is it a vitlens run"
    ):
        find_checkpoint(run)
    file = tmp_path / "w.safetensors"
    file.write_text("x")
    assert find_checkpoint(file) == file


# ----------------------------------------------------------------------------- timm ViTs: ours or the peer
def _tiny_timm(**kw):
    from timm.models.vision_transformer import VisionTransformer

    base = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=1, num_heads=2)
    return VisionTransformer(**{**base, **kw})


@pytest.mark.parametrize(
    "kw",
    [
        dict(global_pool="map"),  # attention pooling
        dict(dynamic_img_size=True),
        dict(qk_norm=True),
        dict(scale_attn_norm=True),
        dict(scale_mlp_norm=True),
        dict(proj_bias=False),
        dict(act_layer="gelu_tanh"),
        dict(act_layer="silu"),
        dict(final_norm=False, fc_norm=False),
        dict(embed_norm_layer=torch.nn.LayerNorm),
        dict(img_size=(32, 48)),
    ],
    ids=str,
)
def test_timm_vit_variants_we_cannot_build_are_kept_as_peers(kw):
    from vitlens.models.peer_config import timm_vit_config

    assert timm_vit_config(_tiny_timm(**kw)) is None


@pytest.mark.parametrize(
    "kw, expected",
    [
        (
            dict(),
            dict(
                pool="cls",
                class_token=True,
                num_registers=0,
                init_values=None,
                fc_norm=False,
                norm_pre=False,
                patch_bias=True,
                qkv_bias=True,
                act="gelu",
                pos_embed="learned",
            ),
        ),
        (
            dict(global_pool="avg", class_token=False, fc_norm=True, qkv_bias=False, mlp_ratio=2.0),
            dict(pool="gap", class_token=False, fc_norm=True, qkv_bias=False, mlp_ratio=2.0),
        ),
        (
            dict(reg_tokens=2, no_embed_class=True, init_values=0.1, pre_norm=True, act_layer="quick_gelu"),
            dict(num_registers=2, init_values=1e-5, norm_pre=True, act="quick_gelu"),
        ),
        (
            dict(pos_embed="none", in_chans=1, num_classes=0),
            dict(pos_embed="none", in_chans=1, num_classes=0),
        ),
    ],
    ids=["plain", "gap", "registers", "nopos"],
)
def test_timm_vit_variants_we_build_match_the_peer(kw, expected):
    from vitlens.models.peer_config import timm_vit_config

    peer = randomise(_tiny_timm(**kw))
    cfg = timm_vit_config(peer)
    assert {k: cfg[k] for k in expected} == expected
    assert (cfg["img_size"], cfg["patch_size"], cfg["embed_dim"], cfg["depth"], cfg["num_heads"]) == (
        32,
        8,
        32,
        1,
        2,
    )
    ours = vitlens.models.VisionTransformer(vitlens.models.ViTConfig(**cfg))
    load_state_dict_into(ours, convert_state_dict(peer.state_dict(), "timm_vit", ours), source="peer")
    x = torch.randn(2, kw.get("in_chans", 3), 32, 32)
    assert (_logits(ours, x) - _logits(peer, x)).abs().max() < TOL


# ----------------------------------------------------------------------------- timm ResNets: ours or the peer
def _tiny_resnet(block="basic", **kw):
    from timm.models.resnet import BasicBlock as TimmBasic
    from timm.models.resnet import Bottleneck as TimmBottleneck
    from timm.models.resnet import ResNet as TimmResNet

    return TimmResNet(TimmBasic if block == "basic" else TimmBottleneck, [1, 1, 1, 1], num_classes=4, **kw)


@pytest.mark.parametrize(
    "block, kw",
    [
        ("bottleneck", dict(cardinality=2, base_width=32)),  # ResNeXt: grouped convolutions
        ("basic", dict(stem_type="deep")),  # a Sequential stem
        ("bottleneck", dict(avg_down=True)),  # the 'd' shortcut
        ("basic", dict(block_args=dict(attn_layer="se"))),  # squeeze-excitation
    ],
    ids=["resnext", "deep_stem", "avg_down", "se"],
)
def test_timm_resnet_variants_we_cannot_build_are_kept_as_peers(block, kw):
    from vitlens.models.peer_config import resnet_config

    assert resnet_config(_tiny_resnet(block, **kw)) is None


@pytest.mark.parametrize(
    "block, kw, expected",
    [
        ("basic", dict(), dict(block="basic", widths=(64, 128, 256, 512), base_width=64)),
        (
            "bottleneck",
            dict(base_width=128),
            dict(block="bottleneck", widths=(64, 128, 256, 512), base_width=128),
        ),
        ("basic", dict(in_chans=1), dict(in_chans=1)),
    ],
    ids=["basic", "wide_bottleneck", "one_channel"],
)
def test_timm_resnet_variants_we_build_match_the_peer(block, kw, expected):
    from vitlens.models.peer_config import resnet_config

    peer = randomise(_tiny_resnet(block, **kw))
    cfg = resnet_config(peer)
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["layers"] == (1, 1, 1, 1) and cfg["stem"] == "imagenet" and cfg["num_classes"] == 4
    ours = vitlens.models.ResNet(vitlens.models.ResNetConfig(**cfg))
    load_state_dict_into(ours, convert_state_dict(peer.state_dict(), "timm_vit", ours), source="peer")
    x = torch.randn(2, kw.get("in_chans", 3), 32, 32)
    assert (_logits(ours, x) - _logits(peer, x)).abs().max() < TOL
