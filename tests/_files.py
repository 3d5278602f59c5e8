"""Tiny image files, folders and tar archives written by tests (shared by the data tests)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(value: int = 0, size: int = 4) -> bytes:
    """A size x size RGB PNG filled with ``value``."""
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    """``files`` (relative path -> bytes) written below ``root``."""
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def write_tar(path: Path, files: dict[str, bytes], mode: str = "w") -> Path:
    """A tar archive (``mode`` "w", "w:gz", ...) holding ``files`` (member name -> bytes)."""
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path
