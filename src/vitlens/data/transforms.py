"""Train / eval transforms on uint8 (3, H, W) tensors, built from torchvision.transforms.v2.

Two augmentation recipes, picked by image size unless ``crop`` says otherwise:

* ``"pad"`` (small images, CIFAR): pad by ``crop_padding`` and take a random ``img_size`` crop.
  When the source is resized (CIFAR 32 -> 224 for a pretrained ViT), the padding scales with it.
* ``"rrc"`` (larger images, ImageNet-style): RandomResizedCrop, which also copes with sources of
  differing sizes.

Then horizontal flip, optional RandAugment (on uint8, where it is defined), conversion to
float in [0, 1], Normalize, and optional RandomErasing (after Normalize, so an erased patch
of zeros is the dataset mean).
"""

from __future__ import annotations

import re

import torch
from torchvision.transforms import v2

from ..errors import ConfigError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

#: (mean, std) per dataset name; ``imagefolder`` defaults to ImageNet's, as pretrained models expect.
DATASET_STATS = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar10-mini": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD),
}

#: Images up to this size get the "pad" recipe by default, larger ones "rrc".
SMALL_IMAGE_MAX = 64

#: Fraction of the resized image kept by the eval center crop in the "rrc" recipe (timm's default).
EVAL_CROP_PCT = 0.875


def parse_randaugment(spec) -> tuple[int, int] | None:
    """``"rand-m9-n2"`` (timm style, any key order) or ``(num_ops, magnitude)`` -> ``(num_ops, magnitude)``.

    ``None``, ``""`` and ``"none"`` mean no RandAugment. Magnitude is on torchvision's 0..30 scale
    (31 bins), which matches timm's ``m`` values.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none", "off")):
        return None
    if isinstance(spec, str):
        parts = spec.strip().lower().split("-")
        if parts[0] != "rand" or len(parts) < 2:
            raise ConfigError(
                f"randaugment={spec!r} is not understood; write it like 'rand-m9-n2' (magnitude 9, 2 ops)"
            )
        vals = {"n": 2, "m": 9}
        for p in parts[1:]:
            m = re.fullmatch(r"([a-z]+)(\d+)", p)
            if m is None or m.group(1) not in vals:
                raise ConfigError(
                    f"randaugment={spec!r}: {p!r} is not supported (torchvision's RandAugment takes only "
                    "m<magnitude> and n<num_ops>); write it like 'rand-m9-n2'"
                )
            vals[m.group(1)] = int(m.group(2))
        num_ops, magnitude = vals["n"], vals["m"]
    else:
        try:
            num_ops, magnitude = (int(v) for v in spec)
        except (TypeError, ValueError):
            raise ConfigError(
                f"randaugment={spec!r}: give a string like 'rand-m9-n2' or (num_ops, magnitude)"
            ) from None
    if num_ops < 1 or not 0 <= magnitude <= 30:
        raise ConfigError(f"randaugment={spec!r}: need num_ops >= 1 and 0 <= magnitude <= 30")
    return num_ops, magnitude


def build_transforms(
    train: bool,
    *,
    img_size: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    crop_padding: int = 4,
    hflip: bool = True,
    randaugment=None,
    random_erasing: float = 0.0,
    src_size: int | None = None,
    crop: str | None = None,
) -> v2.Compose:
    """uint8 (3, H, W) -> normalized float32 (3, img_size, img_size).

    Args:
        train: augmenting train pipeline, or the deterministic eval one.
        img_size: output side length.
        mean, std: per-channel normalization (see :data:`DATASET_STATS`).
        crop_padding: zero padding of the "pad" recipe's random crop, in source pixels.
        hflip: random horizontal flips (train).
        randaugment: ``"rand-m9-n2"``, ``(num_ops, magnitude)`` or ``None`` (train).
        random_erasing: probability of RandomErasing (train; 0 disables).
        src_size: side of the (square, same-size) source images if known; ``None`` = unknown or mixed.
        crop: ``"pad"`` or ``"rrc"``; ``None`` picks "pad" for sources (or, if unknown, outputs)
            of at most :data:`SMALL_IMAGE_MAX` px.
    """
    if img_size < 1:
        raise ConfigError(f"img_size must be a positive number of pixels, got {img_size}")
    if not 0.0 <= random_erasing <= 1.0:
        raise ConfigError(f"random_erasing is a probability in [0, 1], got {random_erasing}")
    if crop is None:
        crop = "pad" if (src_size or img_size) <= SMALL_IMAGE_MAX else "rrc"
    if crop not in ("pad", "rrc"):
        raise ConfigError(
            f"crop={crop!r} is not a recipe; use 'pad' (CIFAR-style) or 'rrc' (RandomResizedCrop)"
        )

    ops: list = []
    if train and crop == "rrc":
        ops.append(v2.RandomResizedCrop(img_size, antialias=True))
    else:
        ops += _fit(img_size, src_size, crop)
        if train and crop_padding > 0:
            scale = img_size / src_size if src_size else 1.0
            ops.append(v2.RandomCrop(img_size, padding=max(1, round(crop_padding * scale))))
    if train and hflip:
        ops.append(v2.RandomHorizontalFlip())
    if train and (ra := parse_randaugment(randaugment)) is not None:
        ops.append(v2.RandAugment(num_ops=ra[0], magnitude=ra[1]))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if train and random_erasing > 0:
        ops.append(v2.RandomErasing(p=random_erasing, value=0))
    return v2.Compose(ops)


def _fit(img_size: int, src_size: int | None, crop: str) -> list:
    """Bring a source image to (img_size, img_size) deterministically."""
    if src_size == img_size:
        return []
    if src_size is not None and crop == "pad":
        return [v2.Resize((img_size, img_size), antialias=True)]
    # Resize the short side, then center-crop: copes with mixed sizes; "rrc" keeps timm's 0.875 margin.
    short = img_size if crop == "pad" else int(round(img_size / EVAL_CROP_PCT))
    return [v2.Resize(short, antialias=True), v2.CenterCrop(img_size)]
