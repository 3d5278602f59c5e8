"""Interop behaviours mutation testing found unchecked (round 2): hub, loading, convert, peer_config,
registry. Each test states what a user relies on against an independent expectation: the peer
library's own model (timm / torchvision / transformers, random weights, offline), a hand-written
message, or a value computed by hand. Hub caches are fabricated as in test_pretrained.py.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch

import vitlens
from vitlens.errors import CheckpointError, MissingFileError, ModelError
from vitlens.models import hub
from vitlens.models.convert import export_timm_state_dict, load_state_dict_into, timm_model_kwargs
from vitlens.models.loading import load_model, save_pretrained
from vitlens.models.peer_config import timm_vit_config

TOL = 1e-4
_TINY_VIT = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)


@torch.no_grad()
def _logits(model, x):
    out = model.eval()(x)
    return getattr(out, "logits", out)


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


# ----------------------------------------------------------------------------- convert
def test_strict_false_warning_counts_and_names_the_keys():
    model = vitlens.create_model("vit_micro_patch4_32", depth=1)
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    sd["extra.w"] = torch.zeros(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_state_dict_into(model, sd, source="w.safetensors", strict=False)
    (w,) = caught
    assert str(w.message) == (
        "loading w.safetensors with strict=False: 2 missing keys (head.weight, head.bias), "
        "1 unexpected keys (extra.w)"
    )
    assert not w.filename.endswith("convert.py")  # stacklevel: the caller's line (mutmut adds frames)


@pytest.mark.parametrize(
    "kw",
    [
        # CLIP: norm_pre (a LayerNorm before block 0), no patch bias, QuickGELU, an eps of its own
        dict(norm_pre=True, patch_bias=False, norm_eps=1e-3, act="quick_gelu"),
        # no [CLS], no position table, average pooling, 1 channel, a non-square image, mlp_ratio 2
        dict(
            pool="gap",
            class_token=False,
            pos_embed="none",
            qkv_bias=False,
            mlp_ratio=2.0,
            in_chans=1,
            img_size=(16, 32),
        ),
    ],
    ids=["clip", "gap_nopos"],
)
def test_export_to_timm_variants(kw):
    ours = _perturb(vitlens.models.VisionTransformer(vitlens.models.ViTConfig(**{**_TINY_VIT, **kw})))
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, **timm_model_kwargs(ours))
    assert isinstance(ref.norm_pre, torch.nn.LayerNorm) == kw.get("norm_pre", False)
    ref.load_state_dict(export_timm_state_dict(ours))  # strict: the same parameters on both sides
    x = torch.randn(2, kw.get("in_chans", 3), 16, kw.get("img_size", (16, 16))[1])
    assert (_logits(ref, x) - _logits(ours, x)).abs().max() < TOL


@pytest.mark.parametrize("kw", [dict(distilled=True), dict(norm_pre=True), dict(pool="cls+gap")], ids=str)
def test_timm_model_kwargs_refusal_whole_message(kw):
    ours = vitlens.models.VisionTransformer(vitlens.models.ViTConfig(**{**_TINY_VIT, **kw}))
    with pytest.raises(ModelError) as info:
        timm_model_kwargs(ours)
    assert str(info.value) == (
        "timm's VisionTransformer has no equivalent of this config (distilled, cls+gap pooling, or norm_pre "
        "without patch_bias=False); export the state dict instead"
    )


# ----------------------------------------------------------------------------- peer_config
def test_timm_gelu_layer_without_approximate_is_plain_gelu():
    """timm's own GELU (act_layer='gelu') has no `approximate` attribute: it is the exact GELU."""
    from timm.models.vision_transformer import VisionTransformer

    peer = _perturb(VisionTransformer(**_TINY_VIT, act_layer="gelu"))
    assert not hasattr(peer.blocks[0].mlp.act, "approximate")
    cfg = timm_vit_config(peer)
    assert cfg is not None and cfg["act"] == "gelu"
    ours = vitlens.models.VisionTransformer(vitlens.models.ViTConfig(**cfg))
    load_state_dict_into(ours, peer.state_dict(), source="peer")
    x = torch.randn(2, 3, 16, 16)
    assert (_logits(ours, x) - _logits(peer, x)).abs().max() < TOL


