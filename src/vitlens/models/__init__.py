"""Architectures. Importing this package registers every model."""

from . import resnet, vit  # noqa: F401  (registration side effects)
from . import bert, gpt, seq2seq  # noqa: F401  (language models)
from .registry import create_model, list_models, register_model
from .resnet import ResNet, ResNetConfig
from .vit import ViTConfig, VisionTransformer

__all__ = ["create_model", "list_models", "register_model", "ResNet", "ResNetConfig", "ViTConfig",
           "VisionTransformer"]

from ..tokenizers import models as _tokenizer_models  # noqa: E402,F401  (ViTs with pixel/vq/hybrid tokens)
