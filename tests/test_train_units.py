"""Unit tests of the training code's bookkeeping and wiring: each one-line bug a user would pay
for (a flag that never reaches the builder, an epoch counted twice, a checkpoint that keeps the
wrong "best", a resumed run that forgets its EMA) must fail one of these.

Expectations are independent of the code under test: torch's own ``cross_entropy``, counts done
by hand, the data module's statistics, a scripted evaluation whose figures are known in advance.
Runs are tiny (20 images of the embedded CIFAR-10 subset, 2 steps an epoch, a one-block ViT; the
1,000-image test-set evaluation is replaced by a script), a fraction of a second each.
"""

from __future__ import annotations

import json
import math
import re
import time
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlens.data as data_mod
from vitlens.errors import CheckpointError, ConfigError, DataError, DeviceError, ResumeError, TrainingError
from vitlens.io import load_checkpoint
from vitlens.train import TrainConfig, harness
from vitlens.train import trainer as trainer_mod
from vitlens.train.distributed import DistInfo

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

TINY = dict(
    model="vit_micro_patch4_32",
    model_args={"depth": 1, "embed_dim": 16, "num_heads": 2},
    data="cifar10-mini",
    fraction=0.01,  # 2 images per class: 20 images, 2 batches of 10
    batch_size=10,
    epochs=2,
    lr=0.01,
    min_lr=0.001,
    warmup_epochs=0.5,  # 1 of the 2 steps of an epoch
    label_smoothing=0.0,
    augment=False,
    amp="fp32",
    progress=False,
)
STEPS_PER_EPOCH = 2


pytestmark = pytest.mark.usefixtures("one_thread")


class _Stop(Exception):
    """Raised by a spy once it has seen what it came for (saves building or training a model)."""


def _script(values):
    """A stand-in for ``trainer.evaluate``: the live model's i-th evaluation reports ``values[i]``
    as top-1 (top-5 = top-1 + 1, loss = top-1 / 100); an EMA model reports top-1 + 0.5."""
    calls = []
    live = []

    def evaluate(model, dataset, **kw):
        calls.append({"model": model, "dataset": dataset, **kw})
        is_live = not live or model is live[0]
        if not live:
            live.append(model)
        n_live = sum(c["model"] is live[0] for c in calls)
        v = values[n_live - 1] + (0.0 if is_live else 0.5)
        return {"top1": v, "top5": v + 1, "loss": v / 100, "n": len(dataset)}

    return evaluate, calls


