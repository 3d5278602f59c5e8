"""The report's run table says what each run saw: its epochs, optimiser steps and images (issue 13)."""

from __future__ import annotations

from vitlens.study.report import _run_row


def _record(**extra):
    return {
        "label": "ViT-CLS", "model": "vit_micro_patch4_32", "fraction": 0.02, "seed": 0,
        "train_images": 1000, "params": 550_000, "flops_per_image": 69_000_000, "train_time_s": 100.25,
        "img_per_s": 932.6, "test_top1": 36.49, "run_dir": "runs/ViT-CLS_f0.02_s0", **extra,
    }


def test_a_row_gives_epochs_steps_and_images_seen():
    row = _run_row(_record(epochs=100, steps=800, images_seen=100_000))
    assert row[4:8] == ["1,000", "100", "800", "100,000"]
    assert row[8:12] == ["0.55", "0.069", "100", "933"]


def test_a_run_recorded_before_those_keys_shows_a_dash():
    row = _run_row(_record())
    assert row[5:8] == ["–", "–", "–"]
