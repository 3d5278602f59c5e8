"""Analyses split across processes (gloo, CPU): the numbers of one process, whatever the world size.

Each test spawns real processes with ``torch.multiprocessing`` on a free port; every process
builds the same tiny float64 models from one seed, runs CKA / attention statistics / probes on
its share of the batches, and saves what it got. The reference is the same call in this (single)
process. float64 everywhere, so per-batch results are identical and only the order of the final
additions differs: equality to 1e-9.
"""

from __future__ import annotations

import json
import os
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dist import free_port

from vitlens.analysis import cka_matrix, localization_probes, mean_attention_distance
from vitlens.analysis.distributed import RankBatches, RankFailedError
from vitlens.models import create_model

CKA_VARIANTS = [("linear", False), ("linear", True), ("rbf", False), ("rbf", True)]


# ----------------------------------------------------------------------------- what every process computes
def _models():
    torch.manual_seed(0)
    vit = create_model("vit_micro_patch4_32", num_classes=4).double().eval()
    cnn = create_model("resnet8_cifar", num_classes=4).double().eval()
    return vit, cnn


def _loader(n: int, batch_size: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


def _analyses(n: int, batch_size: int) -> dict:
    vit, cnn = _models()
    data = _loader(n, batch_size)
    out = {}
    for kernel, debiased in CKA_VARIANTS:
        m, _, _ = cka_matrix(
            vit, cnn, data, kernel=kernel, debiased=debiased, gram_dtype=torch.float64, progress=False
        )
        out[f"cka_{kernel}_{debiased}"] = m
    out["cka_self"] = cka_matrix(vit, data, gram_dtype=torch.float64, progress=False)[0]
    # a plain list of batches (not a DataLoader): each rank keeps its own from the whole list
    out["attention"] = mean_attention_distance(vit, list(data))
    probes = localization_probes(vit, data, _loader(n, batch_size, seed=2), max_images=None)
    out["probe_class"] = np.array([r["class_acc"] for r in probes.values()])
    out["probe_position"] = np.array([r["position_acc"] for r in probes.values()])
    out["probe_tokens"] = np.array([r["train_tokens"] for r in probes.values()], dtype=float)
    out["images_per_rank"] = np.array(RankBatches(data).images_per_rank, dtype=float)
    return out


def _ragged(n: int, batch_size: int) -> dict:
    """Debiased CKA on data whose last batch has < 4 images: skipped with a warning wherever it lands."""
    vit, cnn = _models()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m, _, _ = cka_matrix(vit, cnn, _loader(n, batch_size), gram_dtype=torch.float64, progress=False)
    skipped = any("skipping a batch" in str(w.message) for w in caught)
    return {"cka": m, "warned": np.array([float(skipped)])}


def _fail_on_rank_1(n: int, batch_size: int) -> dict:
    """Rank 1 dies before the sum; rank 0 must stop with a clear error, not wait forever."""
    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    vit, cnn = _models()
    cka_matrix(vit, cnn, _loader(n, batch_size), gram_dtype=torch.float64, progress=False)
    return {}


def _analyses_and_ragged(n: int, batch_size: int) -> dict:
    return {**_analyses(n, batch_size), **{f"ragged_{k}": v for k, v in _ragged(10, 4).items()}}


TASKS = {"analyses": _analyses, "analyses_and_ragged": _analyses_and_ragged, "fail": _fail_on_rank_1}


def _worker(rank: int, world_size: int, port: int, task: str, n: int, batch_size: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=_timedelta(30))
    path = Path(out_dir) / f"rank{rank}"
    t0 = time.monotonic()
    try:
        result = TASKS[task](n, batch_size)
        torch.save(result, path.with_suffix(".pt"))
    except BaseException as e:  # noqa: BLE001 - reported to the test, then re-raised
        path.with_suffix(".err").write_text(
            json.dumps(
                {
                    "type": type(e).__name__,
                    "message": str(e),
                    "seconds": time.monotonic() - t0,
                    "traceback": traceback.format_exc(),
                }
            )
        )
        raise
    finally:
        if rank != 1 or task != "fail":
            dist.destroy_process_group()


def _timedelta(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)


def _context():
    """Fresh processes forked from a server that has imported torch and vitlens once (and run nothing):
    as clean as "spawn", without paying the imports (~10 s on a loaded 2-core machine) per process."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "vitlens.analysis", "vitlens.models"])
    return ctx


def _spawn(tmp_path: Path, world_size: int, task: str, n: int, batch_size: int, expect_ok: bool = True):
    ctx = _context()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, task, n, batch_size, str(tmp_path)))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} process(es) still running after 240 s: a hang"
    if expect_ok:
        for r, p in enumerate(procs):
            err = tmp_path / f"rank{r}.err"
            assert p.exitcode == 0, err.read_text() if err.exists() else f"rank {r} exit code {p.exitcode}"
        return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    return procs


def _assert_same(got: dict, ref: dict, keys) -> None:
    for k in keys:
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-9, err_msg=k)


# ----------------------------------------------------------------------------- tests
pytestmark = pytest.mark.usefixtures("one_thread")


KEYS = [f"cka_{k}_{d}" for k, d in CKA_VARIANTS] + [
    "cka_self",
    "attention",
    "probe_class",
    "probe_position",
    "probe_tokens",
]


def test_two_processes_equal_one(tmp_path):
    """CKA (linear/RBF, biased/debiased, and within one model), mean attention distance per head and
    probe accuracies: 2 processes on 4 batches equal the single-process numbers to 1e-9 on every rank.

    Also a batch too small for debiased CKA (10 images in batches of 4: the last has 2): whichever
    rank holds it skips it with a warning, exactly as one process does, so the matrices agree."""
    ref = _analyses(16, 4)
    with pytest.warns(UserWarning, match="skipping a batch of 2"):
        vit, cnn = _models()
        ragged = cka_matrix(vit, cnn, _loader(10, 4), gram_dtype=torch.float64, progress=False)[0]
    results = _spawn(tmp_path, 2, "analyses_and_ragged", 16, 4)
    for got in results:
        _assert_same(got, ref, KEYS)
        np.testing.assert_array_equal(np.diag(got["cka_self"]), 1.0)
        np.testing.assert_allclose(got["ragged_cka"], ragged, rtol=0, atol=1e-9)
    assert results[0]["images_per_rank"].tolist() == [8, 8]  # whole batches: rank r takes r, r + 2
    # batches 0, 1, 2: the 2-image batch 2 belongs to rank 0, which warned; rank 1 did not
    assert [float(r["ragged_warned"][0]) for r in results] == [1.0, 0.0]
    # the statistics are not trivially equal: the CKA variants differ from each other
    assert not np.allclose(ref["cka_linear_True"], ref["cka_rbf_True"], atol=1e-3)
    assert ref["attention"].shape == (4, 4) and np.all(ref["attention"] > 0)


def test_three_processes_on_two_batches_one_idle(tmp_path):
    """More processes than batches: rank 2 gets no image, adds zeros, and still returns the result."""
    ref = _analyses(8, 4)
    results = _spawn(tmp_path, 3, "analyses", 8, 4)
    for got in results:
        _assert_same(got, ref, KEYS)
    assert results[2]["images_per_rank"].tolist() == [4, 4, 0]


def test_a_failing_rank_stops_the_others_with_a_clear_error(tmp_path):
    procs = _spawn(tmp_path, 2, "fail", 8, 4, expect_ok=False)
    assert procs[0].exitcode != 0 and procs[1].exitcode != 0
    err = json.loads((tmp_path / "rank0.err").read_text())
    assert err["type"] == RankFailedError.__name__, err["traceback"]
    assert "another rank failed" in err["message"] and "rank 0 of 2" in err["message"]
    assert err["seconds"] < 60  # well before anything that could be called a hang


def test_same_cka_command_twice_gives_identical_json(tmp_path):
    """A model built from a name has seeded random weights: the same command, the same bytes;
    another --seed, other weights. The JSON says how the numbers were made."""
    from vitlens.cli import main as cli_main

    args = ["cka", "vit_micro_patch4_32", "--max-images", "16", "--batch-size", "8", "--device", "cpu"]
    for out in ("a", "b"):
        assert cli_main([*args, "--out", str(tmp_path / out)]) == 0
    assert cli_main([*args, "--seed", "1", "--out", str(tmp_path / "c")]) == 0
    first, second = ((tmp_path / d / "cka.json").read_bytes() for d in ("a", "b"))
    assert first == second
    a, c = (json.loads((tmp_path / d / "cka.json").read_text()) for d in ("a", "c"))
    assert not np.allclose(a["matrix"], c["matrix"], atol=1e-6)
    run = a["run"]
    assert run["seed"] == 0 and c["run"]["seed"] == 1 and run["world_size"] == 1
    assert run["images"] == 16 and run["images_per_rank"] == [16] and run["batches"] == 2
    assert run["indices_fingerprint"] == c["run"]["indices_fingerprint"]  # same images, other weights


# ----------------------------------------------------------------------------- the pieces, without processes
def _as_rank(monkeypatch, rank: int, world_size: int) -> None:
    import vitlens.analysis.distributed as d

    monkeypatch.setattr(d, "world", lambda: (rank, world_size))


@pytest.mark.parametrize("as_list", [False, True])
def test_rank_batches_are_whole_batches_of_the_single_process_cut(monkeypatch, as_list):
    """10 items in batches of 3 -> [0 1 2] [3 4 5] [6 7 8] [9]; rank 1 of 2 takes batches 1 and 3.
    With max_images=8 one process sees [0 1 2] [3 4 5] [6 7]: rank 1 takes only [3 4 5]."""
    from vitlens.analysis.distributed import RankBatches

    loader = torch.utils.data.DataLoader(torch.arange(10), batch_size=3, shuffle=False)
    data = list(loader) if as_list else loader
    _as_rank(monkeypatch, 1, 2)
    rb = RankBatches(data)
    assert [b.tolist() for b in rb] == [[3, 4, 5], [9]]
    assert rb.images_per_rank == [6, 4]
    cut = RankBatches(data, max_images=8)
    assert [b.tolist() for b in cut] == [[3, 4, 5]] and cut.images_per_rank == [5, 3]
    _as_rank(monkeypatch, 0, 2)
    assert [b.tolist() for b in RankBatches(data, max_images=8)] == [[0, 1, 2], [6, 7]]
    _as_rank(monkeypatch, 3, 4)  # more ranks than the 3 batches: nothing for rank 3
    idle = RankBatches(data, max_batches=3)
    assert list(idle) == [] and idle.images_per_rank == [3, 3, 3, 0]


def test_rank_batches_refuse_a_shuffling_loader_across_processes(monkeypatch):
    from vitlens.analysis.distributed import RankBatches

    loader = torch.utils.data.DataLoader(torch.arange(10), batch_size=3, shuffle=True)
    _as_rank(monkeypatch, 0, 2)
    with pytest.raises(ValueError, match="shuffle=False"):
        RankBatches(loader)


def test_image_subset_is_the_seeded_sorted_sample_and_is_vit_one_rule():
    import timm
    import torchvision
    from transformers import ViTConfig, ViTModel

    from vitlens.analysis.common import batch_images, indices_fingerprint, is_vit, subset_indices

    # the subset every command and the study use: sorted first k of a seed-0 permutation
    expected = sorted(torch.randperm(100, generator=torch.Generator().manual_seed(0))[:7].tolist())
    assert subset_indices(100, 7) == expected and subset_indices(5, 7) == [0, 1, 2, 3, 4]
    assert indices_fingerprint(expected) == indices_fingerprint(list(expected))
    assert indices_fingerprint(expected) != indices_fingerprint(expected[:-1])
    vit, cnn = _models()
    hf = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            image_size=32, patch_size=8))  # fmt: skip
    assert [is_vit(m) for m in (vit, timm.create_model("vit_tiny_patch16_224"), hf)] == [True] * 3
    assert [is_vit(m) for m in (cnn, torchvision.models.resnet18())] == [False, False]
    x = torch.zeros(2, 3, 4, 4)
    for batch in (x, (x, torch.zeros(2)), [x], {"pixel_values": x}, {"image": x, "label": 1}):
        assert batch_images(batch) is x
    with pytest.raises(TypeError, match="cannot find images"):
        batch_images({"labels": x})


# ----------------------------------------------------------------------------- the study's analysis phase
def _study_worker(rank: int, world_size: int, port: int, study_dir: str, out: str) -> None:
    """What `torchrun -m vitlens study` does after training: every rank joins the analyses."""
    from vitlens.study.config import StudyConfig
    from vitlens.study.run import analyse

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    cfg = StudyConfig.load(Path(study_dir) / "study_config.yaml")
    result = analyse(cfg, Path(study_dir), [], log=lambda *_: None)
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def test_study_analysis_phase_under_two_processes_equals_one(tmp_path):
    """Train a two-model smoke study once, analyse it in this process, then again with two
    processes joined through torchrun's environment variables: rank 0 writes the same numbers."""
    import shutil

    from vitlens.study.config import ModelSpec, StudyConfig
    from vitlens.study.run import analyse, train_all

    one = tmp_path / "one"
    cfg = StudyConfig.load(preset="smoke", fractions=[0.5], out=str(one))
    cfg.models = [m for m in cfg.models if m.label in ("ViT-CLS", "ResNet")]
    assert all(isinstance(m, ModelSpec) for m in cfg.models)
    one.mkdir()
    cfg.save(one / "study_config.yaml")
    train_all(cfg, one, 2000, log=lambda *_: None)
    two = tmp_path / "two"
    shutil.copytree(one / "runs", two / "runs")
    shutil.copy(one / "study_config.yaml", two / "study_config.yaml")
    ref = json.loads(json.dumps(analyse(cfg, one, [], log=lambda *_: None)))

    ctx, port = _context(), free_port()
    procs = [
        ctx.Process(target=_study_worker, args=(r, 2, port, str(two), str(tmp_path / "two.json")))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    got = json.loads((tmp_path / "two.json").read_text())
    assert got["vit_labels"] == ref["vit_labels"] == ["ViT-CLS"]
    assert sorted(p.name for p in (two / "analysis").iterdir()) == sorted(
        p.name for p in (one / "analysis").iterdir()
    )  # rank 0 wrote every analysis file, nothing more
    for label in ("ViT-CLS", "ResNet"):
        np.testing.assert_allclose(
            got["cka"]["within"][label]["matrix"], ref["cka"]["within"][label]["matrix"], atol=1e-9
        )
        for layer, acc in ref["probes"][label].items():
            assert got["probes"][label][layer] == pytest.approx(acc, abs=1e-9)
    np.testing.assert_allclose(got["cka"]["cross"][0]["matrix"], ref["cka"]["cross"][0]["matrix"], atol=1e-9)
    np.testing.assert_allclose(
        got["attention_distance"]["ViT-CLS"]["0.5"], ref["attention_distance"]["ViT-CLS"]["0.5"], atol=1e-9
    )


def test_torchrun_cka_command_equals_one_process_and_only_rank_0_writes(tmp_path):
    """The real launcher: `torchrun --nproc_per_node=2 -m vitlens cka A B` joins through torchrun's
    rendezvous, prints and writes once, and its matrix is the single-process one (one thread per
    process in both, as torchrun sets it, so the float32 forwards agree batch for batch)."""
    import subprocess
    import sys

    from vitlens.cli import main as cli_main

    args = ["cka", "vit_micro_patch4_32", "resnet8_cifar", "--max-images", "32", "--batch-size", "8"]
    args += ["--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = subprocess.run(
        [*cmd, "-m", "vitlens", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("wrote ") == 1  # rank 0 alone
    assert cli_main([*args, "--out", str(tmp_path / "one")]) == 0
    one, two = (json.loads((tmp_path / d / "cka.json").read_text()) for d in ("one", "two"))
    np.testing.assert_allclose(two["matrix"], one["matrix"], rtol=0, atol=1e-9)
    assert two["run"]["world_size"] == 2 and two["run"]["images_per_rank"] == [16, 16]
    assert two["run"]["indices_fingerprint"] == one["run"]["indices_fingerprint"]
