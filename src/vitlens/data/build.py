"""``build_data``: the one call the trainer makes - train/test datasets with transforms, plus ``DataInfo``."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from torch.utils.data import Subset

from ..errors import DataError
from .catalog import build_dataset
from .datasets import TensorImageDataset, TransformedDataset
from .preprocess import check_preprocess, eval_transform
from .subset import nested_fraction_indices
from .transforms import DATASET_STATS, IMAGENET_MEAN, IMAGENET_STD, build_transforms

#: Output size when the source images differ in size and no img_size is given.
DEFAULT_IMG_SIZE = 224


@dataclass
class DataInfo:
    """What a model and a run record need to know about the data."""

    num_classes: int
    classes: list[str]
    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    train_size: int = 0
    test_size: int = 0
    extra: dict = field(default_factory=dict)  # e.g. fraction and seed of the training subset

    def to_dict(self) -> dict:
        return asdict(self)


def build_data(
    name: str = "cifar10-mini",
    data_dir: str | os.PathLike | None = None,
    *,
    fraction: float = 1.0,
    seed: int = 0,
    img_size: int | None = None,
    augment: bool = True,
    randaugment=None,
    crop_padding: int = 4,
    hflip: bool = True,
    random_erasing: float = 0.0,
    crop: str | None = None,
    mean=None,
    std=None,
    download: bool = False,
    on_corrupt: str = "warn",
    cache_dir=None,
    preprocess: dict | None = None,
) -> tuple[TransformedDataset, TransformedDataset, DataInfo]:
    """Train and test datasets (transformed, normalized float tensors) and their :class:`DataInfo`.

    ``fraction`` keeps a class-balanced, nested share of the *training* split
    (:func:`nested_fraction_indices` with ``seed``); the test split is always whole. ``img_size``
    defaults to the images' own size (or 224 when they differ); ``mean``/``std`` default to the
    dataset's statistics (ImageNet's for ``imagefolder``). ``augment=False`` gives the training
    split the deterministic eval transforms (for analysis, probes, feature extraction).
    ``preprocess``: a pretrained model's own evaluation transform (``meta["preprocess"]``, see
    :mod:`.preprocess`): the test split (and an un-augmented train split) goes through it, and its
    crop and mean/std replace ``img_size``/``mean``/``std``.
    """
    opts = dict(download=download, on_corrupt=on_corrupt, cache_dir=cache_dir)
    train_base = build_dataset(name, "train", data_dir, **opts)
    test_base = build_dataset(name, "test", data_dir, **opts)
    if train_base.classes != test_base.classes:
        only_train = sorted(set(train_base.classes) - set(test_base.classes))
        only_test = sorted(set(test_base.classes) - set(train_base.classes))
        raise DataError(
            f"the train and test splits of {name} have different classes "
            f"(only in train: {only_train or '-'}; only in test: {only_test or '-'}), so their labels "
            "would not match; give both splits the same class folders"
        )

    src_size = _square_size(train_base) if _square_size(train_base) == _square_size(test_base) else None
    if preprocess is not None:  # the model's own resize, crop, interpolation and mean/std
        check_preprocess(preprocess)
        img_size, mean, std = preprocess["crop"], preprocess["mean"], preprocess["std"]
    img_size = int(img_size or src_size or DEFAULT_IMG_SIZE)
    default_mean, default_std = DATASET_STATS.get(name.lower(), (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = tuple(mean or default_mean), tuple(std or default_std)

    train_split = train_base
    if fraction != 1.0:
        train_split = Subset(train_base, nested_fraction_indices(train_base.targets, fraction, seed).tolist())
    common = dict(img_size=img_size, mean=mean, std=std, src_size=src_size, crop=crop)
    train_tf = build_transforms(
        augment,
        crop_padding=crop_padding,
        hflip=hflip,
        randaugment=randaugment,
        random_erasing=random_erasing,
        **common,
    )
    test_tf = build_transforms(False, **common) if preprocess is None else eval_transform(preprocess)
    if preprocess is not None and not augment:
        train_tf = test_tf
    train_ds = TransformedDataset(train_split, train_tf)
    test_ds = TransformedDataset(test_base, test_tf)
    info = DataInfo(
        num_classes=len(train_base.classes),
        classes=list(train_base.classes),
        img_size=img_size,
        in_chans=3,
        mean=mean,
        std=std,
        name=name,
        train_size=len(train_ds),
        test_size=len(test_ds),
        extra={"fraction": fraction, "seed": seed, "src_size": src_size, "augment": augment},
    )
    return train_ds, test_ds, info


def run_stats(meta: dict) -> dict:
    """``build_data``'s ``mean``/``std`` for looking at a trained run again: the statistics it was
    trained with where they are not its data's own (a fine-tune from pretrained weights records their
    source as ``meta["normalization"]``); ``{}`` otherwise, so the data's statistics apply as before."""
    if not meta.get("normalization"):
        return {}
    return {"mean": tuple(meta["mean"]), "std": tuple(meta["std"])}


def _square_size(ds) -> int | None:
    """Side of a decoded dataset's (square, uniform) images; ``None`` if unknown or not square."""
    if isinstance(ds, TensorImageDataset):
        h, w = ds.image_size
        return h if h == w else None
    return None
