"""The training recipe is what the config says: schedule, label smoothing, EMA, weight decay.

Each check compares against an independent expectation: the learning rate of every step
computed by hand from the config, the label-smoothed cross-entropy written out from its
definition, the EMA recurrence run over the weights recorded after each step, and the
parameter groups decided by module type rather than by tensor shape.

Short real training runs (10 steps of a tiny ViT on the embedded CIFAR-10 subset, about a
second each) are recorded by spies around the harness's ``train_step``, the model builder and
the batch mixer.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlens
from vitlens.errors import TrainingError
from vitlens.io import load_checkpoint
from vitlens.train import TrainConfig
from vitlens.train import trainer as trainer_mod
from vitlens.train.schedule import warmup_cosine


# -- the schedule, step by step ---------------------------------------------------------------------
def _lrs(n_steps: int, **kw) -> list[float]:
    """The learning rate each optimiser step uses (read before the step, as the optimiser sees it)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=kw["base_lr"])
    sched = warmup_cosine(opt, **kw)
    out = []
    for _ in range(n_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_is_linear_from_the_first_step_and_reaches_the_peak():
    lrs = _lrs(6, total_steps=12, warmup_steps=4, base_lr=0.1, min_lr=0.01)
    # by hand: step s of a 4-step warmup uses (s + 1) / 4 of the peak; step 0 is not 0
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1], abs=1e-12)
    assert lrs[4] == pytest.approx(0.1, abs=1e-12)  # cosine starts at the peak
    # step 5: 1/8 of the way through the cosine: 0.01 + 0.09 * (1 + cos(pi / 8)) / 2
    assert lrs[5] == pytest.approx(0.01 + 0.09 * (1 + 0.9238795325112867) / 2, abs=1e-12)


