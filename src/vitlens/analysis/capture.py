"""Capture intermediate activations by module name, one batch at a time.

Representation analyses (CKA, probes, attention distances) need the outputs of many layers
over a whole dataset, but never all of them at once: each batch's activations are reduced
(to a Gram matrix, a probe update, ...) and dropped before the next batch. So
:class:`ActivationCapture` keeps the outputs of the *current* forward pass only.

Everything is addressed by ``named_modules()`` names (``"blocks.3"``, ``"layer2.1"``,
``"vit.layers.0"``) through ordinary ``register_forward_hook`` callbacks, so the same code
works on vitlens, timm, torchvision and Hugging Face models.

Token policies turn one layer's output into a ``(B, features)`` matrix:

* token sequences ``(B, N, D)`` (ViT): ``"flatten"`` (alias ``"all"``) keeps every token
  (``N*D`` features), ``"cls"`` keeps token 0, ``"mean"`` averages the patch tokens, skipping
  the ``num_prefix_tokens`` prefix ([CLS], registers, distillation token);
* feature maps ``(B, C, H, W)`` (CNN): ``"flatten"`` keeps every position, ``"mean"`` averages
  over space (``"cls"`` has no meaning there and is an error);
* vectors ``(B, D)`` pass through unchanged.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError, ModelError

__all__ = [
    "ActivationCapture",
    "TOKEN_POLICIES",
    "default_layers",
    "infer_num_prefix_tokens",
    "layer_prefix_tokens",
    "reduce_activation",
]

TOKEN_POLICIES = ("flatten", "all", "cls", "mean")
TokenPolicy = str | Callable[[torch.Tensor], torch.Tensor]

# Parameters holding learned prefix tokens, by the names timm, vitlens and Hugging Face use.
_PREFIX_PARAM_NAMES = ("cls_token", "reg_token", "register_tokens", "dist_token", "distillation_token")


# --------------------------------------------------------------------------- token policies
def reduce_activation(
    t: torch.Tensor, policy: TokenPolicy = "flatten", num_prefix_tokens: int = 0
) -> torch.Tensor:
    """Reduce one layer's output to a ``(B, features)`` matrix according to ``policy``.

    ``policy`` may also be a callable ``t -> (B, features)`` for anything the named policies
    do not cover. The result may be a view of ``t`` (``"flatten"``, ``"cls"``).
    """
    if callable(policy):
        out = policy(t)
        if out.dim() != 2 or out.shape[0] != t.shape[0]:
            raise ValueError(f"token policy callable must return (B, features), got shape {tuple(out.shape)}")
        return out
    if policy not in TOKEN_POLICIES:
        raise ConfigError(
            f"unknown token policy {policy!r}; choose one of {TOKEN_POLICIES} or pass a callable"
        )
    if t.dim() == 2:  # already one vector per example (pooled features, logits)
        return t
    if t.dim() == 3:  # (B, N, D) token sequence
        if policy in ("flatten", "all"):
            return t.flatten(1)
        if policy == "cls":
            if num_prefix_tokens < 1:
                raise ConfigError(
                    f"token_policy='cls' on a sequence of shape {tuple(t.shape)} without a class token "
                    "(num_prefix_tokens=0, e.g. the patch_embed output or a model without [CLS]); use "
                    "token_policy='mean' or 'flatten', or leave that layer out"
                )
            return t[:, 0]
        if t.shape[1] <= num_prefix_tokens:
            raise ValueError(
                f"token_policy='mean' needs patch tokens after the {num_prefix_tokens} prefix tokens, "
                f"but the sequence has shape {tuple(t.shape)}"
            )
        return t[:, num_prefix_tokens:].mean(dim=1)
    if t.dim() == 4:  # (B, C, H, W) feature map
        if policy in ("flatten", "all"):
            return t.flatten(1)
        if policy == "mean":
            return t.mean(dim=(2, 3))
        raise ConfigError(
            f"token_policy='cls' does not apply to the feature map of shape {tuple(t.shape)}; use 'mean' "
            "(spatial average) or 'flatten' for CNN layers (cka_matrix accepts a (policy_a, policy_b) pair)"
        )
    raise ValueError(
        f"cannot reduce an activation of shape {tuple(t.shape)}: expected (B, D), (B, N, D) or (B, C, H, W); "
        "pass a callable token_policy for other layouts"
    )


# --------------------------------------------------------------------------- model introspection
def infer_num_prefix_tokens(model: nn.Module) -> int:
    """Number of non-patch tokens ([CLS], registers, distillation) at the start of the sequence.

    Uses the ``num_prefix_tokens`` attribute of timm and vitlens ViTs; otherwise counts the
    tokens in prefix-token parameters (Hugging Face ``embeddings.cls_token`` and friends).
    """
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    total = 0
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in _PREFIX_PARAM_NAMES and p.dim() == 3:
            total += p.shape[1]
    return total


def layer_prefix_tokens(model: nn.Module, layer: str, num_prefix_tokens: int | None = None) -> int:
    """Prefix tokens in the output of ``layer``: none for patch embeddings, the model's count elsewhere.

    The patch embedding runs before [CLS] is prepended, so its output is patch tokens only.
    """
    # Anything inside a patch embedding too ("patch_embed.proj", "patch_embed.norm"):
    # timm/vitlens "patch_embed", HF "patch_embeddings".
    if any("patch_embed" in part for part in layer.split(".")):
        return 0
    return infer_num_prefix_tokens(model) if num_prefix_tokens is None else num_prefix_tokens


def default_layers(model: nn.Module, token_policy: TokenPolicy | None = None) -> list[str]:
    """A sensible ordered list of layers to analyse, input to output.

    With ``token_policy="cls"`` the layers without a [CLS] token (the patch embedding, whose
    output is patch tokens only) are left out, since there is nothing for that policy to take.

    * ViT (timm or vitlens; has a ``blocks`` list): ``["patch_embed", "blocks.0", ..., "blocks.{L-1}"]``;
    * ResNet (torchvision or vitlens; has ``layer1``...): the stem output (``"maxpool"``, or ``"relu"``)
      then every residual block ``"layer{s}.{b}"``;
    * Hugging Face ViT-like (``embeddings`` plus ``encoder.layer`` or ``layers``): the embeddings,
      then every encoder layer.

    Anything else raises: pass ``layers=[...]`` explicitly.
    """
    modules = dict(model.named_modules())
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
        embed = ["patch_embed"] if "patch_embed" in modules and token_policy != "cls" else []
        return embed + [f"blocks.{i}" for i in range(len(blocks))]

    if isinstance(modules.get("layer1"), nn.Sequential):
        names = [s for s in ("maxpool", "relu") if s in modules][:1]
        stage = 1
        while isinstance(modules.get(f"layer{stage}"), nn.Sequential):
            names += [f"layer{stage}.{b}" for b in range(len(modules[f"layer{stage}"]))]
            stage += 1
        return names

    for suffix in ("encoder.layer", "layers"):  # transformers < 5 / >= 5 naming
        for name, mod in modules.items():
            if isinstance(mod, nn.ModuleList) and (name == suffix or name.endswith("." + suffix)):
                root = name[: len(name) - len(suffix)]  # "" or "vit."
                if root + "embeddings" in modules and len(mod) > 0:
                    return [root + "embeddings"] + [f"{name}.{i}" for i in range(len(mod))]

    lists = [n for n, m in modules.items() if isinstance(m, (nn.ModuleList, nn.Sequential)) and n][:8]
    raise ModelError(
        f"cannot guess which layers of {type(model).__name__} to analyse (no ViT `blocks`, ResNet `layer1..` "
        f"or Hugging Face encoder layers); pass layers=[...] explicitly, e.g. children of {lists}"
    )


def _resolve_layers(
    model: nn.Module, layers: Sequence[str] | None, token_policy: TokenPolicy | None = None
) -> list[str]:
    """Validate layer names against ``named_modules()`` with a did-you-mean error."""
    layers = default_layers(model, token_policy) if layers is None else list(layers)
    if not layers:
        raise ConfigError(
            "layers is empty; pass at least one module name (or None for default_layers(model))"
        )
    if len(set(layers)) != len(layers):
        dup = sorted({n for n in layers if layers.count(n) > 1})
        raise ConfigError(f"duplicate layer names {dup}; list each module once")
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        hints = []
        for n in missing:
            close = difflib.get_close_matches(n, list(modules), n=4, cutoff=0.5)
            hints.append(f"{n!r} (did you mean {', '.join(map(repr, close))}?)" if close else repr(n))
        raise ConfigError(
            f"{type(model).__name__} has no module named {'; '.join(hints)}. Layer names are "
            "model.named_modules() names; vitlens.analysis.default_layers(model) gives a sensible list"
        )
    return layers


def _first_tensor(out) -> torch.Tensor:
    """Module outputs may be tuples (HF layers: (hidden_states, attn, ...)) or ModelOutput dicts."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping) and out:
        first = next(iter(out.values()))
        if isinstance(first, torch.Tensor):
            return first
    raise TypeError(
        f"cannot capture a module output of type {type(out).__name__}; hook a module returning a tensor"
    )


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# --------------------------------------------------------------------------- capture
class ActivationCapture:
    """Context manager recording the (reduced) outputs of named modules for the current batch.

    >>> with ActivationCapture(model, ["blocks.0", "blocks.11"], token_policy="cls") as cap:
    ...     for images, _ in loader:
    ...         acts = cap.run(images)        # {"blocks.0": (B, D), "blocks.11": (B, D)}
    ...         ...                            # use them; the next run() replaces them

    Each hook detaches its output, reduces it with ``token_policy`` and, if given, applies
    ``transform(name, features)`` right away (e.g. a Gram matrix), so the full activation need
    not outlive the forward pass. Without ``transform``, a stored view of the module's output is
    cloned, because a later in-place op (torchvision's ``ReLU(inplace=True)`` after ``bn1``)
    would otherwise overwrite it. Hooks are removed on exit, even after an exception.

    ``num_prefix_tokens``: prefix-token count for the ``"cls"``/``"mean"`` policies; an int for
    all layers, a ``{layer: int}`` dict, or None to infer it (see :func:`layer_prefix_tokens`).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        token_policy: TokenPolicy = "flatten",
        *,
        num_prefix_tokens: int | Mapping[str, int] | None = None,
        transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not callable(token_policy) and token_policy not in TOKEN_POLICIES:
            raise ConfigError(
                f"unknown token policy {token_policy!r}; choose one of {TOKEN_POLICIES} or a callable"
            )
        self.model = model
        self.layers = _resolve_layers(model, layers, token_policy)
        self.token_policy = token_policy
        self.transform = transform
        modules = dict(model.named_modules())
        self._modules = {n: modules[n] for n in self.layers}
        if isinstance(num_prefix_tokens, Mapping):
            self.prefix = {n: num_prefix_tokens.get(n, layer_prefix_tokens(model, n)) for n in self.layers}
        else:
            self.prefix = {n: layer_prefix_tokens(model, n, num_prefix_tokens) for n in self.layers}
        self.activations: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._warned: set[str] = set()

    # -- hooks ---------------------------------------------------------------------------
    def _make_hook(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            out = _first_tensor(output).detach()
            feats = reduce_activation(out, self.token_policy, self.prefix[name])
            if self.transform is not None:
                feats = self.transform(name, feats)
            elif _shares_storage(feats, out):
                feats = feats.clone()
            self.activations[name] = feats  # a module called twice keeps its last output
            self._calls[name] = self._calls.get(name, 0) + 1

        return hook

    def __enter__(self) -> ActivationCapture:
        if self._handles:
            raise RuntimeError("ActivationCapture is already active; do not nest the same instance")
        self._handles = [m.register_forward_hook(self._make_hook(n)) for n, m in self._modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook and drop stored activations (called on context exit)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        self.activations = {}
        self._calls = {}

    # -- running ---------------------------------------------------------------------------
    def run(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Forward ``model(*args, **kwargs)`` under ``torch.no_grad`` and return this batch's
        captures, ordered like ``layers``. The model's own output is discarded.

        ``no_grad`` rather than ``inference_mode``: the captured tensors stay ordinary tensors that
        may be modified in place or fed to a probe that is trained with autograd."""
        if not self._handles:
            raise RuntimeError(
                "ActivationCapture.run() needs the hooks: use it inside `with ActivationCapture(...)`"
            )
        self.clear()
        with torch.no_grad():
            self.model(*args, **kwargs)
        return self.collect()

    def collect(self) -> dict[str, torch.Tensor]:
        """This batch's captures in ``layers`` order; errors if a layer never ran."""
        missing = [n for n in self.layers if n not in self.activations]
        if missing:
            raise RuntimeError(
                f"layers {missing} did not run in the forward pass (modules defined but unused?); "
                "choose modules that are called by model.forward"
            )
        for n, c in self._calls.items():
            if c > 1 and n not in self._warned:
                self._warned.add(n)
                warnings.warn(
                    f"module {n!r} ran {c} times in one forward pass (a shared module, e.g. a reused ReLU); "
                    "keeping its last output. Hook a module that runs once (e.g. the enclosing block)",
                    stacklevel=3,
                )
        return {n: self.activations[n] for n in self.layers}
