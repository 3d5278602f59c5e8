"""Architectures. Importing this package registers every model."""

from . import bert, gpt, resnet, resnet_fast, seq2seq, vit  # noqa: F401  (registration side effects)
from .loading import create_model, load_model, load_run_model, save_pretrained
from .registry import list_models, model_config_class, model_config_fields, register_model, register_models
from .resnet import ResNet, ResNetConfig
from .vit import VisionTransformer, ViTConfig

__all__ = ["create_model", "list_models", "load_model", "load_run_model", "model_config_class",
           "model_config_fields", "register_model", "register_models", "save_pretrained", "ResNet",
           "ResNetConfig", "ViTConfig", "VisionTransformer"]
