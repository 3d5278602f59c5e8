"""Representation analysis (Raghu et al. 2021, "Do Vision Transformers See Like CNNs?").

Activation capture by module name and layer-by-layer CKA.
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

# Attention probabilities, localization probes, model loading (figures: vitlens.analysis.plots,
# imported on use so that matplotlib loads only when plotting).
from .attention import (
    AttentionRecord,
    attention_distance,
    attention_entropy,
    attention_layers,
    attention_maps,
    attention_rollout,
    attention_statistics,
    mean_attention_distance,
    record_attention,
    token_geometry,
)
from .loading import load_model_and_meta, load_model_for_analysis
from .probes import localization_probes

__all__ += [
    "AttentionRecord", "attention_distance", "attention_entropy", "attention_layers", "attention_maps",
    "attention_rollout", "attention_statistics", "mean_attention_distance", "record_attention",
    "token_geometry",
    "load_model_and_meta", "load_model_for_analysis", "localization_probes",
]