# ----------------------------------------------------------------------------- hub
def test_as_vitlens_refuses_to_resize_a_peer_head_with_the_whole_message():
    with pytest.raises(ModelError) as info:
        hub._as_vitlens(torch.nn.Linear(2, 2), None, "timm_vit", 5)
    assert str(info.value) == (
        "Linear is not a model vitlens converts, so its head cannot be resized here; "
        "load it without num_classes"
    )


@pytest.mark.parametrize(
    "name",
    [
        "LocalEntryNotFoundError",
        "EntryNotFoundError",
        "RepositoryNotFoundError",
        "OfflineModeIsEnabled",
        "HfHubHTTPError",
        "RevisionNotFoundError",
        "URLError",
        "HTTPError",
        "ConnectError",
        "ConnectionError",
        "TimeoutException",
    ],
)
def test_every_hub_error_name_means_missing_weights(name):
    """httpx / requests / huggingface_hub errors are told apart by class name (not all are OSError)."""
    assert hub._is_missing_weights(type(name, (Exception,), {})("x"))
    assert not hub._is_missing_weights(type(name + "Bug", (Exception,), {})("x"))


def test_timm_preprocess_follows_the_model_size(hubs):
    """A timm model built at 32 px is evaluated at 32 px: crop 32, resize floor(32 / crop_pct)."""
    model, meta = load_model("timm:vit_tiny_patch16_224", img_size=32, depth=1)
    pre = meta["preprocess"]
    crop_pct = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").crop_pct
    assert (pre["crop"], pre["img_size"], pre["resize"]) == (32, 32, int(32 / crop_pct))
    assert pre["resize_mode"] == "shorter" and pre["source"] == "timm pretrained_cfg"


# ----------------------------------------------------------------------------- loading
def test_weights_given_with_a_run_or_file_whole_message(tmp_path):
    path = save_pretrained(vitlens.create_model("vit_micro_patch4_32", depth=1), tmp_path / "m.safetensors")
    tail = (
        f"were given for {path}, which is a run directory or file and brings its own weights; give the "
        "weights with a model name (NAME, timm:NAME, torchvision:NAME), or the file itself with --model NAME"
    )
    with pytest.raises(ModelError) as info:
        load_model(path, pretrained=True)
    assert str(info.value) == "pretrained weights " + tail
    with pytest.raises(ModelError) as info:
        load_model(path, checkpoint="w.pth")
    assert str(info.value) == "a checkpoint (w.pth) " + tail


@pytest.mark.parametrize("spec", ["gone.safetensors", "gone.pt", "gone.pth", "gone.bin", "runs/gone"])
def test_a_missing_file_is_not_an_unknown_model(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingFileError) as info:
        load_model(spec)
    assert str(info.value) == f"checkpoint {spec} does not exist"


