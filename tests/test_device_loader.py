"""The device-resident data path against the DataLoader path it replaces (issue 13).

Expectations come from torch's own DistributedSampler + DataLoader (order, sharding, batching),
from the v2 transforms applied image by image (bit-identical batches without augmentation),
and from the uniform / Bernoulli distributions the random ops must draw from.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from vitlens.data import build_data
from vitlens.data.datasets import TensorImageDataset, TransformedDataset
from vitlens.data.device_loader import (
    DeviceLoader,
    batched_pipeline,
    drop_last_rule,
    epoch_order,
    random_crop,
    random_erasing,
    random_hflip,
    resolve_data_path,
)
from vitlens.errors import ConfigError, DataError


class _Indices(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def _dataloader_batches(n, batch, seed, epoch, world, rank):
    """The trainer's DataLoader path, yielding dataset indices."""
    ds = _Indices(n)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    drop_last = len(sampler) % batch == 1
    return [b.tolist() for b in DataLoader(ds, batch_size=batch, sampler=sampler, drop_last=drop_last)]


def _tiny_dataset(n=37, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return TensorImageDataset(images, [i % 10 for i in range(n)], [str(c) for c in range(10)])


# ------------------------------------------------------------------------------- order and sharding
@pytest.mark.parametrize("n,world", [(50, 1), (37, 1), (37, 2), (37, 3), (10, 4), (3, 4)])
def test_epoch_order_is_distributed_sampler(n, world):
    ds = _Indices(n)
    for seed, epoch in [(0, 0), (0, 3), (7, 1)]:
        for rank in range(world):
            ref = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
            ref.set_epoch(epoch)
            got = epoch_order(n, seed=seed, epoch=epoch, world_size=world, rank=rank).tolist()
            assert got == list(ref)


@pytest.mark.parametrize("n,batch,world", [(37, 8, 1), (33, 8, 1), (37, 4, 2), (41, 5, 3), (64, 16, 2)])
def test_batch_indices_equal_the_dataloader_path(n, batch, world):
    ds = TransformedDataset(_tiny_dataset(n), None)
    for rank in range(world):
        loader = DeviceLoader(ds, batch, seed=3, world_size=world, rank=rank, ops=[])
        for epoch in (0, 2):
            ours = [b.tolist() for b in loader.batch_indices(epoch)]
            assert ours == _dataloader_batches(n, batch, 3, epoch, world, rank)
            loader.set_epoch(epoch)
            assert len(list(loader)) == len(ours) == len(loader)


def test_a_final_batch_of_one_is_dropped_as_in_the_trainer():
    assert drop_last_rule(33, 8) and not drop_last_rule(34, 8) and not drop_last_rule(32, 8)
    loader = DeviceLoader(TransformedDataset(_tiny_dataset(33), None), 8, ops=[])
    assert [len(b) for b in loader.batch_indices()] == [8, 8, 8, 8]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ddp_shards_are_disjoint_and_complete(world):
    n = 48  # divisible by every world size here: no padding, so the shards partition the data
    ds = TransformedDataset(_tiny_dataset(n), None)
    shards = [
        torch.cat(DeviceLoader(ds, 4, seed=1, world_size=world, rank=r, ops=[]).batch_indices(2)).tolist()
        for r in range(world)
    ]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n))
    # Not divisible: the padded duplicates are exactly the first ones of the permutation, as in torch.
    n = 50
    ds = TransformedDataset(_tiny_dataset(n), None)
    shards = [epoch_order(n, seed=1, epoch=0, world_size=world, rank=r).tolist() for r in range(world)]
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(n)) and len(flat) == math.ceil(n / world) * world


def test_evaluation_order_is_the_strided_subset():
    ds = TransformedDataset(_tiny_dataset(10), None)
    for rank in range(3):
        loader = DeviceLoader(ds, 2, shuffle=False, world_size=3, rank=rank, ops=[])
        assert torch.cat(loader.batch_indices()).tolist() == list(range(rank, 10, 3))


# ------------------------------------------------------------------------------- bit-identical batches
def _reference_batches(train_ds, batch, seed, epoch):
    sampler = DistributedSampler(train_ds, num_replicas=1, rank=0, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    loader = DataLoader(train_ds, batch_size=batch, sampler=sampler, drop_last=len(sampler) % batch == 1)
    return list(loader)


@pytest.mark.parametrize("kw", [{}, {"fraction": 0.3}, {"img_size": 40}])
def test_without_augmentation_batches_are_bit_identical(kw):
    train_ds, _, _ = build_data("cifar10-mini", augment=False, seed=5, **kw)
    ref = _reference_batches(train_ds, 128, seed=5, epoch=1)
    loader = DeviceLoader(train_ds, 128, seed=5)
    loader.set_epoch(1)
    ours = list(loader)
    assert len(ours) == len(ref)
    for (xa, ya), (xb, yb) in zip(ours, ref):
        assert xa.dtype == xb.dtype == torch.float32
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_test_split_batches_are_bit_identical():
    _, test_ds, _ = build_data("cifar10-mini")
    ref = list(DataLoader(test_ds, batch_size=100, shuffle=False))
    ours = list(DeviceLoader(test_ds, 100, shuffle=False))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ours, ref))
    assert len(ours) == len(ref)


