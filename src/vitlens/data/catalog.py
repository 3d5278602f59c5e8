"""Dataset names -> datasets: ``build_dataset("cifar10", "train", data_dir)``.

Names:

* ``cifar10-mini`` - shipped inside the package (``vitlens/assets/cifar10_mini.tar``, built by
  ``scripts/make_embedded_subset.py``): 200 train + 50 test CIFAR-10 JPEGs per class, enough
  for smoke tests and tutorials with no download.
* ``cifar10`` / ``cifar100`` - ``data_dir`` (or ``data_dir/<name>``) may hold torchvision's
  binary release (``cifar-10-batches-py/``, ``cifar-100-python/``), JPEG tarballs
  ``<name>-train.tar.gz`` + ``<name>-test.tar.gz``, or ImageFolder ``train/`` + ``test/``
  folders; the first found wins. ``download=True`` fetches the binary release via torchvision.
* ``imagefolder`` - any ImageFolder tree, as a folder or a ``.tar``/``.tar.gz`` read in place.

Images that all share one size are decoded once into memory and cached on disk (see
``cache.py``); others are decoded on access.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError, MissingFileError
from .cache import DecodedSplit, cache_file, load_decoded, save_decoded
from .datasets import LazyImageDataset, TensorImageDataset
from .decode import CorruptImageError, CorruptImageWarning, check_on_corrupt, decode_all
from .sources import archive_fingerprint, is_archive, open_source, split_dirs

log = logging.getLogger(__name__)

DATASET_NAMES = ("cifar10-mini", "cifar10", "cifar100", "imagefolder")

#: The embedded CIFAR-10 subset.
EMBEDDED_CIFAR10_MINI = Path(__file__).resolve().parents[1] / "assets" / "cifar10_mini.tar"

#: Folder names of torchvision's binary CIFAR releases.
TORCHVISION_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}

#: Above this many decoded bytes a split is decoded on access instead of held in memory.
DEFAULT_MAX_DECODED_BYTES = 4 << 30


def default_data_dir() -> Path:
    """Where ``cifar10``/``cifar100`` look (and download to) without ``data_dir``: ``$VITLENS_DATA`` or
    ``~/.cache/vitlens/data``."""
    return Path(os.environ.get("VITLENS_DATA", "~/.cache/vitlens/data")).expanduser()


def build_dataset(
    name: str = "cifar10-mini",
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    on_corrupt: str = "warn",
    cache_dir: str | os.PathLike | None | bool = None,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> TensorImageDataset | LazyImageDataset:
    """One split of a named dataset; items are ``(uint8 (3, H, W) tensor, int label)``.

    Args:
        name: one of :data:`DATASET_NAMES`.
        split: ``"train"`` or ``"test"`` (``"val"`` is accepted and falls back to a test folder).
        data_dir: where the files are (see the module docstring); unused for ``cifar10-mini``.
        download: let torchvision download CIFAR when it is not found (needs internet).
        on_corrupt: ``"warn"`` skips unreadable images with a warning naming each; ``"error"`` raises.
        cache_dir: where decoded pixels are cached (default ``$VITLENS_CACHE`` or ``~/.cache/vitlens``);
            ``False`` disables the on-disk cache.
        max_decoded_bytes: splits larger than this when decoded are decoded on access instead.
    """
    check_on_corrupt(on_corrupt)
    split_dirs(split)  # validates the split name
    key = name.lower()
    opts = dict(on_corrupt=on_corrupt, cache_dir=cache_dir, max_decoded_bytes=max_decoded_bytes)
    if key == "cifar10-mini":
        if data_dir is not None:
            warnings.warn(
                f"cifar10-mini is embedded in the package; ignoring data_dir={str(data_dir)!r} "
                "(use name 'cifar10' to read CIFAR-10 from a folder)",
                stacklevel=2,
            )
        if not EMBEDDED_CIFAR10_MINI.is_file():
            raise MissingFileError(
                f"the embedded dataset {EMBEDDED_CIFAR10_MINI} is missing from this install; "
                "reinstall vitlens, or rebuild it with scripts/make_embedded_subset.py"
            )
        return load_image_folder(EMBEDDED_CIFAR10_MINI, split, label="cifar10-mini", **opts)
    if key in TORCHVISION_DIRS:
        return _build_cifar(key, split, data_dir, download=download, **opts)
    if key == "imagefolder":
        if data_dir is None:
            raise ConfigError(
                "dataset 'imagefolder' needs data_dir (--data-dir): a folder or .tar/.tar.gz holding "
                "train/<class>/<image> and test/<class>/<image> (or val/)"
            )
        return load_image_folder(data_dir, split, **opts)
    raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def load_image_folder(
    path: str | os.PathLike,
    split: str,
    *,
    on_corrupt: str = "warn",
    cache_dir: str | os.PathLike | None | bool = None,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    label: str | None = None,
) -> TensorImageDataset | LazyImageDataset:
    """An ImageFolder split from a folder or archive: decoded + cached if one size, else lazy."""
    check_on_corrupt(on_corrupt)
    path = Path(path).expanduser()
    # Only names the cache file, for humans: "cifar10-train.tar.gz" -> "cifar10-train-train".
    label = (label or re.sub(r"\.(tar|tgz|tar\.\w+)$", "", path.name)) + f"-{split}"
    use_cache = cache_dir is not False
    cache_root = None if cache_dir is True else cache_dir
    cfile = None
    if use_cache and is_archive(path):
        # An archive's key needs no listing, so a cache hit never opens the archive.
        cfile = cache_file(cache_root, label, archive_fingerprint(path, split))
        if (hit := load_decoded(cfile)) is not None:
            return _from_cache(hit, on_corrupt)
    source = open_source(path, split)
    if use_cache and cfile is None:
        cfile = cache_file(cache_root, label, source.fingerprint())
        if (hit := load_decoded(cfile)) is not None:
            return _from_cache(hit, on_corrupt)

    t0, n = time.perf_counter(), len(source)
    images, skipped = decode_all(n, source.read, lambda i: source.names[i], on_corrupt, max_decoded_bytes)
    skipped_names = [source.names[i] for i in skipped]
    source.drop(set(skipped))
    if len(source) == 0:
        raise DataError(
            f"none of the {n} image files in {source.location} could be decoded; check the files"
        )
    if images is None:  # differing sizes, or too big to hold decoded
        log.info(
            "%s: %d images of differing sizes (or > %d bytes); decoding on access",
            label,
            n,
            max_decoded_bytes,
        )
        return LazyImageDataset(source, on_corrupt)
    ds = TensorImageDataset(images, source.targets, source.classes, source.location)
    log.info("%s: decoded %d images in %.1f s", label, len(ds), time.perf_counter() - t0)
    if cfile is not None:
        save_decoded(cfile, DecodedSplit(images, ds.targets, ds.classes, source.location, skipped_names))
    return ds


def _from_cache(hit: DecodedSplit, on_corrupt: str) -> TensorImageDataset:
    # The skipped files are remembered, so a cached load obeys on_corrupt like a fresh decode.
    for name in hit.skipped:
        err = CorruptImageError(name, "found unreadable when the decoded cache was built")
        if on_corrupt == "error":
            raise err
        warnings.warn(
            f"skipping unreadable image {name} (found when the cache was built)",
            CorruptImageWarning,
            stacklevel=2,
        )
    return TensorImageDataset(hit.images, hit.targets, hit.classes, hit.source)


def _build_cifar(name: str, split: str, data_dir, *, download: bool, **opts) -> Dataset:
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if is_archive(root):
        return load_image_folder(root, split, **opts)
    bin_dir = TORCHVISION_DIRS[name]
    looked: list[str] = []
    roots = [root] if root.name == name else [root, root / name]
    for r in roots:
        # 1. torchvision's binary release (the folder itself, or inside r)
        if r.name == bin_dir and r.is_dir():
            return _torchvision_cifar(name, r.parent, split, download=False)
        looked.append(f"{r / bin_dir}/  (torchvision binary release)")
        if (r / bin_dir).is_dir():
            return _torchvision_cifar(name, r, split, download=False)
        # 2. JPEG tarballs, one per split
        for d in split_dirs(split):
            for ext in (".tar.gz", ".tgz", ".tar"):
                tarball = r / f"{name}-{d}{ext}"
                if tarball.is_file():
                    return load_image_folder(tarball, split, **opts)
        looked.append(f"{r / f'{name}-{split}.tar.gz'}  (JPEG tarball; also .tgz/.tar)")
        # 3. an unpacked ImageFolder tree
        for d in split_dirs(split):
            if (r / d).is_dir():
                return load_image_folder(r, split, label=name, **opts)
        looked.append(f"{r / split_dirs(split)[0]}/<class>/<image>  (ImageFolder)")
    if download:
        return _torchvision_cifar(name, root, split, download=True)
    raise MissingFileError(
        f"{name} ({split} split) not found. Looked for:\n    "
        + "\n    ".join(looked)
        + f"\nFix: pass --data-dir (data_dir=) pointing at a folder with one of these (or, from Python "
        f"when online, build_dataset(..., download=True) fetches it into {root})"
    )


def _torchvision_cifar(name: str, root: Path, split: str, *, download: bool) -> TensorImageDataset:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(root=str(root), train=split == "train", download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
        raise MissingFileError(
            f"{name} binary files in {root / TORCHVISION_DIRS[name]} are missing or corrupted ({e}); "
            "delete that folder and fetch it again (from Python: download=True), or pass another --data-dir"
        ) from None
    except OSError as e:  # no network, most likely
        raise DataError(
            f"could not download {name} into {root} ({type(e).__name__}: {e}); without internet, fetch it "
            "elsewhere and pass --data-dir"
        ) from None
    # torchvision keeps CIFAR as (N, H, W, C) uint8 numpy; vitlens datasets are (N, C, H, W) tensors.
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return TensorImageDataset(images, ds.targets, ds.classes, source=str(root / TORCHVISION_DIRS[name]))
