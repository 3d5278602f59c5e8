"""Reading and writing files that hold tensors: atomic safetensors checkpoints (never pickles)."""

from .checkpoint import FORMAT, atomic_write, load_checkpoint, save_checkpoint

__all__ = ["FORMAT", "atomic_write", "load_checkpoint", "save_checkpoint"]
