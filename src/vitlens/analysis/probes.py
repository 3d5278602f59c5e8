"""Linear probes on individual spatial tokens (Raghu et al. 2021, Section 5: localization).

For each chosen layer and each spatial token (a ViT patch token, or one position of a CNN
feature map) two linear read-outs are fitted on a train split and scored on a test split:

* **class probe**: the image's class from that single token. One probe is shared by all
  positions (every token of every image is a training example), so it has many examples per
  parameter even on a few hundred images; ``class_acc_map`` is its test accuracy at each
  position, ``class_acc`` the average over positions. A ViT trained with [CLS] tends to keep
  class information out of late patch tokens; a GAP-trained ViT or a CNN does not.
  ``class_probe="per_position"`` fits one probe per position instead (each on one token per
  image: fewer examples per parameter, but it can read class information that is coded
  differently at different positions).
* **position probe**: the token's own position index (how much spatial information the
  layer still holds); chance is 1 / positions.

Both are closed-form ridge regressions on one-hot targets, predicted by argmax, solved in
float64: deterministic, no learning rate, one pass over each split. Only streaming sufficient
statistics are kept (``X^T X``, ``X^T Y``, sums), so memory is O(D^2 + D (classes + positions))
per layer, independent of the number of images; ``max_images`` (default 1024 per split)
bounds the compute. The regulariser is ``ridge * mean(diag(X^T X))`` (scale-free).

CNN maps larger than ``grid`` are average-pooled to it (e.g. ``grid=8`` to match a patch-4
ViT on 32 px images) so both models have comparable token counts; smaller maps keep their size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..utils import eval_mode, to_2tuple
from .capture import ActivationCapture, default_layers, layer_prefix_tokens
from .common import patch_grid
from .distributed import RankBatches, max_across_ranks, sum_across_ranks, world


class _TokenGrid:
    """Token policy for :class:`ActivationCapture`: any layer output -> (B, N * D) token-major.

    (B, N, D) sequences flatten as they are; (B, C, H, W) maps are pooled to ``grid`` and
    laid out position-major. ``shape`` remembers (N, D, grid) of the last call, which the
    capture's ``transform`` (called right after, for the same layer) uses to restore (B, N, D).
    """

    def __init__(self, grid: tuple[int, int] | None):
        self.grid = grid
        self.shape: tuple[int, int, tuple[int, int] | None] | None = None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 3:
            self.shape = (t.shape[1], t.shape[2], None)
            return t.flatten(1)
        if t.dim() == 4:
            if self.grid is not None and (t.shape[2] > self.grid[0] or t.shape[3] > self.grid[1]):
                t = F.adaptive_avg_pool2d(t, self.grid)
            B, C, H, W = t.shape
            self.shape = (H * W, C, (H, W))
            return t.permute(0, 2, 3, 1).flatten(1)  # (B, H, W, C) -> (B, H*W*C)
        raise ValueError(
            f"probes need token sequences (B, N, D) or feature maps (B, C, H, W), got {tuple(t.shape)}"
        )


@dataclass
class _RidgeStats:
    """Streaming sufficient statistics of a least-squares fit of one-hot targets on features."""

    sx: torch.Tensor  # (D,)
    sxx: torch.Tensor  # (D, D)
    sxy: torch.Tensor  # (D, K)
    sy: torch.Tensor  # (K,)
    n: int = 0

    @classmethod
    def empty(cls, dim: int, k: int, device) -> _RidgeStats:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(dim), z(dim, dim), z(dim, k), z(k))

    def grow(self, k: int) -> None:
        """Make room for labels up to k - 1 (class count discovered while streaming)."""
        if k > self.sy.shape[0]:
            extra = k - self.sy.shape[0]
            self.sxy = F.pad(self.sxy, (0, extra))
            self.sy = F.pad(self.sy, (0, extra))

    def update(self, x: torch.Tensor, y: torch.Tensor, xx: torch.Tensor | None = None) -> None:
        """x (M, D) float64, y (M,) int labels; ``xx`` lets two fits on the same x share X^T X."""
        self.grow(int(y.max()) + 1)
        self.sx += x.sum(0)
        self.sxx += x.T @ x if xx is None else xx
        self.sxy.index_add_(1, y, x.T)  # column y_m += x_m
        self.sy += torch.bincount(y, minlength=self.sy.shape[0]).double()
        self.n += x.shape[0]

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (D, K), b (K,)) of the centred ridge fit ``y ~ x W + b``."""
        mu, ybar = self.sx / self.n, self.sy / self.n
        sxx = self.sxx - self.n * torch.outer(mu, mu)
        sxy = self.sxy - self.n * torch.outer(mu, ybar)
        lam = ridge * sxx.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(sxx.shape[0], dtype=sxx.dtype, device=sxx.device)
        w = torch.linalg.solve(sxx + lam * eye, sxy)
        return w, ybar - mu @ w


class _PerPositionRidgeStats(_RidgeStats):
    """:class:`_RidgeStats` for N positions at once: one ridge fit of one-hot labels per position.

    Shapes gain a leading position axis: sx (N, D), sxx (N, D, D), sxy (N, D, K); sy (K,) is
    shared, since every position sees the same images and so the same labels.
    """

    @classmethod
    def empty(cls, positions: int, dim: int, device) -> _PerPositionRidgeStats:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(positions, dim), z(positions, dim, dim), z(positions, dim, 1), z(1))

    def update(self, t: torch.Tensor, y: torch.Tensor) -> None:
        """t (B, N, D) float64, y (B,) int labels."""
        self.grow(int(y.max()) + 1)
        tn = t.transpose(0, 1)  # (N, B, D)
        onehot = F.one_hot(y, self.sy.shape[0]).to(t.dtype)  # (B, K)
        self.sx += tn.sum(1)
        self.sxx += tn.transpose(1, 2) @ tn
        self.sxy += tn.transpose(1, 2) @ onehot
        self.sy += onehot.sum(0)
        self.n += t.shape[0]

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (N, D, K), b (N, K)): per position, the centred ridge fit of :meth:`_RidgeStats.solve`."""
        mu, ybar = self.sx / self.n, self.sy / self.n  # (N, D), (K,)
        sxx = self.sxx - self.n * mu[:, :, None] * mu[:, None, :]
        sxy = self.sxy - self.n * mu[:, :, None] * ybar[None, None, :]
        lam = ridge * sxx.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)  # (N,)
        eye = torch.eye(sxx.shape[1], dtype=sxx.dtype, device=sxx.device)
        w = torch.linalg.solve(sxx + lam[:, None, None] * eye, sxy)
        return w, ybar[None, :] - torch.einsum("nd,ndk->nk", mu, w)


class _TokenReader:
    """The capture ``transform``: a layer's flattened tokens -> (B, N, D) float64, prefix tokens dropped.

    Also remembers each layer's token grid: a CNN map's own (pooled) size; for a token sequence
    the model's patch grid when the count matches (a ViT), else one row of N tokens.
    """

    def __init__(self, model: nn.Module, layers: list[str], grid) -> None:
        self.policy = _TokenGrid(None if grid is None else to_2tuple(grid))
        self.prefix = {n: layer_prefix_tokens(model, n) for n in layers}
        patches = patch_grid(model)
        self.model_grid = None if patches is None else patches[0]
        self.grids: dict[str, tuple[int, int]] = {}

    def __call__(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        n, d, g = self.policy.shape
        t = flat.view(flat.shape[0], n, d)[:, self.prefix[name] if g is None else 0 :]
        if g is None:
            mg = self.model_grid
            g = mg if mg and mg[0] * mg[1] == t.shape[1] else (1, t.shape[1])
        self.grids[name] = tuple(g)
        return t.double()


def _labelled(batches: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("probe data must yield (images, labels) batches")
        yield batch[0], torch.as_tensor(batch[1])


def _stats_tensors(st: _RidgeStats) -> list[torch.Tensor]:
    return [
        st.sx,
        st.sxx,
        st.sxy,
        st.sy,
        torch.tensor([float(st.n)], dtype=torch.float64, device=st.sx.device),
    ]


class _ProbeStats:
    """Pass 1: per layer, the ridge statistics of the class probe and of the position probe."""

    def __init__(self, per_position: bool, device) -> None:
        self.per_position, self.device = per_position, device
        self.cls: dict[str, _RidgeStats | _PerPositionRidgeStats] = {}
        self.pos: dict[str, _RidgeStats] = {}

    def _create(self, name: str, positions: int, dim: int) -> None:
        self.cls[name] = (
            _PerPositionRidgeStats.empty(positions, dim, self.device)
            if self.per_position
            else _RidgeStats.empty(dim, 1, self.device)
        )
        self.pos[name] = _RidgeStats.empty(dim, positions, self.device)

    def update(self, name: str, t: torch.Tensor, labels: torch.Tensor) -> None:
        """t (B, N, D) float64 tokens of one layer, labels (B,)."""
        B, N, D = t.shape
        if name not in self.cls:
            self._create(name, N, D)
        x = t.reshape(B * N, D)
        xx = x.T @ x
        if self.per_position:
            self.cls[name].update(t, labels)
        else:  # every token of every image is an example, labelled with its image's class
            self.cls[name].update(x, labels.repeat_interleave(N), xx)
        self.pos[name].update(x, torch.arange(N, device=self.device).repeat(B), xx)

    def sum_across_ranks(self, layers: list[str], reader: _TokenReader) -> None:
        """Agree on every layer's shapes (a rank may have seen no batch), then add all statistics at once."""
        shapes = []
        for n in layers:
            st, g = self.pos.get(n), reader.grids.get(n, (0, 0))
            shapes += [0, 0, 0, 0, 0] if st is None else [*st.sxx.shape[-1:], *g, self.cls[n].sy.shape[0], 1]
        shapes = max_across_ranks(shapes)
        for i, n in enumerate(layers):
            dim, gh, gw, classes, seen = shapes[5 * i : 5 * i + 5]
            if not seen:
                raise DataError("no images to fit probes on; the data iterable is empty")
            if n not in self.cls:
                self._create(n, gh * gw, dim)
                reader.grids[n] = (gh, gw)
            self.cls[n].grow(classes)
        stats = [st for n in layers for st in (self.cls[n], self.pos[n])]
        summed = sum_across_ranks([t for st in stats for t in _stats_tensors(st)], "probe statistics")
        for k, st in enumerate(stats):
            st.sx, st.sxx, st.sxy, st.sy, n = summed[5 * k : 5 * k + 5]
            st.n = int(n.item())


