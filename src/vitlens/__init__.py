"""vitlens: build, train, compare and look inside Vision Transformers and CNNs."""

from .models import create_model, list_models, load_model, register_model, save_pretrained

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load_model", "register_model", "save_pretrained", "__version__"]