def test_a_file_saved_from_a_config_keeps_its_own_architecture(tmp_path):
    """save_pretrained of a model built from a config (no registered name) records its class; naming
    an architecture when loading it does not replace the file's own (deeper) one."""
    ours = _perturb(vitlens.models.VisionTransformer(vitlens.models.ViTConfig(**_TINY_VIT)))
    path = save_pretrained(ours, tmp_path / "m.safetensors")
    model, meta = load_model(path, model_name="vit_micro_patch4_32")
    assert isinstance(model, vitlens.models.VisionTransformer) and meta["arch"] == "VisionTransformer"
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(_logits(model, x), _logits(ours, x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- meta["preprocess"], whole
def test_timm_random_init_meta_is_the_pretrained_cfg_preprocessing(hubs):
    """vit_tiny's default tag (augreg): mean/std 0.5, bicubic, crop_pct 0.9 -> resize 248, crop 224."""
    model, meta = load_model("timm:vit_tiny_patch16_224", depth=1)
    assert meta == {
        "model": "timm:vit_tiny_patch16_224",
        "label": "timm:vit_tiny_patch16_224",
        "preprocess": {
            "resize": 248,
            "resize_mode": "shorter",
            "crop": 224,
            "img_size": 224,
            "interpolation": "bicubic",
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "source": "timm pretrained_cfg",
        },
    }
    assert isinstance(model, timm.models.VisionTransformer)  # random init keeps timm's module


def test_timm_squash_crop_mode_at_another_size(hubs):
    """CLIP fine-tunes use crop_mode 'squash' (both sides resized), crop_pct 0.95: at 64 px the resize is
    floor(64 / 0.95) = 67 squashed, then a 64 crop."""
    _, meta = load_model(
        "timm:vit_base_patch16_clip_384.openai_ft_in12k_in1k", img_size=64, depth=1, embed_dim=32, num_heads=2
    )
    pre = meta["preprocess"]
    assert (pre["resize"], pre["resize_mode"], pre["crop"], pre["interpolation"]) == (
        67,
        "squash",
        64,
        "bicubic",
    )
    assert pre["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert pre["std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])


def _small_tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return _perturb(
        VisionTransformer(
            image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3
        )
    )


def test_torchvision_pretrained_meta_whole(hubs, monkeypatch):
    """torchvision's weights transforms for ViT_B_16 IMAGENET1K_V1: resize 256, crop 224, bilinear."""
    import torchvision

    weights = torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1
    cache = hubs / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / weights.url.rsplit("/", 1)[1]).write_bytes(b"present")  # the offline check sees it cached
    peer = _small_tv_vit()
    monkeypatch.setattr(torchvision.models, "get_model", lambda name, weights=None, **kw: peer)
    model, meta = load_model("torchvision:vit_b_16", pretrained=True)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    assert meta == {
        "model": "torchvision:vit_b_16",
        "label": "torchvision:vit_b_16",
        "preprocess": {
            "resize": 256,
            "resize_mode": "shorter",
            "crop": 224,
            "img_size": 224,
            "interpolation": "bilinear",
            "mean": pytest.approx(mean),
            "std": pytest.approx(std),
            "source": "torchvision ViT_B_16_Weights.IMAGENET1K_V1",
        },
        "pretrained": "torchvision:vit_b_16.IMAGENET1K_V1",
        "img_size": 224,
        "mean": pytest.approx(mean),
        "std": pytest.approx(std),
    }
    x = torch.randn(2, 3, 16, 16)
    assert isinstance(model, vitlens.models.VisionTransformer)
    assert (_logits(model, x) - _logits(peer, x)).abs().max() < TOL


def _hf_folder(repo, model, processor=None):
    from _hub import hf_snapshot

    folder = hf_snapshot(repo)
    _perturb(model).save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


def test_hf_pretrained_meta_whole(hubs):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    cfg = ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=8,
        num_labels=3,
    )
    _hf_folder(
        "org/vit",
        ViTForImageClassification(cfg),
        ViTImageProcessor(
            size={"height": 16, "width": 16},
            resample=3,
            image_mean=[0.1, 0.2, 0.3],
            image_std=[0.4, 0.5, 0.6],
        ),
    )
    model, meta = load_model("hf:org/vit", pretrained=True)
    mean, std = pytest.approx([0.1, 0.2, 0.3]), pytest.approx([0.4, 0.5, 0.6])
    assert meta == {
        "model": "hf:org/vit",
        "label": "hf:org/vit",
        "preprocess": {
            "resize": 16,
            "resize_mode": "squash",
            "crop": 16,
            "img_size": 16,
            "interpolation": "bicubic",
            "mean": mean,
            "std": std,
            "source": "Hugging Face ViTImageProcessor",
        },
        "pretrained": "hf:org/vit",
        "img_size": 16,
        "mean": mean,
        "std": std,
    }
    assert isinstance(model, vitlens.models.VisionTransformer) and model.cfg.num_classes == 3
    reference = ViTForImageClassification.from_pretrained("org/vit")
    x = torch.randn(2, 3, 16, 16)
    assert (_logits(model, x) - _logits(reference, x)).abs().max() < TOL


