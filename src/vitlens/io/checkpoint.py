"""Safetensors checkpoints, written atomically.

A checkpoint is one ``.safetensors`` file: every tensor (model weights, optimizer moments,
RNG states) under a prefixed key, and everything that is not a tensor (the model name and
config, epoch/step counters, optimizer hyper-parameters) as JSON in the file's metadata.
Nothing is ever unpickled, so a checkpoint from a stranger cannot run code.

Atomic write: the file is written to a temporary name in the same directory, flushed to
disk, then ``os.replace``d over the target, so a crash mid-write leaves the last good
checkpoint intact.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError, MissingFileError

FORMAT = "vitlens"
_TEMP_NAME = re.compile(r"^\..+\.[^.]+\.tmp$")  # atomic_write's ".NAME.<random>.tmp"


def atomic_write(path: str | Path, write_fn) -> None:
    """Call ``write_fn(tmp_path)``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files that interrupted atomic writes left in ``folder``.

    Call it when a run starts (before any writer of this folder is running): a temporary file
    is only ever valid while its writer lives. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and _TEMP_NAME.match(p.name):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensors out of a nested structure into ``tensors``; return a JSON-able skeleton."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def _unflatten(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__dict__" in skel:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in skel["__dict__"]}
        if "__tuple__" in skel:
            return tuple(_unflatten(v, tensors) for v in skel["__tuple__"])
    if isinstance(skel, list):
        return [_unflatten(v, tensors) for v in skel]
    return skel


def save_checkpoint(
    path: str | Path,
    model_state: dict[str, torch.Tensor],
    *,
    meta: dict | None = None,
    state: dict | None = None,
) -> None:
    """Write ``model_state`` (as ``model.<key>``), an optional nested training ``state`` dict
    (optimizer, scheduler, RNG, counters) and JSON ``meta`` (model name, config) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model_state.items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    skeleton = _flatten(state or {}, "state", tensors)
    # safetensors refuses tensors that share memory; clone the few that do (tied weights).
    seen: dict[int, str] = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen and ptr != -1:
            tensors[k] = v.clone()
        seen[ptr] = k
    metadata = {"format": FORMAT, "meta": json.dumps(meta or {}), "state": json.dumps(skeleton)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[dict, dict, dict]:
    """Return ``(model_state, meta, state)`` from a vitlens checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=map_location) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointError(
                    f"{path} is not a vitlens training checkpoint (no 'format: vitlens' metadata); "
                    "to load plain weights use vitlens.create_model(name, checkpoint=path)"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(metadata.get("meta", "{}"))
        skeleton = json.loads(metadata.get("state", "{}"))
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' own error types (damaged header or data), bad JSON
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"could not read {path} as a vitlens checkpoint ({first}); the file is empty, "
                              "truncated or not a safetensors file: use another checkpoint (e.g. "
                              "checkpoints/best.safetensors) or retrain") from None
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    state = _unflatten(skeleton, tensors)
    return model_state, meta, state
