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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .capture import ActivationCapture, default_layers, layer_prefix_tokens


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


def _batches(data: Iterable, max_images: int | None):
    """Yield (images, labels) until ``max_images`` images were given (the last batch is cut)."""
    seen = 0
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("probe data must yield (images, labels) batches")
        images, labels = batch[0], torch.as_tensor(batch[1])
        if max_images is not None:
            if seen >= max_images:
                return
            images, labels = images[: max_images - seen], labels[: max_images - seen]
        seen += images.shape[0]
        yield images, labels
    if seen == 0:
        raise ValueError("no images to fit probes on; the data iterable is empty")


def _pair(grid) -> tuple[int, int] | None:
    return None if grid is None else ((grid, grid) if isinstance(grid, int) else tuple(grid))


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
    """
    from tqdm.auto import tqdm

    if class_probe not in ("shared", "per_position"):
        raise ValueError(f"class_probe must be 'shared' or 'per_position', got {class_probe!r}")

    layers = default_layers(model) if layers is None else list(layers)
    policy = _TokenGrid(_pair(grid))
    prefix = {n: layer_prefix_tokens(model, n) for n in layers}
    grids: dict[str, tuple[int, int] | None] = {}
    geo_grid = None
    try:
        from .attention import token_geometry

        geo_grid = token_geometry(model).grid_size
    except ValueError:
        pass  # a CNN: grids come from the feature maps

    def tokens(name: str, flat: torch.Tensor) -> torch.Tensor:  # capture transform: -> (B, N, D) float64
        n, d, g = policy.shape
        t = flat.view(flat.shape[0], n, d)[:, prefix[name] if g is None else 0 :]
        if g is None:  # token sequence: the model's patch grid when the count matches
            g = geo_grid if geo_grid and geo_grid[0] * geo_grid[1] == t.shape[1] else (1, t.shape[1])
        grids[name] = g
        return t.double()

    was_training = model.training
    model.to(device).eval()
    stats_dev = "cpu" if torch.device(device).type == "mps" else device  # no float64 on MPS
    cls_stats: dict[str, _RidgeStats | _PerPositionRidgeStats] = {}
    pos_stats: dict[str, _RidgeStats] = {}
    per_position = class_probe == "per_position"
    try:
        with ActivationCapture(model, layers, token_policy=policy, transform=tokens) as cap:
            # ---- pass 1: sufficient statistics on the train split
            for images, labels in tqdm(
                _batches(train_data, max_images), desc="probes: train", disable=not progress, leave=False
            ):
                acts = cap.run(images.to(device))
                for name, t in acts.items():
                    t = t.to(stats_dev)
                    B, N, D = t.shape
                    x = t.reshape(B * N, D)
                    y = labels.to(stats_dev)
                    y_pos = torch.arange(N, device=stats_dev).repeat(B)
                    if name not in cls_stats:
                        cls_stats[name] = (
                            _PerPositionRidgeStats.empty(N, D, stats_dev)
                            if per_position
                            else _RidgeStats.empty(D, 1, stats_dev)
                        )
                        pos_stats[name] = _RidgeStats.empty(D, N, stats_dev)
                    xx = x.T @ x
                    if per_position:
                        cls_stats[name].update(t, y)
                    else:  # every token of every image is an example, labelled with its image's class
                        cls_stats[name].update(x, y.repeat_interleave(N), xx)
                    pos_stats[name].update(x, y_pos, xx)
            fits = {n: (cls_stats[n].solve(ridge), pos_stats[n].solve(ridge)) for n in layers}
            # ---- pass 2: accuracy per position on the test split
            correct_cls = {n: 0.0 for n in layers}
            correct_pos = {n: 0.0 for n in layers}
            count = 0
            for images, labels in tqdm(
                _batches(test_data, max_images), desc="probes: test", disable=not progress, leave=False
            ):
                acts = cap.run(images.to(device))
                labels = labels.to(stats_dev)
                for name, t in acts.items():
                    t = t.to(stats_dev)  # (B, N, D)
                    (wc, bc), (wp, bp) = fits[name]
                    pos = torch.arange(t.shape[1], device=stats_dev)
                    # (B, N, K) class scores: one probe for all positions, or each position's own
                    scores = torch.einsum("bnd,ndk->bnk", t, wc) + bc if per_position else t @ wc + bc
                    correct_cls[name] = (
                        correct_cls[name] + (scores.argmax(-1) == labels[:, None]).sum(0).double()
                    )
                    correct_pos[name] = correct_pos[name] + ((t @ wp + bp).argmax(-1) == pos).sum(0).double()
                count += images.shape[0]
    finally:
        model.train(was_training)

    results = {}
    for name in layers:
        g = grids[name]
        cmap = (correct_cls[name] / count).view(*g).cpu().numpy()
        pmap = (correct_pos[name] / count).view(*g).cpu().numpy()
        k, npos = cls_stats[name].sy.shape[0], g[0] * g[1]
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
            "train_tokens": pos_stats[name].n,
            "class_probe": class_probe,
        }
    return results
