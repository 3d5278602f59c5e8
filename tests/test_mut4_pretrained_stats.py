"""The pieces behind ``vitlens train --pretrained``'s normalisation, one by one, against typed-in values.

``pretrained_stats`` (every hub: registered, ``timm:``, ``torchvision:``, ``hf:``; tags in the name or
given as ``pretrained``; weights that do not exist), ``peer_config_fields``/``model_fields`` (what the
trainer may pass to a hub model), ``input_stats``/``stats_message`` (the line the user reads),
``architecture_meta`` and the reload of a run of a ``timm:``/``torchvision:`` model, ``run_stats``
(what ``vitlens eval``/the analyses normalise with), and ``evaluate``'s device-side sums against a
hand computation. The hub caches are fabricated (tests/_hub.py, the ``hubs`` fixture: offline, no
sockets); the statistics are the libraries' documented constants, typed in.
"""

from __future__ import annotations

import dataclasses
import math
import re
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from _hub import hf_snapshot
from torch import nn

from vitlens.errors import CheckpointError
from vitlens.io import save_checkpoint
from vitlens.models import hub
from vitlens.models.hub import peer_config_fields, pretrained_stats
from vitlens.models.loading import architecture_meta, load_model
from vitlens.models.resnet import ResNet, ResNetConfig
from vitlens.models.vit import VisionTransformer, ViTConfig
from vitlens.train import TrainConfig
from vitlens.train import trainer as trainer_mod

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
OPENAI_CLIP = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
DEIT = "deit_tiny_patch16_224"
CPU = torch.device("cpu")


def _stats(stats, source: str) -> dict:
    return {"mean": pytest.approx(stats[0]), "std": pytest.approx(stats[1]), "source": source}


# ----------------------------------------------------------------------------- pretrained_stats: timm
@pytest.mark.parametrize(
    "spec, pretrained, stats, source",
    [
        # a tag given as `pretrained` picks those weights: DINO's ImageNet statistics, not augreg's 0.5
        ("timm:vit_small_patch16_224", "dino", IMAGENET, "timm pretrained_cfg of vit_small_patch16_224.dino"),
        ("vit_small_patch16_224", "dino", IMAGENET, "timm pretrained_cfg of vit_small_patch16_224.dino"),
        (
            "timm:vit_small_patch16_224",
            True,
            HALF,
            "timm pretrained_cfg of vit_small_patch16_224.augreg_in21k_ft_in1k",
        ),
        # the tag in the name (BAMBOO: CLIP statistics); a tag given as `pretrained` wins over it
        (
            "timm:vit_base_patch16_224.bamboo",
            True,
            OPENAI_CLIP,
            "timm pretrained_cfg of vit_base_patch16_224.bamboo",
        ),
        (
            "timm:vit_base_patch16_224.bamboo",
            "mae",
            IMAGENET,
            "timm pretrained_cfg of vit_base_patch16_224.mae",
        ),
        (f"timm:{DEIT}.fb_in1k", True, IMAGENET, f"timm pretrained_cfg of {DEIT}.fb_in1k"),
    ],
)
def test_pretrained_stats_timm_tags(hubs, spec, pretrained, stats, source):
    assert pretrained_stats(spec, pretrained) == _stats(stats, source)


@pytest.mark.parametrize("spec", ["timm:vit_base_patch16_gap_224", "vit_base_patch16_gap_224"])
def test_pretrained_stats_of_a_timm_model_without_pretrained_weights_is_unknown(hubs, spec):
    # timm knows the architecture and has an "untrained" default cfg (mean/std 0.5), but no weights
    # were ever trained with it: nothing to match
    assert (
        timm.is_model("vit_base_patch16_gap_224") and timm.list_pretrained("vit_base_patch16_gap_224*") == []
    )
    assert pretrained_stats(spec) is None