def _fit(
    cap: ActivationCapture, data, stats: _ProbeStats, reader: _TokenReader, *, device, max_images, progress
):
    """Pass 1 over the train split: the probes' sufficient statistics, summed over ranks, solved."""
    for images, labels in _labelled(
        RankBatches(data, max_images=max_images, progress=progress, desc="probes: train")
    ):
        labels = labels.to(stats.device)
        for name, t in cap.run(images.to(device)).items():
            stats.update(name, t.to(stats.device), labels)
    if world()[1] > 1:
        stats.sum_across_ranks(cap.layers, reader)
    elif not stats.cls:
        raise DataError("no images to fit probes on; the data iterable is empty")


def _score(cap: ActivationCapture, data, fits: dict, stats: _ProbeStats, *, device, max_images, progress):
    """Pass 2 over the test split: per layer, correct class and position predictions per position."""
    dev, per_position = stats.device, stats.per_position
    correct_cls = {
        n: torch.zeros(stats.pos[n].sy.shape[0], dtype=torch.float64, device=dev) for n in cap.layers
    }
    correct_pos = {n: torch.zeros_like(c) for n, c in correct_cls.items()}
    count = 0
    for images, labels in _labelled(
        RankBatches(data, max_images=max_images, progress=progress, desc="probes: test")
    ):
        labels = labels.to(dev)
        for name, t in cap.run(images.to(device)).items():
            t = t.to(dev)  # (B, N, D)
            (wc, bc), (wp, bp) = fits[name]
            pos = torch.arange(t.shape[1], device=dev)
            # (B, N, K) class scores: one probe for all positions, or each position's own
            scores = torch.einsum("bnd,ndk->bnk", t, wc) + bc if per_position else t @ wc + bc
            correct_cls[name] += (scores.argmax(-1) == labels[:, None]).sum(0).double()
            correct_pos[name] += ((t @ wp + bp).argmax(-1) == pos).sum(0).double()
        count += images.shape[0]
    if world()[1] > 1:
        n = len(cap.layers)
        summed = sum_across_ranks(
            [*correct_cls.values(), *correct_pos.values(), torch.tensor([float(count)])], "probe accuracies"
        )
        correct_cls, correct_pos = dict(zip(cap.layers, summed[:n])), dict(zip(cap.layers, summed[n : 2 * n]))
        count = int(summed[-1].item())
    if count == 0:
        raise DataError("no test images to score the probes on; the test data iterable is empty")
    return correct_cls, correct_pos, count


