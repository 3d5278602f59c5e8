"""What the image trainer's epoch progress bar shows, and when (issue 15: seed 4's whole-function run
of ``train_epoch`` left only display mutants alive).

The bar's postfix is refreshed at most once a second (so a GPU is not synchronised every step) and on
the last step; it shows the mean loss so far, the images per second of ALL processes, and the
learning rate of the first parameter group. A fake clock and a fake bar make that exact.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from vitlens.train import trainer


class _Bar:
    disable = False

    def __init__(self, items):
        self.items, self.postfixes = items, []

    def __iter__(self):
        return iter(self.items)

    def set_postfix(self, **kw):
        self.postfixes.append(kw)


def test_epoch_bar_refreshes_once_a_second_and_on_the_last_step(monkeypatch):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(4)]
    bar = _Bar(batches)
    run = SimpleNamespace(
        cfg=SimpleNamespace(channels_last=False, grad_clip=0.0, epochs=1, label_smoothing=0.0),
        progress=lambda loader, desc, leave: bar,
        device=torch.device("cpu"),
        dist=SimpleNamespace(world_size=2, rank=0),
    )
    # perf_counter: start, after steps 1..4 (0.5 s, exactly 1.0 s, 1.5 s, 3.0 s), end of the epoch
    clock = iter([0.0, 0.5, 1.0, 1.5, 3.0, 3.5])
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(trainer, "train_step", lambda run, forward, *a, **kw: forward())
    scheduler = SimpleNamespace(get_last_lr=lambda: [1e-3, 5e-4])  # two groups, different rates

    (loss_sum, correct, seen), seconds = trainer.train_epoch(
        run, model, model, batches, None, scheduler, None, None, None, epoch=0
    )

    with torch.no_grad():
        losses = [F.cross_entropy(model(x), y).item() for x, y in batches]
    assert seen == 16 and seconds == 3.5
    assert abs(loss_sum - 4 * sum(losses)) < 1e-5
    # step 1 (0.5 s): nothing; step 2 (1.0 s since the start): shown; step 3 (0.5 s since): nothing;
    # step 4: the last step, shown. img/s counts both processes: 2 x 8 images / 1 s, 2 x 16 / 3 s.
    assert bar.postfixes == [
        {"loss": f"{sum(losses[:2]) / 2:.3f}", "img_s": "16", "lr": "1.00e-03"},
        {"loss": f"{sum(losses) / 4:.3f}", "img_s": "11", "lr": "1.00e-03"},
    ]


def test_a_disabled_bar_is_never_refreshed(monkeypatch):
    model = nn.Linear(3, 2)
    batches = [(torch.randn(2, 3), torch.tensor([0, 1])) for _ in range(3)]
    bar = _Bar(batches)
    bar.disable = True
    run = SimpleNamespace(
        cfg=SimpleNamespace(channels_last=False, grad_clip=0.0, epochs=1, label_smoothing=0.0),
        progress=lambda loader, desc, leave: bar,
        device=torch.device("cpu"),
        dist=SimpleNamespace(world_size=1, rank=0),
    )
    clock = iter([0.0, 5.0, 10.0, 15.0, 20.0])
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(trainer, "train_step", lambda run, forward, *a, **kw: forward())
    trainer.train_epoch(run, model, model, batches, None, SimpleNamespace(get_last_lr=lambda: [1.0]),
                        None, None, None, epoch=0)
    assert bar.postfixes == []