@pytest.mark.parametrize("missing", ["mean", "std"])
def test_pretrained_stats_of_a_cfg_without_statistics_is_unknown(hubs, monkeypatch, missing):
    real = timm.models.get_pretrained_cfg
    monkeypatch.setattr(
        timm.models, "get_pretrained_cfg", lambda name: dataclasses.replace(real(name), **{missing: None})
    )
    assert pretrained_stats(f"timm:{DEIT}") is None
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: None)
    assert pretrained_stats(f"timm:{DEIT}") is None


# ----------------------------------------------------------------------------- pretrained_stats: torchvision
@pytest.mark.parametrize(
    "spec, pretrained, weights",
    [
        ("torchvision:resnet50.IMAGENET1K_V1", True, "ResNet50_Weights.IMAGENET1K_V1"),  # named in the spec
        ("torchvision:resnet50", "IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V1"),  # named as pretrained
        (
            "torchvision:resnet50.IMAGENET1K_V1",
            "IMAGENET1K_V2",
            "ResNet50_Weights.IMAGENET1K_V2",
        ),  # that wins
        ("torchvision:resnet50", True, "ResNet50_Weights.IMAGENET1K_V2"),  # DEFAULT
        ("torchvision:vit_b_16", True, "ViT_B_16_Weights.IMAGENET1K_V1"),
    ],
)
def test_pretrained_stats_torchvision_weights_names(hubs, spec, pretrained, weights):
    assert pretrained_stats(spec, pretrained) == _stats(IMAGENET, f"torchvision {weights}.transforms()")


def test_pretrained_stats_torchvision_weights_of_other_statistics(hubs):
    # torchvision's ViT-H/14 SWAG weights are ImageNet-normalised too; the DEFAULT is checked by name
    got = pretrained_stats("torchvision:vit_h_14")
    assert got == _stats(IMAGENET, "torchvision ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1.transforms()")


@pytest.mark.parametrize(
    "spec, pretrained",
    [("torchvision:resnet50", "IMAGENET1K_V9"), ("torchvision:resnet50.IMAGENET1K_V9", True)],
)
def test_pretrained_stats_torchvision_unknown_weights(hubs, spec, pretrained):
    assert pretrained_stats(spec, pretrained) is None


# ----------------------------------------------------------------------------- pretrained_stats: Hugging Face
def _hf_model(folder, processor: bool = True) -> None:
    from transformers import ViTConfig as HFViTConfig
    from transformers import ViTImageProcessor

    HFViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=48,
        patch_size=16,
    ).save_pretrained(folder)
    if processor:
        ViTImageProcessor(
            size={"height": 48, "width": 48}, image_mean=OPENAI_CLIP[0], image_std=OPENAI_CLIP[1]
        ).save_pretrained(folder)


def test_pretrained_stats_hf_from_the_image_processor(hubs):
    _hf_model(hf_snapshot("org/vit-clip-stats"))
    got = pretrained_stats("hf:org/vit-clip-stats")
    assert got == _stats(OPENAI_CLIP, "Hugging Face ViTImageProcessor")


def test_pretrained_stats_hf_without_an_image_processor_is_the_config_default(hubs):
    _hf_model(hf_snapshot("org/vit-bare"), processor=False)
    got = pretrained_stats("hf:org/vit-bare")
    assert got == _stats(HALF, "Hugging Face config (no image processor)")


def test_pretrained_stats_hf_local_folder_with_a_colon_in_its_path(hubs):
    folder = hubs / "finetune-10:30" / "vit"  # a time in a folder name: only the first colon is the prefix's
    folder.mkdir(parents=True)
    _hf_model(folder)
    assert pretrained_stats(f"hf:{folder}") == _stats(OPENAI_CLIP, "Hugging Face ViTImageProcessor")


def test_pretrained_stats_hf_missing_is_the_one_line_cache_error(hubs):
    with pytest.raises(CheckpointError) as err:
        pretrained_stats("hf:org/absent")
    cache = hubs / "hf" / "hub"
    assert re.fullmatch(
        re.escape(
            f"pretrained weights for hf:org/absent are not cached: org/absent (config.json) is not in "
            f"{cache} and cannot be fetched ("
        )
        + r"OSError: [^\n]+"
        + re.escape(
            "); download it once where the hub is reachable (unset HF_HUB_OFFLINE), point HF_HOME/TORCH_HOME "
            "at a cache that has it, or pass the weights file itself with --checkpoint FILE "
            "(create_model(NAME, checkpoint=FILE))"
        ),
        str(err.value),
    )