def test_hf_dinov2_is_built_for_the_processors_crop(hubs):
    """DINOv2 is stored at one size and used at the processor's crop: our model is built at the crop, its
    position table resampled once on load (with the warning naming both grids)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14
    )
    _hf_folder(
        "org/dino",
        Dinov2Model(cfg),
        BitImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_center_crop=True, resample=3
        ),
    )
    with pytest.warns(UserWarning, match="checkpoint's 4x4 position table to the model's 2x2 grid"):
        model, meta = load_model("hf:org/dino", pretrained=True)
    assert model.cfg.img_size == 28 and meta["img_size"] == 28 and model.pos_embed.shape == (1, 5, 16)
    assert (meta["preprocess"]["resize"], meta["preprocess"]["resize_mode"]) == (32, "shorter")
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 16)  # no head: the [CLS] features


# ----------------------------------------------------------------------------- timm: tags, sizes, messages
_SLIM = dict(depth=1, embed_dim=32, num_heads=2)  # a tiny body for fabricated caches


def _timm_cache(full: str, **kw):
    """A fabricated HF-cache entry for timm's ``full`` name (random weights of the slim model)."""
    from _hub import hf_snapshot
    from safetensors.torch import save_file

    peer = _perturb(timm.create_model(full, **kw))
    save_file(
        {k: v.contiguous() for k, v in peer.state_dict().items()},
        str(hf_snapshot(f"timm/{full}") / "model.safetensors"),
    )
    return peer


def test_timm_pretrained_tag_size_and_classes(hubs):
    """pretrained='TAG' picks that tag (not the default one); img_size and num_classes adapt our model."""
    peer = _timm_cache("vit_tiny_patch16_224.augreg_in21k", **_SLIM)  # not the default tag
    spec = "timm:vit_tiny_patch16_224"
    model, meta = load_model(spec, pretrained="augreg_in21k", **_SLIM)
    assert model.cfg.num_classes == 21843 and model.patch_embed.img_size == (224, 224)
    x = torch.randn(1, 3, 224, 224)
    assert (_logits(model, x) - _logits(peer, x)).abs().max() < TOL
    assert meta["pretrained"] == "timm:vit_tiny_patch16_224.augreg_in21k"
    with pytest.warns(UserWarning, match="14x14 position table to the model's 2x2 grid"):
        small, meta = load_model(spec, pretrained="augreg_in21k", img_size=32, num_classes=5, **_SLIM)
    pre = {
        "resize": 35,
        "resize_mode": "shorter",
        "crop": 32,
        "img_size": 32,
        "interpolation": "bicubic",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "source": "timm pretrained_cfg",
    }
    assert meta == {
        "model": spec,
        "label": spec,
        "preprocess": pre,
        "pretrained": "timm:vit_tiny_patch16_224.augreg_in21k",
        "img_size": 32,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    assert small.cfg.img_size == 32 and small.head.out_features == 5 and small.cfg.num_classes == 5
    torch.testing.assert_close(small.blocks[0].attn.qkv.weight, peer.blocks[0].attn.qkv.weight)


def test_timm_pretrained_peer_we_do_not_convert_is_built_at_the_size(hubs):
    """SigLIP's attention pooling is not ours: timm's module comes back, built (by timm) at img_size."""
    name = "vit_base_patch16_siglip_224.webli"
    _timm_cache(name, **_SLIM)
    model, meta = load_model(f"timm:{name}", pretrained=True, img_size=32, **_SLIM)
    assert isinstance(model, timm.models.VisionTransformer) and model.attn_pool is not None
    assert model.patch_embed.img_size == (32, 32) and model(torch.randn(1, 3, 32, 32)).shape[-1] == 32
    assert timm.models.get_pretrained_cfg(name).crop_pct == 0.9  # resize floor(32 / 0.9) = 35
    assert (meta["img_size"], meta["preprocess"]["crop"], meta["preprocess"]["resize"]) == (32, 32, 35)
    same, _ = load_model(f"timm:{name}", pretrained=True, **_SLIM)
    assert same.patch_embed.img_size == (224, 224)


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("resnet10x", "timm has no model 'resnet10x'; similar: {}; see timm.list_models('resne*')"),
        ("zzz_model", "timm has no model 'zzz_model'; see timm.list_models('zzz_m*')"),
    ],
)
def test_timm_unknown_model_whole_message(arch, expected, hubs):
    similar = ", ".join(timm.list_models(f"{arch[:8]}*")[:5])  # timm's own names sharing 8 characters
    with pytest.raises(ModelError) as info:
        load_model(f"timm:{arch}")
    assert str(info.value) == expected.format(similar)