# ------------------------------------------------------------------------------- augmentation statistics
def _crop_offsets(src, out, pad):
    """Recover each crop's (top, left) in padded coordinates by matching all candidates."""
    padded = torch.nn.functional.pad(src, (pad, pad, pad, pad))
    h, w = src.shape[-2:]
    offsets = []
    for img, o in zip(padded, out):
        hits = [
            (t, l)
            for t in range(2 * pad + 1)
            for l in range(2 * pad + 1)  # noqa: E741
            if torch.equal(img[:, t : t + h, l : l + w], o)
        ]
        assert len(hits) == 1
        offsets.append(hits[0])
    return offsets


def test_random_crop_offsets_are_uniform():
    n, size, pad = 2000, 6, 2
    # Distinct, non-zero pixels: every (top, left) gives a different crop.
    base = (torch.arange(3 * size * size).reshape(3, size, size) % 250 + 1).to(torch.uint8)
    src = base.expand(n, -1, -1, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    out = random_crop(src, g, size=(size, size), padding=(pad, pad, pad, pad))
    offsets = _crop_offsets(src[:1].expand(n, -1, -1, -1), out, pad)
    counts = torch.zeros(2 * pad + 1, 2 * pad + 1)
    for t, l in offsets:  # noqa: E741
        counts[t, l] += 1
    expected = n / counts.numel()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 51.2  # 24 degrees of freedom, p = 0.001


def test_random_crop_matches_v2_for_a_given_offset():
    """The gather equals pad-then-slice (what v2.RandomCrop does) at the offsets it drew."""
    ds = _tiny_dataset(64, size=8)
    g = torch.Generator().manual_seed(1)
    out = random_crop(ds.images, g, size=(8, 8), padding=(4, 4, 4, 4))
    g = torch.Generator().manual_seed(1)
    tops = torch.randint(0, 9, (64,), generator=g)
    lefts = torch.randint(0, 9, (64,), generator=g)
    for i in range(64):
        ref = v2.functional.crop(
            v2.functional.pad(ds.images[i], [4, 4, 4, 4]), int(tops[i]), int(lefts[i]), 8, 8
        )
        assert torch.equal(out[i], ref)


def test_flips_happen_half_the_time():
    n = 4000
    img = torch.arange(3 * 4 * 5, dtype=torch.uint8).reshape(1, 3, 4, 5).expand(n, -1, -1, -1)
    out = random_hflip(img, torch.Generator().manual_seed(0))
    flipped = (out == img.flip(-1)).flatten(1).all(1)
    kept = (out == img).flatten(1).all(1)
    assert bool((flipped ^ kept).all())
    share = flipped.float().mean().item()
    assert abs(share - 0.5) < 4 * math.sqrt(0.25 / n)


def test_random_erasing_probability_and_area():
    n, p = 4000, 0.4
    x = torch.ones(n, 3, 16, 16)
    out = random_erasing(x, torch.Generator().manual_seed(0), p=p, value=0.0)
    erased = (out == 0).all(1)  # (n, H, W): all channels erased together
    assert torch.equal((out == 0).any(1), erased)
    frac = erased.flatten(1).float().mean(1)
    hit = frac > 0
    assert abs(hit.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    # Rounding of h and w moves the area a little past the nominal (0.02, 0.33) of 256 pixels.
    assert frac[hit].min().item() >= 0.01 and frac[hit].max().item() <= 0.40


def test_augmented_epoch_depends_only_on_seed_and_epoch():
    """Exact resume: epoch 2's batches are the same after epochs 0-1 or straight away."""
    train_ds, _, _ = build_data("cifar10-mini", fraction=0.1, seed=0, random_erasing=0.5)
    a = DeviceLoader(train_ds, 64, seed=0)
    for epoch in range(3):
        a.set_epoch(epoch)
        batches_a = [x.clone() for x, _ in a]
    b = DeviceLoader(train_ds, 64, seed=0)
    b.set_epoch(2)
    batches_b = [x for x, _ in b]
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b))
    b.set_epoch(1)
    assert not torch.equal(next(iter(b))[0], batches_b[0])


def test_augmented_batch_is_normalised_like_the_dataloader():
    """Same per-channel statistics as the per-image path on the same images (within sampling error)."""
    train_ds, _, info = build_data("cifar10-mini", seed=0)
    ours = torch.cat([x for x, _ in DeviceLoader(train_ds, 500, seed=0)])
    torch.manual_seed(0)
    ref = torch.cat([x for x, _ in DataLoader(train_ds, batch_size=500)])
    assert ours.shape == ref.shape
    assert torch.allclose(ours.mean((0, 2, 3)), ref.mean((0, 2, 3)), atol=0.03)
    assert torch.allclose(ours.std((0, 2, 3)), ref.std((0, 2, 3)), atol=0.03)