def test_pretrained_stats_of_a_vitlens_only_model_is_unknown(hubs):
    for name in ("resnet20", "vit_micro_patch4_32", "gpt_nano"):
        assert pretrained_stats(name) is None


# ----------------------------------------------------------------------------- registered names' hubs
@pytest.mark.parametrize("name", ["resnet20", "vit_micro_patch4_32"])
def test_vitlens_only_registered_models_have_no_pretrained_weights(hubs, name):
    from vitlens.errors import ModelError

    with pytest.raises(ModelError) as err:
        hub.create_pretrained_registered(name, True)
    assert str(err.value) == (
        f"{name} is a vitlens-only model with no pretrained weights on a hub; train it "
        "(`vitlens train`) and load the run, or pick an ImageNet model (`vitlens models 'vit_*'`)"
    )


# ----------------------------------------------------------------------------- what the trainer may pass
def test_peer_config_fields_of_a_timm_vit_and_resnet(hubs, monkeypatch):
    devices = []
    real = timm.create_model

    def create(*args, **kw):
        model = real(*args, **kw)
        devices.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(timm, "create_model", create)
    for spec in (f"timm:{DEIT}", f"timm:{DEIT}.fb_in1k"):
        fields = peer_config_fields(spec)
        assert {
            "img_size",
            "patch_size",
            "in_chans",
            "num_classes",
            "embed_dim",
            "depth",
            "num_heads",
        } <= fields
        assert "self" not in fields
    # the architecture's fields whatever the tag names (a wrong tag is for building it to report)
    assert "img_size" in peer_config_fields(f"timm:{DEIT}.no_such_tag")
    fields = peer_config_fields("timm:resnet10t")
    assert {"in_chans", "num_classes", "layers", "drop_rate"} <= fields and "img_size" not in fields
    assert "self" not in fields
    assert devices == ["meta"] * 4  # built without memory or weights


def test_peer_config_fields_drops_var_keyword(hubs, monkeypatch):
    class Peer(nn.Module):
        def __init__(self, img_size=224, *blocks, in_chans=3, **kwargs):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

    monkeypatch.setattr(timm, "create_model", lambda arch: Peer())
    assert peer_config_fields(f"timm:{DEIT}") == {"img_size", "blocks", "in_chans"}


@pytest.mark.parametrize(
    "spec",
    [
        "torchvision:resnet18",
        "hf:google/vit-base-patch16-224",
        "timm:no_such_model",
        "timm:hf-hub:timm/vit_tiny_patch16_224",
    ],
)
def test_peer_config_fields_none_asked(hubs, spec):
    assert peer_config_fields(spec) == set()


def test_model_fields_of_hub_and_registered_names(hubs):
    assert "img_size" in trainer_mod.model_fields(f"timm:{DEIT}")
    assert "img_size" not in trainer_mod.model_fields("timm:resnet10t")
    assert trainer_mod.model_fields("torchvision:resnet18") == set()
    assert {"img_size", "embed_dim", "depth"} <= trainer_mod.model_fields("vit_micro_patch4_32")
    from vitlens.errors import ModelError

    with pytest.raises(ModelError):
        trainer_mod.model_fields("no_such_model")


def test_a_builder_registered_without_a_config_class_takes_no_fields_and_has_no_hub(hubs, monkeypatch):
    from vitlens.models import registry

    def my_mlp(**overrides):
        return nn.Linear(2, 2)

    monkeypatch.setitem(registry._MODELS, "my_mlp", registry.ModelEntry("my_mlp", my_mlp, None))
    assert trainer_mod.model_fields("my_mlp") == set()  # nothing passed but num_classes and the user's
    assert pretrained_stats("my_mlp") is None


