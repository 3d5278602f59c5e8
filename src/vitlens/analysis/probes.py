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

Precision and speed. Tokens keep their precision: float64 tokens are fitted and scored in float64;
anything else (a float32 or bf16 model) in float32, which is ~3x faster on a CPU. The float32 path
loses nothing that matters: every layer's tokens are shifted by a fixed reference (their mean over
the first batch) before the products, so ``X^T X`` holds centred-scale numbers rather than a large
common offset that cancels later (ReLU maps, residual streams), and each batch's products are added
to float64 sums. Only the sums the fits need are formed: the class probe's ``X^T Y`` from per-image
token sums, the position probe's from per-position sums, never a per-token one-hot matrix; scores
are formed a few images at a time, so a ResNet's 56x56 map (3,136 positions) never builds a
(batch, 3136, 3136) tensor. :class:`ProbeStream` takes the tokens from the caller, so one forward
pass can feed the probes and other analyses at once (the pretrained study does).

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
from .capture import ActivationCapture, _shares_storage, default_layers, layer_prefix_tokens
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


_ROWS = 8192  # tokens per float32 product X^T X added to the float64 sums
_SCORE_ELEMS = 1 << 22  # (image, token, class) scores formed at a time: 16 MB in float32


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 tokens stay float64 (reference numbers); float32/bf16/fp16 tokens are fitted in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass
class _RidgeStats:
    """Streaming sufficient statistics of a least-squares fit of one-hot targets on features.

    With ``shift`` set, the sums are those of ``x - shift`` (see the module doc); the fit is the same.
    """

    sx: torch.Tensor  # (D,)
    sxx: torch.Tensor  # (D, D)
    sxy: torch.Tensor  # (D, K)
    sy: torch.Tensor  # (K,)
    n: int = 0
    shift: torch.Tensor | None = None  # (D,) float64

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
        if self.shift is not None:
            x = x - self.shift
        self.grow(int(y.max()) + 1)
        self.sx += x.sum(0)
        self.sxx += x.T @ x if xx is None else xx
        self.sxy.index_add_(1, y, x.T)  # column y_m += x_m
        self.sy += torch.bincount(y, minlength=self.sy.shape[0]).double()
        self.n += x.shape[0]

    def reshift(self, shift: torch.Tensor | None) -> None:
        """The same statistics as sums of ``x - shift`` (None: of x itself); exact in float64."""
        if self.n == 0:  # nothing summed yet: only the reference changes
            self.shift = None if shift is None else shift.to(self.sx)
            return
        old = torch.zeros_like(self.sx) if self.shift is None else self.shift
        delta = (torch.zeros_like(self.sx) if shift is None else shift.to(self.sx)) - old
        # out of place: the class and position fits of one layer may share one X^T X tensor
        outer = torch.outer(delta, self.sx)
        self.sxx = self.sxx + self.n * torch.outer(delta, delta) - outer - outer.T
        self.sxy = self.sxy - torch.outer(delta, self.sy)
        self.sx = self.sx - self.n * delta
        self.shift = None if shift is None else shift.to(self.sx)

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (D, K), b (K,)) of the centred ridge fit ``y ~ x W + b`` (for x itself, not ``x - shift``)."""
        mu, ybar = self.sx / self.n, self.sy / self.n
        sxx = self.sxx - self.n * torch.outer(mu, mu)
        sxy = self.sxy - self.n * torch.outer(mu, ybar)
        lam = ridge * sxx.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(sxx.shape[0], dtype=sxx.dtype, device=sxx.device)
        w = torch.linalg.solve(sxx + lam * eye, sxy)
        if self.shift is not None:
            mu = mu + self.shift
        return w, ybar - mu @ w


class _PerPositionRidgeStats(_RidgeStats):
    """:class:`_RidgeStats` for N positions at once: one ridge fit of one-hot labels per position.

    Shapes gain a leading position axis: sx (N, D), sxx (N, D, D), sxy (N, D, K); sy (K,) is
    shared, since every position sees the same images and so the same labels. Always float64, unshifted.
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

    def reshift(self, shift) -> None:  # never shifted
        pass

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
    """A layer's flattened tokens -> (B, N, D), prefix tokens dropped; float64 stays, the rest float32.

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
        return t.to(_work_dtype(t))


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
    """Per layer, the ridge statistics of the class probe and of the position probe."""

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
        """t (B, N, D) tokens of one layer (float64, or float32: see the module doc), labels (B,).

        Every token is an example: of its position for the position probe, of its image's class
        for the shared class probe; the two fits share X^T X and the token sums.
        """
        B, N, D = t.shape
        if name not in self.cls:
            self._create(name, N, D)
        pos, cls = self.pos[name], self.cls[name]
        if pos.shift is None:  # the first batch's mean: later sums stay at the centred scale
            shift = t.float().mean((0, 1)).to(self.device, torch.float64)
            pos.reshift(shift)
            cls.reshift(shift)  # (the per-position fits are never shifted)
        if self.per_position:
            cls.update(t.double(), labels)
        wd = _work_dtype(t)
        shift = pos.shift.to(wd)
        per_image = torch.zeros(B, D, dtype=torch.float64, device=self.device)
        per_position = torch.zeros(N, D, dtype=torch.float64, device=self.device)
        step = max(1, _ROWS // N)
        for i in range(0, B, step):
            x = t[i : i + step] - shift  # (b, N, D) in the work dtype, a fresh tensor
            flat = x.view(-1, D)
            pos.sxx += (flat.T @ flat).double()
            per_image[i : i + step] = x.sum(1)  # float32 sums are pairwise: accurate, and fast
            per_position += x.sum(0)
        sx = per_position.sum(0)
        pos.sx += sx
        pos.sxy += per_position.T  # position n's column: the sum of the tokens at n
        pos.sy += B
        pos.n += B * N
        if not self.per_position:  # class k's column: the tokens of the images of class k
            cls.grow(int(labels.max()) + 1)
            onehot = F.one_hot(labels, cls.sy.shape[0]).double()
            cls.sx += sx
            cls.sxx = pos.sxx  # the same tokens: one X^T X serves both fits
            cls.sxy += per_image.T @ onehot
            cls.sy += N * onehot.sum(0)
            cls.n += B * N

    def solve(self, name: str, ridge: float) -> tuple:
        """((W, b) of the class probe, (W, b) of the position probe) of one layer."""
        cls, pos = self.cls[name], self.pos[name]
        if self.per_position or cls.sxx is not pos.sxx:
            return cls.solve(ridge), pos.solve(ridge)
        # The shared class probe has the position probe's examples (every token), so the same
        # regularised X^T X: one solve with both right-hand sides, as two _RidgeStats.solve would give.
        both = _RidgeStats(pos.sx, pos.sxx, torch.cat([cls.sxy, pos.sxy], 1), torch.cat([cls.sy, pos.sy]),
                           pos.n, pos.shift)
        w, b = both.solve(ridge)
        k = cls.sy.shape[0]
        return (w[:, :k], b[:k]), (w[:, k:], b[k:])

    def sum_across_ranks(self, layers: list[str], reader: _TokenReader) -> None:
        """Agree on every layer's shapes (a rank may have seen no batch), then add all statistics at once.

        Each rank's statistics are unshifted first (shifts differ by rank), then shifted by the global mean.
        """
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
        for st in stats:
            st.reshift(None)
        summed = sum_across_ranks([t for st in stats for t in _stats_tensors(st)], "probe statistics")
        for k, st in enumerate(stats):
            st.sx, st.sxx, st.sxy, st.sy, n = summed[5 * k : 5 * k + 5]
            st.n = int(n.item())
        for n in layers:
            mean = self.pos[n].sx / max(self.pos[n].n, 1)
            self.pos[n].reshift(mean)
            self.cls[n].reshift(mean)


class ProbeStream:
    """:func:`localization_probes` fed by the caller, so one forward pass can serve several analyses.

    ``fit(layer, output, labels)`` with each train batch's layer output ((B, N, D) tokens or
    (B, C, H, W) maps, as the module returned it), ``solve(layer)`` once the train images are
    in, ``score(layer, output, labels)`` with the test batches, then ``results()`` (the
    dictionary :func:`localization_probes` returns). Tokens are read exactly as there: maps
    pooled to ``grid`` if larger, prefix tokens dropped.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        *,
        grid: int | tuple[int, int] | None = None,
        ridge: float = 1e-3,
        class_probe: str = "shared",
        device: str | torch.device = "cpu",
    ) -> None:
        if class_probe not in ("shared", "per_position"):
            raise ConfigError(f"class_probe must be 'shared' or 'per_position', got {class_probe!r}")
        self.layers, self.ridge, self.class_probe = list(layers), ridge, class_probe
        self.reader = _TokenReader(model, self.layers, grid)
        self.stats = _ProbeStats(class_probe == "per_position", device)
        self.fits: dict[str, tuple] = {}
        self._scorers: dict[str, tuple] = {}
        self.correct_cls: dict[str, torch.Tensor] = {}
        self.correct_pos: dict[str, torch.Tensor] = {}
        self.scored: dict[str, int] = {}

    def tokens(self, name: str, output: torch.Tensor) -> torch.Tensor:
        """A layer's output -> (B, N, D) probe tokens (a view where possible: use it before the next op)."""
        return self.reader(name, self.reader.policy(output))

    def fit(self, name: str, output: torch.Tensor, labels: torch.Tensor) -> None:
        self.fit_tokens(name, self.tokens(name, output), labels)

    def fit_tokens(self, name: str, t: torch.Tensor, labels: torch.Tensor) -> None:
        dev = self.stats.device
        self.stats.update(name, t.to(dev), torch.as_tensor(labels, device=dev))

    def solve(self, name: str | None = None) -> None:
        """Solve the fits of ``name`` (every layer by default) from the train statistics so far."""
        for n in self.layers if name is None else [name]:
            if n not in self.stats.pos:
                raise DataError("no images to fit probes on; the data iterable is empty")
            self.fits[n] = self.stats.solve(n, self.ridge)
            self._scorers.pop(n, None)

    def score(self, name: str, output: torch.Tensor, labels: torch.Tensor) -> None:
        self.score_tokens(name, self.tokens(name, output), labels)

    def _scorer(self, name: str, wd: torch.dtype) -> tuple:
        """Weights for scoring tokens shifted like the fit's: x W + b = (x - shift) W + (b + shift W)."""
        key = (name, wd)
        if key not in self._scorers:
            (wc, bc), (wp, bp) = self.fits[name]
            shift = self.stats.pos[name].shift
            if not self.stats.per_position:  # per-position fits score the raw tokens in float64
                wc, bc = wc.to(wd), (bc + shift @ wc).to(wd)
            self._scorers[key] = (shift.to(wd), wc, bc, wp.to(wd), (bp + shift @ wp).to(wd))
        return self._scorers[key]

    def score_tokens(self, name: str, t: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one test batch's correct class and position predictions, per position."""
        if name not in self.fits:
            self.solve(name)
        dev = self.stats.device
        t, labels = t.to(dev), torch.as_tensor(labels, device=dev)  # not via torch's default device
        B, N, D = t.shape
        wd = _work_dtype(t)
        shift, wc, bc, wp, bp = self._scorer(name, wd)
        if name not in self.correct_cls:
            self.correct_cls[name] = torch.zeros(N, dtype=torch.float64, device=dev)
            self.correct_pos[name] = torch.zeros(N, dtype=torch.float64, device=dev)
            self.scored[name] = 0
        own = torch.arange(N, device=dev)
        step = max(1, _SCORE_ELEMS // (N * N))  # images whose (N, N) position scores are formed at once
        for i in range(0, B, step):
            x, y = t[i : i + step], labels[i : i + step]
            if self.stats.per_position:  # each position its own probe, on the raw tokens, float64
                scores = torch.einsum("bnd,ndk->bnk", x.double(), wc) + bc
            else:
                x = x - shift
                scores = torch.baddbmm(bc, x, wc.expand(x.shape[0], -1, -1))
            self.correct_cls[name] += (scores.argmax(-1) == y[:, None]).sum(0).double()
            if self.stats.per_position:
                x = x - shift
            scores = torch.baddbmm(bp, x, wp.expand(x.shape[0], -1, -1))  # (b, N, N), bias fused
            self.correct_pos[name] += (scores.argmax(-1) == own).sum(0).double()
        self.scored[name] += B

    def sum_scores_across_ranks(self) -> None:
        n = len(self.layers)
        for name in self.layers:  # a rank that scored nothing adds zeros of the right shape
            if name not in self.correct_cls:
                g = self.reader.grids[name]
                z = torch.zeros(g[0] * g[1], dtype=torch.float64, device=self.stats.device)
                self.correct_cls[name], self.correct_pos[name], self.scored[name] = z, z.clone(), 0
        counts = torch.tensor([float(self.scored[name]) for name in self.layers], device=self.stats.device)
        summed = sum_across_ranks(
            [*map(self.correct_cls.get, self.layers), *map(self.correct_pos.get, self.layers), counts],
            "probe accuracies",
        )
        self.correct_cls = dict(zip(self.layers, summed[:n]))
        self.correct_pos = dict(zip(self.layers, summed[n : 2 * n]))
        self.scored = {k: int(c) for k, c in zip(self.layers, summed[-1].tolist())}

    def results(self) -> dict[str, dict]:
        """``{layer: {"class_acc", "position_acc", ...}}``: see :func:`localization_probes`."""
        results = {}
        for name in self.layers:
            count = self.scored.get(name, 0)
            if count == 0:
                raise DataError("no test images to score the probes on; the test data iterable is empty")
            g = self.reader.grids[name]
            cmap = (self.correct_cls[name] / count).view(*g).cpu().numpy()
            pmap = (self.correct_pos[name] / count).view(*g).cpu().numpy()
            k, npos = self.stats.cls[name].sy.shape[0], g[0] * g[1]
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
                "train_tokens": self.stats.pos[name].n,
                "class_probe": self.class_probe,
            }
        return results


def _pass(cap: ActivationCapture, data, feed, *, device, max_images, progress, desc) -> bool:
    """One pass over ``data``: every batch's layer tokens to ``feed(name, tokens, labels)``; any batch?"""
    seen = False
    for images, labels in _labelled(RankBatches(data, max_images=max_images, progress=progress, desc=desc)):
        for name, t in cap.run(images.to(device)).items():
            feed(name, t, labels)
        seen = True
    return seen


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
    :class:`ProbeStream` computes the same from tokens the caller supplies.

    Under an initialised ``torch.distributed`` process group each rank takes every W-th batch of
    each split; the ridge statistics, then the correct counts, are added across ranks once per
    split (see :mod:`vitlens.analysis.distributed`), and every rank returns the same result.
    """
    if class_probe not in ("shared", "per_position"):
        raise ConfigError(f"class_probe must be 'shared' or 'per_position', got {class_probe!r}")
    layers = default_layers(model) if layers is None else list(layers)
    stream = ProbeStream(
        model,
        layers,
        grid=grid,
        ridge=ridge,
        class_probe=class_probe,
        device="cpu" if torch.device(device).type == "mps" else device,
    )
    reader = stream.reader
    passes = {"device": device, "max_images": max_images, "progress": progress}

    def tokens(name: str, flat: torch.Tensor) -> torch.Tensor:
        t = reader(name, flat)  # copied: a later in-place op of the forward must not change it
        return t.clone() if _shares_storage(t, flat) else t

    distributed = world()[1] > 1
    with (
        eval_mode(model),
        ActivationCapture(model, layers, token_policy=reader.policy, transform=tokens) as cap,
    ):
        model.to(device)
        seen = _pass(cap, train_data, stream.fit_tokens, desc="probes: train", **passes)
        if distributed:
            stream.stats.sum_across_ranks(layers, reader)
        elif not seen:
            raise DataError("no images to fit probes on; the data iterable is empty")
        stream.solve()
        _pass(cap, test_data, stream.score_tokens, desc="probes: test", **passes)
    if distributed:
        stream.sum_scores_across_ranks()
    return stream.results()