@torch.no_grad()
def localization_probes(
    model: nn.Module,
    train_data: Iterable,
    test_data: Iterable,
    layers: Sequence[str] | None = None,
    *,
    grid: int | tuple[int, int] | None = None,
    ridge: float = 1e-3,
    max_images: int | None = 1024,
    class_probe: str = "shared",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, dict]:
    """Fit class and position probes on every spatial token of each layer; score them on ``test_data``.

    ``train_data``/``test_data`` yield ``(images, labels)`` batches; at most ``max_images`` of
    each are used. ``layers`` defaults to :func:`default_layers` (ViT: patch_embed and each
    block; ResNet: stem and each residual block). Prefix tokens ([CLS], registers) are left out.
    Returns ``{layer: {"class_acc", "position_acc", "class_acc_map" (h, w), "position_acc_map"
    (h, w), "grid_size", "num_positions", "num_classes", "chance_class", "chance_position",
    "train_tokens", "class_probe"}}`` with accuracies in [0, 1]. ``class_probe``: ``"shared"`` (one
    class probe for all positions) or ``"per_position"`` (one per position; see the module doc).

    Under an initialised ``torch.distributed`` process group each rank takes every W-th batch of
    each split; the ridge statistics, then the correct counts, are added across ranks once per
    split (see :mod:`vitlens.analysis.distributed`), and every rank returns the same result.
    """
    if class_probe not in ("shared", "per_position"):
        raise ConfigError(f"class_probe must be 'shared' or 'per_position', got {class_probe!r}")
    layers = default_layers(model) if layers is None else list(layers)
    reader = _TokenReader(model, layers, grid)
    stats = _ProbeStats(
        class_probe == "per_position", "cpu" if torch.device(device).type == "mps" else device
    )
    passes = {"device": device, "max_images": max_images, "progress": progress}
    with (
        eval_mode(model),
        ActivationCapture(model, layers, token_policy=reader.policy, transform=reader) as cap,
    ):
        model.to(device)
        _fit(cap, train_data, stats, reader, **passes)
        fits = {n: (stats.cls[n].solve(ridge), stats.pos[n].solve(ridge)) for n in layers}
        correct_cls, correct_pos, count = _score(cap, test_data, fits, stats, **passes)

    results = {}
    for name in layers:
        g = reader.grids[name]
        cmap = (correct_cls[name] / count).view(*g).cpu().numpy()
        pmap = (correct_pos[name] / count).view(*g).cpu().numpy()
        k, npos = stats.cls[name].sy.shape[0], g[0] * g[1]
        results[name] = {
            "class_acc": float(cmap.mean()),
            "position_acc": float(pmap.mean()),
            "class_acc_map": cmap,
            "position_acc_map": pmap,
            "grid_size": tuple(g),
            "num_positions": npos,
            "num_classes": k,
            "chance_class": 1.0 / k,
            "chance_position": 1.0 / npos,
            "train_tokens": stats.pos[name].n,
            "class_probe": class_probe,
        }
    return results
