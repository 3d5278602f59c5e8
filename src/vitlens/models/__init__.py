"""Architectures. Importing this package registers every model."""

from . import bert, gpt, resnet, seq2seq, vit  # noqa: F401  (registration side effects)  # noqa: F401  (language models)
from .registry import create_model, list_models, register_model
from .resnet import ResNet, ResNetConfig
from .vit import VisionTransformer, ViTConfig

__all__ = ["create_model", "list_models", "register_model", "ResNet", "ResNetConfig", "ViTConfig",
           "VisionTransformer"]

from .tokenizers import models as _tokenizer_models  # noqa: E402,F401  (ViTs with pixel/vq/hybrid tokens)