def _train(tmp_path, name="run", *, script=(50.0, 60.0, 70.0, 80.0, 90.0), resume=False, mp=None, **cfg):
    """Train TINY (+ ``cfg``) with spies; returns the summary and what the spies saw.

    Per optimiser step: the learning rate of every group, the targets and logits of the objective,
    its loss, the scaler, ``torch.initial_seed()`` and the weights after the step. Per checkpoint
    save: the count. The test-set evaluation is scripted (``_script``)."""
    own = mp is None
    mp = mp or pytest.MonkeyPatch()
    seen = {"steps": [], "saves": [], "model": None}
    real_create, real_step = trainer_mod.create_model, trainer_mod.train_step
    real_save = harness.Run.save_checkpoint

    def create_spy(*a, **kw):
        seen["model"] = real_create(*a, **kw)
        seen["create_kwargs"] = kw
        return seen["model"]

    def step_spy(run, forward, optimizer, scheduler, **kw):
        rec = {
            "lr": [g["lr"] for g in optimizer.param_groups],
            "seed": torch.initial_seed(),
            "scaler": kw.get("scaler"),
            "images": forward.__defaults__[0].clone(),
            "targets": forward.__defaults__[1].clone(),
        }

        def forward_spy():
            loss, logits = forward()
            rec.update(loss=loss.detach().clone(), logits=logits.detach().float().clone())
            return loss, logits

        forward_spy.__defaults__ = forward.__defaults__
        out = real_step(run, forward_spy, optimizer, scheduler, **kw)
        rec["weights"] = {n: p.detach().clone() for n, p in seen["model"].named_parameters()}
        seen["steps"].append(rec)
        return out

    def save_spy(self, *a, count, **kw):
        seen["saves"].append(count)
        return real_save(self, *a, count=count, **kw)

    evaluate, seen["evals"] = _script(list(script))
    mp.setattr(trainer_mod, "create_model", create_spy)
    mp.setattr(trainer_mod, "train_step", step_spy)
    mp.setattr(trainer_mod, "evaluate", evaluate)
    mp.setattr(harness.Run, "save_checkpoint", save_spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path / name
    try:
        seen["summary"] = trainer_mod.train(TrainConfig(**{**TINY, **cfg}, out=str(out)), resume=resume)
    finally:
        torch.set_num_threads(threads)
        if own:
            mp.undo()
    seen["out"] = out
    return seen


def _records(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _state(run_dir, which="last"):
    return load_checkpoint(run_dir / "checkpoints" / f"{which}.safetensors")


# ------------------------------------------------------------------------------- the objective
def test_without_mixing_the_targets_are_the_labels_and_the_loss_is_torchs(tmp_path):
    run = _train(tmp_path, label_smoothing=0.1)
    assert len(run["steps"]) == 2 * STEPS_PER_EPOCH
    for rec in run["steps"]:
        t = rec["targets"]
        assert t.dtype == torch.long and t.shape == (10,)  # hard labels, not one-hot or mixed
        expected = F.cross_entropy(rec["logits"], t, label_smoothing=0.1)
        torch.testing.assert_close(rec["loss"], expected, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(rec["loss"], F.cross_entropy(rec["logits"], t), rtol=1e-4)
    # no EMA asked for: none kept, none evaluated, none reported
    _, _, state = _state(run["out"])
    assert state["ema"] is None
    assert all("ema_test_top1" not in r for r in _records(run["out"]))
    assert run["summary"]["ema_test_top1"] is None
    assert len(run["evals"]) == 2  # the live model once per epoch, nothing else


def test_cutmix_alone_pastes_a_box_and_softens_the_targets(tmp_path, monkeypatch):
    unmixed = []
    real = data_mod.build_batch_mixer

    def mixer_spy(*a, **kw):
        mixer = real(*a, **kw)
        assert mixer is not None, "cutmix > 0 must give a mixer"

        def mix(images, labels):
            unmixed.append(images.clone())
            return mixer(images, labels)

        return mix

    monkeypatch.setattr(data_mod, "build_batch_mixer", mixer_spy)
    run = _train(tmp_path, mp=monkeypatch, cutmix=1.0, mixup=0.0)
    boxes = 0
    for rec, before in zip(run["steps"], unmixed):
        t = rec["targets"]
        assert t.shape == (10, 10) and torch.allclose(t.sum(-1), torch.ones(10))
        changed = (rec["images"] != before).any(dim=1).any(dim=0)  # (H, W): pixels any image changed
        if changed.any():
            rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
            box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all(), "CutMix pastes one rectangle"
            boxes += int(not changed.all())
    assert boxes > 0, "some batch must show a box smaller than the image (MixUp changes every pixel)"


# ------------------------------------------------------------------------------- wiring of the config
def test_the_config_reaches_the_model_builder(tmp_path, monkeypatch):
    from vitlens.data import CIFAR10_MEAN, CIFAR10_STD

    got = {}

    def create_spy(name, **kw):
        got.update(kw, name=name)
        raise _Stop

    monkeypatch.setattr(trainer_mod, "create_model", create_spy)
    cfg = TrainConfig(**{**TINY, "pretrained": True, "tokenizer": "pixel"}, out=str(tmp_path / "r"))
    with pytest.raises(_Stop):
        trainer_mod.train(cfg)
    assert got["name"] == TINY["model"] and got["pretrained"] is True
    assert got["num_classes"] == 10 and got["img_size"] == 32 and got["tokenizer"] == "pixel"
    assert got["tokenizer_args"]["mean"] == pytest.approx(CIFAR10_MEAN)
    assert got["tokenizer_args"]["std"] == pytest.approx(CIFAR10_STD)
    assert not (tmp_path / "r").exists()  # a failed build leaves no run folder


@pytest.mark.parametrize(
    "model, model_args, channels_last, expected",
    [("vit_micro_patch4_32", TINY["model_args"], True, True), ("resnet8_cifar", {}, False, False)],
)
def test_channels_last_follows_the_config_not_the_model_kind(
    tmp_path, model, model_args, channels_last, expected
):
    run = _train(tmp_path, model=model, model_args=model_args, channels_last=channels_last, epochs=1)
    conv = next(m for m in run["model"].modules() if isinstance(m, nn.Conv2d))
    layout = torch.channels_last
    assert conv.weight.is_contiguous(memory_format=layout) == expected
    for rec in run["steps"]:
        assert rec["images"].is_contiguous(memory_format=layout) == expected


def test_fp16_gets_an_enabled_loss_scaler_and_its_state_is_saved(tmp_path):
    run = _train(tmp_path, amp="fp16", epochs=1)
    for rec in run["steps"]:
        assert isinstance(rec["scaler"], torch.amp.GradScaler) and rec["scaler"].is_enabled()
    _, _, state = _state(run["out"])
    assert state["scaler"]["scale"] > 0
    fp32 = _train(tmp_path, "fp32", epochs=1)
    assert not fp32["steps"][0]["scaler"].is_enabled()


def test_epochs_reseed_the_global_rng_from_seed_epoch_and_rank(tmp_path):
    a = _train(tmp_path, "a", seed=3, epochs=2)
    b = _train(tmp_path, "b", seed=4, epochs=2)
    first = [a["steps"][i]["seed"] for i in (0, STEPS_PER_EPOCH)]
    assert first == [harness.run_seed(3, 0, 0), harness.run_seed(3, 1, 0)]
    assert first[0] != first[1]  # every epoch its own stream
    assert b["steps"][0]["seed"] != a["steps"][0]["seed"]  # and every run


def test_warmup_epochs_round_to_the_nearest_step(tmp_path):
    run = _train(tmp_path, epochs=1, warmup_epochs=0.9)  # 0.9 x 2 steps = 1.8: a warmup of 2 steps
    assert [s["lr"][0] for s in run["steps"]] == pytest.approx([0.005, 0.01], rel=1e-12)


# ------------------------------------------------------------------------------- what a run writes
def test_model_json_metrics_and_summary_hold_what_they_say(tmp_path):
    from torch.utils.flop_counter import FlopCounterMode

    from vitlens.data import CIFAR10_MEAN, CIFAR10_STD

    run = _train(tmp_path, epochs=2, script=(40.0, 45.0))
    out, model, summary = run["out"], run["model"], run["summary"]
    meta = json.loads((out / "model.json").read_text())
    assert meta == {
        "model": TINY["model"],
        "model_args": {"num_classes": 10, **TINY["model_args"], "img_size": 32},
        "classes": CIFAR10_CLASSES,
        "img_size": 32,
        "in_chans": 3,
        "mean": pytest.approx(list(CIFAR10_MEAN)),
        "std": pytest.approx(list(CIFAR10_STD)),
        "data": "cifar10-mini",
    }
    records = _records(out)
    assert [(r["epoch"], r["step"], r["images"]) for r in records] == [(1, 2, 20), (2, 4, 20)]
    for r in records:
        assert r["img_per_s"] == pytest.approx(20 / r["epoch_time_s"], rel=1e-9)
        assert (r["test_top1"], r["test_top5"], r["test_loss"]) == pytest.approx(
            (35 + 5 * r["epoch"], 36 + 5 * r["epoch"], (35 + 5 * r["epoch"]) / 100)
        )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, 32, 32))
    assert summary == {
        "finished": True,
        "model": TINY["model"],
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_image": counter.get_total_flops(),
        "train_images": 20,
        "epochs": 2,
        "steps": 4,  # 2 epochs of 20 images in batches of 10
        "images_seen": 40,
        "train_time_s": pytest.approx(sum(r["epoch_time_s"] for r in records), rel=1e-9),
        "img_per_s": records[-1]["img_per_s"],
        "test_top1": 45.0,
        "test_top5": 46.0,
        "best_test_top1": 45.0,
        "ema_test_top1": None,
        "device": "cpu",
        "world_size": 1,
    }
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["flops_per_image"] > 0 and summary["params"] > 0


def test_evaluation_every_n_epochs_and_always_at_the_last(tmp_path):
    run = _train(tmp_path, epochs=3, eval_every=2, tta="flip", script=(10.0, 20.0))
    records = _records(run["out"])
    assert ["test_top1" in r for r in records] == [False, True, True]
    assert [r.get("test_top1") for r in records] == [None, 10.0, 20.0]
    for call in run["evals"]:
        assert call["model"] is run["model"]
        assert len(call["dataset"]) == 500  # the whole test split, not the training fraction
        assert call["batch_size"] == 2 * TINY["batch_size"]
        assert call["tta"] == "flip" and call["device"] == torch.device("cpu")
        assert call["data_path"] == "auto" and call["num_workers"] == 0 and call["amp_dtype"] is None


def test_ema_is_evaluated_beside_the_model_and_reported(tmp_path):
    run = _train(tmp_path, epochs=2, ema_decay=0.5, script=(30.0, 40.0))
    models = [c["model"] for c in run["evals"]]
    assert len(models) == 4 and models[0] is run["model"] and models[1] is not run["model"]
    assert isinstance(models[1], type(run["model"]))  # the averaged copy of the same architecture
    records = _records(run["out"])
    assert [(r["ema_test_top1"], r["ema_test_top5"]) for r in records] == [(30.5, 31.5), (40.5, 41.5)]
    assert run["summary"]["ema_test_top1"] == 40.5
    _, _, state = _state(run["out"])
    assert state["ema"] is not None


def test_best_checkpoint_keeps_the_first_epoch_with_the_best_accuracy(tmp_path):
    run = _train(tmp_path, epochs=4, script=(30.0, 50.0, 50.0, 40.0))
    weights, meta, _ = _state(run["out"], "best")
    assert meta["epoch"] == 2 and meta["test_top1"] == 50.0 and meta["classes"] == CIFAR10_CLASSES
    after_epoch_2 = run["steps"][2 * STEPS_PER_EPOCH - 1]["weights"]
    for n, w in after_epoch_2.items():
        assert torch.equal(weights[n], w), n
    assert run["summary"]["best_test_top1"] == 50.0 and run["summary"]["test_top1"] == 40.0


def test_best_checkpoint_counts_only_evaluated_epochs_even_at_zero_accuracy(tmp_path):
    run = _train(tmp_path, epochs=2, eval_every=2, script=(0.5,))
    _, meta, _ = _state(run["out"], "best")
    assert meta["epoch"] == 2 and meta["test_top1"] == 0.5
    assert run["summary"]["best_test_top1"] == 0.5


def test_checkpoints_every_n_epochs_and_at_the_end(tmp_path):
    run = _train(tmp_path, epochs=3, checkpoint_every=2)
    assert run["saves"] == [2, 3]
    weights, meta, state = _state(run["out"])
    assert meta["epoch"] == 3 and state["epoch"] == 3
    assert state["scheduler"]["last_epoch"] == 3 * STEPS_PER_EPOCH
    assert state["train_time"] == pytest.approx(sum(r["epoch_time_s"] for r in _records(run["out"])))
    for n, w in run["steps"][-1]["weights"].items():
        assert torch.equal(weights[n], w), n


def test_stop_after_epochs_leaves_with_a_checkpoint_and_no_summary(tmp_path):
    run = _train(tmp_path, epochs=3, stop_after_epochs=2, checkpoint_every=5)
    assert run["summary"] == {"finished": False, "epoch": 2}
    assert run["saves"] == [2] and [r["epoch"] for r in _records(run["out"])] == [1, 2]
    assert not (run["out"] / "summary.json").exists()
    whole = _train(tmp_path, "whole", epochs=2, stop_after_epochs=2)  # stopping at the end is finishing
    assert whole["summary"]["finished"] and (whole["out"] / "summary.json").is_file()


def test_a_spent_time_budget_leaves_after_the_epoch_unless_it_was_the_last(tmp_path, monkeypatch):
    monkeypatch.setattr(harness.Run, "out_of_time", lambda self: True)
    run = _train(tmp_path, mp=monkeypatch, epochs=3, checkpoint_every=5)
    assert run["summary"] == {"finished": False, "epoch": 1} and run["saves"] == [1]
    last = _train(tmp_path, "last", mp=monkeypatch, epochs=1)
    assert last["summary"]["finished"]


def test_a_stopped_run_continued_equals_an_unbroken_one(tmp_path):
    cfg = dict(epochs=3, ema_decay=0.6, augment=True, model_args={**TINY["model_args"], "drop_rate": 0.1})
    whole = _train(tmp_path, "whole", script=(50.0, 30.0, 40.0), **cfg)
    part = _train(tmp_path, "parts", script=(50.0,), stop_after_epochs=1, **cfg)
    assert part["summary"] == {"finished": False, "epoch": 1}
    rest = _train(tmp_path, "parts", script=(30.0, 40.0), resume=True, **cfg)
    assert len(rest["steps"]) == 2 * STEPS_PER_EPOCH  # epochs 2 and 3 only
    wa, _, sa = _state(whole["out"])
    wb, _, sb = _state(rest["out"])
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n
    for n in sa["ema"]:
        assert torch.equal(sa["ema"][n], sb["ema"][n]), f"EMA {n}"
    assert sb["scheduler"]["last_epoch"] == 3 * STEPS_PER_EPOCH
    ra, rb = _records(whole["out"]), _records(rest["out"])
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    assert [r["epoch"] for r in rb] == [1, 2, 3]
    # best accuracy and training time carry across the break
    assert rest["summary"]["best_test_top1"] == 50.0
    _, meta, _ = _state(rest["out"], "best")
    assert meta["epoch"] == 1
    assert rest["summary"]["train_time_s"] == pytest.approx(sum(r["epoch_time_s"] for r in rb), rel=1e-9)
    # what the run saw counts the epochs before the break too
    assert (rest["summary"]["steps"], rest["summary"]["images_seen"]) == (3 * STEPS_PER_EPOCH, 3 * 20)
    assert (whole["summary"]["steps"], whole["summary"]["images_seen"]) == (3 * STEPS_PER_EPOCH, 3 * 20)


def test_no_training_batches_is_a_data_error_and_one_batch_is_enough(tmp_path, monkeypatch):
    class Empty:
        def set_epoch(self, epoch):
            pass

        def __len__(self):
            return 0

        def __iter__(self):
            return iter(())

    with monkeypatch.context() as m:
        m.setattr(trainer_mod, "build_train_loader", lambda *a, **k: Empty())
        with pytest.raises(
            DataError, match=r"no training batches: 20 images for batch size 10; lower --batch-size"
        ):
            trainer_mod.train(TrainConfig(**TINY, out=str(tmp_path / "empty")))
    one = _train(tmp_path, batch_size=20, epochs=1)  # the whole subset in one batch
    assert len(one["steps"]) == 1 and one["summary"]["finished"]


def test_progress_shows_the_epoch_its_mean_loss_and_the_next_lr(tmp_path, capsys):
    t0 = time.perf_counter()
    run = _train(tmp_path, epochs=2, progress=True)
    wall = time.perf_counter() - t0
    captured = capsys.readouterr()
    err = captured.err
    assert "epoch 1/2" in err and "epoch 2/2" in err
    losses = [r["loss"].item() for r in run["steps"]]
    # at the end of each epoch (at least) the bar shows the epoch's mean loss so far and the lr
    # of the step to come (the floor after the last)
    next_lr = [run["steps"][2]["lr"][0], TINY["min_lr"]]
    for epoch in range(2):
        own = losses[epoch * 2 : epoch * 2 + 2]
        assert f"loss={sum(own) / 2:.3f}" in err
        assert f"lr={next_lr[epoch]:.2e}" in err
    rates = [int(x) for x in re.findall(r"img_s=(\d+)", err)]
    assert rates and min(rates) >= int(10 / wall)  # images per second of this epoch, not of all time
    # each epoch's record is printed too, rounded to 4 decimals
    printed = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert [p["epoch"] for p in printed] == [1, 2]
    assert printed[0]["train_loss"] == round(_records(run["out"])[0]["train_loss"], 4)


# ------------------------------------------------------------------------------- pieces of the trainer
def test_build_train_loader_shards_shuffles_by_epoch_and_drops_a_lone_last_sample():
    from torch.utils.data import TensorDataset

    def order(n, bs, *, epoch=0, seed=0, world=1, rank=0):
        ds = TensorDataset(torch.arange(n), torch.zeros(n, dtype=torch.long))
        cfg = TrainConfig(data_path="dataloader", seed=seed)
        loader = trainer_mod.build_train_loader(ds, cfg, DistInfo(rank, world), torch.device("cpu"), bs)
        loader.set_epoch(epoch)
        batches = [x.tolist() for x, _ in loader]
        assert len(loader) == len(batches)
        return batches

    assert [len(b) for b in order(9, 4)] == [4, 4]  # 9 = 4 + 4 + 1: a batch of one breaks BatchNorm
    assert [len(b) for b in order(10, 4)] == [4, 4, 2]
    assert sorted(sum(order(10, 4), [])) == list(range(10))
    assert order(10, 4, epoch=1) != order(10, 4) and order(10, 4, epoch=1) == order(10, 4, epoch=1)
    assert order(10, 4, seed=1) != order(10, 4)
    r0, r1 = sum(order(10, 5, world=2), []), sum(order(10, 5, world=2, rank=1), [])
    assert len(r0) == len(r1) == 5 and sorted(r0 + r1) == list(range(10))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_build_optimizer_recipe_and_device_options(name, monkeypatch):
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    monkeypatch.setattr(trainer_mod, "optimizer_options", lambda device: {"foreach": False})
    opt = trainer_mod.build_optimizer(model, TrainConfig(optimizer=name, lr=0.3, weight_decay=0.2))
    assert opt.defaults["foreach"] is False  # the device's options reach the optimiser
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    if name == "sgd":
        assert (
            isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"]
        )
    else:
        assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)


