"""The device-resident data path: decoded uint8 images live on the training device, batches are
drawn by index there, and augmentation runs on whole batches.

Why: for CIFAR-sized data the DataLoader path spends more time in per-image Python (one v2
transform call per image, a collate, a host->device copy) than a small model spends computing.
Here one epoch is a permutation of indices; a batch is one gather from a (N, C, H, W) uint8
tensor already on the device, then a few batched tensor ops.

Same semantics as the DataLoader path in ``train/trainer.py``:

* order: :func:`epoch_order` is ``DistributedSampler(shuffle=True, drop_last=False)`` - a
  permutation seeded by ``seed + epoch``, padded to a multiple of the world size, rank ``r`` taking
  every ``world_size``-th index from ``r`` - so shards are disjoint up to that padding and complete;
* batches: consecutive runs of ``batch_size`` local indices; the last one is dropped only when it
  would hold a single image (:func:`drop_last_rule`, the trainer's rule: one image breaks BatchNorm);
* augmentation: the training split's own ``v2.Compose`` (from ``build_transforms``) translated op by
  op (:func:`batched_pipeline`): deterministic ops (Resize, CenterCrop, ToDtype, Normalize) are the
  very same v2 kernels applied to the batch, so with augmentation off a batch is bit-identical to the
  DataLoader's; RandomCrop (zero padding), RandomHorizontalFlip, RandomErasing and RandAugment draw their
  parameters per image from a generator on the device (RandAugment then applies each of its 14 ops
  once, with torchvision's kernels, to the images that drew it);
* resume: the augmentation generator is re-seeded from ``(seed, epoch, rank)`` at every
  ``set_epoch``, so an epoch's batches do not depend on what ran before it.

Datasets that are not decoded in memory (``LazyImageDataset``) or whose transforms have no batched
translation (RandomResizedCrop) keep the DataLoader path: :func:`device_loader_or_none` says which.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from ..errors import ConfigError, DataError
from .datasets import TensorImageDataset, TransformedDataset

DATA_PATHS = ("auto", "device", "dataloader")

#: On a GPU, keep the resident images under this share of the free memory; above it use the DataLoader.
MAX_DEVICE_MEMORY_SHARE = 0.25

BatchOp = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


# ------------------------------------------------------------------------------- order
def epoch_order(n: int, *, seed: int, epoch: int, world_size: int = 1, rank: int = 0) -> torch.Tensor:
    """This rank's indices for ``epoch``: exactly ``list(DistributedSampler(...))`` with ``shuffle=True``,
    ``drop_last=False`` after ``set_epoch(epoch)`` (int64, on the CPU)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g)
    total = math.ceil(n / world_size) * world_size
    if total > n:  # pad by repeating the start of the permutation, as DistributedSampler does
        order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
    return order[rank:total:world_size]


def drop_last_rule(n_local: int, local_batch_size: int) -> bool:
    """The trainer's rule: drop the final batch only when it would hold one image (it breaks BatchNorm)."""
    return n_local % local_batch_size == 1


