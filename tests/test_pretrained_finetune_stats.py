"""Fine-tuning pretrained weights feeds them the normalisation they were trained with.

``vitlens train --pretrained`` normalises the training AND test images with the weights' own mean/std
(timm ``pretrained_cfg``, torchvision ``weights.transforms()``), says so in one line, and records it in
the run's meta so ``vitlens eval`` / the analyses normalise the same way; without ``--pretrained``
nothing changes (the dataset's statistics). A run of a ``timm:NAME`` / ``torchvision:NAME`` model
is reloaded from its folder.

The hub caches are fabricated (tests/_hub.py, the ``hubs`` fixture: offline, sockets disabled). The
expected statistics are typed in here from the libraries' documentation, and the model's actual
inputs are compared with the raw uint8 images normalised by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torchvision
from _hub import hf_snapshot, randomise
from safetensors.torch import save_file

from vitlens.data.build import run_stats
from vitlens.io import load_checkpoint
from vitlens.models.hub import pretrained_stats
from vitlens.models.loading import load_model, load_run_model
from vitlens.train import TrainConfig
from vitlens.train import trainer as trainer_mod

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

DEIT = "deit_tiny_patch16_224"
RESAMPLED = "14x14 position table to the model's 2x2 grid"  # 224 px weights fine-tuned on 32 px CIFAR
SMALL = dict(
    data="cifar10-mini",
    fraction=0.01,  # 20 training images, 2 batches of 10
    batch_size=10,
    epochs=1,
    lr=1e-3,
    warmup_epochs=0,
    augment=False,
    amp="fp32",
    progress=False,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _cache_timm(name: str, tag: str, **kw) -> None:
    peer = randomise(timm.create_model(name, **kw))
    save_file({k: v.contiguous() for k, v in peer.state_dict().items()},
              str(hf_snapshot(f"timm/{name}.{tag}") / "model.safetensors"))


def _cache_torchvision(hubs: Path) -> None:
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cache = hubs / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(randomise(torchvision.models.resnet18()).state_dict(), cache / Path(weights.url).name)


def _normalised(images: torch.Tensor, stats) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> what a model trained with ``stats`` expects, by hand."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in stats)
    return (images.float() / 255 - mean) / std


def _spy(monkeypatch, stub_eval: bool = False) -> dict:
    """The images the model sees (training, evaluation) and the training split, recorded."""
    seen = {"train": [], "eval": [], "train_ds": None, "test_ds": None}
    real_create, real_loader = trainer_mod.create_model, trainer_mod.build_train_loader
    real_eval = trainer_mod.evaluate

    def create(name, **kw):
        model = real_create(name, **kw)

        def record(module, args):
            if args[0].shape[0] > 1:  # not the one-image FLOP count
                seen["train" if module.training else "eval"].append(args[0].detach().clone())

        model.register_forward_pre_hook(record)
        return model

    def loader(train_ds, *args, **kw):
        seen["train_ds"] = train_ds
        return real_loader(train_ds, *args, **kw)

    def evaluate(model, dataset, **kw):
        seen["test_ds"] = dataset
        if stub_eval:
            return {"top1": 50.0, "top5": 90.0, "loss": 1.0, "n": len(dataset)}
        return real_eval(model, dataset, **kw)

    monkeypatch.setattr(trainer_mod, "create_model", create)
    monkeypatch.setattr(trainer_mod, "build_train_loader", loader)
    monkeypatch.setattr(trainer_mod, "evaluate", evaluate)
    return seen


def _check_training_inputs(seen: dict, stats) -> None:
    """Every training image the model saw is one of the split's raw images normalised with ``stats``,
    and the epoch saw all of them."""
    split = seen["train_ds"].base
    expected = _normalised(torch.stack([split[i][0] for i in range(len(split))]), stats)
    fed = torch.cat(seen["train"])
    assert fed.shape == expected.shape == (20, 3, 32, 32)
    dist = torch.cdist(fed.flatten(1).double(), expected.flatten(1).double())
    nearest = dist.min(1)
    assert nearest.values.max().item() < 1e-3
    assert sorted(nearest.indices.tolist()) == list(range(20))


def _stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("fine-tuning")]


# ----------------------------------------------------------------------------- the statistics looked up
@pytest.mark.parametrize(
    "spec, stats, source",
    [
        (f"timm:{DEIT}", IMAGENET, f"timm pretrained_cfg of {DEIT}.fb_in1k"),
        (DEIT, IMAGENET, f"timm pretrained_cfg of {DEIT}.fb_in1k"),  # a registered name: its timm namesake
        ("timm:vit_small_patch16_224.augreg_in21k_ft_in1k", HALF,
         "timm pretrained_cfg of vit_small_patch16_224.augreg_in21k_ft_in1k"),
        ("timm:vit_base_patch16_clip_224.openai", OPENAI_CLIP,
         "timm pretrained_cfg of vit_base_patch16_clip_224.openai"),
        ("torchvision:resnet18", IMAGENET, "torchvision ResNet18_Weights.IMAGENET1K_V1.transforms()"),
        ("resnet50", IMAGENET, "torchvision ResNet50_Weights.IMAGENET1K_V2.transforms()"),  # DEFAULT is V2
    ],
)
def test_pretrained_stats_are_the_weights_own(hubs, spec, stats, source):
    got = pretrained_stats(spec)  # metadata only: the caches are empty and the network is off
    assert got == {"mean": pytest.approx(list(stats[0])), "std": pytest.approx(list(stats[1])),
                   "source": source}


@pytest.mark.parametrize(
    "spec",
    ["vit_micro_patch4_32", "timm:vit_small_patch16_224.nope", "timm:no_such_model",
     "torchvision:resnet18.IMAGENET1K_V9", "torchvision:no_such_model", "not_a_model"],
)
def test_pretrained_stats_unknown(hubs, spec):
    assert pretrained_stats(spec) is None


# ----------------------------------------------------------------------------- fine-tuning a timm model
def test_timm_finetune_trains_evaluates_and_records_the_weights_stats(hubs, monkeypatch, capsys):
    from vitlens.cli import main

    _cache_timm(DEIT, "fb_in1k", depth=1)
    seen = _spy(monkeypatch)
    out = hubs / "run"
    cfg = TrainConfig(model=f"timm:{DEIT}", model_args={"depth": 1}, pretrained=True, out=str(out), **SMALL)
    with pytest.warns(UserWarning, match=RESAMPLED):
        summary = trainer_mod.train(cfg)

    # training: ImageNet's statistics (deit's pretrained_cfg), not CIFAR-10's
    _check_training_inputs(seen, IMAGENET)
    # evaluation: the test images in order, normalised the same way
    test_split = seen["test_ds"].base
    fed = torch.cat(seen["eval"])
    assert fed.shape == (500, 3, 32, 32)
    raw = torch.stack([test_split[i][0] for i in range(len(test_split))])
    torch.testing.assert_close(fed, _normalised(raw, IMAGENET), atol=1e-5, rtol=0)
    assert _stderr_lines(capsys) == [
        f"fine-tuning pretrained timm:{DEIT}: images normalised with mean (0.485, 0.456, 0.406) std "
        f"(0.229, 0.224, 0.225), the statistics its weights were trained with (timm pretrained_cfg of "
        f"{DEIT}.fb_in1k), not cifar10-mini's own"
    ]

    # recorded: model.json and both checkpoints
    source = f"timm pretrained_cfg of {DEIT}.fb_in1k"
    metas = [json.loads((out / "model.json").read_text())]
    metas += [load_checkpoint(out / "checkpoints" / f"{w}.safetensors")[1] for w in ("best", "last")]
    for meta in metas:
        assert meta["mean"] == pytest.approx(list(IMAGENET[0]))
        assert meta["std"] == pytest.approx(list(IMAGENET[1]))
        assert meta["normalization"] == source and meta["model"] == f"timm:{DEIT}"

    # later: the run reloads by itself, and `vitlens eval` / the analyses normalise as it trained
    model, meta = load_model(out, which="best")
    assert run_stats(meta) == {"mean": pytest.approx(IMAGENET[0]), "std": pytest.approx(IMAGENET[1])}
    from vitlens.cli.analyze import _data

    _, analysed, info = _data(SimpleNamespace(data=None, data_dir=None), model, meta)
    assert info.mean == pytest.approx(IMAGENET[0]) and info.std == pytest.approx(IMAGENET[1])
    torch.testing.assert_close(analysed[7][0], _normalised(raw[7:8], IMAGENET)[0], atol=1e-5, rtol=0)
    seen["eval"].clear()
    assert main(["eval", str(out), "--which", "best", "--device", "cpu", "--batch-size", "100"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(summary["best_test_top1"])  # the same images as in training
    torch.testing.assert_close(seen["test_ds"][3][0], _normalised(raw[3:4], IMAGENET)[0], atol=1e-5, rtol=0)


def test_finetune_with_unknown_stats_keeps_the_datasets_and_says_so(hubs, monkeypatch, capsys):
    _cache_timm(DEIT, "fb_in1k", depth=1)
    monkeypatch.setattr(trainer_mod, "pretrained_stats", lambda name, pretrained: None)  # a hub without a cfg
    seen = _spy(monkeypatch, stub_eval=True)
    out = hubs / "run"
    cfg = TrainConfig(model=DEIT, model_args={"depth": 1}, pretrained=True, out=str(out), **SMALL)
    with pytest.warns(UserWarning, match=RESAMPLED):
        trainer_mod.train(cfg)
    _check_training_inputs(seen, CIFAR10)
    assert _stderr_lines(capsys) == [
        f"fine-tuning pretrained {DEIT}: the statistics its weights were trained with are unknown (no "
        "pretrained cfg), so images are normalised with cifar10-mini's own mean (0.4914, 0.4822, 0.4465) "
        "std (0.247, 0.2435, 0.2616)"
    ]
    meta = json.loads((out / "model.json").read_text())
    assert meta["mean"] == pytest.approx(list(CIFAR10[0])) and meta["std"] == pytest.approx(list(CIFAR10[1]))
    assert "normalization" not in meta and run_stats(meta) == {}


def test_torchvision_finetune_uses_the_weights_transforms_stats(hubs, monkeypatch, capsys):
    _cache_torchvision(hubs)
    seen = _spy(monkeypatch, stub_eval=True)
    out = hubs / "run"
    cfg = TrainConfig(model="torchvision:resnet18", pretrained=True, out=str(out), **SMALL)
    trainer_mod.train(cfg)
    _check_training_inputs(seen, IMAGENET)
    raw = seen["test_ds"].base[0][0]
    torch.testing.assert_close(seen["test_ds"][0][0], _normalised(raw[None], IMAGENET)[0], atol=1e-5, rtol=0)
    assert _stderr_lines(capsys) == [
        "fine-tuning pretrained torchvision:resnet18: images normalised with mean (0.485, 0.456, 0.406) "
        "std (0.229, 0.224, 0.225), the statistics its weights were trained with (torchvision "
        "ResNet18_Weights.IMAGENET1K_V1.transforms()), not cifar10-mini's own"
    ]
    _, meta, _ = load_checkpoint(out / "checkpoints" / "last.safetensors")
    assert meta["normalization"] == "torchvision ResNet18_Weights.IMAGENET1K_V1.transforms()"
    assert meta["mean"] == pytest.approx(list(IMAGENET[0]))
    assert meta["std"] == pytest.approx(list(IMAGENET[1]))
    # the converted vitlens ResNet reloads from the run with the fine-tuned weights and a 10-class head
    model, _ = load_run_model(out)
    assert type(model).__name__ == "ResNet" and model.fc.out_features == 10
    state = load_checkpoint(out / "checkpoints" / "last.safetensors")[0]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


# ----------------------------------------------------------------------------- without --pretrained
def test_training_from_scratch_is_unchanged(hubs, monkeypatch, capsys):
    seen = _spy(monkeypatch, stub_eval=True)
    out = hubs / "run"
    cfg = TrainConfig(model="vit_micro_patch4_32", model_args={"depth": 1, "embed_dim": 16, "num_heads": 2},
                      out=str(out), **SMALL)
    trainer_mod.train(cfg)
    _check_training_inputs(seen, CIFAR10)  # the dataset's own statistics
    raw = seen["test_ds"].base[0][0]
    torch.testing.assert_close(seen["test_ds"][0][0], _normalised(raw[None], CIFAR10)[0], atol=1e-5, rtol=0)
    assert _stderr_lines(capsys) == []
    meta = json.loads((out / "model.json").read_text())
    assert meta["mean"] == pytest.approx(list(CIFAR10[0])) and meta["std"] == pytest.approx(list(CIFAR10[1]))
    assert set(meta) == {"model", "model_args", "classes", "img_size", "in_chans", "mean", "std", "data"}
    assert run_stats(meta) == {}


# ----------------------------------------------------------------------------- runs of hub names reload
@pytest.mark.parametrize(
    "spec, model_args, peer_class",
    [
        (f"timm:{DEIT}", {"depth": 1}, timm.models.vision_transformer.VisionTransformer),
        ("timm:resnet10t", {}, timm.models.resnet.ResNet),  # takes no img_size: not passed
        ("torchvision:resnet18", {}, torchvision.models.ResNet),
    ],
)
def test_run_of_a_hub_model_from_scratch_reloads(hubs, monkeypatch, spec, model_args, peer_class):
    _spy(monkeypatch, stub_eval=True)
    out = hubs / "run"
    trainer_mod.train(TrainConfig(model=spec, model_args=model_args, out=str(out), **SMALL))
    model, meta = load_run_model(out, which="best")
    assert type(model) is peer_class and meta["model"] == spec
    state = load_checkpoint(out / "checkpoints" / "best.safetensors")[0]
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    logits = model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 10)


def test_run_fine_tuned_from_timm_reloads_as_the_converted_vit(hubs, monkeypatch):
    _cache_timm(DEIT, "fb_in1k", depth=1)
    _spy(monkeypatch, stub_eval=True)
    out = hubs / "run"
    cfg = TrainConfig(model=f"timm:{DEIT}", model_args={"depth": 1}, pretrained=True, out=str(out), **SMALL)
    with pytest.warns(UserWarning, match=RESAMPLED):
        trainer_mod.train(cfg)
    model, meta = load_model(str(out), which="last")
    assert type(model).__name__ == "VisionTransformer" and meta["arch"] == "VisionTransformer"
    assert model.head.out_features == 10 and model.pos_embed.shape == (1, 5, 192)  # 32 px, 2x2 patches + cls
    state = load_checkpoint(out / "checkpoints" / "last.safetensors")[0]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
