"""Fabricated hub caches for the pretrained-model tests: an HF snapshot layout and randomised weights."""

from __future__ import annotations

from pathlib import Path

import torch


def hf_snapshot(repo: str) -> Path:
    """An HF hub cache entry: models--ORG--NAME/snapshots/<rev>/ with refs/main naming <rev>."""
    from huggingface_hub import constants

    entry = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (entry / "snapshots" / rev).mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(rev)
    return entry / "snapshots" / rev


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()