# ----------------------------------------------------------------------------- input_stats, stats_message
def test_input_stats_only_when_fine_tuning(hubs, monkeypatch):
    assert trainer_mod.input_stats(TrainConfig(model=f"timm:{DEIT}", pretrained=True)) == _stats(
        IMAGENET, f"timm pretrained_cfg of {DEIT}.fb_in1k"
    )
    assert trainer_mod.input_stats(
        TrainConfig(model="torchvision:resnet50.IMAGENET1K_V1", pretrained=True)
    ) == (_stats(IMAGENET, "torchvision ResNet50_Weights.IMAGENET1K_V1.transforms()"))

    def no_lookup(*args):
        raise AssertionError("looked up without --pretrained")

    monkeypatch.setattr(trainer_mod, "pretrained_stats", no_lookup)
    assert trainer_mod.input_stats(TrainConfig(model=f"timm:{DEIT}", pretrained=False)) is None


def test_stats_message_both_cases():
    cfg = TrainConfig(model="timm:vit_base_patch16_clip_224.openai", data="cifar10", pretrained=True)
    info = SimpleNamespace(mean=tuple(OPENAI_CLIP[0]), std=tuple(OPENAI_CLIP[1]))
    source = "timm pretrained_cfg of vit_base_patch16_clip_224.openai"
    assert trainer_mod.stats_message(cfg, info, {"source": source}) == (
        "fine-tuning pretrained timm:vit_base_patch16_clip_224.openai: images normalised with mean "
        "(0.4815, 0.4578, 0.4082) std (0.2686, 0.2613, 0.2758), the statistics its weights were trained "
        "with (timm pretrained_cfg of vit_base_patch16_clip_224.openai), not cifar10's own"
    )
    info = SimpleNamespace(mean=(0.5071, 0.4865), std=(0.2673, 0.2564))
    cfg = TrainConfig(model="resnet18", data="cifar100", pretrained=True)
    assert trainer_mod.stats_message(cfg, info, None) == (
        "fine-tuning pretrained resnet18: the statistics its weights were trained with are unknown (no "
        "pretrained cfg), so images are normalised with cifar100's own mean (0.5071, 0.4865) std "
        "(0.2673, 0.2564)"
    )


# ----------------------------------------------------------------------------- run_stats
def test_run_stats_only_for_runs_that_recorded_a_source():
    from vitlens.data.build import run_stats

    meta = {"mean": OPENAI_CLIP[0], "std": OPENAI_CLIP[1], "normalization": "timm pretrained_cfg of x.openai"}
    got = run_stats(meta)
    assert got == {"mean": tuple(OPENAI_CLIP[0]), "std": tuple(OPENAI_CLIP[1])}
    assert type(got["mean"]) is tuple and type(got["std"]) is tuple  # build_data's types
    assert run_stats({"mean": OPENAI_CLIP[0], "std": OPENAI_CLIP[1]}) == {}  # the data's own
    assert run_stats({"mean": OPENAI_CLIP[0], "std": OPENAI_CLIP[1], "normalization": ""}) == {}
    assert run_stats({}) == {}


# ----------------------------------------------------------------------------- architecture_meta and reloads
def test_architecture_meta_of_vitlens_modules_only():
    vit = VisionTransformer(
        ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    )
    meta = architecture_meta(vit)
    assert set(meta) == {"arch", "config"} and meta["arch"] == "VisionTransformer"
    assert (meta["config"]["embed_dim"], meta["config"]["depth"], meta["config"]["num_classes"]) == (16, 1, 3)
    rebuilt = VisionTransformer(ViTConfig(**meta["config"]))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in vit.state_dict().items()
    }
    res = ResNet(ResNetConfig(layers=(1, 1), widths=(8, 16), num_classes=4))
    assert architecture_meta(res)["arch"] == "ResNet" and architecture_meta(res)["config"]["num_classes"] == 4
    assert architecture_meta(timm.create_model("resnet10t", num_classes=2)) == {}  # a peer's own module
    assert architecture_meta(nn.Linear(2, 2)) == {}


