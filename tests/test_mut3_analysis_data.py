"""Mutation round 3 (issue 15) for analysis/ and data/: behaviour the last sample's survivors broke.

Each test states a behaviour a user relies on, against an independent expectation: a numpy float64
ridge fit straight from the definition, the files actually written to disk, and hand-computed byte
counts. Equivalent survivors are listed with reasons in benchmarks/equivalent/s4_analysis_data.txt.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Subset


# ------------------------------------------------------------------------------------------- probes
def _ridge_reference(tokens: np.ndarray, targets: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of the centred ridge fit of one-hot ``targets`` on the rows of ``tokens``, numpy float64,
    regulariser ``ridge * mean(diag(Xc^T Xc))`` (the module doc's definition)."""
    x = tokens.astype(np.float64)
    xc = x - x.mean(0)
    gram = xc.T @ xc
    y = np.eye(targets.max() + 1)[targets]
    w = np.linalg.solve(gram + ridge * np.mean(np.diag(gram)) * np.eye(x.shape[1]), xc.T @ (y - y.mean(0)))
    return w, y.mean(0) - x.mean(0) @ w


def test_float64_tokens_far_from_the_first_batch_are_fitted_in_float64():
    """The module doc: float64 tokens are fitted in float64. A second batch far from the first batch's
    mean (the shift), many tokens per position: both probes equal the numpy float64 ridge fit to 1e-9
    (float32 sums anywhere on the way lose ~1e-7 relative and miss by far more)."""
    from vitlens.analysis.probes import ProbeStream

    g = torch.Generator().manual_seed(0)
    b, n, d = 200, 3, 4
    labels = torch.randint(0, 3, (2 * b,), generator=g)
    pos_code = torch.randn(n, d, generator=g, dtype=torch.float64)
    cls_code = torch.randn(3, d, generator=g, dtype=torch.float64)
    tokens = pos_code + cls_code[labels][:, None] + torch.randn(2 * b, n, d, generator=g, dtype=torch.float64)
    tokens[b:] += 3e4  # the second batch sits far from the first batch's mean
    stream = ProbeStream(nn.Identity(), ["t"], ridge=1e-3)
    stream.fit("t", tokens[:b], labels[:b])
    stream.fit("t", tokens[b:], labels[b:])
    stream.solve()
    (wc, bc), (wp, bp) = stream.fits["t"]
    flat = tokens.reshape(-1, d).numpy()
    for (w, bias), targets in (
        ((wc, bc), np.repeat(labels.numpy(), n)),
        ((wp, bp), np.tile(np.arange(n), 2 * b)),
    ):
        w_ref, b_ref = _ridge_reference(flat, targets, 1e-3)
        assert w.dtype == bias.dtype == torch.float64
        np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(bias.numpy(), b_ref, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------- build_data
def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _tree_with_a_corrupt_train_jpeg(root):
    """train: 2 readable images per class plus one garbage .jpg in class 'ant'; test: 1 per class."""
    for c, cls in enumerate(["ant", "bee"]):
        for split, count in (("train", 2), ("test", 1)):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed = 10 * c + i + (100 if split == "test" else 0)
                (root / split / cls / f"{i}.jpg").write_bytes(_jpeg(seed))
    (root / "train" / "ant" / "broken.jpg").write_bytes(b"not a jpeg at all" * 16)
    return root


def test_build_data_obeys_on_corrupt_for_its_splits(tmp_path):
    """on_corrupt reaches the dataset builder: 'error' stops at the broken file, 'warn' skips it with a
    warning naming it and keeps the 4 readable train images."""
    from vitlens.data import build_data
    from vitlens.data.decode import CorruptImageError, CorruptImageWarning

    root = _tree_with_a_corrupt_train_jpeg(tmp_path / "data")
    with pytest.raises(CorruptImageError) as exc:
        build_data("imagefolder", root, on_corrupt="error", cache_dir=False)
    assert exc.value.name.endswith("broken.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, test, info = build_data("imagefolder", root, on_corrupt="warn", cache_dir=False)
    corrupt = [w for w in caught if issubclass(w.category, CorruptImageWarning)]
    assert len(corrupt) == 1 and "broken.jpg" in str(corrupt[0].message)
    assert (len(train), len(test)) == (4, 2) and info.classes == ["ant", "bee"]


# ------------------------------------------------------------------------------------- device path
def test_fits_on_device_of_a_one_image_dataset(monkeypatch):
    """A single decoded 3x5x7 uint8 image needs 105 bytes: it fits when a quarter of the free GPU memory
    holds them, not one byte less."""
    from vitlens.data.datasets import TensorImageDataset, TransformedDataset
    from vitlens.data.device_loader import MAX_DEVICE_MEMORY_SHARE, fits_on_device

    assert MAX_DEVICE_MEMORY_SHARE == 0.25
    one = TransformedDataset(TensorImageDataset(torch.zeros(1, 3, 5, 7, dtype=torch.uint8), [0], ["a"]), None)
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 10**12))
    for free_bytes, want in [(4 * 105, True), (4 * 105 - 1, False)]:
        free["bytes"] = free_bytes
        assert fits_on_device(one, torch.device("cuda")) is want


def test_an_empty_subset_loads_as_no_images_on_the_device_path():
    """A Subset with no indices (e.g. an empty class-balanced share): resident_parts gives an empty int64
    index and DeviceLoader holds zero images of the right shape instead of failing to index."""
    from vitlens.data.datasets import TensorImageDataset, TransformedDataset
    from vitlens.data.device_loader import DeviceLoader, resident_parts

    base = TensorImageDataset(torch.ones(4, 3, 2, 2, dtype=torch.uint8), [0, 1, 0, 1], ["a", "b"])
    ds = TransformedDataset(Subset(base, []), None)
    index = resident_parts(ds)[2]
    assert index.dtype == torch.int64 and index.shape == (0,)
    loader = DeviceLoader(ds, 2, shuffle=False, ops=[])
    assert loader.images.shape == (0, 3, 2, 2) and loader.targets.shape == (0,) and len(loader) == 0


def test_an_evaluation_shard_with_no_images_yields_no_batches_like_a_dataloader():
    """One test image over two ranks: rank 1's evaluation shard is empty. Like torch's DataLoader over
    an empty dataset it yields no batch at all (not one empty batch), in agreement with its len 0."""
    from torch.utils.data import DataLoader

    from vitlens.data.datasets import TensorImageDataset, TransformedDataset
    from vitlens.data.device_loader import DeviceLoader

    ds = TransformedDataset(TensorImageDataset(torch.ones(1, 3, 2, 2, dtype=torch.uint8), [0], ["a"]), None)
    assert list(DataLoader(Subset(ds, range(1, 1, 2)), batch_size=4)) == []  # the reference
    rank0, rank1 = (DeviceLoader(ds, 4, shuffle=False, world_size=2, rank=r, ops=[]) for r in (0, 1))
    assert len(rank1) == 0 and list(rank1) == [] and rank1.batch_indices() == []
    assert len(rank0) == 1 and [y.tolist() for _, y in rank0] == [[0]]
    assert [b.tolist() for b in rank0.batch_indices()] == [[0]]
