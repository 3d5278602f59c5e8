"""Centered Kernel Alignment (CKA): how similar are two layers' representations?

CKA (Kornblith et al. 2019) compares two sets of features of the *same* n examples through
their n x n kernel (similarity) matrices K and L:

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

It is invariant to orthogonal transforms and isotropic scaling of either representation,
so layers of different widths (a ViT block vs a ResNet stage) can be compared.

Two HSIC estimators:

* biased (Gretton et al. 2005): ``tr(K H L H) / (n-1)^2`` with H the centering matrix;
* debiased / unbiased (Song et al. 2012), used by Nguyen, Raghu & Kornblith 2021 and Raghu et
  al. 2021: with K~, L~ the kernels with zeroed diagonals,
  ``[tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``.
  It equals ``<U(K), U(L)> / (n(n-3))`` where U is "U-centering" (Szekely & Rizzo 2014), the
  form we compute: every pair of layers is then one dot product of flattened matrices.

Whole-dataset Gram matrices do not fit in memory, so :class:`MinibatchCKA` follows Nguyen et
al.: it sums the debiased HSIC of each minibatch for every (layer_a, layer_b) pair and only
normalises at the end, ``CKA = sum_b HSIC_b(K, L) / sqrt(sum_b HSIC_b(K, K) sum_b HSIC_b(L, L))``.
That is an unbiased-per-batch estimate, *not* the average of per-batch CKA values, and not
exactly the full-batch CKA either (they agree as batches grow). :func:`cka_matrix` runs
models over data once and feeds it, so memory stays constant in the number of images.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..utils import eval_mode
from .capture import ActivationCapture, TokenPolicy, _resolve_layers
from .common import batch_images
from .distributed import RankBatches, sum_across_ranks, world

__all__ = ["MinibatchCKA", "cka", "cka_matrix", "feature_gram", "hsic"]

KERNELS = ("linear", "rbf")


# --------------------------------------------------------------------------- building blocks
def feature_gram(
    x: torch.Tensor, *, dtype: torch.dtype = torch.float64, chunk_elems: int = 1 << 22
) -> torch.Tensor:
    """Dot-product Gram matrix ``Xc Xc^T`` of the column-centred features ``Xc``, as float64 ``(n, n)``.

    Both HSIC estimators are invariant to translating the features, so centring changes no CKA
    value, but it keeps the products well conditioned: ReLU outputs and residual streams often
    share a large common offset (raw/centred energy ratios of 10-200 in a random-init ResNet-50)
    that would otherwise dominate, and cancel in, every entry of an uncentred float32 Gram.

    ``dtype=torch.float64`` (default): centre and multiply in double precision.

    ``dtype=torch.float32``: the fast path for big activations (a ResNet-50 ``layer1`` output has
    800k features, and float64 matmuls are ~3x slower on CPU). ``x`` is processed in column chunks
    of ``chunk_elems`` elements: each chunk is centred into a reused buffer and multiplied in
    float32, and the partial Grams are summed in float64; the relative error is ~1e-7. Chunks
    bound the temporary memory; they are large because every op is a parallel region, and
    many small ones cost more than they save when the CPU is shared.
    """
    if x.dim() != 2:
        raise ValueError(f"feature_gram expects (n, features), got shape {tuple(x.shape)}; flatten it first")
    if dtype == torch.float64:
        xc = x.double()
        xc = xc - xc.mean(dim=0, keepdim=True)
        return xc @ xc.T
    x = x.to(dtype)
    n, f = x.shape
    cols = min(f, max(256, chunk_elems // max(n, 1)))
    mean = torch.full((1, n), 1.0 / n, dtype=dtype, device=x.device) @ x  # (1, f) column means, one pass
    g = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    buf = torch.empty(n, cols, dtype=dtype, device=x.device)  # reused: no allocation per chunk
    for start in range(0, f, cols):
        stop = min(start + cols, f)
        b = buf[:, : stop - start]
        torch.sub(x[:, start:stop], mean[:, start:stop], out=b)  # centre the chunk's columns
        g += (b @ b.T).double()
    return g


def _median(t: torch.Tensor) -> torch.Tensor:
    """Median over the last dim, averaging the two middle values for even sizes (like ``np.median``).

    Uses ``kthvalue`` because ``torch.quantile`` refuses inputs over 2^24 elements.
    """
    k = t.shape[-1]
    lo = t.kthvalue((k + 1) // 2, dim=-1).values
    if k % 2:
        return lo
    return 0.5 * (lo + t.kthvalue(k // 2 + 1, dim=-1).values)


def _kernel_from_gram(gram: torch.Tensor, kernel: str, sigma_frac: float) -> torch.Tensor:
    """Linear or RBF kernel matrices ``(..., n, n)`` from dot-product Grams of the same features.

    RBF bandwidth as in Kornblith et al.'s reference code: ``sigma^2 = sigma_frac^2 *
    median(squared distances)``, the median taken over the whole n x n distance matrix of
    the batch (so sigma is about ``sigma_frac`` times the median pairwise distance).
    """
    if kernel == "linear":
        return gram
    sq_norms = gram.diagonal(dim1=-2, dim2=-1)
    sq_dist = (sq_norms[..., :, None] + sq_norms[..., None, :] - 2 * gram).clamp_min_(0.0)
    sq_dist.diagonal(dim1=-2, dim2=-1).zero_()
    med = _median(sq_dist.flatten(-2))[..., None, None]
    if bool((med <= 0).any()):
        raise ValueError(
            "RBF kernel bandwidth is 0: more than half of the pairwise distances are zero (duplicate or "
            "constant representations); use kernel='linear' or larger, more varied batches"
        )
    return torch.exp(-sq_dist / (2.0 * sigma_frac**2 * med))


def _center(k: torch.Tensor, debiased: bool) -> torch.Tensor:
    """Centre kernel matrices ``(..., n, n)`` so that HSIC is a plain dot product of them.

    biased: ``H K H``. debiased: U-centring, i.e. zero the diagonal, subtract row/column sums
    / (n-2), add the total / ((n-1)(n-2)), zero the diagonal again.
    """
    n = k.shape[-1]
    if not debiased:
        return k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-2, -1), keepdim=True)
    k = k.clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    rows = k.sum(-1, keepdim=True)  # (..., n, 1); K~ is symmetric so column sums are rows^T
    total = rows.sum(-2, keepdim=True)  # (..., 1, 1)
    u = k - rows / (n - 2) - rows.transpose(-1, -2) / (n - 2) + total / ((n - 1) * (n - 2))
    u.diagonal(dim1=-2, dim2=-1).zero_()
    return u


def _hsic_scale(n: int, debiased: bool) -> float:
    return 1.0 / (n * (n - 3)) if debiased else 1.0 / (n - 1) ** 2


def _check_n(n: int, debiased: bool) -> None:
    if debiased and n < 4:
        raise DataError(f"debiased HSIC/CKA needs at least 4 examples (it divides by n-3), got n={n}")
    if n < 2:
        raise DataError(f"HSIC/CKA needs at least 2 examples, got n={n}")


def _check_kernel(kernel: str, sigma_frac: float) -> None:
    if kernel not in KERNELS:
        raise ConfigError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    if kernel == "rbf" and not sigma_frac > 0:
        raise ConfigError(f"sigma_frac must be > 0 for the RBF kernel, got {sigma_frac}")


# --------------------------------------------------------------------------- full-batch CKA
def hsic(k: torch.Tensor, l: torch.Tensor, *, debiased: bool = False) -> float:  # noqa: E741 - paper notation
    """HSIC of two ``(n, n)`` kernel matrices (biased, or the unbiased estimator of Song et al.)."""
    if k.dim() != 2 or k.shape[0] != k.shape[1] or k.shape != l.shape:
        raise ValueError(
            f"hsic expects two (n, n) kernel matrices of one size, got {tuple(k.shape)} and {tuple(l.shape)}"
        )
    n = k.shape[0]
    _check_n(n, debiased)
    ck, cl = _center(k.double(), debiased), _center(l.double(), debiased)
    return float((ck * cl).sum()) * _hsic_scale(n, debiased)


def cka(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel: str = "linear",
    debiased: bool = False,
    sigma_frac: float = 1.0,
) -> float:
    """CKA between two representations ``x (n, p)`` and ``y (n, q)`` of the same n examples.

    Computed in float64. ``kernel``: ``"linear"`` or ``"rbf"`` (bandwidth ``sigma_frac`` times
    the median distance, see :func:`_kernel_from_gram`). ``debiased`` uses the unbiased HSIC
    estimator (needs n >= 4). Returns NaN, with a warning, if a representation is constant.
    """
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cka: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(
                f"cka: {name} must be 2-D (n_examples, features), got shape {tuple(t.shape)}; reduce it with "
                "vitlens.analysis.reduce_activation(t, policy) or t.flatten(1)"
            )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"cka: x and y must describe the same examples, got {x.shape[0]} and {y.shape[0]} rows; "
            "pass activations of the same inputs, in the same order"
        )
    _check_kernel(kernel, sigma_frac)
    _check_n(x.shape[0], debiased)
    kx = _center(_kernel_from_gram(feature_gram(x), kernel, sigma_frac), debiased)
    ky = _center(_kernel_from_gram(feature_gram(y.to(x.device)), kernel, sigma_frac), debiased)
    # the 1/(n(n-3)) or 1/(n-1)^2 factors cancel in the ratio
    hxy, hxx, hyy = (kx * ky).sum(), (kx * kx).sum(), (ky * ky).sum()
    denom = torch.sqrt(hxx * hyy)
    if denom <= 0:
        warnings.warn(
            "cka: a representation is constant across examples (HSIC(K, K) = 0); CKA is undefined",
            stacklevel=2,
        )
        return float("nan")
    return float(hxy / denom)


# --------------------------------------------------------------------------- minibatch CKA
class MinibatchCKA:
    """Accumulate HSIC over minibatches for every (layer of A, layer of B) pair (Nguyen et al. 2021).

    >>> acc = MinibatchCKA(num_layers_a=13, num_layers_b=17)
    >>> for feats_a, feats_b in batches:     # lists of (b, features) tensors, one per layer
    ...     acc.update(feats_a, feats_b)
    >>> matrix = acc.compute()               # (13, 17) numpy array

    ``num_layers_b=None`` compares A's layers with each other (pass only ``feats_a``): the
    matrix is then exactly symmetric with ones on the diagonal.

    Per batch, the m + k kernel matrices are centred once and stacked as ``(m, b*b)`` and
    ``(k, b*b)``; all m*k HSIC values are one matrix product, added to float64 sums. The
    ratio is taken once, in :meth:`compute`.

    A batch smaller than the estimator allows (4 for debiased, 2 for biased; typically a
    DataLoader's ragged last batch) is skipped with a warning: its HSIC is undefined, and a
    Gram matrix cannot be merged with another batch's without the cross-batch entries.
    """

    def __init__(
        self,
        num_layers_a: int,
        num_layers_b: int | None = None,
        *,
        kernel: str = "linear",
        debiased: bool = True,
        sigma_frac: float = 1.0,
    ) -> None:
        _check_kernel(kernel, sigma_frac)
        if num_layers_a < 1 or (num_layers_b is not None and num_layers_b < 1):
            raise ValueError(f"need at least one layer per model, got {num_layers_a} and {num_layers_b}")
        self.kernel, self.debiased, self.sigma_frac = kernel, debiased, sigma_frac
        self.self_compare = num_layers_b is None
        self.shape = (num_layers_a, num_layers_a if num_layers_b is None else num_layers_b)
        # float64 sums on the CPU whatever torch's default device (update() adds .cpu() products)
        self.hsic_ab = torch.zeros(self.shape, dtype=torch.float64, device="cpu")
        self.hsic_aa = torch.zeros(self.shape[0], dtype=torch.float64, device="cpu")
        self.hsic_bb = torch.zeros(self.shape[1], dtype=torch.float64, device="cpu")
        self.num_batches = 0
        self.num_examples = 0
        self.skipped_examples = 0

    @property
    def min_batch(self) -> int:
        return 4 if self.debiased else 2

    def update(
        self,
        feats_a: Sequence[torch.Tensor],
        feats_b: Sequence[torch.Tensor] | None = None,
        *,
        gram_dtype: torch.dtype = torch.float64,
    ) -> None:
        """Add one batch given per-layer features ``(b, features_i)`` (any widths, same b)."""
        grams_a = torch.stack([feature_gram(f, dtype=gram_dtype) for f in feats_a])
        grams_b = (
            None if feats_b is None else torch.stack([feature_gram(f, dtype=gram_dtype) for f in feats_b])
        )
        self.update_grams(grams_a, grams_b)

    def update_grams(self, grams_a: torch.Tensor, grams_b: torch.Tensor | None = None) -> None:
        """Add one batch given stacked dot-product Grams ``(m, b, b)`` (and ``(k, b, b)``), e.g. from
        :func:`feature_gram`. Use this when Grams are computed in forward hooks."""
        if self.self_compare != (grams_b is None):
            raise ValueError(
                "this MinibatchCKA was built with num_layers_b=None (self-comparison): pass only grams_a"
                if self.self_compare
                else "this MinibatchCKA compares two models: pass grams for both"
            )
        for g, m, who in ((grams_a, self.shape[0], "a"), (grams_b, self.shape[1], "b")):
            if g is None:
                continue
            if g.dim() != 3 or g.shape[0] != m or g.shape[1] != g.shape[2]:
                raise ValueError(f"grams_{who} must have shape ({m}, b, b), got {tuple(g.shape)}")
        n = grams_a.shape[-1]
        if grams_b is not None and grams_b.shape[-1] != n:
            raise ValueError(f"both models must see the same batch: {n} vs {grams_b.shape[-1]} examples")
        if n < self.min_batch:
            warnings.warn(
                f"MinibatchCKA: skipping a batch of {n} examples "
                f"({'debiased' if self.debiased else 'biased'} "
                f"HSIC needs >= {self.min_batch}); use drop_last=True or a batch size that divides the data",
                stacklevel=2,
            )
            self.skipped_examples += n
            return
        scale = _hsic_scale(n, self.debiased)
        a = _center(_kernel_from_gram(grams_a.double(), self.kernel, self.sigma_frac), self.debiased).flatten(
            1
        )
        if self.self_compare:
            cross = a @ a.T
            cross = 0.5 * (cross + cross.T)  # exact symmetry, whatever the BLAS summation order
            aa = bb = cross.diagonal()
        else:
            b = _center(
                _kernel_from_gram(grams_b.double(), self.kernel, self.sigma_frac), self.debiased
            ).flatten(1)
            cross, aa, bb = a @ b.T, (a * a).sum(1), (b * b).sum(1)
        self.hsic_ab += (cross * scale).cpu()
        self.hsic_aa += (aa * scale).cpu()
        self.hsic_bb += (bb * scale).cpu()
        self.num_batches += 1
        self.num_examples += n

    def sum_across_ranks(self) -> None:
        """Add up the HSIC sums of all ranks of an initialised process group (one all-reduce).

        A rank that saw no batch adds zeros. Within one model, HSIC(K, K) is read back from the
        diagonal of the summed cross matrix, so the diagonal of the CKA matrix stays exactly 1.
        """
        if world()[1] == 1:
            return
        counts = torch.tensor(
            [self.num_batches, self.num_examples, self.skipped_examples], dtype=torch.float64
        )
        parts = (
            [self.hsic_ab, counts]
            if self.self_compare
            else [self.hsic_ab, self.hsic_aa, self.hsic_bb, counts]
        )
        summed = sum_across_ranks(parts, "CKA statistics (HSIC sums)")
        self.hsic_ab, counts = summed[0], summed[-1]
        if self.self_compare:
            self.hsic_ab = 0.5 * (self.hsic_ab + self.hsic_ab.T)  # exact symmetry whatever the sum order
            self.hsic_aa = self.hsic_bb = self.hsic_ab.diagonal().clone()
        else:
            self.hsic_aa, self.hsic_bb = summed[1], summed[2]
        self.num_batches, self.num_examples, self.skipped_examples = (int(c) for c in counts.tolist())

    def compute(self) -> np.ndarray:
        """The ``(m, k)`` CKA matrix, float64. NaN (with a warning) where a layer was constant."""
        if self.num_batches == 0:
            raise RuntimeError(
                f"MinibatchCKA: no batch of >= {self.min_batch} examples was added; feed data with update()"
            )
        denom = torch.sqrt(self.hsic_aa[:, None] * self.hsic_bb[None, :])
        out = self.hsic_ab / denom
        bad = ~(denom > 0)
        if bool(bad.any()):
            warnings.warn(
                "MinibatchCKA: some layers are constant over the data (HSIC = 0); their CKA is NaN",
                stacklevel=2,
            )
            out[bad] = float("nan")
        return out.numpy()


# --------------------------------------------------------------------------- models -> CKA matrix
def _split_policy(
    token_policy: TokenPolicy | tuple[TokenPolicy, TokenPolicy],
) -> tuple[TokenPolicy, TokenPolicy]:
    if isinstance(token_policy, tuple):
        if len(token_policy) != 2:
            raise ValueError(f"token_policy tuple must be (policy_a, policy_b), got {token_policy!r}")
        return token_policy
    return token_policy, token_policy


def _models_and_data(model_a, model_b, data) -> tuple[nn.Module | None, Iterable]:
    """Sort out the call forms ``(model_a, model_b, data)``, ``(model, None, data)``, ``(model, data)``."""
    if model_b is not None and not isinstance(model_b, nn.Module):
        if data is not None:
            raise TypeError(
                f"cka_matrix(model_a, model_b, data): model_b must be an nn.Module or None, got "
                f"{type(model_b).__name__}; the data comes third (or as data=...)"
            )
        model_b, data = None, model_b  # cka_matrix(model, data): a model with itself
    if data is None:
        raise TypeError(
            "cka_matrix needs data: cka_matrix(model_a, model_b, data) or cka_matrix(model, data=...)"
        )
    if not isinstance(model_a, nn.Module):
        raise TypeError(f"cka_matrix: model_a must be an nn.Module, got {type(model_a).__name__}")
    return model_b, data


@dataclass
class _LayerPlan:
    """Which layers of which models are compared, and how many forward passes a batch needs.

    ``self_compare``: one model with itself (same layers, same policy): one forward, one set of
    Grams serving both sides. ``one_forward``: two layer sets or policies of ONE model: one
    forward fills both captures. Otherwise each model runs once per batch.
    """

    model_a: nn.Module
    model_b: nn.Module | None
    names_a: list[str]
    names_b: list[str]
    policy_a: TokenPolicy
    policy_b: TokenPolicy
    self_compare: bool
    one_forward: bool

    @classmethod
    def build(cls, model_a, model_b, layers_a, layers_b, token_policy) -> _LayerPlan:
        policy_a, policy_b = _split_policy(token_policy)
        if model_b is None and layers_b is not None:
            raise ValueError(
                "layers_b given without model_b; pass model_b=model_a to compare two layer sets of one model"
            )
        self_compare = model_b is None or (
            model_b is model_a
            and (layers_b is None or list(layers_b) == list(layers_a or []))
            and policy_a == policy_b
        )
        names_a = _resolve_layers(model_a, layers_a, policy_a)
        names_b = names_a if self_compare else _resolve_layers(model_b, layers_b, policy_b)
        one_forward = not self_compare and model_b is model_a
        return cls(
            model_a, model_b, list(names_a), list(names_b), policy_a, policy_b, self_compare, one_forward
        )

    @property
    def models(self) -> list[nn.Module]:
        return [self.model_a] if self.self_compare or self.one_forward else [self.model_a, self.model_b]

    @contextmanager
    def grams(self, gram_dtype: torch.dtype) -> Iterator[Callable[[torch.Tensor], tuple]]:
        """Within the context, ``grams_of(images) -> (grams_a (m, b, b), grams_b (k, b, b) or None)``.

        Forward hooks turn each layer's output into its Gram matrix at once, so no activation
        outlives its layer's forward pass.
        """

        def to_gram(name: str, feats: torch.Tensor) -> torch.Tensor:
            return feature_gram(feats, dtype=gram_dtype)

        cap_b = (
            nullcontext()
            if self.self_compare
            else ActivationCapture(self.model_b, self.names_b, self.policy_b, transform=to_gram)
        )
        with ActivationCapture(self.model_a, self.names_a, self.policy_a, transform=to_gram) as cap_a, cap_b:

            def grams_of(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
                if self.one_forward:  # model_a's forward fills both captures
                    cap_b.clear()
                grams_a = torch.stack(list(cap_a.run(images).values()))
                if self.self_compare:
                    return grams_a, None
                captured_b = cap_b.collect() if self.one_forward else cap_b.run(images)
                return grams_a, torch.stack(list(captured_b.values()))

            yield grams_of


def cka_matrix(
    model_a: nn.Module,
    model_b: nn.Module | None = None,
    data: Iterable | None = None,
    *,
    layers_a: Sequence[str] | None = None,
    layers_b: Sequence[str] | None = None,
    token_policy: TokenPolicy | tuple[TokenPolicy, TokenPolicy] = "flatten",
    kernel: str = "linear",
    debiased: bool = True,
    sigma_frac: float = 1.0,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    progress: bool = True,
    gram_dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, list[str], list[str]]:
    """Layer-by-layer minibatch CKA between ``model_a`` and ``model_b`` (or ``model_a`` and itself).

    Called as ``cka_matrix(model_a, model_b, data)``; within one model as
    ``cka_matrix(model, None, data)``, ``cka_matrix(model, data=data)`` or ``cka_matrix(model, data)``
    (data is never an ``nn.Module``, so the last form is unambiguous).

    One pass over ``data`` (an iterable of image tensors or ``(images, labels)`` batches): each
    batch runs through both models under ``torch.no_grad`` in eval mode; forward hooks reduce
    each layer's output (``token_policy``, or a ``(policy_a, policy_b)`` pair such as
    ``("cls", "mean")`` for ViT vs ResNet) and turn it into a ``(b, b)`` Gram matrix at once, so
    memory does not grow with the dataset. With ``model_b=None`` the model runs once per batch
    and its Grams serve both sides. Layers default to :func:`default_layers` (for the ``"cls"``
    policy, without the patch embedding, which has no [CLS] token).

    Under an initialised ``torch.distributed`` process group each rank takes every W-th batch
    and the HSIC sums are added across ranks once at the end (:mod:`vitlens.analysis.distributed`):
    every rank returns the single-process matrix (to float64 rounding). A batch too small for the
    estimator (< 4 images debiased) is skipped with a warning, by whichever rank holds it, exactly
    as one process skips it.

    ``gram_dtype``: float32 (default) centres and multiplies features in single precision with
    float64 accumulation (relative error ~1e-7, several times faster on CPU); float64 for
    reference-grade numbers. Models are moved to ``device`` and put back in their previous
    train/eval mode afterwards. Returns ``(matrix (m, k), names_a, names_b)``.
    """
    model_b, data = _models_and_data(model_a, model_b, data)
    plan = _LayerPlan.build(model_a, model_b, layers_a, layers_b, token_policy)
    acc = MinibatchCKA(
        len(plan.names_a),
        None if plan.self_compare else len(plan.names_b),
        kernel=kernel,
        debiased=debiased,
        sigma_frac=sigma_frac,
    )
    batches = RankBatches(data, max_batches=max_batches, progress=progress, desc="CKA")
    with eval_mode(*plan.models), plan.grams(gram_dtype) as grams_of:
        for m in plan.models:
            m.to(device)
        for batch in batches:
            acc.update_grams(*grams_of(batch_images(batch).to(device, non_blocking=True)))
    acc.sum_across_ranks()
    return acc.compute(), plan.names_a, plan.names_b