def test_count_flops_of_a_linear_layer_by_hand():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 5))
    model.train()
    assert trainer_mod.count_flops(model, 2, 3, torch.device("cpu")) == 2 * 12 * 5
    assert model.training  # left as it was


def test_model_overrides_channels_and_a_user_image_size():
    cfg = TrainConfig(model="vit_micro_patch4_32", model_args={"img_size": 64})
    args = trainer_mod.model_overrides(cfg, 7, 32, 1)
    assert args == {"num_classes": 7, "img_size": 64, "in_chans": 1}  # the user's size wins
    assert "in_chans" not in trainer_mod.model_overrides(TrainConfig(), 10, 32, 3)
    from vitlens.errors import ModelError

    with pytest.raises(ModelError):
        trainer_mod.model_overrides(TrainConfig(model="no_such_model"), 10, 32, 3)


def test_evaluate_with_flip_averages_the_logits_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3, 4))
    images = torch.randn(5, 1, 2, 3)
    labels = torch.tensor([0, 1, 2, 3, 0])
    data = list(zip(images, labels))
    with torch.no_grad():
        mean = (model(images) + model(images.flip(-1))) / 2
    out = trainer_mod.evaluate(model, data, batch_size=2, device=torch.device("cpu"), tta="flip")
    assert out["loss"] == pytest.approx(F.cross_entropy(mean, labels).item(), rel=1e-6)
    assert out["top1"] == pytest.approx(100 * (mean.argmax(1) == labels).float().mean().item())
    plain = trainer_mod.evaluate(model, data, batch_size=2, device=torch.device("cpu"))
    with torch.no_grad():
        assert plain["loss"] == pytest.approx(F.cross_entropy(model(images), labels).item(), rel=1e-6)


