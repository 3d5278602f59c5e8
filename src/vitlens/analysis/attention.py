"""Attention probabilities and what they tell: distance, rollout, [CLS] maps, entropy.

Recording. Fused attention kernels never materialise the probabilities, so
:func:`record_attention` switches only the chosen layers to an explicit softmax path and
hooks the probabilities there; every other layer keeps its fused kernel. Three families:

* vitlens (:class:`vitlens.layers.Attention`): set ``record_attn=True`` on the chosen
  modules and hook their ``attn_probs`` hook point.
* timm (``timm.layers.Attention`` and the attention classes that follow its pattern): set
  ``fused_attn=False`` on the chosen modules and hook ``attn_drop``, the dropout that timm
  applies to the softmax output in its explicit path (``attn = attn.softmax(-1);
  attn = self.attn_drop(attn)``, timm 1.0.31 ``timm/layers/attention.py``). The hook reads
  the dropout's *input*, so probabilities are exact in train mode too.
* Hugging Face (``transformers`` models listing ``"attentions"`` in
  ``_can_record_outputs``, e.g. ``ViTModel``): the attention implementation is a property of
  the shared config, so the whole model is switched to ``attn_implementation="eager"``
  while recording (every layer, not only the chosen ones), and the chosen attention
  modules' second output (the probabilities, what ``output_attentions=True`` returns) is hooked.

Every flag is restored and every hook removed on exit, also when the body raises.

Mean attention distance (Dosovitskiy et al. 2020 Fig. 7; Raghu et al. 2021 Fig. 3): for
query patch i the attention-weighted pixel distance to the key patches,
``sum_j a_ij * ||centre_i - centre_j||``, averaged over patch queries and images, one number
per head. Choice made here: [CLS] and register tokens are removed from both queries and keys
and each query's patch-to-patch attention is renormalised to sum to 1, so the figure measures
*where among the patches* a head looks, not how much it attends to [CLS] (a head that puts
90% of its mass on [CLS] would otherwise read as very local).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DataError, ModelError
from ..layers.attention import Attention as VitlensAttention
from ..utils import eval_mode, to_2tuple
from .capture import infer_num_prefix_tokens
from .common import batch_images, patch_grid
from .distributed import RankBatches, sum_across_ranks

LayerSpec = Sequence[str | int] | str | int | None


# ----------------------------------------------------------------------------- finding layers
def _hf_attention_classes(model: nn.Module) -> tuple[type, ...]:
    spec = getattr(model, "_can_record_outputs", None) or {}
    target = spec.get("attentions") if isinstance(spec, dict) else None
    if target is None:
        return ()
    targets = target if isinstance(target, (list, tuple)) else [target]
    classes = []
    for t in targets:
        cls = t if isinstance(t, type) else getattr(t, "target_class", None)
        if isinstance(cls, type):
            classes.append(cls)
    return tuple(classes)


def _kind(module: nn.Module, hf_classes: tuple[type, ...]) -> str | None:
    if isinstance(module, VitlensAttention):
        return "vitlens"
    if hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), nn.Module):
        return "timm"
    if hf_classes and isinstance(module, hf_classes):
        return "hf"
    return None


def attention_layers(model: nn.Module) -> list[str]:
    """Names of the attention modules :func:`record_attention` can read, in module order."""
    hf = _hf_attention_classes(model)
    return [name for name, m in model.named_modules() if _kind(m, hf)]


def resolve_attention_layers(model: nn.Module, layers: LayerSpec = None) -> list[str]:
    """``None``: all attention layers; ints index :func:`attention_layers` (-1 = last); names pass."""
    available = attention_layers(model)
    if not available:
        raise ModelError(
            f"{type(model).__name__} has no attention layers that vitlens can record (vitlens, timm or "
            "Hugging Face attention); attention analyses apply to transformers, not CNNs"
        )
    if layers is None:
        return available
    if isinstance(layers, (str, int)):
        layers = [layers]
    names = []
    for layer in layers:
        if isinstance(layer, int):
            if not -len(available) <= layer < len(available):
                raise ConfigError(
                    f"attention layer index {layer} out of range: the model has {len(available)}"
                )
            names.append(available[layer])
        elif layer in available:
            names.append(layer)
        else:
            raise ConfigError(
                f"{layer!r} is not an attention layer of {type(model).__name__}; "
                f"choose from {available[:4]}{' ...' if len(available) > 4 else ''} or an index"
            )
    return names


# ----------------------------------------------------------------------------- recording
@dataclass
class AttentionRecord:
    """Probabilities seen by :func:`record_attention`: ``probs[layer]`` is (B, heads, L, S).

    With ``accumulate=False`` (default) each forward pass replaces the previous one, so
    memory stays one batch; with ``accumulate=True`` batches are concatenated along B.
    """

    layers: list[str]
    accumulate: bool = False
    probs: dict[str, torch.Tensor] = field(default_factory=dict)
    sink: Callable[[str, torch.Tensor], None] | None = None  # gets each layer's probs instead of storing

    def __getitem__(self, layer: str) -> torch.Tensor:
        if layer not in self.probs:
            raise KeyError(f"no attention recorded for {layer!r}; run a forward pass inside the context")
        return self.probs[layer]

    def in_order(self) -> list[torch.Tensor]:
        """The recorded tensors in layer order (what :func:`attention_rollout` takes)."""
        return [self[name] for name in self.layers]

    def clear(self) -> None:
        self.probs.clear()

    def _store(self, name: str, probs: torch.Tensor) -> None:
        if probs is None or probs.dim() != 4:
            raise RuntimeError(
                f"layer {name!r} gave no (B, heads, L, S) probabilities "
                f"(got {None if probs is None else tuple(probs.shape)}); its attention class is not supported"
            )
        probs = probs.detach()
        if self.sink is not None:  # reduced at once: no layer's (B, H, L, L) outlives its own forward
            self.sink(name, probs)
            return
        if self.accumulate and name in self.probs:
            probs = torch.cat([self.probs[name], probs], dim=0)
        self.probs[name] = probs


@contextmanager
def record_attention(
    model: nn.Module,
    layers: LayerSpec = None,
    *,
    accumulate: bool = False,
    sink: Callable[[str, torch.Tensor], None] | None = None,
) -> Iterator[AttentionRecord]:
    """Within the context, forward passes of ``model`` record the chosen layers' attention probabilities.

    ``sink(layer_name, probs)``: called with each layer's probabilities as soon as that layer has
    run, instead of keeping them (streaming statistics with one layer's probabilities in memory).

    >>> with record_attention(model, layers=[0, -1]) as rec:
    ...     model(images)
    >>> rec.probs["blocks.0.attn"].shape  # (B, heads, L, L)
    """
    names = resolve_attention_layers(model, layers)
    record = AttentionRecord(names, accumulate, sink=sink)
    modules = dict(model.named_modules())
    hf_classes = _hf_attention_classes(model)
    handles, restore = [], []
    try:
        for name in names:
            m = modules[name]
            kind = _kind(m, hf_classes)
            if kind == "vitlens":
                restore.append(lambda m=m, prev=m.record_attn: setattr(m, "record_attn", prev))
                m.record_attn = True
                handles.append(
                    m.attn_probs.register_forward_hook(
                        lambda _m, _inp, out, name=name: record._store(name, out)
                    )
                )
            elif kind == "timm":
                restore.append(lambda m=m, prev=m.fused_attn: setattr(m, "fused_attn", prev))
                m.fused_attn = False
                handles.append(
                    m.attn_drop.register_forward_hook(
                        lambda _m, inp, _out, name=name: record._store(name, inp[0])
                    )
                )
            else:  # Hugging Face: (attn_output, attn_weights)
                # Only this layer switches to eager attention (the one that returns weights): it gets
                # its own shallow copy of the shared config, so every other layer keeps SDPA/flash.
                restore.append(lambda m=m, prev=m.config: setattr(m, "config", prev))
                m.config = copy.copy(m.config)
                m.config._attn_implementation = "eager"
                handles.append(
                    m.register_forward_hook(
                        lambda _m, _inp, out, name=name: record._store(
                            name, out[1] if isinstance(out, tuple) else None
                        )
                    )
                )
        yield record
    finally:
        for h in handles:
            h.remove()
        for undo in reversed(restore):
            undo()


@torch.no_grad()
def attention_probs(model: nn.Module, *inputs, layers: LayerSpec = None, **kwargs) -> dict[str, torch.Tensor]:
    """One forward ``model(*inputs, **kwargs)`` in eval mode -> ``{layer: probabilities (B, heads, L, S)}``.

    The recording path of every single-input view (image maps, text attention); streaming
    statistics over a dataset use :func:`record_attention` with a ``sink`` instead.
    """
    with eval_mode(model), record_attention(model, layers) as rec:
        model(*inputs, **kwargs)
    return {name: rec[name] for name in rec.layers}


def num_heads(model: nn.Module, layer: str) -> int:
    """Head count of one attention layer (``num_heads``: vitlens, timm; ``num_attention_heads``: HF)."""
    module = dict(model.named_modules())[layer]
    for owner in (module, getattr(module, "config", None)):
        for attr in ("num_heads", "num_attention_heads"):
            if isinstance(getattr(owner, attr, None), int):
                return getattr(owner, attr)
    raise ModelError(
        f"cannot tell how many heads {layer!r} ({type(module).__name__}) has: no num_heads attribute"
    )


# ----------------------------------------------------------------------------- geometry
@dataclass
class TokenGeometry:
    """Where tokens sit in the image: a ``grid_size`` grid of ``patch_size`` pixel cells after
    ``num_prefix_tokens`` non-spatial tokens ([CLS], registers)."""

    grid_size: tuple[int, int]
    patch_size: tuple[int, int]
    num_prefix_tokens: int
    has_cls: bool


def token_geometry(model: nn.Module) -> TokenGeometry:
    """Read the token grid from a vitlens/timm ViT (``patch_embed``) or a Hugging Face ViT (``config``).

    Grid and token pixel size: :func:`vitlens.analysis.common.patch_grid`. Prefix tokens: the
    ``num_prefix_tokens`` of a vitlens/timm ViT; for Hugging Face, counted from the model's own
    parameters ([CLS], DeiT's distillation token, DINOv2's registers).
    """
    grid = patch_grid(model)
    if grid is None:
        raise ModelError(
            f"cannot tell where {type(model).__name__}'s tokens sit in the image: it needs a patch_embed "
            "with grid_size and patch_size (vitlens/timm ViT) or a Hugging Face ViT config"
        )
    if getattr(getattr(model, "patch_embed", None), "grid_size", None) is not None:
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        has_cls = getattr(model, "cls_token", None) is not None
    else:  # Hugging Face ViT: the input must have the config's image size
        prefix = infer_num_prefix_tokens(model)
        has_cls = any(name.endswith("cls_token") for name, _ in model.named_parameters())
    return TokenGeometry(grid[0], grid[1], prefix, has_cls)


def patch_distances(grid_size, patch_size) -> torch.Tensor:
    """(N, N) float64 pixel distances between patch centres, row-major like the token order.

    Patch (r, c) has its centre at ((r + 0.5) * patch_h, (c + 0.5) * patch_w) in input pixels.
    """
    gh, gw = to_2tuple(grid_size)
    ph, pw = to_2tuple(patch_size)
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    centres = torch.stack([(rows.flatten() + 0.5) * ph, (cols.flatten() + 0.5) * pw], dim=1)  # (N, 2)
    return torch.cdist(centres, centres)


def _patch_attention(probs: torch.Tensor, num_prefix_tokens: int, num_patches: int) -> torch.Tensor:
    """(B, H, L, L) -> (B, H, N, N) patch-to-patch attention, each row renormalised to sum to 1."""
    if probs.dim() != 4 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"expected self-attention probabilities (B, heads, L, L), got {tuple(probs.shape)}")
    if probs.shape[-1] != num_prefix_tokens + num_patches:
        raise ValueError(
            f"{probs.shape[-1]} tokens do not match {num_prefix_tokens} prefix tokens + "
            f"{num_patches} patches; check grid_size and num_prefix_tokens"
        )
    return _renorm_rows(probs[..., num_prefix_tokens:, num_prefix_tokens:].double())


def _renorm_rows(a: torch.Tensor) -> torch.Tensor:
    """Rows rescaled to sum to 1; a row with no mass stays 0."""
    return a / a.sum(-1, keepdim=True).clamp_min(1e-12)


def _distance_sum(probs, distances, num_prefix_tokens) -> torch.Tensor:
    """(heads,) sum over images and patch queries of sum_j a_ij d_ij."""
    a = _patch_attention(probs, num_prefix_tokens, distances.shape[0])
    return (a * distances.to(a.device)).sum(-1).sum(dim=(0, 2))  # (B, H, N) -> (H,)


def attention_distance(probs: torch.Tensor, grid_size, patch_size, num_prefix_tokens: int) -> torch.Tensor:
    """Mean attention distance in pixels per head, (heads,), for probabilities (B, heads, L, L).

    Prefix tokens are dropped from queries and keys and rows renormalised (see the module doc).
    """
    d = patch_distances(grid_size, patch_size)
    B, H, L, _ = probs.shape
    return _distance_sum(probs, d, num_prefix_tokens) / (B * d.shape[0])


class _HeadSums:
    """Per-layer, per-head running sums of attention distance and entropy, filled inside each forward.

    Allocated up front from the head counts, so a rank that sees no batch still has (zero) sums
    of the right shapes to add to the others'.
    """

    def __init__(self, model: nn.Module, names: list[str], geo: TokenGeometry, device) -> None:
        self.names, self.geo = names, geo
        self.distances = patch_distances(geo.grid_size, geo.patch_size).to(device)  # (N, N)
        zeros = {n: torch.zeros(num_heads(model, n), dtype=torch.float64, device=device) for n in names}
        self.distance = {n: z.clone() for n, z in zeros.items()}
        self.entropy = zeros
        self.images = 0

    def add_layer(self, name: str, probs: torch.Tensor) -> None:  # record_attention's sink
        self.distance[name] += _distance_sum(probs, self.distances, self.geo.num_prefix_tokens)  # (H,)
        self.entropy[name] += attention_entropy(probs, reduce=False).sum(dim=(0, 2))  # (H,)

    def sum_across_ranks(self) -> None:
        n = len(self.names)
        summed = sum_across_ranks(
            [*self.distance.values(), *self.entropy.values(), torch.tensor([float(self.images)])],
            "attention statistics",
        )
        self.distance = dict(zip(self.names, summed[:n]))
        self.entropy = dict(zip(self.names, summed[n : 2 * n]))
        self.images = int(summed[-1].item())

    def means(self) -> dict:
        if self.images == 0:
            raise DataError("no batches to measure attention on; the data iterable is empty")
        patches = self.distances.shape[0]
        tokens = self.geo.num_prefix_tokens + patches  # queries per image
        stack = lambda sums: torch.stack([sums[n] for n in self.names]).cpu()  # noqa: E731
        return {
            "layers": self.names,
            "distance": stack(self.distance).div(self.images * patches).numpy(),
            "entropy": stack(self.entropy).div(self.images * tokens).numpy(),
        }


@torch.no_grad()
def attention_statistics(
    model: nn.Module,
    data: Iterable,
    *,
    layers: LayerSpec = None,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """One streamed pass: mean attention distance (pixels) and attention entropy (nats) per head.

    Returns ``{"layers": names, "distance": (layers, heads), "entropy": (layers, heads)}``
    (numpy). ``data`` yields images or (images, labels) batches; at most ``max_batches`` are
    used. The model is moved to ``device`` and run in eval mode (its training flag is restored).
    Entropy is over all keys, prefix tokens included, averaged over every query.

    Under an initialised ``torch.distributed`` process group each rank takes every W-th batch and
    the sums are added across ranks once at the end (see :mod:`vitlens.analysis.distributed`).
    """
    names = resolve_attention_layers(model, layers)
    sums = _HeadSums(model, names, token_geometry(model), device)
    with eval_mode(model), record_attention(model, names, sink=sums.add_layer):
        model.to(device)
        for batch in RankBatches(data, max_batches=max_batches, progress=progress, desc="attention"):
            images = batch_images(batch).to(device)
            model(images)
            sums.images += images.shape[0]
    sums.sum_across_ranks()
    return sums.means()


def mean_attention_distance(model: nn.Module, data: Iterable, **kwargs) -> np.ndarray:
    """Mean attention distance in pixels, an array (layers, heads), streamed over ``data`` batches, no grad.

    Takes :func:`attention_statistics`'s keyword arguments (``layers``, ``max_batches``,
    ``device``, ``progress``); rows follow :func:`resolve_attention_layers`.
    """
    return attention_statistics(model, data, **kwargs)["distance"]


# ----------------------------------------------------------------------------- rollout, maps, entropy
def attention_rollout(
    attn_per_layer: Sequence[torch.Tensor] | dict, discard_ratio: float = 0.0, head_fusion: str = "mean"
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): (B, L, L) flow from input tokens to the last layer's tokens.

    Per layer (in forward order): fuse heads ('mean' | 'max' | 'min') -> optionally zero the
    ``discard_ratio`` smallest entries of each image's (L, L) matrix (Gildenblat's
    vit-explain variant, to sharpen maps) -> add the identity for the residual connection,
    ``0.5 * A + 0.5 * I`` -> renormalise rows -> multiply: ``R = A_l @ ... @ A_1``.
    """
    layers = list(attn_per_layer.values()) if isinstance(attn_per_layer, dict) else list(attn_per_layer)
    if not layers:
        raise ValueError("attention_rollout needs at least one layer of attention")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}
    if head_fusion not in fuse:
        raise ValueError(f"head_fusion must be one of {sorted(fuse)}, got {head_fusion!r}")
    B, _, L, _ = layers[0].shape
    eye = torch.eye(L, dtype=torch.float64, device=layers[0].device)
    rollout = eye.expand(B, L, L).clone()
    for probs in layers:
        a = fuse[head_fusion](probs.double())  # (B, L, L)
        if discard_ratio > 0:
            flat = a.reshape(B, -1)
            k = int(flat.shape[1] * discard_ratio)
            idx = flat.topk(k, dim=-1, largest=False).indices
            a = flat.scatter(1, idx, 0.0).view(B, L, L)
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    return rollout


