"""A pretrained model's own evaluation transform, built from its description (a plain dict).

Each hub says how its models want an image: timm's ``pretrained_cfg`` (``crop_pct``, ``crop_mode``,
interpolation, mean/std), torchvision's ``weights.transforms()`` and the Hugging Face image
processors. :mod:`vitlens.models.hub` reads that into ``meta["preprocess"]``::

    {"resize": 248, "crop": 224, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3,
     "resize_mode": "shorter", "source": "timm pretrained_cfg"}

``resize_mode`` ``"shorter"`` (the default when absent) resizes the shorter side to ``resize``,
keeping the aspect ratio (timm's ``center`` crop mode, torchvision, HF ``shortest_edge``);
``"squash"`` resizes to ``resize`` x ``resize`` (timm's ``squash``, HF ``height``/``width``).
Then a centre crop to ``crop``, ``ToTensor`` and ``Normalize``: the same torchvision ops on PIL
images the peers run (timm ``create_transform``, torchvision ``ImageClassification``, the HF
processors' PIL backend), so the pixels are theirs to float rounding (tests/test_preprocess.py).
Resizing a uint8 tensor instead of a PIL image would round differently (up to ~2/255), so tensors
from vitlens' datasets go through PIL first, losslessly.

It lives in ``data`` (below ``models``) because the description is plain data: ``build_data``, the
analyses, ``vitlens eval`` and the pretrained study all use this one builder.
"""

from __future__ import annotations

import torch
from torchvision import transforms as T

from ..errors import ConfigError

RESIZE_MODES = ("shorter", "squash")
_KEYS = ("resize", "crop", "interpolation", "mean", "std")


def check_preprocess(pre: dict) -> dict:
    """``pre`` itself when it describes a transform, else a :class:`ConfigError` naming what is wrong."""
    missing = [k for k in _KEYS if k not in pre]
    if missing:
        raise ConfigError(
            f"a preprocessing description needs {', '.join(_KEYS)}; missing {', '.join(missing)}"
        )
    mode = pre.get("resize_mode", "shorter")
    if mode not in RESIZE_MODES:
        raise ConfigError(f"preprocess resize_mode {mode!r} is not one of {', '.join(RESIZE_MODES)}")
    try:
        T.InterpolationMode(pre["interpolation"])
    except ValueError:
        names = ", ".join(m.value for m in T.InterpolationMode)
        raise ConfigError(
            f"preprocess interpolation {pre['interpolation']!r} is not one of {names}"
        ) from None
    return pre


class ToPILRGB:
    """A uint8 (3, H, W) tensor (vitlens' datasets) or any PIL image -> an RGB PIL image (lossless)."""

    def __call__(self, image):
        from PIL import Image
        from torchvision.transforms.functional import to_pil_image

        if isinstance(image, torch.Tensor):
            image = to_pil_image(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image or a uint8 (3, H, W) tensor, got {type(image).__name__}")
        return image.convert("RGB")

    def __repr__(self) -> str:
        return "ToPILRGB()"


def resize_crop(pre: dict) -> T.Compose:
    """The geometric part: image -> RGB PIL image resized as ``pre`` says and centre-cropped to ``crop``."""
    check_preprocess(pre)
    interpolation = T.InterpolationMode(pre["interpolation"])
    squash = pre.get("resize_mode", "shorter") == "squash"
    size = (int(pre["resize"]),) * 2 if squash else int(pre["resize"])  # an int: the shorter side
    return T.Compose(
        [ToPILRGB(), T.Resize(size, interpolation=interpolation), T.CenterCrop(int(pre["crop"]))]
    )


def eval_transform(pre: dict) -> T.Compose:
    """The model's whole evaluation transform: image -> normalised float32 (3, crop, crop)."""
    return T.Compose([*resize_crop(pre).transforms, T.ToTensor(), T.Normalize(pre["mean"], pre["std"])])