# ------------------------------------------------------------------------------- choosing the path
def test_pipeline_translation_and_path_choice():
    train_ds, _, _ = build_data("cifar10-mini", randaugment="rand-m9-n2", random_erasing=0.25)
    assert batched_pipeline(train_ds.transform) is not None
    x, y = next(iter(DeviceLoader(train_ds, 32)))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (32,)
    cpu = torch.device("cpu")
    assert resolve_data_path("auto", train_ds, cpu) == "device"
    assert resolve_data_path("auto", train_ds, cpu, num_workers=2) == "dataloader"
    assert resolve_data_path("dataloader", train_ds, cpu) == "dataloader"
    rrc = TransformedDataset(train_ds.base, v2.Compose([v2.RandomResizedCrop(32)]))
    assert batched_pipeline(rrc.transform) is None
    assert resolve_data_path("auto", rrc, cpu) == "dataloader"
    with pytest.raises(DataError, match="dataloader"):
        resolve_data_path("device", rrc, cpu)
    with pytest.raises(ConfigError, match="auto, device, dataloader"):
        resolve_data_path("gpu", train_ds, cpu)


def test_randaugment_gives_each_image_one_of_torchvisions_own_outcomes():
    """num_ops=1: every output is torchvision's RandAugment op (some op, some sign) applied to that image,
    and the ops differ between images of one batch (drawn per image, not per batch)."""
    from vitlens.data.device_loader import batched_randaugment

    op = v2.RandAugment(num_ops=1, magnitude=9)
    imgs = _tiny_dataset(120, size=12, seed=2).images
    out = batched_randaugment(op)(imgs, torch.Generator().manual_seed(0))
    space = op._AUGMENTATION_SPACE
    matched = set()
    for i in range(len(imgs)):
        candidates = {}
        for name, (fn, signed) in space.items():
            mags = fn(op.num_magnitude_bins, 12, 12)
            m = float(mags[op.magnitude]) if mags is not None else 0.0
            for sign in (-1, 1) if signed else (1,):
                candidates[(name, sign)] = op._apply_image_or_video_transform(
                    imgs[i], name, sign * m, interpolation=op.interpolation, fill=op._fill
                )
        hits = [k for k, c in candidates.items() if torch.equal(c, out[i])]
        assert hits, f"image {i} is no RandAugment outcome"
        matched.update(h[0] for h in hits)
    assert len(matched) >= 10  # 120 images drew (nearly) all 14 ops


# ------------------------------------------------------------------------------- in the trainer
def _train(tmp_path, name, **kw):
    from vitlens.io import load_checkpoint
    from vitlens.train import TrainConfig, train

    values = dict(
        model="resnet8_cifar",
        model_args={"widths": [8, 16, 16]},
        data="cifar10-mini",
        fraction=0.05,
        epochs=2,
        batch_size=32,
        amp="fp32",
        progress=False,
        out=str(tmp_path / name),
    )
    values.update(kw)
    resume = values.pop("resume", False)
    summary = train(TrainConfig(**values), resume=resume)
    weights, _, _ = load_checkpoint(tmp_path / name / "checkpoints" / "last.safetensors")
    return summary, weights


def test_training_on_the_device_equals_the_dataloader_path_without_augmentation(tmp_path):
    """Same batches in the same order => bit-identical weights and the same test accuracy."""
    a, wa = _train(tmp_path, "device", augment=False, data_path="device")
    b, wb = _train(tmp_path, "loader", augment=False, data_path="dataloader")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["test_top1"] == b["test_top1"] and a["train_images"] == b["train_images"] == 100


def test_resume_on_the_device_path_is_exact(tmp_path):
    """Augmented (crop, flip, erasing) on the device: 1 epoch + stop + resume == 3 epochs straight."""
    kw = dict(epochs=3, random_erasing=0.5, data_path="device")
    _, straight = _train(tmp_path, "straight", **kw)
    first = _train(tmp_path, "resumed", stop_after_epochs=1, **kw)[0]
    assert first["finished"] is False
    _, resumed = _train(tmp_path, "resumed", resume=True, **kw)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_flip_tta_evaluates_the_mean_of_image_and_mirror_logits():
    from vitlens.train.trainer import evaluate

    class MirrorProbe(torch.nn.Module):
        """Logits from the left half of the image only: a flip changes them."""

        def forward(self, x):
            return x[..., : x.shape[-1] // 2].mean(dim=(1, 2))[:, :10]

    _, test_ds, _ = build_data("cifar10-mini")
    model = MirrorProbe()
    plain = evaluate(model, test_ds, batch_size=100, device=torch.device("cpu"))
    tta = evaluate(model, test_ds, batch_size=100, device=torch.device("cpu"), tta="flip", data_path="device")
    x, y = next(iter(DataLoader(test_ds, batch_size=500)))
    logits = (model(x) + model(x.flip(-1))) / 2
    expected = 100 * (logits.argmax(1) == y).float().mean().item()
    assert tta["top1"] == pytest.approx(expected) and tta["n"] == plain["n"] == 500