# ------------------------------------------------------------------------------- the harness
def test_run_seed_is_a_distinct_31_bit_seed_per_seed_counter_and_rank():
    seeds = {(s, c, r): harness.run_seed(s, c, r) for s in range(3) for c in range(40) for r in range(4)}
    assert len(set(seeds.values())) == len(seeds)  # no two (seed, counter, rank) share a stream
    assert all(0 <= v < 2**31 for v in seeds.values())
    assert harness.run_seed(2**40, 3, 1) < 2**31  # large seeds fold into range too
    assert harness.run_seed(5, 7) == harness.run_seed(5, 7, 0)  # rank 0 by default


def _fake_run(world=1, rank=0):
    return SimpleNamespace(
        dist=DistInfo(rank=rank, world_size=world), autocast=nullcontext, device=torch.device("cpu")
    )


def test_share_of_batch_takes_every_nth_row_and_weights_by_counted_targets():
    x = torch.arange(10).view(5, 2)
    counted = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1], [1, 1]]).bool()  # 7 counted targets
    a, c, w = harness.share_of_batch(_fake_run(), (x, counted), counted)
    assert a is x and w == 1.0 and isinstance(w, float)
    a, c, w = harness.share_of_batch(_fake_run(2, 1), (x, counted), counted)
    assert torch.equal(a, x[[1, 3]]) and torch.equal(c, counted[[1, 3]])
    assert w == pytest.approx(3 * 2 / 7)  # rows 1 and 3 hold 3 of the 7 targets; 2 processes
    _, _, w0 = harness.share_of_batch(_fake_run(2, 0), (x, counted), counted)
    assert w0 == pytest.approx(4 * 2 / 7) and (w + w0) / 2 == pytest.approx(
        1.0
    )  # DDP's mean is the global one
    empty = torch.zeros(4, dtype=torch.bool)
    assert harness.share_of_batch(_fake_run(2, 0), (empty,), empty)[-1] == 0.0  # no division by zero


def test_weighted_and_split_batch():
    loss = torch.tensor(3.0)
    assert harness.weighted(loss, 1.0) is loss
    assert harness.weighted(loss, 0.5).item() == 1.5
    assert harness.split_batch(12, _fake_run(3)) == 4 and harness.split_batch(12, _fake_run()) == 12
    with pytest.raises(
        ConfigError, match=r"batch size 10 is not divisible by 4 processes; use a multiple of 4"
    ):
        harness.split_batch(10, _fake_run(4))


def test_count_params_counts_tied_weights_once():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 4, bias=False))
    assert harness.count_params(model) == 4 * 3 + 3 + 12
    model[1].weight = nn.Parameter(model[0].weight.t().contiguous())
    model.tied = nn.Linear(4, 3)
    model.tied.weight = model[0].weight
    assert harness.count_params(model) == 15 + 12 + 3  # the tied weight once, the new bias once


def test_param_groups_by_hand():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.norm = nn.LayerNorm(3)
            self.pos_embed = nn.Parameter(torch.zeros(1, 4, 3))
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 3))
            self.reg_token = nn.Parameter(torch.zeros(1, 2, 3))
            self.frozen = nn.Linear(3, 3).requires_grad_(False)
            self.proj = nn.Linear(3, 2, bias=False)

    m = M()
    decay, no_decay = harness.param_groups(m, 0.3)
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(m.lin.weight), id(m.proj.weight)]
    expected = [m.lin.bias, m.norm.weight, m.norm.bias, m.pos_embed, m.cls_token, m.reg_token]
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in expected}


def test_model_config_refuses_unknown_fields_naming_the_valid_ones():
    cfg = harness.model_config("gpt_nano", {"dropout": 0.25})
    assert cfg.dropout == 0.25 and cfg.block_size > 0
    with pytest.raises(
        ConfigError, match=r"gpt_nano has no config field\(s\) dropot; valid fields: .*dropout"
    ):
        harness.model_config("gpt_nano", {"dropot": 0.1})


def test_resolve_device():
    assert harness.resolve_device("cpu") == torch.device("cpu")
    assert harness.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu0", "xla"):
        with pytest.raises(DeviceError):
            harness.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device; use --device cpu"):
            harness.resolve_device("cuda")
    else:
        n = torch.cuda.device_count()
        with pytest.raises(DeviceError, match=f"only {n} CUDA device"):
            harness.resolve_device(f"cuda:{n}")


def _lm_run(tmp_path, **kw):
    from vitlens.train.lm import LMTrainConfig

    cfg = LMTrainConfig(
        **{"out": str(tmp_path / "run"), "device": "cpu", "amp": "fp32", "progress": False, **kw}
    )
    return harness.start_run(cfg, counter="step")


def test_run_precision_scaler_clock_and_progress(tmp_path):
    run = _lm_run(tmp_path)
    assert run.amp_name == "fp32" and run.amp_dtype is None and not run.grad_scaler().is_enabled()
    assert run.wrap(nn.Linear(1, 1)).__class__ is nn.Linear  # one process: no DDP wrapper
    assert run.progress(range(3)).disable  # --no-progress
    assert not run.out_of_time()  # no budget: never out of time
    bf16 = _lm_run(tmp_path, amp="bf16", time_budget_min=1.0, progress=True)
    assert bf16.amp_name == "bfloat16" and not bf16.grad_scaler().is_enabled()
    assert not bf16.progress(range(3)).disable
    bf16.started -= 30  # half a minute ago: within a budget of one minute
    assert not bf16.out_of_time()
    bf16.started -= 31  # a minute and a second ago
    assert bf16.out_of_time()
    fp16 = _lm_run(tmp_path, amp="fp16")
    assert fp16.amp_name == "float16" and fp16.grad_scaler().is_enabled()


def test_restore_loads_every_part_and_refuses_foreign_checkpoints(tmp_path):
    run = _lm_run(tmp_path)
    assert run.restore(nn.Linear(2, 2)) == {}  # a new run restores nothing
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.ones(1, 2)).sum().backward()
    opt.step(), sched.step(), sched.step()
    run.save_checkpoint(model, opt, sched, meta={"m": 1}, count=7, extra={"train_time": 2.5})
    again = harness.Run(**{**run.__dict__, "resume": True})
    m2 = nn.Linear(2, 2)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    s2 = torch.optim.lr_scheduler.LambdaLR(o2, lambda s: 1.0 / (s + 1))
    state = again.restore(m2, o2, s2)
    assert again.resumed_at == 7 and state["step"] == 7 and state["train_time"] == 2.5
    assert torch.equal(m2.weight, model.weight) and s2.last_epoch == 2
    assert torch.equal(
        o2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"]
    )
    with pytest.raises(ResumeError, match="does not fit this model"):
        again.restore(nn.Linear(3, 2))
    epochs = harness.Run(**{**run.__dict__, "resume": True, "counter": "epoch"})
    with pytest.raises(CheckpointError, match="holds no epoch counter"):
        epochs.restore(nn.Linear(2, 2))


def test_open_log_and_finish_write_the_run_folder(tmp_path, capsys):
    run = _lm_run(tmp_path, progress=True)
    run.open({"model": "x"}, files={"extra.txt": lambda p: p.write_text("hi")})
    assert json.loads((run.dir / "model.json").read_text()) == {"model": "x"}
    assert (run.dir / "extra.txt").read_text() == "hi"
    assert json.loads((run.dir / "config.json").read_text())["out"] == str(run.dir)
    run.log_record({"step": 1, "loss": 0.123456789})
    assert json.loads(capsys.readouterr().out) == {"step": 1, "loss": 0.1235}
    assert _records(run.dir) == [{"step": 1, "loss": 0.123456789}]
    run.finish({"finished": False})
    assert not (run.dir / "summary.json").exists()  # an unfinished run has no summary
    run.finish({"finished": True, "x": 1})
    assert json.loads((run.dir / "summary.json").read_text()) == {"finished": True, "x": 1}


def test_train_step_names_an_infinite_loss_and_updates_once():
    w = nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    run = _fake_run()
    harness.train_step(run, lambda: ((2 * w).sum(), None), opt, sched, params=[w], grad_clip=None)
    assert w.item() == pytest.approx(0.0) and sched.last_epoch == 1  # one step: 1 - 0.5 * 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
    with pytest.raises(
        TrainingError, match=r"^training diverged: the loss became infinite at step 2; fix it$"
    ):
        harness.train_step(
            run, lambda: (w.sum() + float("inf"), None), opt, sched, params=[w], grad_clip=None, fix="fix it"
        )
    assert w.grad is None or w.grad.item() == 2.0  # nothing was stepped on the bad loss
    assert sched.last_epoch == 1


class _Task:
    """A tiny regression "task" for the step loop: records the steps it was asked for."""

    def __init__(self, model):
        self.model, self.asked, self.losses, self.evals = model, [], [], 0

    def next_batch(self, step):
        self.asked.append((step, torch.initial_seed()))
        return torch.full((3, 2), float(step))

    def loss(self, batch):
        loss = (self.model(batch) - 1).pow(2).mean()
        self.losses.append(loss.item())
        return loss

    def loop(self):
        def evaluate():
            self.evals += 1
            return {"val": float(self.evals)}

        return harness.StepLoop(
            next_batch=self.next_batch,
            loss=self.loss,
            tokens=lambda b: b.numel(),
            evaluate=evaluate,
            position=lambda: {"pos": len(self.asked)},
        )


def _step_loop(tmp_path, state=None, **cfg):
    from vitlens.train.schedule import warmup_cosine

    run = _lm_run(
        tmp_path, **{"max_steps": 5, "eval_every": 2, "lr": 0.1, "min_lr": 0.01, "warmup_steps": 2, **cfg}
    )
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = warmup_cosine(opt, total_steps=5, warmup_steps=2, base_lr=0.1, min_lr=0.01)
    if state:
        for _ in range(state["step"]):
            opt.step()  # no gradients: moves nothing, but keeps the optimiser-then-schedule order
            sched.step()
    saves = []
    real = run.save_checkpoint
    run.save_checkpoint = lambda *a, count, extra, **k: (
        saves.append((count, extra)),
        real(*a, count=count, extra=extra, **k),
    )
    run.open({"m": 1})
    task = _Task(model)
    out = harness.run_steps(run, task.loop(), model, opt, sched, meta={"m": 1}, state=state or {})
    run.close()
    return run, task, saves, out


def _lr(s, lr=0.1, min_lr=0.01, warmup=2, total=5):
    """The learning rate step s uses, by hand (linear warmup from the first step, then cosine)."""
    if s < warmup:
        return lr * (s + 1) / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / (total - warmup))))


def test_step_loop_evaluates_logs_and_checkpoints_every_n_steps_and_at_the_end(tmp_path):
    run, task, saves, (step, last, train_time) = _step_loop(tmp_path)
    assert [s for s, _ in task.asked] == [0, 1, 2, 3, 4]
    assert [seed for _, seed in task.asked] == [harness.run_seed(0, s, 0) for s in range(5)]
    records = _records(run.dir)
    assert [r["step"] for r in records] == [2, 4, 5] and [c for c, _ in saves] == [2, 4, 5]
    assert [r["val"] for r in records] == [1.0, 2.0, 3.0]
    assert [r["train_loss"] for r in records] == pytest.approx([task.losses[i] for i in (1, 3, 4)], rel=1e-6)
    assert [r["lr"] for r in records] == pytest.approx([_lr(2), _lr(4), _lr(5)], rel=1e-9)  # the next step's
    assert [e["pos"] for _, e in saves] == [2, 4, 5] and saves[-1][1]["train_time"] == records[-1][
        "train_time_s"
    ]
    windows = [records[0]["train_time_s"]] + [
        b["train_time_s"] - a["train_time_s"] for a, b in zip(records, records[1:])
    ]
    steps = [2, 2, 1]
    for r, w, n in zip(records, windows, steps):
        assert r["tokens_per_s"] * w == pytest.approx(6 * n, rel=1e-6)  # 6 "tokens" a batch
    assert (step, last) == (5, records[-1]) and train_time == records[-1]["train_time_s"]


def test_step_loop_continues_from_a_checkpoints_step_and_clock(tmp_path):
    run, task, saves, (step, last, train_time) = _step_loop(tmp_path, state={"step": 3, "train_time": 10.0})
    assert [s for s, _ in task.asked] == [3, 4]
    assert [r["step"] for r in _records(run.dir)] == [4, 5] and step == 5
    assert last["train_time_s"] > 10.0 and train_time == last["train_time_s"]


def test_step_loop_leaves_with_a_record_and_a_checkpoint_when_out_of_time(tmp_path, monkeypatch):
    monkeypatch.setattr(harness.Run, "out_of_time", lambda self: True)
    run, task, saves, (step, last, _) = _step_loop(tmp_path)
    assert step == 1 and [c for c, _ in saves] == [1] and [r["step"] for r in _records(run.dir)] == [1]


def test_step_loop_divergence_names_the_step_and_the_clipping_fix(tmp_path):
    class Nan(_Task):
        def loss(self, batch):
            return super().loss(batch) * (float("nan") if len(self.asked) == 3 else 1.0)

    run = _lm_run(tmp_path, max_steps=5, eval_every=10, grad_clip=None)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run.open({})
    msg = r"^training diverged: the loss became NaN at step 3; lower the learning rate or use --amp fp32, "
    msg += r"or clip the gradients \(--grad-clip 1\.0\)$"
    with pytest.raises(TrainingError, match=msg):
        harness.run_steps(run, Nan(model).loop(), model, opt, sched, meta={}, state={})
    run.close()


def test_a_nan_loss_on_the_command_line_is_one_line_with_step_and_fix(tmp_path, monkeypatch, capsys):
    from vitlens.cli import main

    real = trainer_mod.create_model

    def nan_head(*a, **kw):
        model = real(*a, **kw)
        with torch.no_grad():
            model.head.bias.fill_(float("nan"))
        return model

    monkeypatch.setattr(trainer_mod, "create_model", nan_head)
    argv = [
        "train", "--model", "vit_micro_patch4_32",
        "--model-args", '{"depth": 1, "embed_dim": 16, "num_heads": 2}',
        "--fraction", "0.01", "--batch-size", "10", "--epochs", "1", "--no-progress", "--amp", "fp32",
        "--grad-clip", "none", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.strip() == (
        "vitlens train: error: training diverged: the loss became NaN at step 1 (epoch 1); "
        "lower --lr or use --amp fp32, or clip the gradients (--grad-clip 1.0)"
    )


# ------------------------------------------------------------------------------- the image tokenizer task
def test_spread_picks_evenly_spaced_items_including_both_ends():
    from vitlens.train.tokenizer import spread

    items = torch.arange(10)
    assert spread(items, 4).tolist() == [0, 3, 6, 9]
    assert spread(items, 2).tolist() == [0, 9]
    for n in (None, 0, 10, 12):
        assert torch.equal(spread(items, n), items)


class _StubVQ(nn.Module):
    """Reconstructs image i with an error of 0.1 * (i + 1); its codes: the 2x2 corner of channel 1."""

    def __init__(self, K=4):
        super().__init__()
        self.cfg = SimpleNamespace(codebook_size=K)

    def forward(self, x):
        err = 0.1 * (x[:, 0, 0, 0] * 255 + 1)  # image i holds the value i at its first pixel
        recon = x + err[:, None, None, None]
        idx = (x[:, 1, :2, :2] * 255).round().long()  # (B, 2, 2) code grid
        return recon, idx, torch.tensor(0.0), {}


def test_evaluate_vq_psnr_usage_and_perplexity_by_hand():
    from vitlens.train.tokenizer import evaluate_vq

    images = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor([0, 1, 2], dtype=torch.uint8)  # errors 0.1, 0.2, 0.3
    codes = [[[0, 0], [0, 0]], [[1, 1], [1, 1]], [[0, 0], [0, 2]]]  # code 0: 7 cells, 1: 4, 2: 1, 3: none
    images[:, 1, :2, :2] = torch.tensor(codes, dtype=torch.uint8)
    images[2, 2, 3, 3] = 250  # a bright pixel: its reconstruction is clamped to 1 before the error
    model = _StubVQ()
    model.train()
    out = evaluate_vq(model, images, batch_size=2)  # two batches: the sums must run over both
    assert model.training  # left as it was
    # per-pixel squared errors: clamp(x + e) - x; the image holds 0..2/255 then zeros
    x = images.float() / 255
    mse = (((x + torch.tensor([0.1, 0.2, 0.3])[:, None, None, None]).clamp(0, 1) - x) ** 2).flatten(1).mean(1)
    assert out["mse"] == pytest.approx(mse.mean().item(), rel=1e-6)
    assert out["psnr"] == pytest.approx(10 * math.log10(1 / mse.mean().item()), rel=1e-6)
    assert out["psnr_per_image"] == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), rel=1e-6)
    assert out["codebook_usage"] == pytest.approx(75.0)  # codes 0, 1 and 2 of 4 (2 only once)
    h = -sum(q * math.log(q) for q in (7 / 12, 4 / 12, 1 / 12))  # perplexity exp(H(7/12, 4/12, 1/12))
    assert out["perplexity"] == pytest.approx(math.exp(h), rel=1e-5)


