"""The decoded-image cache: a split's uint8 pixels, decoded once and reused by every later process.

Small-image datasets (CIFAR) are cheap to hold decoded - 50,000 x 3 x 32 x 32 bytes is
150 MB - and expensive to decode every epoch, so the first load writes one safetensors file:

* ``images``  (N, 3, H, W) uint8, ``targets`` (N,) int64;
* metadata: class names, the source, and the files skipped as unreadable when it was built.

The file name carries a key of the source's fingerprint (path + size + mtime of an archive,
or of every file in a folder) and of :data:`CACHE_VERSION`, so a changed source or a new
decoder never reads a stale cache. Where it lives: ``cache_dir`` if given, else
``$VITLENS_CACHE``, else ``$XDG_CACHE_HOME/vitlens`` (``~/.cache/vitlens``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

#: Bump when decoding changes what lands in the cache (e.g. a new decoder or colour conversion).
CACHE_VERSION = "1"


@dataclass
class DecodedSplit:
    """What the cache holds for one split."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    targets: list[int]
    classes: list[str]
    source: str
    skipped: list[str]  # names of files skipped as unreadable when the cache was built


def default_cache_dir() -> Path:
    if os.environ.get("VITLENS_CACHE"):
        return Path(os.environ["VITLENS_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "vitlens"


def cache_file(cache_dir: str | os.PathLike | None, label: str, fingerprint: str) -> Path:
    """``<cache_dir>/decoded/<label>-<key>.safetensors``; ``label`` only helps humans browsing it."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = hashlib.sha1(f"{CACHE_VERSION}|{fingerprint}".encode()).hexdigest()[:20]
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:60]
    return root / "decoded" / f"{label}-{key}.safetensors"


def load_decoded(path: Path) -> DecodedSplit | None:
    """The cached split at ``path``, or ``None`` if there is none (or it is unreadable: it gets rebuilt)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            images, targets = f.get_tensor("images"), f.get_tensor("targets")
        return DecodedSplit(
            images=images,
            targets=targets.tolist(),
            classes=json.loads(meta["classes"]),
            source=meta["source"],
            skipped=json.loads(meta["skipped"]),
        )
    except Exception as e:  # a half-written or foreign file: decode again rather than fail
        warnings.warn(
            f"ignoring unreadable decoded cache {path} ({type(e).__name__}: {e}); rebuilding it", stacklevel=2
        )
        return None


def save_decoded(path: Path, split: DecodedSplit) -> None:
    """Write atomically (temp file + rename), so a killed run or a parallel one never leaves half a file.

    A cache that cannot be written (read-only home, full disk) costs speed, not correctness:
    it warns and carries on.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "classes": json.dumps(split.classes),
            "source": split.source,
            "skipped": json.dumps(split.skipped),
            "version": CACHE_VERSION,
        }
        tensors = {
            "images": split.images.contiguous(),
            "targets": torch.tensor(split.targets, dtype=torch.int64),
        }
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        warnings.warn(
            f"could not write the decoded-image cache {path} ({e}); continuing without it, so the next run "
            "decodes again. Point cache_dir / $VITLENS_CACHE at a writable folder to fix this",
            stacklevel=2,
        )