def test_timm_tag_of_a_model_without_weights_whole_message(hubs):
    with pytest.raises(ModelError) as info:
        load_model("timm:vit_base_patch16_18x2_224.foo", pretrained=True)
    assert str(info.value) == "timm has no pretrained tag 'foo' for vit_base_patch16_18x2_224; its tags: none"
    with pytest.raises(ModelError) as info:
        load_model("timm:vit_tiny_patch16_224.foo", pretrained=True)
    assert str(info.value) == (
        "timm has no pretrained tag 'foo' for vit_tiny_patch16_224; its tags: "
        "augreg_in21k, augreg_in21k_ft_in1k"
    )


# ----------------------------------------------------------------------------- torchvision: weights, messages
_FIX = (
    "download it once where the hub is reachable (unset HF_HUB_OFFLINE), point HF_HOME/TORCH_HOME at a "
    "cache that has it, or pass the weights file itself with --checkpoint FILE "
    "(create_model(NAME, checkpoint=FILE))"
)


def test_torchvision_random_init_ignores_a_weights_tag_and_takes_overrides(hubs):
    import torchvision

    model, meta = load_model("torchvision:resnet18.IMAGENET1K_V1", num_classes=4)  # not pretrained: random
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 4
    assert meta == {
        "model": "torchvision:resnet18.IMAGENET1K_V1",
        "label": "torchvision:resnet18.IMAGENET1K_V1",
    }


@pytest.mark.parametrize(
    "spec, pretrained",
    [("torchvision:resnet50", "IMAGENET1K_V1"), ("torchvision:resnet50.IMAGENET1K_V1", True)],
)
def test_torchvision_named_weights_not_the_default_whole_message(spec, pretrained, hubs):
    """resnet50's DEFAULT is IMAGENET1K_V2 (resnet50-11ad3fa6.pth): the V1 file is the one looked for."""
    cache = hubs / "torch" / "hub" / "checkpoints"
    with pytest.raises(CheckpointError) as info:
        load_model(spec, pretrained=pretrained)
    assert str(info.value) == (
        "pretrained weights for torchvision:resnet50 are not cached: resnet50-0676ba61.pth "
        f"(ResNet50_Weights.IMAGENET1K_V1) is not in {cache} and cannot be fetched "
        "(HF_HUB_OFFLINE=1 is set); " + _FIX
    )


def test_torchvision_unknown_weights_whole_message(hubs):
    with pytest.raises(ModelError) as info:
        load_model("torchvision:resnet50", pretrained="IMAGENET1K_V9")
    assert str(info.value) == (
        "torchvision has no weights 'IMAGENET1K_V9' for resnet50; choose one of DEFAULT, IMAGENET1K_V1, "
        "IMAGENET1K_V2"
    )  # DEFAULT is also a member of the enum: listed once
    with pytest.raises(ModelError) as info:
        load_model("torchvision:resnet999")
    assert str(info.value) == "torchvision has no model 'resnet999'; see torchvision.models.list_models()"