def test_tokenizer_config_checks():
    from vitlens.train.tokenizer import TokenizerTrainConfig

    bad_values = [
        dict(kind="kmeans"),
        dict(fraction=0.0),
        dict(fraction=1.5),
        dict(epochs=0),
        dict(k=0),
        dict(codebook_size=0),
        dict(lr=0.0),
        dict(warmup_steps=-1),
        dict(weight_decay=-0.1),
    ]
    for bad in bad_values:
        with pytest.raises(ConfigError):
            TokenizerTrainConfig(**bad)
    TokenizerTrainConfig(fraction=1.0, warmup_steps=0, weight_decay=0.0, epochs=1)
    vq = TokenizerTrainConfig(hidden=16, code_dim=8, codebook_size=32, ema=False).vq_config()
    assert (vq.hidden, vq.code_dim, vq.codebook_size, vq.ema) == (16, 8, 32, False)


VQ_RUN = dict(
    kind="vq", data="cifar10-mini", fraction=0.01, batch_size=8, epochs=2, hidden=8, res_hidden=4,
    num_res_blocks=1, code_dim=4, codebook_size=8, lr=0.01, warmup_steps=1, eval_images=20, progress=False,
)  # fmt: skip


def test_vq_run_schedule_records_and_summary(tmp_path, monkeypatch):
    from vitlens.train import tokenizer as tok_mod

    steps = []
    real = tok_mod.train_step

    def spy(run, forward, opt, sched, **kw):
        rec = {"lr": opt.param_groups[0]["lr"], "clip": kw["grad_clip"]}
        loss, (recon, stats) = real(run, forward, opt, sched, **kw)
        rec.update(loss=loss.item(), recon=recon.item(), ppl=stats["perplexity"])
        steps.append(rec)
        return loss, (recon, stats)

    monkeypatch.setattr(tok_mod, "train_step", spy)
    out = tmp_path / "vq"
    summary = tok_mod.train_tokenizer(tok_mod.TokenizerTrainConfig(**VQ_RUN, out=str(out)))
    assert len(steps) == 2 * 2  # 20 images // 8 = 2 full batches an epoch
    # warmup of one step, then cosine to 0 over the remaining 3
    expected = [0.01] + [0.01 * 0.5 * (1 + math.cos(math.pi * s / 3)) for s in range(3)]
    assert [s["lr"] for s in steps] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    records = _records(out)
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 2), (2, 4)]
    for r, own in zip(records, (steps[:2], steps[2:])):
        assert r["train_loss"] == pytest.approx(sum(s["loss"] for s in own) / 2, rel=1e-6)
        assert r["train_psnr"] == pytest.approx(10 * math.log10(2 / sum(s["recon"] for s in own)), rel=1e-6)
        assert r["train_perplexity"] == pytest.approx(sum(s["ppl"] for s in own) / 2, rel=1e-6)
        assert r["img_per_s"] == pytest.approx(16 / r["epoch_time_s"], rel=1e-9)
    assert records[1]["lr"] == pytest.approx(0.0, abs=1e-15)
    assert summary["finished"] and summary["epochs_done"] == 2 and summary["train_images"] == 20
    assert summary["test_images"] == 500 and summary["file"] == "tokenizer.safetensors"
    assert summary["train_time_s"] == pytest.approx(sum(r["epoch_time_s"] for r in records), rel=1e-9)
    assert summary["config"]["codebook_size"] == 8 and summary["config"]["hidden"] == 8
    assert json.loads((out / "summary.json").read_text())["epochs_done"] == 2
    assert (out / "tokenizer.safetensors").is_file() and (out / "recon.png").is_file()
    _, meta, state = load_checkpoint(out / "checkpoints" / "last.safetensors")
    assert state["epoch"] == 2 and state["scheduler"]["last_epoch"] == 4


def test_vq_run_needs_one_full_batch(tmp_path):
    from vitlens.train.tokenizer import TokenizerTrainConfig, train_tokenizer

    cfg = TokenizerTrainConfig(**{**VQ_RUN, "batch_size": 21}, out=str(tmp_path / "vq"))
    with pytest.raises(DataError, match="20 training images are fewer than one batch of 21"):
        train_tokenizer(cfg)


