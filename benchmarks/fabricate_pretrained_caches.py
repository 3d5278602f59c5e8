"""Fabricate hub caches for ``vitlens study --preset pretrained``: random weights, the hubs' own layouts.

    python benchmarks/fabricate_pretrained_caches.py DIR

writes ``DIR/hf`` (HF_HOME: ``hub/models--ORG--NAME/snapshots/<rev>/model.safetensors`` + ``refs/main``)
and ``DIR/torch`` (TORCH_HOME: ``hub/checkpoints/<torchvision file>``) for every model of the preset,
exactly as tests/test_pretrained_study.py does, so the preset runs offline with no download.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REV = "0123456789abcdef0123456789abcdef01234567"


def main(root: str) -> None:
    root = Path(root).resolve()
    os.environ["HF_HOME"], os.environ["TORCH_HOME"] = str(root / "hf"), str(root / "torch")
    import timm
    import torch
    import torchvision
    from safetensors.torch import save_file

    from vitlens.study.config import StudyConfig

    torch.manual_seed(0)

    def noisy(model):  # random-initialised, plus noise (as tests/test_pretrained.py's _random)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return model

    for spec in StudyConfig.load(preset="pretrained").models:
        lib, name = spec.model.split(":", 1)
        if lib == "timm":
            repo = timm.models.get_pretrained_cfg(name).hf_hub_id
            entry = root / "hf" / "hub" / ("models--" + repo.replace("/", "--"))
            (entry / "snapshots" / REV).mkdir(parents=True, exist_ok=True)
            (entry / "refs").mkdir(exist_ok=True)
            (entry / "refs" / "main").write_text(REV)
            state = noisy(timm.create_model(name)).state_dict()
            file = entry / "snapshots" / REV / "model.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, str(file))
        elif lib == "torchvision":
            weights = torchvision.models.get_model_weights(name)["DEFAULT"]
            cache = root / "torch" / "hub" / "checkpoints"
            cache.mkdir(parents=True, exist_ok=True)
            torch.save(noisy(torchvision.models.get_model(name)).state_dict(), cache / Path(weights.url).name)
        else:
            raise SystemExit(f"cannot fabricate {spec.model}")
        print(f"fabricated {spec.model}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "pretrained-caches")