def test_torchvision_pretrained_passes_weights_and_overrides_to_torchvision(hubs, monkeypatch):
    """A spy in torchvision's place: the weights enum member and the other overrides reach get_model,
    num_classes does not (a new head is ours to make)."""
    import torchvision

    weights = torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1
    cache = hubs / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / weights.url.rsplit("/", 1)[1]).write_bytes(b"present")
    calls = []

    def spy(name, **kw):
        calls.append((name, kw))
        return _small_tv_vit()

    monkeypatch.setattr(torchvision.models, "get_model", spy)
    model = vitlens.create_model("torchvision:vit_b_16", pretrained=True, dropout=0.0, num_classes=5)
    assert calls == [("vit_b_16", {"weights": weights, "dropout": 0.0})]
    assert model.head.out_features == 5 and model.cfg.num_classes == 5


def test_torchvision_download_failure_whole_message(hubs, monkeypatch):
    import urllib.error

    import torchvision

    monkeypatch.setattr(hub, "offline", lambda: False)

    def unreachable(name, **kw):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.models, "get_model", unreachable)
    with pytest.raises(CheckpointError) as info:
        load_model("torchvision:resnet18", pretrained=True)
    assert str(info.value) == (
        "pretrained weights for torchvision:resnet18 are not cached: resnet18-f37072fd.pth "
        f"(ResNet18_Weights.IMAGENET1K_V1) is not in {hubs / 'torch' / 'hub' / 'checkpoints'} and cannot be "
        "fetched (URLError: <urlopen error no route to host>); " + _FIX
    )


# ------------------------------------------------------------------------ hub._fetch: one line, cut at 90
def _raise(e):
    def load():
        raise e

    return load


def test_fetch_missing_reason_is_the_first_line_cut_at_90_characters():
    long = "x" * 100
    with pytest.raises(CheckpointError) as info:
        hub._fetch(_raise(ConnectionError(f"{long}\nsecond line")), "timm:m", "f.safetensors", "/cache")
    assert str(info.value) == (
        "pretrained weights for timm:m are not cached: f.safetensors is not in /cache and cannot be fetched "
        f"(ConnectionError: {'x' * 90}); " + _FIX
    )
    with pytest.raises(CheckpointError) as info:
        hub._fetch(_raise(ConnectionError()), "timm:m", "f.safetensors", "/cache")  # no message: the class
    assert "(ConnectionError: ConnectionError); " in str(info.value)


def test_fetch_state_dict_misfit_names_the_last_line_cut_at_90_characters():
    detail = "size mismatch for head.weight: " + "y" * 80
    err = RuntimeError(f"Error(s) in loading state_dict for VisionTransformer:\n\t{detail}")
    with pytest.raises(CheckpointError) as info:
        hub._fetch(_raise(err), "timm:m", "f.safetensors", "/cache")
    assert str(info.value) == (
        f"the cached weights for timm:m (f.safetensors in /cache) do not fit the model ({detail[:90]}...); "
        "the cache holds another variant or a damaged file: delete it to fetch it again, or pass the weights "
        "file itself with --checkpoint FILE (create_model(NAME, checkpoint=FILE))"
    )
    assert hub._fetch(lambda: "loaded", "timm:m", "f", "/cache") == "loaded"