def test_checkpoint_of_a_timm_model_reloads_as_the_peer_module(hubs):
    peer = timm.create_model("resnet10t", num_classes=3)
    file = hubs / "peer.safetensors"
    save_checkpoint(
        file, peer.state_dict(), meta={"model": "timm:resnet10t", "model_args": {"num_classes": 3}}
    )
    model, meta = load_model(file)
    assert type(model) is timm.models.resnet.ResNet and meta["model"] == "timm:resnet10t"
    for k, v in peer.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_checkpoint_of_a_torchvision_model_reloads_as_the_peer_module(hubs):
    peer = torchvision.models.resnet18(num_classes=4)
    file = hubs / "peer.safetensors"
    save_checkpoint(
        file, peer.state_dict(), meta={"model": "torchvision:resnet18", "model_args": {"num_classes": 4}}
    )
    model, _ = load_model(file)
    assert type(model) is torchvision.models.ResNet and model.fc.out_features == 4


def test_checkpoint_of_a_converted_hub_model_reloads_as_the_vitlens_module(hubs):
    vit = VisionTransformer(
        ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    )
    file = hubs / "ft.safetensors"
    save_checkpoint(file, vit.state_dict(), meta={"model": f"timm:{DEIT}", **architecture_meta(vit)})
    model, _ = load_model(file)
    assert type(model) is VisionTransformer and model.head.out_features == 3
    for k, v in vit.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("name", [None, "mystery_model"])
def test_checkpoint_of_an_unknown_model_is_one_line(hubs, name):
    file = hubs / "x.safetensors"
    save_checkpoint(file, {"w": torch.zeros(1)}, meta={"model": name, "model_args": {}})
    with pytest.raises(CheckpointError) as err:
        load_model(file)
    assert str(err.value) == (
        f"{file} names neither a registered model ({name!r}) nor a known architecture (None); load it "
        "with create_model(NAME, checkpoint=path)"
    )


