"""Analyses split across processes: each rank takes whole batches, the statistics are summed once.

Under ``torchrun --nproc_per_node=W -m vitlens cka ...`` (or any code that has initialised a
``torch.distributed`` process group) the analyses divide the work instead of repeating it:

* the data is cut into exactly the batches one process would use, and rank ``r`` takes batches
  ``r, r + W, r + 2W, ...`` (:class:`RankBatches`): a batch is never split, so every per-batch
  quantity (a debiased HSIC, a ridge update) is the one a single process computes;
* each rank accumulates its sums (HSIC per layer pair, attention distance sums and counts, ridge
  normal equations) in float64, and they are added across ranks in ONE all-reduce at the end
  (:func:`sum_across_ranks`); a rank with no batch contributes zeros but still joins.

So the result equals the single-process one up to the order of float64 additions (~1e-15),
for any number of processes, including more processes than batches. Files are written by rank 0
only (:func:`is_main_process`). The engine is torchrun's rendezvous (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``...); gloo on CPU, NCCL on GPU; one node or many.

A rank that fails leaves the others waiting in the all-reduce: gloo notices the closed
connection (or the process group's ``timeout`` expires) and they stop with
:class:`RankFailedError` naming the rank, instead of hanging.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "RankBatches",
    "RankFailedError",
    "init_from_torchrun",
    "is_main_process",
    "main_process_says",
    "sum_across_ranks",
    "world",
]

DEFAULT_TIMEOUT_S = 600.0


class RankFailedError(RuntimeError):
    """The cross-rank sum did not complete: another rank failed, or none arrived within the timeout."""


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (and in a plain single process): the one process that writes files.

    Without a process group (before it is joined or after it ends) torchrun's ``RANK`` decides.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def main_process_says(value):
    """Rank 0's ``value`` on every rank (a picklable object), so all ranks take the same branch."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def init_from_torchrun(device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join torchrun's process group when launched by it (``WORLD_SIZE`` > 1); True if this call did.

    gloo for CPU, NCCL for CUDA (each rank on ``cuda:LOCAL_RANK``). ``timeout_s`` bounds every
    collective, so a rank whose peer died stops with an error instead of waiting forever.
    Without torchrun's environment, or with a group already initialised, nothing happens.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def rank_device(device: str | torch.device) -> torch.device:
    """``device`` for this rank: ``cuda`` means ``cuda:LOCAL_RANK`` under torchrun."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def sum_across_ranks(
    tensors: Sequence[torch.Tensor], what: str = "analysis statistics"
) -> list[torch.Tensor]:
    """Element-wise sums over all ranks of ``tensors`` (any shapes), in float64, in one all-reduce.

    Returns new float64 tensors on each input's device; without a process group, float64
    copies. Every rank must call it with tensors of the same shapes, in the same order.
    """
    rank, world_size = world()
    flat = [t.detach().to(torch.float64).reshape(-1) for t in tensors]
    if world_size > 1:
        comm_device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        )
        buf = torch.cat([f.to(comm_device) for f in flat]) if flat else torch.zeros(0, device=comm_device)
        try:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        except Exception as e:  # gloo/NCCL raise RuntimeError (DistBackendError) on a dead peer or timeout
            raise RankFailedError(
                f"rank {rank} of {world_size}: summing the {what} across processes failed: another rank "
                f"failed or did not arrive within the process group's timeout (look for its error above); "
                f"backend said: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from e
        flat = list(buf.split([f.numel() for f in flat]))
    return [f.reshape(t.shape).to(t.device) for f, t in zip(flat, tensors)]


def max_across_ranks(values: Sequence[int]) -> list[int]:
    """Element-wise maxima of a few integers over all ranks (shapes that only ranks with data know)."""
    _, world_size = world()
    if world_size == 1:
        return [int(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    except Exception as e:
        raise RankFailedError(
            f"rank {dist.get_rank()}: exchanging shapes across processes failed: another rank failed "
            f"or timed out ({type(e).__name__})"
        ) from e
    return t.tolist()


# ----------------------------------------------------------------------------- the batches of one rank
def _cut(batch, k: int):
    """The first ``k`` examples of a batch (a tensor, or a tuple/list/dict of per-example tensors)."""
    if isinstance(batch, torch.Tensor):
        return batch[:k]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cut(b, k) for b in batch)
    if isinstance(batch, dict):
        return {key: _cut(v, k) for key, v in batch.items()}
    return batch


def _size(batch) -> int:
    from .common import batch_images

    return int(batch_images(batch).shape[0])


class RankBatches:
    """This rank's share of ``data``: batches ``rank, rank + W, ...`` of the batches one process would see.

    ``data``: a ``DataLoader`` over a map-style dataset (the fast path: the index lists of all
    batches are known up front, so each rank *loads* only its own images) or any iterable of
    batches (each rank iterates all of it and keeps its own; fine for tensors in memory).
    ``max_batches`` / ``max_images`` cut the data as a single process would (the last batch
    shortened to reach ``max_images`` exactly).

    ``progress``: one tqdm bar on rank 0, in images for all ranks together: when rank 0 finishes
    its batch of a round of W batches it advances by the whole round (ranks are not asked for
    their progress, which would cost a collective per batch), so images/s is that of all ranks.
    After iteration, ``images_per_rank`` lists how many images each rank received.
    """

    def __init__(
        self,
        data: Iterable,
        *,
        max_batches: int | None = None,
        max_images: int | None = None,
        progress: bool = False,
        desc: str = "",
    ) -> None:
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
        self.data, self.max_batches, self.max_images = data, max_batches, max_images
        self.rank, self.world_size = world()
        self.progress, self.desc = progress, desc
        self.index_lists = self._index_lists(data)
        self.sizes: list[int] = [] if self.index_lists is None else [len(b) for b in self.index_lists]

    # -- planning
    def _done(self, batch_index: int, images_seen: int) -> bool:
        """Whether a single process would stop before this batch (``max_batches`` / ``max_images``)."""
        return (self.max_batches is not None and batch_index >= self.max_batches) or (
            self.max_images is not None and images_seen >= self.max_images
        )

    def _index_lists(self, data) -> list[list[int]] | None:
        """The batches' dataset indices, cut to the limits, when ``data`` is a plain DataLoader."""
        from torch.utils.data import DataLoader, IterableDataset, RandomSampler

        if not isinstance(data, DataLoader) or data.batch_sampler is None:
            return None
        if isinstance(data.dataset, IterableDataset):
            return None
        if isinstance(data.sampler, RandomSampler) and self.world_size > 1:
            raise ValueError(
                "the analysis data loader shuffles (shuffle=True): every process would draw other batches; "
                "use shuffle=False (the analyses need a fixed image order, e.g. a seeded subset)"
            )
        lists = []
        seen = 0
        for i, idx in enumerate(data.batch_sampler):
            if self._done(i, seen):
                break
            idx = list(idx)
            if self.max_images is not None:
                idx = idx[: self.max_images - seen]
            seen += len(idx)
            lists.append(idx)
        return lists

    @property
    def total_images(self) -> int | None:
        return sum(self.sizes) if self.index_lists is not None else None

    @property
    def images_per_rank(self) -> list[int]:
        """Images each rank received (after iteration for a plain iterable; at once for a DataLoader)."""
        return [sum(self.sizes[r :: self.world_size]) for r in range(self.world_size)]

    @property
    def indices(self) -> list[int] | None:
        """Every dataset index used by all ranks, in batch order (None for a plain iterable)."""
        return None if self.index_lists is None else [i for b in self.index_lists for i in b]

    # -- iteration
    def _mine_from_loader(self) -> Iterator:
        from torch.utils.data import DataLoader

        d = self.data
        mine = self.index_lists[self.rank :: self.world_size]
        if not mine:
            return iter(())
        loader = DataLoader(
            d.dataset,
            batch_sampler=mine,
            num_workers=d.num_workers,
            collate_fn=d.collate_fn,
            pin_memory=d.pin_memory,
            worker_init_fn=d.worker_init_fn,
            multiprocessing_context=d.multiprocessing_context if d.num_workers else None,
            generator=d.generator,
            persistent_workers=d.persistent_workers if d.num_workers else False,
        )
        return iter(loader)

    def _mine_from_iterable(self) -> Iterator:
        seen = 0
        for i, batch in enumerate(self.data):
            if self._done(i, seen):
                return
            n = _size(batch)
            if self.max_images is not None and seen + n > self.max_images:
                batch, n = _cut(batch, self.max_images - seen), self.max_images - seen
            seen += n
            self.sizes.append(n)
            if i % self.world_size == self.rank:
                yield batch

    def __iter__(self) -> Iterator:
        from tqdm.auto import tqdm

        known = self.index_lists is not None
        if not known:
            self.sizes = []
        bar = tqdm(
            total=self.total_images,
            desc=self.desc,
            unit="img",
            disable=not self.progress or self.rank != 0,
            leave=False,
        )
        batches = self._mine_from_loader() if known else self._mine_from_iterable()
        try:
            for k, batch in enumerate(batches):
                yield batch
                if known:  # the whole round of W batches that ran beside this one
                    lo = k * self.world_size
                    bar.update(sum(self.sizes[lo : lo + self.world_size]))
                else:
                    bar.update(_size(batch) * self.world_size)
        finally:
            bar.close()

    def describe(self) -> dict:
        """What a result should record about its images: count, fingerprint, world size, images per rank."""
        from .common import indices_fingerprint

        out = {
            "world_size": self.world_size,
            "images": sum(self.sizes),
            "images_per_rank": self.images_per_rank,
        }
        indices = self.indices
        if indices is not None:
            out["batches"] = len(self.sizes)
            out["indices_fingerprint"] = indices_fingerprint(_dataset_indices(self.data.dataset, indices))
        return out


def _dataset_indices(dataset, indices: list[int]) -> list[int]:
    """Indices into the underlying dataset, through ``Subset`` layers (the subset's own indices)."""
    from torch.utils.data import Subset

    while isinstance(dataset, Subset):
        indices = [int(dataset.indices[i]) for i in indices]
        dataset = dataset.dataset
    return indices
