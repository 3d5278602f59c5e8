"""The Dataset classes: decoded-in-memory, decoded-on-access, and a transform wrapper.

Every dataset here yields ``(image, label)`` with ``image`` a uint8 (3, H, W) tensor (before
transforms) and exposes ``classes`` (names) and ``targets`` (one int label per item), the
two attributes torchvision's datasets have and the rest of vitlens relies on.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.data import Dataset, Subset

from .decode import CorruptImageError, CorruptImageWarning, check_on_corrupt, decode_bytes
from .sources import ImageFolderSource


class TensorImageDataset(Dataset):
    """All images of a split decoded into one (N, 3, H, W) uint8 tensor: indexing is a slice, no decode."""

    def __init__(self, images: torch.Tensor, targets, classes: list[str], source: str = ""):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}"
            )
        if len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.source = source

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.targets[i]

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"TensorImageDataset({n} images {c}x{h}x{w}, {len(self.classes)} classes, from {self.source})"


class LazyImageDataset(Dataset):
    """Decode each file when it is asked for: for images of differing sizes, or too many to hold decoded.

    A file found unreadable only now cannot be dropped (the length is fixed by then): with
    ``on_corrupt="warn"`` it is replaced by the next readable item, with a warning naming it;
    with ``"error"`` a :class:`CorruptImageError` names it.
    """

    def __init__(self, source: ImageFolderSource, on_corrupt: str = "warn"):
        self.src = source
        self.on_corrupt = check_on_corrupt(on_corrupt)
        self.classes = source.classes
        self.targets = source.targets
        self.source = source.location

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        for k in range(min(n, 64)):  # give up on a folder that is (nearly) all garbage
            j = (i + k) % n
            try:
                return decode_bytes(self.src.read(j), self.src.names[j]), self.targets[j]
            except CorruptImageError as e:
                if self.on_corrupt == "error":
                    raise
                warnings.warn(
                    f"unreadable image {e.name} ({e.reason}); returning the next item instead",
                    CorruptImageWarning,
                    stacklevel=2,
                )
        raise CorruptImageError(
            self.src.names[i], f"it and the {min(n, 64) - 1} items after it are unreadable"
        )

    def __repr__(self) -> str:
        return f"LazyImageDataset({len(self)} images, {len(self.classes)} classes, from {self.source})"


def dataset_targets(ds: Dataset) -> list[int]:
    """``targets`` of a dataset, looking through :class:`torch.utils.data.Subset` (which lacks them)."""
    if isinstance(ds, Subset):
        parent = dataset_targets(ds.dataset)
        return [parent[i] for i in ds.indices]
    if not hasattr(ds, "targets"):
        raise TypeError(f"{type(ds).__name__} has no .targets (one int label per item)")
    return [int(t) for t in ds.targets]


def dataset_classes(ds: Dataset) -> list[str]:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return list(ds.classes)


class TransformedDataset(Dataset):
    """``base`` with ``transform`` applied to each image (labels untouched); keeps ``classes``/``targets``."""

    def __init__(self, base: Dataset, transform=None):
        self.base, self.transform = base, transform
        self.classes = dataset_classes(base)
        self.targets = dataset_targets(base)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label = self.base[i]
        return (self.transform(img) if self.transform is not None else img), label

    def __repr__(self) -> str:
        return f"TransformedDataset({self.base!r},\n  transform={self.transform})"