def attention_entropy(probs: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """Entropy (nats) of each query's attention distribution; probs (..., heads, L, S).

    ``reduce=True``: the mean per head, (heads,). ``reduce=False``: (..., heads, L).
    0 log 0 counts as 0, so masked keys (probability 0) add nothing. Uniform attention over
    S keys gives log(S); attention on one key gives 0.
    """
    p = probs.double()
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (..., heads, L)
    if not reduce:
        return ent
    if ent.dim() < 2:
        raise ValueError(f"expected probabilities (..., heads, L, S), got {tuple(probs.shape)}")
    dims = [d for d in range(ent.dim()) if d != ent.dim() - 2]
    return ent.mean(dim=dims)


@torch.no_grad()
def attention_maps(
    model: nn.Module,
    image: torch.Tensor,
    layer: str | int = -1,
    *,
    discard_ratio: float = 0.0,
    head_fusion: str = "mean",
) -> dict:
    """Where the [CLS] token looks, reshaped to the patch grid, ready to draw over ``image``.

    Returns numpy arrays: ``heads`` (heads, gh, gw) [CLS]->patch attention at ``layer``;
    ``mean`` its head average; ``rollout`` (gh, gw) the rollout from the first attention layer
    up to ``layer``. The [CLS] row is read with prefix tokens removed and renormalised over
    patches (as in the distance). For a model without [CLS] (pool='gap') the query is the
    average over patch queries, i.e. how much attention each patch *receives*.
    """
    geo = token_geometry(model)
    all_layers = attention_layers(model)
    target = resolve_attention_layers(model, layer)[0]
    upto = all_layers[: all_layers.index(target) + 1]
    x = image[None] if image.dim() == 3 else image
    if x.shape[0] != 1:
        raise ValueError(f"attention_maps takes one image (C, H, W), got a batch of {x.shape[0]}")
    probs = attention_probs(model, x.to(next(model.parameters()).device), layers=upto)
    gh, gw = geo.grid_size
    P = geo.num_prefix_tokens

    def query_row(mat: torch.Tensor) -> torch.Tensor:  # (..., L, L) -> (..., N)
        if geo.has_cls:
            return _renorm_rows(mat[..., 0, P:])
        return _renorm_rows(mat[..., P:, P:]).mean(-2)

    heads = query_row(probs[target][0].double())  # (H, N)
    roll = query_row(attention_rollout(probs, discard_ratio, head_fusion)[0])  # (N,)
    return {
        "layer": target,
        "grid_size": (gh, gw),
        "heads": heads.view(-1, gh, gw).cpu().numpy(),
        "mean": heads.mean(0).view(gh, gw).cpu().numpy(),
        "rollout": roll.view(gh, gw).cpu().numpy(),
    }