# ----------------------------------------------------------------------------- evaluate's device-side sums
class _Lookup(nn.Module):
    """Each "image" is one number: the index of a row of preset logits."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x):
        return self.table[x.view(-1).long()]


def test_evaluate_top1_top5_loss_by_hand_with_a_last_partial_batch():
    # 7 classes; batches of 3: [0, 1, 2], [3, 4, 5], [6] (the last one partial)
    row = [6.0, 5, 4, 3, 2, 1, 0]
    logits = torch.tensor([row] * 6 + [[0.0, 0, 0, 0, 0, 0, 8]])
    labels = [0, 4, 5, 1, 6, 2, 6]
    # ranks of the labels: 1, 5, 6, 2, 7, 3 | 1 -> top-1: items 0 and 6; top-5: 0, 1, 3, 5, 6
    data = [(torch.tensor([i]), y) for i, y in enumerate(labels)]
    out = trainer_mod.evaluate(_Lookup(logits), data, batch_size=3, device=CPU)
    assert out["n"] == 7 and type(out["n"]) is int
    assert out["top1"] == pytest.approx(100 * 2 / 7, rel=1e-12)
    assert out["top5"] == pytest.approx(100 * 5 / 7, rel=1e-12)
    lse = math.log(sum(math.exp(v) for v in row))
    nll = [lse - row[y] for y in labels[:6]] + [math.log(6 + math.exp(8.0)) - 8.0]
    assert out["loss"] == pytest.approx(sum(nll) / 7, rel=1e-6)


def test_evaluate_sums_in_float64_across_batches():
    # a confidently wrong image (loss 1e8) and an unsure one (loss ln 2) in separate batches: a float32
    # running sum would round 1e8 + 0.69 to 1e8; each batch's loss is float32, the sum float64
    logits = torch.tensor([[0.0, 1e8], [0.0, 0.0]])
    data = [(torch.tensor([0]), 0), (torch.tensor([1]), 1)]
    out = trainer_mod.evaluate(_Lookup(logits), data, batch_size=1, device=CPU)
    ln2 = float(torch.tensor(0.6931471805599453, dtype=torch.float32))
    assert out["loss"] == pytest.approx((1e8 + ln2) / 2, rel=0, abs=1e-6)
    assert out["top5"] == pytest.approx(100.0) and out["n"] == 2  # (top-1 of a tie is not asked)


def test_evaluate_reads_the_sums_once(monkeypatch):
    # the per-batch figures stay on the device: one read (.tolist) at the end, and no more scalar
    # reads (.item) for 10 batches than for 3 (the DataLoader's own seed reads are per pass)
    real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    images, labels = torch.randn(10, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    data = list(zip(images, labels))
    reads, outs = {}, {}
    for batch_size in (4, 1):
        count = {"item": 0, "tolist": 0}

        def item(self, count=count):
            count["item"] += 1
            return real_item(self)

        def tolist(self, count=count):
            count["tolist"] += 1
            return real_tolist(self)

        monkeypatch.setattr(torch.Tensor, "item", item)
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        outs[batch_size] = trainer_mod.evaluate(model, data, batch_size=batch_size, device=CPU)
        monkeypatch.undo()
        reads[batch_size] = count
    assert reads[1] == reads[4] and reads[1]["tolist"] == 1
    with torch.no_grad():
        logits = model(images)
    for out in outs.values():
        assert out["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
        assert out["top1"] == pytest.approx(
            100 * (logits.argmax(1) == labels).double().mean().item(), rel=1e-12
        )
        assert out["top5"] == pytest.approx(100.0) and out["n"] == 10  # 3 classes: always in the top 5


def test_evaluate_one_image_and_none():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    one = trainer_mod.evaluate(_Lookup(logits), [(torch.tensor([0]), 1)], batch_size=4, device=CPU)
    loss = math.log(1 + math.exp(2.0) + math.exp(1.0)) - 2.0
    assert one == {
        "top1": pytest.approx(100.0),
        "top5": pytest.approx(100.0),
        "loss": pytest.approx(loss),
        "n": 1,
    }
    # an empty split (a rank's share of a tiny test set): zeros, not a division by zero
    none = trainer_mod.evaluate(_Lookup(logits), [], batch_size=4, device=CPU)
    assert none == {"top1": 0.0, "top5": 0.0, "loss": 0.0, "n": 0}


def test_evaluate_under_ddp_takes_every_world_size_th_image_and_sums_the_ranks(monkeypatch):
    from vitlens.train.distributed import DistInfo

    # rank 0 of 2 sees images 0, 2, 4: labels 0, 2, 1, ranked 1st, 3rd, 2nd by the rows
    row = [6.0, 5, 4, 3, 2, 1, 0]
    logits = torch.tensor([row] * 6)
    labels = [0, 5, 2, 5, 1, 5]
    data = [(torch.tensor([i]), y) for i, y in enumerate(labels)]
    other_rank = [0.0, 1.0, 10.0, 3.0]  # correct1, correct5, loss sum, n of rank 1 (hand-made)
    seen = []

    def all_reduce_sum(values, info, device):  # what dist.all_reduce returns: float64 sums, as floats
        seen.append(list(values))
        return (
            torch.tensor(values, dtype=torch.float64) + torch.tensor(other_rank, dtype=torch.float64)
        ).tolist()

    monkeypatch.setattr(trainer_mod, "all_reduce_sum", all_reduce_sum)
    out = trainer_mod.evaluate(
        _Lookup(logits), data, batch_size=2, device=CPU, dist_info=DistInfo(rank=0, world_size=2)
    )
    lse = math.log(sum(math.exp(v) for v in row))
    rank0_loss = (lse - 6) + (lse - 4) + (lse - 5)
    assert seen == [[1.0, 3.0, pytest.approx(rank0_loss), 3]]
    assert out == {
        "top1": pytest.approx(100 * 1 / 6),
        "top5": pytest.approx(100 * 4 / 6),
        "loss": pytest.approx((rank0_loss + 10.0) / 6),
        "n": 6,
    }
    assert type(out["n"]) is int