def augment_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the augmentation generator for one (seed, epoch, rank); a different stream from the
    global RNG the trainer seeds per epoch (so dropout and augmentation never share draws)."""
    return (seed * 1_000_003 + epoch * 9_973 + rank * 101 + 7_919) % (2**63 - 1)


# ------------------------------------------------------------------------------- batched ops
def random_crop(
    x: torch.Tensor, g: torch.Generator, *, size: tuple[int, int], padding: Sequence[int]
) -> torch.Tensor:
    """v2.RandomCrop(size, padding, fill=0) on every image of ``x`` (B, C, H, W), one offset per image.

    Pads with zeros (left, top, right, bottom), then takes each image's crop at its own uniformly drawn
    (top, left) in ``[0, padded - size]``, by one gather of row and column indices."""
    left, top, right, bottom = padding
    xp = F.pad(x, (left, right, top, bottom)) if any(padding) else x
    b, c, hp, wp = xp.shape
    h, w = size
    tops = torch.randint(0, hp - h + 1, (b,), generator=g, device=x.device)
    lefts = torch.randint(0, wp - w + 1, (b,), generator=g, device=x.device)
    rows = (tops[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, h, 1)
    cols = (lefts[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, w)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[batch, chans, rows, cols]


def random_hflip(x: torch.Tensor, g: torch.Generator, *, p: float = 0.5) -> torch.Tensor:
    """v2.RandomHorizontalFlip(p): each image flipped with probability ``p``."""
    flip = torch.rand(x.shape[0], generator=g, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_erasing(
    x: torch.Tensor,
    g: torch.Generator,
    *,
    p: float,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float = 0.0,
    attempts: int = 10,
) -> torch.Tensor:
    """v2.RandomErasing on every image: with probability ``p`` a rectangle of area ``scale`` x image and
    aspect in ``ratio`` (log-uniform) is set to ``value``; like torchvision, up to ``attempts`` draws of
    the shape per image, the first that fits is used, none erases nothing."""
    b, _, H, W = x.shape
    dev = x.device
    area = H * W * (scale[0] + (scale[1] - scale[0]) * torch.rand(b, attempts, generator=g, device=dev))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(b, attempts, generator=g, device=dev))
    h = torch.round(torch.sqrt(area * aspect)).long()
    w = torch.round(torch.sqrt(area / aspect)).long()
    fits = (h < H) & (w < W)
    first = torch.argmax(fits.int(), dim=1)  # first attempt that fits (0 when none: masked below)
    pick = torch.arange(b, device=dev)
    h, w = h[pick, first], w[pick, first]
    erase = fits.any(dim=1) & (torch.rand(b, generator=g, device=dev) < p)
    top = (torch.rand(b, generator=g, device=dev) * (H - h + 1)).long()
    left = (torch.rand(b, generator=g, device=dev) * (W - w + 1)).long()
    ys = torch.arange(H, device=dev)[None, :, None]
    xs = torch.arange(W, device=dev)[None, None, :]
    box = (ys >= top[:, None, None]) & (ys < (top + h)[:, None, None]) & (xs >= left[:, None, None])
    box &= xs < (left + w)[:, None, None]
    box &= erase[:, None, None]
    return x.masked_fill(box[:, None], value)


def batched_randaugment(op: v2.RandAugment) -> BatchOp:
    """v2.RandAugment with its own draw per image: each of ``num_ops`` rounds picks an op (and the sign
    of its magnitude) for every image, then applies each op once to the images that picked it - the
    loop runs over the 14 ops, never over images, with torchvision's own kernels for each op."""
    space = op._AUGMENTATION_SPACE
    names = list(space)
    fill = op._fill

    def apply(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        x = x.clone()
        for _ in range(op.num_ops):
            which = torch.randint(0, len(names), (b,), generator=g, device=x.device)
            negative = torch.rand(b, generator=g, device=x.device) < 0.5
            for k, name in enumerate(names):
                magnitudes_fn, signed = space[name]
                mags = magnitudes_fn(op.num_magnitude_bins, h, w)
                magnitude = float(mags[op.magnitude]) if mags is not None and mags.ndim > 0 else 0.0
                for sign in (-1.0, 1.0) if signed else (1.0,):
                    chosen = which == k
                    if signed:
                        chosen &= negative if sign < 0 else ~negative
                    idx = chosen.nonzero().squeeze(1)
                    if name == "Identity" or idx.numel() == 0:
                        continue
                    x[idx] = op._apply_image_or_video_transform(
                        x[idx], name, sign * magnitude, interpolation=op.interpolation, fill=fill
                    )
        return x

    return apply


def normalize(mean: Sequence[float], std: Sequence[float]) -> BatchOp:
    """v2.Normalize's arithmetic (``x.sub(mean).div_(std)``, so bit-identical) with the statistics copied
    to the device once rather than on every batch."""
    stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def apply(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if x.device not in stats:
            stats[x.device] = tuple(
                torch.tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1) for v in (mean, std)
            )
        m, s = stats[x.device]
        return x.sub(m).div_(s)

    return apply


def batched_pipeline(transform) -> list[BatchOp] | None:
    """Translate a ``v2.Compose`` made by ``build_transforms`` into batched ops; ``None`` if some op has
    no batched translation (the DataLoader path is used then)."""
    ops = (
        list(transform.transforms)
        if isinstance(transform, v2.Compose)
        else ([transform] if transform else [])
    )
    out: list[BatchOp] = []
    for op in ops:
        if isinstance(op, v2.Normalize):
            out.append(normalize(op.mean, op.std))
        elif isinstance(op, (v2.Resize, v2.CenterCrop, v2.ToDtype)):
            out.append(lambda x, g, op=op: op(x))  # deterministic: the same kernels, on a batch
        elif isinstance(op, v2.RandomCrop):
            if op.padding_mode != "constant" or op.fill not in (0, None) or op.pad_if_needed:
                return None
            padding = tuple(op.padding) if op.padding is not None else (0, 0, 0, 0)
            # v2 keeps padding as [left, right, top, bottom]
            left, right, top, bottom = padding
            out.append(
                lambda x, g, s=tuple(op.size), p=(left, top, right, bottom): random_crop(
                    x, g, size=s, padding=p
                )
            )
        elif isinstance(op, v2.RandomHorizontalFlip):
            out.append(lambda x, g, p=op.p: random_hflip(x, g, p=p))
        elif isinstance(op, v2.RandomErasing):
            values = op.value if isinstance(op.value, (list, tuple)) else [op.value]
            if len(set(values)) != 1 or not isinstance(values[0], (int, float)):
                return None  # per-channel or random fill: not translated
            v = float(values[0])
            out.append(
                lambda x, g, op=op, v=v: random_erasing(
                    x, g, p=op.p, scale=tuple(op.scale), ratio=tuple(op.ratio), value=v
                )
            )
        elif isinstance(op, v2.RandAugment):
            out.append(batched_randaugment(op))
        else:  # RandomResizedCrop and anything unknown
            return None
    return out


# ------------------------------------------------------------------------------- the loader
def resident_parts(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, object] | None:
    """``(images uint8 (N,C,H,W), targets (N,), subset indices or None, transform)`` of a dataset built by
    ``build_data`` (TransformedDataset over an optional Subset of a TensorImageDataset); ``None`` if the
    images are not decoded in memory."""
    transform = None
    if isinstance(ds, TransformedDataset):
        transform, ds = ds.transform, ds.base
    index = None
    while isinstance(ds, Subset):
        idx = torch.as_tensor(list(ds.indices), dtype=torch.long)
        index = idx if index is None else idx[index]  # the outer subset indexes this one
        ds = ds.dataset
    if not isinstance(ds, TensorImageDataset):
        return None
    return ds.images, torch.as_tensor(ds.targets, dtype=torch.long), index, transform


class DeviceLoader:
    """Batches ``(images, labels)`` drawn on ``device`` from a decoded dataset; a drop-in for the
    trainer's DataLoader (``len``, iteration, ``set_epoch``).

    Args:
        dataset: as returned by ``build_data`` (see :func:`resident_parts`).
        batch_size: images per batch on this process (the global batch / world size).
        device: where the images live and batches are made.
        seed: the run's seed (order: ``seed + epoch``; augmentation: :func:`augment_seed`).
        shuffle: training order (:func:`epoch_order`); ``False`` gives the evaluation order, this rank
            taking items ``rank, rank + world_size, ...`` with nothing padded or dropped.
        drop_last: ``None`` applies :func:`drop_last_rule` (training) / never (evaluation).
        ops: batched ops replacing ``dataset``'s transform (default: :func:`batched_pipeline` of it).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        seed: int = 0,
        shuffle: bool = True,
        world_size: int = 1,
        rank: int = 0,
        drop_last: bool | None = None,
        ops: list[BatchOp] | None = None,
    ):
        parts = resident_parts(dataset)
        if parts is None:
            raise DataError(
                f"{type(dataset).__name__} is not decoded in memory, so it cannot live on the device; "
                "use data_path='dataloader' (or 'auto', which picks it)"
            )
        images, targets, index, transform = parts
        if ops is None:
            ops = batched_pipeline(transform)
            if ops is None:
                raise DataError(
                    f"the transform {transform} has an op with no batched version (e.g. RandomResizedCrop); "
                    "use data_path='dataloader' (or 'auto', which picks it)"
                )
        self.device = torch.device(device)
        if index is not None:  # hold only the subset: a 1% fraction keeps 1% of the images on the GPU
            images, targets = images[index], targets[index]
        self.images = images.to(self.device)
        self.targets = targets.to(self.device)
        self.ops = ops
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), shuffle
        self.world_size, self.rank = int(world_size), int(rank)
        n_local = len(self._order(0))
        self.drop_last = (
            drop_last_rule(n_local, self.batch_size) if drop_last is None and shuffle else bool(drop_last)
        )
        self.epoch = 0
        self.generator = torch.Generator(device=self.device)
        self.set_epoch(0)

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return (
            f"DeviceLoader({n} images {c}x{h}x{w} on {self.device}, batch {self.batch_size}, "
            f"rank {self.rank}/{self.world_size}, shuffle={self.shuffle}, drop_last={self.drop_last})"
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.generator.manual_seed(augment_seed(self.seed, self.epoch, self.rank))

    def _order(self, epoch: int) -> torch.Tensor:
        n = len(self.images)
        if self.shuffle:
            return epoch_order(n, seed=self.seed, epoch=epoch, world_size=self.world_size, rank=self.rank)
        return torch.arange(self.rank, n, self.world_size)

    def batch_indices(self, epoch: int | None = None) -> list[torch.Tensor]:
        """The index batches of an epoch (into the dataset as given, i.e. the subset's own numbering)."""
        order = self._order(self.epoch if epoch is None else epoch)
        batches = list(order.split(self.batch_size)) if len(order) else []  # not one empty chunk
        if batches and self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __len__(self) -> int:
        n = len(self._order(0))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def make_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.device, non_blocking=True)
        x = self.images.index_select(0, idx)
        for op in self.ops:
            x = op(x, self.generator)
        return x, self.targets.index_select(0, idx)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # One host->device copy of the epoch's order, then every batch is a slice of it.
        order = self._order(self.epoch).to(self.device)
        batches = order.split(self.batch_size) if len(order) else ()  # no empty batch from an empty shard
        if batches and self.drop_last and len(batches[-1]) < self.batch_size:
            batches = batches[:-1]
        for idx in batches:
            yield self.make_batch(idx)


def fits_on_device(ds: Dataset, device: torch.device) -> bool:
    """Whether ``ds``'s decoded images may be copied onto ``device`` (always on the CPU: they are
    already in memory; on a GPU if they take at most :data:`MAX_DEVICE_MEMORY_SHARE` of its free memory)."""
    parts = resident_parts(ds)
    if parts is None:
        return False
    if device.type != "cuda":
        return True
    images, _, index, _ = parts
    n = len(index) if index is not None else len(images)
    need = n * images[0].numel() * images.element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return need <= MAX_DEVICE_MEMORY_SHARE * free


def resolve_data_path(data_path: str, dataset: Dataset, device: torch.device, num_workers: int = 0) -> str:
    """``'device'`` or ``'dataloader'`` for a run. ``auto`` takes the device path for decoded, translatable
    data that fits, unless DataLoader workers were asked for explicitly (``num_workers > 0``)."""
    if data_path not in DATA_PATHS:
        raise ConfigError(f"data_path must be one of {', '.join(DATA_PATHS)}; got {data_path!r}")
    if data_path == "dataloader":
        return data_path
    parts = resident_parts(dataset)
    ok = parts is not None and batched_pipeline(parts[3]) is not None
    if data_path == "device":
        if not ok:
            raise DataError(
                "data_path='device' needs data decoded in memory (CIFAR, cifar10-mini, any same-size image "
                "folder under the decode limit) and pad-crop augmentation; this data has neither. Use "
                "data_path='auto' or 'dataloader'"
            )
        return data_path
    return "device" if ok and num_workers == 0 and fits_on_device(dataset, device) else "dataloader"
