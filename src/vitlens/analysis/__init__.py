"""Representation analysis (Raghu et al. 2021, "Do Vision Transformers See Like CNNs?").

Activation capture by module name, layer-by-layer CKA, attention statistics and maps,
localization probes. Shared helpers (images of a batch, the fixed image subset, "is it a ViT")
are in :mod:`.common`; the split across torchrun processes in :mod:`.distributed`.
"""

from .capture import (
    ActivationCapture,
    default_layers,
    infer_num_prefix_tokens,
    layer_prefix_tokens,
    reduce_activation,
)
from .cka import MinibatchCKA, cka, cka_matrix, feature_gram, hsic

__all__ = [
    "ActivationCapture",
    "default_layers",
    "infer_num_prefix_tokens",
    "layer_prefix_tokens",
    "reduce_activation",
    "MinibatchCKA",
    "cka",
    "cka_matrix",
    "feature_gram",
    "hsic",
]

# Attention probabilities, localization probes (figures: vitlens.analysis.plots, imported on use
# so that matplotlib loads only when plotting).
from .attention import (
    AttentionRecord,
    attention_distance,
    attention_entropy,
    attention_layers,
    attention_maps,
    attention_probs,
    attention_rollout,
    attention_statistics,
    mean_attention_distance,
    record_attention,
    token_geometry,
)
from .common import batch_images, image_subset, is_vit
from .probes import localization_probes

__all__ += [
    "AttentionRecord", "attention_distance", "attention_entropy", "attention_layers", "attention_maps",
    "attention_probs", "attention_rollout", "attention_statistics", "mean_attention_distance",
    "record_attention", "token_geometry",
    "batch_images", "image_subset", "is_vit",
    "localization_probes",
]