def test_cosine_ends_at_min_lr_and_stays_there():
    lrs = _lrs(16, total_steps=12, warmup_steps=4, base_lr=0.1, min_lr=0.01)
    assert lrs[8] == pytest.approx(0.01 + 0.09 * 0.5, abs=1e-12)  # half way: the mean of peak and floor
    assert lrs[12] == pytest.approx(0.01, abs=1e-12)
    assert lrs[15] == pytest.approx(0.01, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # never rises after the warmup


def test_no_warmup_starts_at_the_peak():
    lrs = _lrs(3, total_steps=4, warmup_steps=0, base_lr=0.2, min_lr=0.0)
    # cosine over 4 steps: 0.2 * (1 + cos(pi * s / 4)) / 2
    assert lrs == pytest.approx([0.2, 0.1 * (1 + 0.7071067811865476), 0.1], abs=1e-12)


def test_default_floor_is_zero_and_a_one_step_cosine_ends_on_it():
    lrs = _lrs(6, total_steps=5, warmup_steps=4, base_lr=0.1)  # min_lr left at its default
    assert lrs[3] == pytest.approx(0.1) and lrs[4] == pytest.approx(
        0.1
    )  # cosine of one step starts at the peak
    assert lrs[5] == pytest.approx(0.0, abs=1e-15)  # ... and has reached the floor one step later


# -- parameter groups: decay only on the weights of linear and conv layers -------------------------
def _weight_names(model: nn.Module) -> set[str]:
    """By module type, not by shape: the .weight of every Linear / Conv layer."""
    return {
        f"{mod_name}.weight"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and getattr(mod, "weight", None) is not None
    }


def _optimizer(name: str, cfg_kw: dict, **model_kw):
    model = vitlens.create_model(name, **model_kw)
    cfg = TrainConfig(**cfg_kw)
    return model, trainer_mod.build_optimizer(model, cfg)


@pytest.mark.parametrize(
    "name, model_kw",
    [("vit_micro_patch4_32", dict(depth=1, num_registers=2)), ("resnet8_cifar", {})],
)
def test_weight_decay_groups_by_name(name, model_kw):
    model, opt = _optimizer(name, dict(weight_decay=0.3, lr=0.1), **model_kw)
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay: dict[float, set[str]] = {}
    for group in opt.param_groups:
        by_decay.setdefault(group["weight_decay"], set()).update(names[id(p)] for p in group["params"])
    assert set(by_decay) == {0.3, 0.0}
    assert by_decay[0.3] == _weight_names(model)
    assert by_decay[0.0] == set(names.values()) - _weight_names(model)
    if name.startswith("vit"):
        no_decay = by_decay[0.0]
        assert {"pos_embed", "cls_token", "reg_token", "norm.weight", "norm.bias", "head.bias"} <= no_decay
        assert {"blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "patch_embed.proj.bias"} <= no_decay


def test_frozen_parameters_are_left_out_and_the_rest_kept():
    """Catches ``break`` for ``continue`` on a frozen parameter (every later parameter lost)."""
    model = vitlens.create_model("vit_micro_patch4_32", depth=2)
    model.patch_embed.requires_grad_(False)  # frozen, and first in the parameter order
    opt = trainer_mod.build_optimizer(model, TrainConfig(weight_decay=0.1))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_opt == trainable and len(trainable) == len(list(model.parameters())) - 2


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_decay_shrinks_only_the_weights(optimizer):
    """With zero gradients an optimiser step moves a parameter only through its weight decay."""
    lr, wd = 0.1, 0.5
    model, opt = _optimizer(
        "vit_micro_patch4_32", dict(weight_decay=wd, lr=lr, optimizer=optimizer), depth=1, num_registers=1
    )
    with torch.no_grad():
        for p in model.parameters():  # no zero tensors, so any decay shows
            p.uniform_(0.5, 1.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed = _weight_names(model)
    for n, p in model.named_parameters():
        if n not in decayed:
            torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0, msg=f"{n} was decayed")
        elif optimizer == "adamw":  # decoupled decay: p <- p * (1 - lr * wd)
            torch.testing.assert_close(p.detach(), before[n] * (1 - lr * wd), rtol=1e-6, atol=0)
        else:  # SGD, Nesterov momentum 0.9, first step: p <- p - lr * (1 + 0.9) * wd * p
            torch.testing.assert_close(p.detach(), before[n] * (1 - lr * 1.9 * wd), rtol=1e-6, atol=0)


# -- one recorded training run -----------------------------------------------------------------------
LS, EMA, WARMUP_EPOCHS, CLIP = 0.2, 0.7, 0.6, 0.05

RECIPE = dict(
    model="vit_micro_patch4_32",
    model_args={"depth": 1, "embed_dim": 32, "num_heads": 2, "num_registers": 1},
    data="cifar10-mini",
    fraction=0.02,  # 4 images per class: 40 images, 5 batches of 8
    batch_size=8,
    epochs=2,
    lr=0.01,
    min_lr=0.001,
    weight_decay=0.05,
    warmup_epochs=WARMUP_EPOCHS,  # 3 of the 5 steps of an epoch
    label_smoothing=LS,
    ema_decay=EMA,
    grad_clip=CLIP,  # small enough to clip every step
    mixup=0.8,  # soft targets: the loss formula below covers them
    channels_last=True,
    augment=False,
    eval_every=2,
    progress=False,
)


def _record(out, **overrides) -> dict:
    """Train RECIPE (+ overrides) with spies: per step the optimiser's lr and decay by parameter
    name, the labels, soft targets, logits and loss of the objective, the gradient norm the
    update used, and the weights and buffers after it. Function-scoped on purpose: every test
    runs the training itself, so a mutation tool sees which tests cover the trainer."""
    mp = pytest.MonkeyPatch()
    steps: list[dict] = []
    built, labels, unmixed = {}, [], []
    real_create, real_step = trainer_mod.create_model, trainer_mod.train_step
    import vitlens.data as data_mod

    real_mixer = data_mod.build_batch_mixer

    def create_spy(*a, **kw):
        built["model"] = real_create(*a, **kw)
        return built["model"]

    def mixer_spy(*a, **kw):
        mixer = real_mixer(*a, **kw)
        if mixer is None:
            return None

        def mix(images, y):
            labels.append(y.clone())
            unmixed.append(images.clone())
            return mixer(images, y)

        return mix

    def step_spy(run, forward, optimizer, scheduler, **kw):
        model = built["model"]
        names = {id(p): n for n, p in model.named_parameters()}
        rec = {
            "lr": [g["lr"] for g in optimizer.param_groups],
            "decay": {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]},
            "labels": labels[-1] if labels else None,
            "unmixed": unmixed[-1] if unmixed else None,
        }

        def forward_spy():
            loss, logits = forward()
            rec.update(loss=loss.detach().clone(), logits=logits.detach().float().clone())
            return loss, logits

        forward_spy.__defaults__ = forward.__defaults__  # the (images, targets) of this step
        rec["images"], rec["targets"] = (t.clone() for t in forward.__defaults__[-2:])
        out = real_step(run, forward_spy, optimizer, scheduler, **kw)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        rec["grad_norm"] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        rec["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        rec["buffers"] = {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()}
        steps.append(rec)
        return out

    mp.setattr(trainer_mod, "create_model", create_spy)
    mp.setattr(trainer_mod, "train_step", step_spy)
    mp.setattr(data_mod, "build_batch_mixer", mixer_spy)
    # the test-set evaluation (1,000 forward images) is not part of the recipe: skip it for speed
    mp.setattr(trainer_mod, "evaluate_epoch", lambda *a, **k: {})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend on a shared machine
    try:
        summary = trainer_mod.train(TrainConfig(**{**RECIPE, **overrides}, out=str(out)))
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    assert summary["finished"]
    return {"steps": steps, "out": out, "model": built["model"]}


@pytest.fixture
def recorded(tmp_path):
    return _record(tmp_path / "run")


def test_learning_rate_of_every_step_follows_the_config(recorded):
    assert len(recorded["steps"]) == 10  # 2 epochs x 5 batches
    lr, min_lr, total = RECIPE["lr"], RECIPE["min_lr"], 10
    warmup = 3  # round(0.6 * 5)
    expected = []
    for s in range(total):
        if s < warmup:
            expected.append(lr * (s + 1) / warmup)
        else:
            progress = (s - warmup) / (total - warmup)
            expected.append(min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))
    for s, rec in enumerate(recorded["steps"]):
        assert rec["lr"] == pytest.approx([expected[s]] * len(rec["lr"]), rel=1e-9), f"step {s}"
    assert recorded["steps"][0]["lr"][0] == pytest.approx(lr / 3)  # the first step learns


def test_label_smoothing_is_applied_to_the_mixed_targets(recorded):
    plain_differs = []
    for rec in recorded["steps"]:
        logits, t = rec["logits"], rec["targets"]
        assert t.shape == logits.shape and torch.allclose(t.sum(-1), torch.ones(len(t)))  # soft targets
        logp = logits.log_softmax(-1)
        ce = -(t * logp).sum(-1)  # cross-entropy with the (mixed) targets
        uniform = -logp.mean(-1)  # cross-entropy with the uniform distribution over classes
        expected = ((1 - LS) * ce + LS * uniform).mean()
        torch.testing.assert_close(rec["loss"], expected, rtol=1e-5, atol=1e-6)
        plain_differs.append(not torch.allclose(rec["loss"], ce.mean(), rtol=1e-4))
    # ... and it is not the plain loss (a near-uniform prediction can make one step's two losses agree)
    assert sum(plain_differs) >= len(plain_differs) - 1
    steps = recorded["steps"]
    assert any(not torch.equal(r["targets"], F.one_hot(r["labels"], 10).float()) for r in steps)
    assert all(not torch.equal(r["images"], r["unmixed"]) for r in steps)  # the images are mixed too


def test_gradients_are_clipped_to_the_configured_norm(recorded):
    norms = torch.stack([rec["grad_norm"] for rec in recorded["steps"]])
    assert (norms <= CLIP * (1 + 1e-5)).all()
    assert torch.allclose(norms, torch.full_like(norms, CLIP), rtol=1e-4)  # every step was clipped


def test_logged_train_loss_and_accuracy_are_the_epoch_means(recorded):
    import json

    records = [json.loads(x) for x in (recorded["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for epoch, rec in enumerate(records):
        steps = recorded["steps"][5 * epoch : 5 * epoch + 5]
        n = sum(len(s["labels"]) for s in steps)
        loss = sum(s["loss"].item() * len(s["labels"]) for s in steps) / n
        correct = sum((s["logits"].argmax(1) == s["labels"]).sum().item() for s in steps)
        assert rec["train_loss"] == pytest.approx(loss, rel=1e-6)
        assert rec["train_acc"] == pytest.approx(100 * correct / n, rel=1e-6)
    # the logged lr is the schedule's after the epoch: the next step's (the floor after the last)
    assert records[0]["lr"] == pytest.approx(recorded["steps"][5]["lr"][0], rel=1e-9)
    assert records[1]["lr"] == pytest.approx(RECIPE["min_lr"], rel=1e-9)


def test_weight_decay_groups_in_the_run(recorded):
    decay = recorded["steps"][0]["decay"]
    weights = _weight_names(recorded["model"])
    assert {n for n, wd in decay.items() if wd == RECIPE["weight_decay"]} == weights
    assert {n for n, wd in decay.items() if wd == 0.0} == set(decay) - weights
    assert {"pos_embed", "cls_token", "reg_token"} <= set(decay) - weights


def _check_ema(rec: dict, decay: float) -> None:
    _, _, state = load_checkpoint(rec["out"] / "checkpoints" / "last.safetensors")
    ema_state = state["ema"]
    steps = rec["steps"]
    # torch's AveragedModel: the first update copies the weights, then ema <- d * ema + (1 - d) * w
    expected = {n: w.clone() for n, w in {**steps[0]["weights"], **steps[0]["buffers"]}.items()}
    for s in steps[1:]:
        for n, w in {**s["weights"], **s["buffers"]}.items():
            expected[n] = decay * expected[n] + (1 - decay) * w
    last = {**steps[-1]["weights"], **steps[-1]["buffers"]}
    for n, e in expected.items():
        torch.testing.assert_close(ema_state[f"module.{n}"], e, rtol=1e-5, atol=1e-7, msg=f"EMA of {n}")
    moved = [n for n in expected if not torch.allclose(expected[n], last[n], atol=1e-6)]
    assert moved, "the EMA must differ from the last weights, or this test cannot see a missing EMA"


def test_ema_is_the_recurrence_over_the_recorded_weights(recorded):
    _check_ema(recorded, EMA)


def test_ema_of_a_cnn_averages_its_batchnorm_statistics_too(tmp_path):
    rec = _record(tmp_path / "run", model="resnet8_cifar", model_args={}, ema_decay=0.6, channels_last=None)
    assert any("running_mean" in n for n in rec["steps"][0]["buffers"])
    _check_ema(rec, 0.6)


def test_a_diverging_run_stops_with_the_step_and_the_fix(tmp_path, monkeypatch):
    real_create = trainer_mod.create_model

    def nan_model(*a, **kw):
        model = real_create(*a, **kw)
        with torch.no_grad():
            model.head.bias.fill_(float("nan"))
        return model

    monkeypatch.setattr(trainer_mod, "create_model", nan_model)
    msg = r"^training diverged: the loss became NaN at step 1 \(epoch 1\); lower --lr or use --amp fp32$"
    with pytest.raises(TrainingError, match=msg):
        trainer_mod.train(TrainConfig(**RECIPE, out=str(tmp_path / "run")))
    # without gradient clipping the fix says to turn it on
    with pytest.raises(TrainingError, match=r"at step 1 \(epoch 1\); .*--amp fp32, or clip the gradients"):
        trainer_mod.train(TrainConfig(**{**RECIPE, "grad_clip": None}, out=str(tmp_path / "run2")))


# -- the pieces around the step: evaluation figures, gradient clipping, the translation loss --------
class _Lookup(nn.Module):
    """Each "image" is one number: the index of a row of preset logits."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x):
        return self.table[x.view(-1).long()]


def test_evaluate_top1_top5_and_loss_by_hand():
    logits = torch.tensor(
        [
            [5.0, 4, 3, 2, 1, 0, 0],  # label 0: top-1
            [5.0, 4, 3, 2, 1, 0, 0],  # label 4: 5th best -> top-5 only
            [5.0, 4, 3, 2, 1, 0, 0],  # label 5: outside the top 5
            [0.0, 0, 0, 9, 0, 0, 0],  # label 3: top-1
        ]
    )
    labels = [0, 4, 5, 3]
    data = [(torch.tensor([i]), y) for i, y in enumerate(labels)]
    out = trainer_mod.evaluate(_Lookup(logits), data, batch_size=3, device=torch.device("cpu"))
    assert out["n"] == 4
    assert out["top1"] == pytest.approx(50.0) and out["top5"] == pytest.approx(75.0)
    nll = [-(logits[i].log_softmax(-1)[y]).item() for i, y in enumerate(labels)]
    assert out["loss"] == pytest.approx(sum(nll) / 4, rel=1e-6)  # per image, over uneven batches


@pytest.mark.parametrize("scaled", [False, True])
def test_train_step_clips_the_gradient_norm(scaled):
    """With and without a GradScaler (the harness always passes one; disabled outside fp16, and
    with a real scale the gradients must be unscaled before clipping)."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from vitlens.train.harness import train_step

    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run = SimpleNamespace(autocast=nullcontext)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaled else None
    loss, _ = train_step(
        run, lambda: ((w * w).sum(), None), opt, sched, params=[w], grad_clip=0.5, scaler=scaler, where="t"
    )
    # gradient 2w = (6, 8), norm 10 -> clipped to norm 0.5: (0.3, 0.4); SGD lr 1 subtracts it
    torch.testing.assert_close(w.detach(), torch.tensor([2.7, 3.6]))
    assert loss.item() == pytest.approx(25.0)
    # the step is the schedule's count (one step done): this is the second
    msg = (
        r"^training diverged: the loss became NaN at step 2 \(t\); lower the learning rate or use --amp fp32$"
    )
    with pytest.raises(TrainingError, match=msg):
        train_step(
            run, lambda: (w.sum() * float("nan"), None), opt, sched, params=[w], grad_clip=None, where="t"
        )


def test_train_step_leaves_a_parameter_without_gradient_alone():
    """Gradients are reset to None, not zero: AdamW then skips a parameter this step did not use
    (zeros would still decay it and move its moments)."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from vitlens.train.harness import train_step

    used, unused = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([used, unused], lr=0.1, weight_decay=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run = SimpleNamespace(autocast=nullcontext)
    both = lambda: ((used * unused).sum(), None)  # noqa: E731
    only_used = lambda: ((used * 2).sum(), None)  # noqa: E731
    train_step(run, both, opt, sched, params=[used, unused], grad_clip=None, where="t")
    before = unused.detach().clone()
    train_step(run, only_used, opt, sched, params=[used, unused], grad_clip=None, where="t")
    torch.testing.assert_close(unused.detach(), before, rtol=0, atol=0)


def test_translation_loss_is_shifted_smoothed_and_skips_padding():
    from vitlens.text.data import PAD
    from vitlens.train.translate import seq2seq_loss

    V, eps = 6, 0.1
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1, 3, V, generator=g)
    seen = {}

    class Stub(nn.Module):
        def forward(self, src, tgt_in):
            seen["src"], seen["tgt_in"] = src, tgt_in
            return table.expand(tgt_in.shape[0], -1, -1)

    tgt = torch.tensor([[1, 4, 5, PAD]])  # <s> 4 5 <pad>: targets 4, 5 and a padded position
    src = torch.tensor([[5, 2]])
    loss = seq2seq_loss(Stub(), src, tgt, label_smoothing=eps)
    assert seen["src"] is src and torch.equal(seen["tgt_in"], tgt[:, :-1])  # teacher forcing: the prefix
    logp = table[0].log_softmax(-1)
    per_token = [(1 - eps) * -logp[t, y] + eps * -logp[t].mean() for t, y in ((0, 4), (1, 5))]
    assert loss.item() == pytest.approx(sum(per_token).item() / 2, rel=1e-6)  # padding left out
    plain = seq2seq_loss(Stub(), src, tgt)  # no smoothing unless asked for
    assert plain.item() == pytest.approx((-logp[0, 4] - logp[1, 5]).item() / 2, rel=1e-6)
