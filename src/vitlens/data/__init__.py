"""Data pipeline: datasets (embedded CIFAR-10 subset, CIFAR-10/100, any ImageFolder), a decoded-pixel
cache, nested class-balanced subsets, transforms and batch MixUp/CutMix.

The trainer needs one call::

    train_ds, test_ds, info = build_data("cifar10", "../shared/data", fraction=0.1, randaugment="rand-m9-n2")
"""

from .build import DataInfo, build_data
from .cache import default_cache_dir
from .catalog import DATASET_NAMES, build_dataset, default_data_dir, load_image_folder
from .datasets import LazyImageDataset, TensorImageDataset, TransformedDataset, dataset_targets
from .decode import CorruptImageError, CorruptImageWarning, decode_bytes
from .mixing import BatchMixer, build_batch_mixer
from .subset import nested_fraction_indices
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DATASET_STATS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_transforms,
    parse_randaugment,
)

__all__ = [
    "DATASET_NAMES",
    "DATASET_STATS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchMixer",
    "CorruptImageError",
    "CorruptImageWarning",
    "DataInfo",
    "LazyImageDataset",
    "TensorImageDataset",
    "TransformedDataset",
    "build_batch_mixer",
    "build_data",
    "build_dataset",
    "build_transforms",
    "dataset_targets",
    "decode_bytes",
    "default_cache_dir",
    "default_data_dir",
    "load_image_folder",
    "nested_fraction_indices",
    "parse_randaugment",
]