# --------------------------------------------------------------- convert: resampling, registered meta
def test_pos_embed_resampling_warning_whole_and_timms_values():
    src = _perturb(vitlens.models.VisionTransformer(vitlens.models.ViTConfig(**_TINY_VIT)))  # 2x2 grid
    dst = vitlens.models.VisionTransformer(vitlens.models.ViTConfig(**{**_TINY_VIT, "img_size": (16, 32)}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_state_dict_into(dst, src.state_dict(), source="w")
    (w,) = caught
    assert str(w.message) == (
        "resampling the checkpoint's 2x2 position table to the model's 2x4 grid (bicubic), "
        "as when fine-tuning at another resolution"
    )
    from timm.layers import resample_abs_pos_embed

    expected = resample_abs_pos_embed(src.pos_embed.detach(), (2, 4), (2, 2), num_prefix_tokens=1)
    torch.testing.assert_close(dst.pos_embed.detach(), expected)


def test_registered_name_meta_is_the_name():
    model, meta = load_model("vit_micro_patch4_32", depth=1)
    assert meta == {"model": "vit_micro_patch4_32", "label": "vit_micro_patch4_32"}
    assert model.model_name == "vit_micro_patch4_32" and not model.training


# ----------------------------------------------------------------------------- registry: the whole messages
@pytest.fixture
def table(monkeypatch):
    """A private registry table holding two builders (the real one is left untouched)."""
    from torch import nn

    from vitlens.models import registry

    monkeypatch.setattr(registry, "_MODELS", {})
    registry.register_model(lambda **kw: nn.Linear(2, 2))  # registered as "<lambda>", without a config class
    registry.register_models(
        vitlens.models.ResNet,
        vitlens.models.ResNetConfig,
        {"alpha_model": dict(layers=(1, 1, 1), widths=(4, 8, 16), stem="cifar", num_classes=3)},
    )
    return registry


def test_registry_messages_whole(table):
    import dataclasses

    with pytest.raises(ModelError) as info:
        table.model_entry("alpha_modl")
    assert str(info.value) == (
        "unknown model 'alpha_modl'. Did you mean alpha_model? `vitlens models` (or vitlens.list_models()) "
        "lists "
        "them all."
    )
    with pytest.raises(ModelError) as info:
        table.model_entry("zzzz")
    assert (
        str(info.value) == "unknown model 'zzzz'. `vitlens models` (or vitlens.list_models()) lists them all."
    )
    fields = sorted(f.name for f in dataclasses.fields(vitlens.models.ResNetConfig))
    with pytest.raises(vitlens.errors.ConfigError) as info:
        table.build_model("alpha_model", zeta=1, embed_dim=3)
    assert (
        str(info.value)
        == f"alpha_model has no config field(s) embed_dim, zeta; valid fields: {', '.join(fields)}"
    )
    with pytest.raises(ModelError) as info:
        table.model_config_class("<lambda>")
    assert str(info.value) == (
        "model '<lambda>' was registered without a config dataclass, so its fields are unknown; "
        "register it with "
        "register_model(config_class=...)"
    )
    with pytest.raises(ModelError) as info:
        table.register_models(vitlens.models.ResNet, vitlens.models.ResNetConfig, {"alpha_model": {}})
    assert str(info.value) == "model 'alpha_model' registered twice"
    model = table.build_model("alpha_model", num_classes=5)
    assert model.model_name == "alpha_model" and model.fc.out_features == 5 and model.cfg.widths == (4, 8, 16)
    assert table.list_models() == ["<lambda>", "alpha_model"] and table.list_models("alpha*") == [
        "alpha_model"
    ]
    assert table.model_defaults("alpha_model")["widths"] == (4, 8, 16) and table.is_registered("alpha_model")


def test_hf_preprocess_without_an_image_processor_whole(tmp_path):
    """No preprocessor_config.json: the config's image size, bilinear, mean/std 0.5 (transformers' ViT)."""
    from transformers import ViTConfig

    pre = hub._hf_preprocess(str(tmp_path), ViTConfig(image_size=24))
    assert pre == {
        "resize": 24,
        "resize_mode": "shorter",
        "crop": 24,
        "img_size": 24,
        "interpolation": "bilinear",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "source": "Hugging Face config (no image processor)",
    }


def test_a_training_checkpoint_keeps_its_recorded_model_args(tmp_path):
    """A trainer checkpoint records model + model_args (no arch): naming the model when loading it still
    builds the recorded variant (depth 1 here), not the name's defaults."""
    from vitlens.io import save_checkpoint

    ours = _perturb(vitlens.create_model("vit_micro_patch4_32", depth=1, num_classes=4))
    path = tmp_path / "last.safetensors"
    save_checkpoint(
        path,
        ours.state_dict(),
        meta={"model": "vit_micro_patch4_32", "model_args": {"depth": 1, "num_classes": 4}},
    )
    model, _ = load_model(path, model_name="vit_micro_patch4_32")
    assert model.cfg.depth == 1 and model.cfg.num_classes == 4
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(model, x), _logits(ours, x), rtol=0, atol=0)