def test_palette_summary_measures_its_own_psnr(tmp_path):
    from vitlens.models.tokenizers.palette import assign_palette, load_palette
    from vitlens.train.tokenizer import TokenizerTrainConfig, load_images, spread, train_tokenizer

    cfg = TokenizerTrainConfig(
        kind="palette", data="cifar10-mini", k=4, palette_iters=2, palette_sample=2000, fraction=0.01,
        eval_images=10, out=str(tmp_path / "p"), progress=False,
    )  # fmt: skip
    summary = train_tokenizer(cfg)
    palette = load_palette(tmp_path / "p" / "palette.safetensors")
    x = spread(load_images("cifar10-mini", "test"), 10).permute(0, 2, 3, 1).float()
    idx = assign_palette(x, palette)
    mse = ((palette[idx] - x) / 255).pow(2).mean().item()
    assert summary["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    assert summary["colors_used_test"] == torch.unique(idx).numel() <= 4
    assert summary["k"] == 4 and summary["train_images"] == 20 and summary["kind"] == "palette"
    with pytest.raises(ResumeError, match="nothing to resume"):
        train_tokenizer(cfg, resume=True)


# ------------------------------------------------------------------------------- the image config
@pytest.mark.parametrize(
    "bad",
    [
        dict(fraction=0.0),
        dict(fraction=1.01),
        dict(amp="fp8"),
        dict(data_path="disk"),
        dict(tta="five-crop"),
        dict(optimizer="lion"),
        dict(on_corrupt="skip"),
        dict(epochs=0),
        dict(batch_size=0),
        dict(eval_every=0),
        dict(checkpoint_every=0),
        dict(img_size=0),
        dict(stop_after_epochs=0),
        dict(lr=0.0),
        dict(min_lr=-1e-6),
        dict(ema_decay=1.0),
        dict(ema_decay=0.0),
        dict(weight_decay=-0.1),
        dict(warmup_epochs=-1.0),
        dict(mixup=-0.1),
        dict(cutmix=-0.1),
        dict(num_workers=-1),
        dict(label_smoothing=1.0),
        dict(label_smoothing=-0.1),
        dict(random_erasing=1.0),
        dict(grad_clip=0.0),
        dict(time_budget_min=0.0),
    ],
)
def test_train_config_refuses_values_that_cannot_train(bad):
    with pytest.raises(ConfigError, match=next(iter(bad)).split("_")[0]):
        TrainConfig(**bad)


def test_train_config_takes_the_edge_values_that_can():
    cfg = TrainConfig(
        fraction=1.0,
        epochs=1,
        batch_size=1,
        eval_every=1,
        checkpoint_every=1,
        img_size=1,
        stop_after_epochs=1,
        min_lr=0.0,
        ema_decay=0.5,
        weight_decay=0.0,
        warmup_epochs=0.0,
        mixup=0.0,
        cutmix=0.0,
        num_workers=0,
        label_smoothing=0.0,
        random_erasing=0.0,
        grad_clip=None,
        time_budget_min=None,
        tta="flip",
        amp="bf16",
        optimizer="sgd",
        on_corrupt="error",
        data_path="device",
        randaugment="None",
    )
    assert cfg.randaugment is None  # "none" / "off" / "" switch RandAugment off
    assert TrainConfig(randaugment="rand-m9-n2").randaugment == "rand-m9-n2"
    defaults = TrainConfig()
    assert (defaults.label_smoothing, defaults.ema_decay, defaults.mixup, defaults.cutmix) == (
        0.1,
        None,
        0.0,
        0.0,
    )
    assert (defaults.optimizer, defaults.grad_clip, defaults.warmup_epochs) == ("adamw", 1.0, 1.0)


# ------------------------------------------------------------------------------- the run folder
def test_metrics_log_cuts_back_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    from vitlens.train.run_folder import MetricsLog, last_record, read_records

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "a": 1}\n{"step": 4, "a": 2}\n{"step": 6, "a": 3}\n{"step": 8, "a"')
    assert [r["step"] for r in read_records(path)] == [2, 4, 6]  # the line a kill cut short is dropped
    assert last_record(path) == {"step": 6, "a": 3} and last_record(tmp_path / "none.jsonl") == {}
    log = MetricsLog(tmp_path, enabled=True, keep_upto=("step", 4))
    assert [r["step"] for r in read_records(path)] == [2, 4]  # records after the checkpoint's step go
    log.write({"step": 6, "a": 9.5, "name": "x"})
    log.close()
    assert read_records(path)[-1] == {"step": 6, "a": 9.5, "name": "x"}
    off = MetricsLog(tmp_path / "other", enabled=False)
    off.write({"step": 1})
    assert not (tmp_path / "other").exists()  # not the main process: writes nothing


def test_config_differences_and_stored_config_defaults(tmp_path):
    from vitlens.train.run_folder import config_differences, stored_config

    stored = {"lr": 0.1, "epochs": 3, "tags": [1, 2]}
    assert config_differences(stored, {"lr": 0.1, "epochs": 4, "tags": (1, 2)}) == {"epochs": (3, 4)}
    assert config_differences(stored, {"lr": 0.2, "epochs": 4, "tags": [1, 2]}, ignore={"epochs"}) == {
        "lr": (0.1, 0.2)
    }
    assert config_differences({}, {"new": 1}) == {"new": (None, 1)}
    assert stored_config(tmp_path) == {}
    (tmp_path / "config.json").write_text(json.dumps({"lr": 0.5, "overrides": [{"at_epoch": 1}]}))
    values = stored_config(tmp_path, TrainConfig)
    assert values["lr"] == 0.5 and "overrides" not in values  # the history is not the config
    assert (
        values["epochs"] == TrainConfig().epochs and values["model_args"] == {}
    )  # fields it lacked: defaults
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ResumeError, match="not valid JSON"):
        stored_config(tmp_path)


def test_has_checkpoint_and_is_finished(tmp_path):
    from vitlens.train.run_folder import LAST, has_checkpoint, is_finished

    assert not has_checkpoint(tmp_path) and not is_finished(tmp_path)
    (tmp_path / LAST).parent.mkdir(parents=True)
    (tmp_path / LAST).write_bytes(b"x")
    (tmp_path / "summary.json").write_text("{}")
    assert has_checkpoint(tmp_path) and is_finished(tmp_path)


# ------------------------------------------------------------------------------- precision choices
def test_is_cnn_needs_more_than_one_convolution_and_no_transformer_blocks():
    from vitlens.train.precision import is_cnn

    one_conv = nn.Sequential(nn.Conv2d(3, 4, 2, stride=2), nn.Flatten())
    assert not is_cnn(one_conv)  # a patch embedding alone is not a CNN
    assert is_cnn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))
    hybrid = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    hybrid.blocks = nn.ModuleList()  # a ViT on a conv stem keeps its encoder in .blocks
    assert not is_cnn(hybrid)


def test_cpu_flags_come_from_the_flags_line_only(tmp_path):
    from vitlens.train.precision import Capability, _cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: flags-less cpu amx_bf16\nflags\t\t: fpu avx512_bf16 sse\n")
    assert _cpu_flags(info) == {"fpu", "avx512_bf16", "sse"}
    assert Capability(cpu_avx512_bf16=True).cpu_bf16 and Capability(cpu_amx_bf16=True).cpu_bf16
    assert not Capability(cuda_bf16=True).cpu_bf16
