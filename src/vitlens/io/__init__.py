"""Reading and writing files that hold tensors: atomic safetensors checkpoints (never pickles)."""

from .checkpoint import FORMAT, atomic_write, load_checkpoint, remove_stale_temp_files, save_checkpoint
from .weights import load_state_dict_file, read_safetensors_metadata, strip_prefixes

__all__ = ["FORMAT", "atomic_write", "load_checkpoint", "load_state_dict_file", "read_safetensors_metadata",
           "remove_stale_temp_files", "save_checkpoint", "strip_prefixes"]
