"""Reading any weights file into a flat ``{name: tensor}`` dict, never running code.

``.safetensors`` is read as data; ``.pt/.pth/.bin`` only with ``torch.load(weights_only=True)``,
so a checkpoint from a stranger can never run code while it is being read. Every file that
cannot be read (missing, empty, truncated, a pickle of objects, no tensors) is one
:class:`~vitlens.errors.CheckpointError` line naming the file and the fix.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import CheckpointError, MissingFileError
from .checkpoint import FORMAT, load_checkpoint

_WRAPPERS = ("state_dict", "model", "model_ema", "state_dict_ema", "module")  # tried in this order
_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def load_state_dict_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Return ``(state_dict, metadata)`` from a checkpoint file.

    metadata: for a vitlens file, ``{"format": "vitlens", "model": ..., "config": {...}, ...}``
    (the JSON ``meta`` it was saved with); for another ``.safetensors`` file its string
    metadata; ``{}`` for a pickle.
    """
    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():  # a Hugging Face save_pretrained folder
        path = path / "model.safetensors"
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes), probably an interrupted copy or "
                              "download; copy or save the file again")
    if path.suffix == ".safetensors":
        metadata = read_safetensors_metadata(path)
        if metadata.get("format") == FORMAT:  # vitlens: tensors under "model.", JSON meta
            state, meta, _ = load_checkpoint(path)
            return strip_prefixes(state), {**meta, "format": FORMAT}
        try:
            return strip_prefixes(load_file(str(path), device="cpu")), metadata
        except Exception as e:  # safetensors raises its own error types for damaged data
            raise _unreadable(path, e) from None
    return strip_prefixes(_unwrap(_torch_load(path), path)), {}


def read_safetensors_metadata(path: str | Path) -> dict:
    """The string metadata of a ``.safetensors`` header (CheckpointError if the file is not one)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise _unreadable(path, e) from None


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CheckpointError(f"could not read {path} as safetensors ({first}); the file is truncated or not "
                           "a safetensors file: save or download it again")


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds Python objects other than tensors, and vitlens never unpickles untrusted files "
            f"(torch.load(weights_only=True) refused it: {str(e).splitlines()[0]}). If you trust its origin, "
            "convert it to safetensors once: sd = torch.load(path, weights_only=False) (take "
            "sd['state_dict'] or sd['model'] if it is wrapped), then "
            "safetensors.torch.save_file(sd, 'weights.safetensors')"
        ) from None
    except Exception as e:  # a damaged zip or pickle stream fails with many types (KeyError, EOFError, ...)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"could not read {path} as a PyTorch checkpoint ({first}); expected a state "
                              "dict saved with torch.save, or a .safetensors file: save it again") from None


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict inside common training-checkpoint wrappers ({'state_dict': ...}, ...)."""
    for _ in range(3):  # wrappers nest at most a couple of levels in practice
        if not isinstance(obj, dict):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
            break
        obj = inner
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path} holds no state dict (found {keys}); expected {{name: tensor}}, possibly "
                          f"under one of {', '.join(_WRAPPERS)}")


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes every key shares."""
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd
