"""Encoded bytes -> uint8 CHW RGB tensors, and what to do with files that do not decode.

torchvision's libjpeg-turbo decoder (``torchvision.io.decode_image``) is about twice as fast
as Pillow on small JPEGs and gives the same pixels (the tests check this on CIFAR-10); Pillow
is the fallback for the formats torchvision lacks (BMP, TIFF, PPM, ...) and for a torchvision
without image decoding (deprecated since 0.29; Pillow gives the same pixels, twice as slowly).
Measured on one CPU core: the 50,000 CIFAR-10 train JPEGs decode in about 2.5 s, so decoding runs sequentially
(a process pool would mostly pay to ship bytes and pixels between processes).

An unreadable file is either skipped with a :class:`CorruptImageWarning` naming it
(``on_corrupt="warn"``) or stops the run with a :class:`CorruptImageError` naming it
(``on_corrupt="error"``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError

try:  # deprecated since torchvision 0.29 in favour of TorchCodec; Pillow takes over once it is gone
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - depends on the torchvision version
    decode_image = None

ON_CORRUPT = ("warn", "error")
# torchvision >= 0.29 warns on every decode call; the decoder still works, so keep it quiet.
_TV_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


class CorruptImageError(ValueError):
    """An image file that neither torchvision nor Pillow can decode."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(
            f"cannot decode image {name}: {reason}. Delete or replace the file, or pass on_corrupt='warn' "
            "(--on-corrupt warn) to skip unreadable files"
        )


class CorruptImageWarning(UserWarning):
    """An unreadable image was skipped (``on_corrupt="warn"``)."""


def check_on_corrupt(on_corrupt: str) -> str:
    if on_corrupt not in ON_CORRUPT:
        raise ConfigError(f"on_corrupt={on_corrupt!r} is not supported; use one of {ON_CORRUPT}")
    return on_corrupt


def report_corrupt(err: CorruptImageError, on_corrupt: str) -> None:
    """Raise ``err`` or warn about it, as ``on_corrupt`` says."""
    if on_corrupt == "error":
        raise err
    warnings.warn(f"skipping unreadable image {err.name}: {err.reason}", CorruptImageWarning, stacklevel=3)


def decode_bytes(data: bytes, name: str) -> torch.Tensor:
    """Decode one encoded image to a (3, H, W) uint8 RGB tensor; :class:`CorruptImageError` if unreadable.

    Grey, palette and RGBA images are converted to RGB so every sample has 3 channels.
    """
    if data and decode_image is not None:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_TV_DEPRECATION, category=DeprecationWarning)
                img = decode_image(
                    torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
                )
            return img[0] if img.ndim == 4 else img  # animated GIF: keep the first frame
        except RuntimeError:
            pass  # not a format torchvision decodes, or damaged: let Pillow try and explain
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.array(im.convert("RGB"))
    except UnidentifiedImageError:
        raise CorruptImageError(
            name, "not a recognizable image file" + (" (empty)" if not data else "")
        ) from None
    except Exception as e:  # truncated data, bad headers, decompression bombs, ...
        raise CorruptImageError(name, f"{type(e).__name__}: {e}") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def decode_all(
    n: int,
    read: Callable[[int], bytes],
    name: Callable[[int], str],
    on_corrupt: str,
    max_bytes: int,
) -> tuple[torch.Tensor | None, list[int]]:
    """Decode images ``0..n-1`` into one (N, 3, H, W) uint8 tensor, if they all share one size.

    Optimistic: the tensor is allocated from the first readable image's size; the first image
    of another size (or a total above ``max_bytes``) stops the pass and returns ``None`` for
    the images, so the caller falls back to decoding on access. Unreadable files are skipped
    or raised per ``on_corrupt``. Returns ``(images or None, indices of the skipped files)``.
    """
    skipped: list[int] = []
    out: torch.Tensor | None = None
    kept = 0
    for i in range(n):
        try:
            img = decode_bytes(read(i), name(i))
        except CorruptImageError as e:
            report_corrupt(e, on_corrupt)
            skipped.append(i)
            continue
        if out is None:
            if n * img.numel() > max_bytes:
                return None, skipped
            out = torch.empty((n, *img.shape), dtype=torch.uint8)
        elif img.shape != out.shape[1:]:
            return None, skipped  # mixed sizes: cannot stack
        out[kept] = img
        kept += 1
    if out is None:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8), skipped
    return (out[:kept].clone() if kept < n else out), skipped
