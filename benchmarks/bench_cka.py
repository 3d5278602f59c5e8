"""Benchmark: layer x layer linear CKA between ViT-S/16 and ResNet-50, vitlens vs the `torch-cka` package.

What is measured (every phase in its own fresh subprocess, so each peak RSS is that phase's own):

(a) forward: both models' forward passes alone over N images (no hooks) -- the floor;
(b) ours: ``vitlens.analysis.cka_matrix`` over the same N images, one data pass;
(c) torch-cka: ``torch_cka.CKA(...).compare`` on the first M <= N images, extrapolated
    linearly to N (its cost is per batch, so time scales with the number of batches);
    the package's matrix and ours (float32 Grams) are compared with ours in float64 on those images;
(d) memory: peak RSS of (b) at N and at 2N images, and RSS after each batch -- flat in N.

Wall and process-CPU seconds are both reported. On a shared machine, CPU time is the steadier
figure, but with 2 threads it is inflated by OpenMP threads spin-waiting for a descheduled
sibling (worse for many small ops than for a few big convolutions); --threads 1 gives the
cleanest ratio of work.

Layers: every ViT block (12) x every ResNet-50 bottleneck (16), full representations
(``token_policy="flatten"``, which is what torch-cka does). Images: CIFAR-10 test JPEGs from
``../shared/data`` upsampled to --img-size (random noise if the archive is missing or --data random).

    python benchmarks/bench_cka.py                 # N=512, batch 64, 224 px (~15-30 min on 2 cores)
    python benchmarks/bench_cka.py --quick         # N=64, batch 32, 112 px, smoke test (~3 min)
    python benchmarks/bench_cka.py --threads 1 --skip-torch-cka --skip-memory   # just (a) vs (b)
    python benchmarks/bench_cka.py --nproc 2       # `vitlens cka` under torchrun, 2 processes vs 1

Models use random weights (nothing can be downloaded here); speed does not depend on them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
CIFAR_TEST = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-test.tar.gz"
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- data
def load_cifar_uint8(n: int, source: str) -> torch.Tensor:
    """n CIFAR-10 test images (evenly spread over the 10 classes) as uint8 (n, 3, 32, 32)."""
    if source == "cifar" and CIFAR_TEST.is_file():
        from PIL import Image

        with tarfile.open(CIFAR_TEST) as tar:
            members = sorted((m for m in tar.getmembers() if m.name.endswith(".jpg")), key=lambda m: m.name)
            if n > len(members):
                raise SystemExit(
                    f"--images {n} exceeds the {len(members)} CIFAR-10 test images; use --data random"
                )
            picks = np.linspace(0, len(members) - 1, n).round().astype(int)
            arrays = [
                np.asarray(Image.open(io.BytesIO(tar.extractfile(members[i]).read())).convert("RGB"))
                for i in picks
            ]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


class UpsampledBatches(torch.utils.data.Dataset):
    """Each item is a whole batch ``(images, labels)``, upsampled to ``size`` on the fly.

    Used with ``DataLoader(batch_size=None)``: one loader for every phase (torch-cka needs a
    real DataLoader), and only the small uint8 originals live in memory -- never N upsampled images.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, size: int):
        self.images, self.batch_size, self.size = images, batch_size, size

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int):
        x = self.images[i * self.batch_size : (i + 1) * self.batch_size].float().div_(255)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - IMAGENET_MEAN) / IMAGENET_STD, torch.zeros(len(x), dtype=torch.long)

    def __repr__(self) -> str:  # torch-cka records dataset.__repr__()
        return f"UpsampledBatches({len(self.images)} images, {self.size}px)"


def make_loader(n: int, args) -> torch.utils.data.DataLoader:
    ds = UpsampledBatches(load_cifar_uint8(n, args.data), args.batch_size, args.img_size)
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)


# --------------------------------------------------------------------------- models
def build_models(img_size: int):
    """ViT-S/16 (vitlens if available, else timm; identical module names) and torchvision ResNet-50."""
    import torchvision

    torch.manual_seed(0)  # the same random weights in every phase's process
    try:
        from vitlens.models import create_model

        vit, vit_src = create_model("vit_small_patch16_224", img_size=img_size), "vitlens"
    except Exception:  # pragma: no cover - vitlens models not built yet
        import timm

        vit, vit_src = timm.create_model("vit_small_patch16_224", img_size=img_size), "timm"
    cnn = torchvision.models.resnet50()
    layers_vit = [f"blocks.{i}" for i in range(len(vit.blocks))]
    layers_cnn = [f"layer{s}.{b}" for s in range(1, 5) for b in range(len(getattr(cnn, f"layer{s}")))]
    return vit.eval(), cnn.eval(), layers_vit, layers_cnn, vit_src


class Timer:
    """Wall-clock and process CPU seconds (user + sys) of a block.

    CPU time is reported too because on a shared machine other processes stretch wall time
    but not (much) the CPU time our own threads consume.
    """

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, self._cpu() - self.cpu

    @staticmethod
    def _cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def result(self) -> dict:
        return {"seconds": self.wall, "cpu_seconds": self.cpu}


def warm_up(models, img_size: int) -> None:
    """One small forward per model, so one-time kernel/allocator setup is not timed."""
    x = torch.randn(4, 3, img_size, img_size)
    with torch.inference_mode():
        for m in models:
            m(x)


# --------------------------------------------------------------------------- phases (child processes)
def phase_forward(args) -> dict:
    vit, cnn, *_ = build_models(args.img_size)
    loader = make_loader(args.images, args)
    warm_up([vit, cnn], args.img_size)
    with Timer() as t, torch.inference_mode():
        for x, _ in loader:
            vit(x)
            cnn(x)
    return t.result()


def current_rss_mb() -> float:
    """Resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


class RssTrace:
    """Wraps a loader; records the RSS each time the next batch is requested (= after the previous one)."""

    def __init__(self, loader):
        self.loader, self.trace = loader, []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch
            self.trace.append(current_rss_mb())


def phase_ours(args) -> dict:
    from vitlens.analysis import cka_matrix

    vit, cnn, la, lb, vit_src = build_models(args.img_size)
    loader = RssTrace(make_loader(args.images, args))
    warm_up([vit, cnn], args.img_size)
    gram_dtype = {"float32": torch.float32, "float64": torch.float64}[args.gram_dtype]
    with Timer() as t:
        m, _, _ = cka_matrix(
            vit,
            cnn,
            loader,
            layers_a=la,
            layers_b=lb,
            token_policy="flatten",
            progress=False,
            gram_dtype=gram_dtype,
        )
    return {
        **t.result(),
        "matrix": m.tolist(),
        "vit_source": vit_src,
        "shape": list(m.shape),
        "rss_trace": loader.trace,
    }


def phase_torch_cka(args) -> dict:
    """torch-cka on args.images images, plus our matrix on the same images for agreement."""
    from torch_cka import CKA

    from vitlens.analysis import cka_matrix

    vit, cnn, la, lb, _ = build_models(args.img_size)
    loader = make_loader(args.images, args)
    warm_up([vit, cnn], args.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "dataloader2 not given", identical-name warnings
        ref = CKA(
            vit, cnn, model1_name="vit_small", model2_name="resnet50", model1_layers=la, model2_layers=lb
        )
        # torch-cka runs its forwards with autograd on (its README calls compare() as is); by
        # default we wrap it in no_grad, which can only make it faster. --torch-cka-autograd: as shipped.
        with Timer() as t, torch.set_grad_enabled(args.torch_cka_autograd):
            ref.compare(loader)
    theirs = ref.export()["CKA"].double().numpy()
    for mod in (*vit.modules(), *cnn.modules()):  # torch-cka never removes its hooks
        mod._forward_hooks.clear()
    ours = {
        dt: cka_matrix(vit, cnn, loader, layers_a=la, layers_b=lb, progress=False, gram_dtype=dt)[0]
        for dt in (torch.float32, torch.float64)
    }
    return {
        **t.result(),
        "max_abs_diff_vs_ours": float(np.abs(ours[torch.float32] - theirs).max()),
        "max_abs_diff_ours_f32_vs_f64": float(np.abs(ours[torch.float32] - ours[torch.float64]).max()),
        "max_abs_diff_torch_cka_vs_f64": float(np.abs(theirs - ours[torch.float64]).max()),
        "matrix": theirs.tolist(),
    }


PHASES = {"forward": phase_forward, "ours": phase_ours, "torch_cka": phase_torch_cka}


def run_child(phase: str, images: int, args) -> dict:
    """Run one phase in a fresh interpreter; it reports its result and its own peak RSS."""
    cmd = [
        sys.executable,
        __file__,
        "--_phase",
        phase,
        "--images",
        str(images),
        "--batch-size",
        str(args.batch_size),
        "--img-size",
        str(args.img_size),
        "--threads",
        str(args.threads),
        "--data",
        args.data,
        "--gram-dtype",
        args.gram_dtype,
        *(["--torch-cka-autograd"] if args.torch_cka_autograd else []),
    ]
    print(f"  running {phase} on {images} images ...", flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report
def report(res: dict, n: int, m_tc: int, args) -> None:
    f, o = res["forward"], res["ours"]
    row = "{:<30}: {:8.1f} s wall {:8.1f} s CPU   peak RSS {:6.0f} MB"
    print()
    print(row.format("(a) forward passes only", f["seconds"], f["cpu_seconds"], f["peak_rss_mb"]))
    print(
        row.format("(b) vitlens cka_matrix", o["seconds"], o["cpu_seconds"], o["peak_rss_mb"])
        + f"   (matrix {o['shape'][0]}x{o['shape'][1]}, ViT from {o['vit_source']})"
    )
    print(
        f"    ours / forward            : {o['seconds'] / f['seconds']:6.3f} wall, "
        f"{o['cpu_seconds'] / f['cpu_seconds']:6.3f} CPU   (target <= 1.25)"
    )
    if "torch_cka" in res:
        t = res["torch_cka"]
        ew, ec = t["extrapolated_seconds"], t["extrapolated_cpu_seconds"]
        print(row.format("(c) torch-cka 0.21", ew, ec, t["peak_rss_mb"]))
        how = "measured on all N"
        if m_tc < n:
            how = f"measured on {m_tc} images: {t['seconds']:.1f} s wall / {t['cpu_seconds']:.1f} s CPU"
            how += f", x{n / m_tc:g}"
        mode = "as shipped, autograd on" if args.torch_cka_autograd else "under torch.no_grad: its best case"
        print(f"    ({how}; {mode})")
        print(
            f"    torch-cka / ours          : {ew / o['seconds']:6.2f} wall, {ec / o['cpu_seconds']:6.2f} CPU"
            "   (target >= 5)"
        )
        ovh_ours, ovh_tc = o["cpu_seconds"] - f["cpu_seconds"], ec - f["cpu_seconds"]
        if ovh_ours > 0:
            print(
                f"    CPU time beyond the forward passes: ours {ovh_ours:.1f} s, torch-cka {ovh_tc:.1f} s "
                f"({ovh_tc / ovh_ours:.1f}x)"
            )
        print(
            f"    same {m_tc} images, max abs difference to our float64-Gram matrix: ours (float32 Grams) "
            f"{t['max_abs_diff_ours_f32_vs_f64']:.1e}, torch-cka {t['max_abs_diff_torch_cka_vs_f64']:.1e}"
        )
    if "ours_2n" in res:
        o2 = res["ours_2n"]
        print(
            f"(d) peak RSS of ours: N={n}: {o['peak_rss_mb']:.0f} MB, 2N={2 * n}: {o2['peak_rss_mb']:.0f} MB "
            f"({o2['peak_rss_mb'] / o['peak_rss_mb']:.3f}x); 2N took {o2['seconds']:.1f} s wall, "
            f"{o2['cpu_seconds']:.1f} s CPU"
        )
        tr = o2["rss_trace"]
        half = len(tr) // 2
        print(
            f"    RSS after each batch of the 2N run: first half max {max(tr[:half] or [0]):.0f} MB, "
            f"second half max {max(tr[half:] or [0]):.0f} MB (min {min(tr):.0f}, last {tr[-1]:.0f})"
        )
        diff = np.abs(np.array(o2["matrix"]) - np.array(o["matrix"])).max()
        print(f"    max |CKA(2N) - CKA(N)| = {diff:.3f} (N and 2N are different image samples)")


# --------------------------------------------------------------------------- --nproc: torchrun vs one process
def _cka_command(args, out: Path) -> list[str]:
    return [
        "-m", "vitlens", "cka", *args.nproc_models, "--max-images", str(args.images),
        "--batch-size", str(args.batch_size), "--device", args.device, "--data", "cifar10",
        "--data-dir", str(CIFAR_TEST.parent), "--out", str(out),
    ]  # fmt: skip


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _timed(cmd: list[str], env: dict) -> dict:
    """Wall seconds and CPU seconds (user + sys of every process the command started, launcher included)."""
    wall, cpu = time.perf_counter(), _children_cpu()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall, cpu = time.perf_counter() - wall, _children_cpu() - cpu
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    workers = [
        float(u) + float(s)
        for u, s in (line.split()[1:3] for line in out.stderr.splitlines() if line.startswith("BENCH_CPU "))
    ]
    return {"seconds": wall, "cpu_seconds": cpu, "worker_cpu_seconds": workers}


def nproc_benchmark(args) -> dict:
    """`vitlens cka` end to end (process start, data, models, CKA, files): one process vs N under torchrun.

    Every process runs with ``--threads`` threads (torchrun sets OMP_NUM_THREADS=1 for its workers,
    so the default is 1 for both), which also makes their float32 arithmetic identical, batch for
    batch: the matrices must agree to float64 rounding. CPU time is counted from the OS (rusage of
    the child processes, and /usr/bin/time around each torchrun worker), so load from other users
    of the machine stretches wall time but hardly the CPU figures.
    """
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(
            f"  one process: vitlens cka {' '.join(args.nproc_models)} on {args.images} images ...",
            flush=True,
        )
        one = _timed([sys.executable, *_cka_command(args, tmp / "one")], env)
        one["worker_cpu_seconds"] = [one["cpu_seconds"]]
        print(f"  {args.nproc} processes under torchrun ...", flush=True)
        torchrun = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
            "--no-python", "/usr/bin/time", "-f", "BENCH_CPU %U %S", sys.executable,
        ]  # fmt: skip
        many = _timed([*torchrun, *_cka_command(args, tmp / "many")], env)
        m1, mn = (json.loads((tmp / d / "cka.json").read_text()) for d in ("one", "many"))
    diff = float(np.abs(np.array(m1["matrix"]) - np.array(mn["matrix"])).max())
    res = {"one": one, "many": many, "max_abs_diff": diff, "run_one": m1["run"], "run_many": mn["run"]}
    w1, wn = sum(one["worker_cpu_seconds"]), sum(many["worker_cpu_seconds"])
    print(
        f"\nvitlens cka {' '.join(args.nproc_models)}, {args.images} CIFAR-10 test images, batch "
        f"{args.batch_size}, {args.threads} thread(s) per process, device {args.device}\n"
        f"  1 process : {one['seconds']:7.1f} s wall, {w1:7.1f} s CPU\n"
        f"  {args.nproc} processes: {many['seconds']:7.1f} s wall, {wn:7.1f} s CPU in the workers "
        f"({' + '.join(f'{c:.1f}' for c in many['worker_cpu_seconds'])}), {many['cpu_seconds']:.1f} s with "
        f"the torchrun launcher\n"
        f"  wall {one['seconds'] / many['seconds']:.2f}x faster; worker CPU {wn / w1:.2f}x one process's "
        f"(with launcher {many['cpu_seconds'] / w1:.2f}x); images per rank {mn['run']['images_per_rank']}\n"
        f"  max |CKA(1 process) - CKA({args.nproc} processes)| = {diff:.1e}"
    )
    return res


# --------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--images", type=int, default=None, help="N images (default 512; quick: 64)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 64; quick: 32)")
    p.add_argument(
        "--img-size", type=int, default=None, help="image side in pixels (default 224; quick: 112)"
    )
    p.add_argument(
        "--torch-cka-images",
        type=int,
        default=None,
        help="images for torch-cka, extrapolated linearly to N (default min(N, 2 batches))",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--data", choices=["cifar", "random"], default="cifar")
    p.add_argument(
        "--gram-dtype",
        choices=["float32", "float64"],
        default="float32",
        help="dtype of our per-batch Gram products (accumulation is always float64)",
    )
    p.add_argument(
        "--torch-cka-autograd",
        action="store_true",
        help="run torch-cka as shipped, with autograd on (default: under torch.no_grad, its best case)",
    )
    p.add_argument("--skip-memory", action="store_true", help="skip the 2N-image memory run")
    p.add_argument("--skip-torch-cka", action="store_true")
    p.add_argument("--quick", action="store_true", help="small smoke run: N=64, batch 32, 112 px")
    p.add_argument("--json", type=Path, default=None, help="also write all results to this file")
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="instead: `vitlens cka` end to end, one process vs NPROC under torchrun (wall, CPU, agreement)",
    )
    p.add_argument(
        "--nproc-models",
        nargs=2,
        default=["vit_micro_patch4_32", "resnet8_cifar"],
        help="the model pair for --nproc (small, so that it takes minutes)",
    )
    p.add_argument("--device", default="cpu", help="--nproc: cpu (gloo) or cuda (NCCL)")
    p.add_argument("--_phase", choices=list(PHASES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.nproc:
        args.images = args.images or 1024
        args.batch_size = args.batch_size or 64
        args.threads = 1 if args.threads == 2 and "--threads" not in sys.argv else args.threads
        res = nproc_benchmark(args)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        return
    quick = args.quick
    args.images = args.images or (64 if quick else 512)
    args.batch_size = args.batch_size or (32 if quick else 64)
    args.img_size = args.img_size or (112 if quick else 224)
    torch.set_num_threads(args.threads)

    if args._phase:  # child process: run one phase, print one JSON line
        result = PHASES[args._phase](args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    n, b = args.images, args.batch_size
    m_tc = min(n, args.torch_cka_images or 2 * b)
    data_note = (
        "CIFAR-10 test JPEGs" if args.data == "cifar" and CIFAR_TEST.is_file() else "random uint8 images"
    )
    print(
        f"CKA benchmark: ViT-S/16 (12 blocks) x ResNet-50 (16 bottlenecks), linear debiased minibatch CKA,\n"
        f"  token_policy=flatten, N={n} {data_note} upsampled to {args.img_size}px, batch {b}, "
        f"{args.threads} threads, {os.cpu_count()} CPUs, torch {torch.__version__}, gram {args.gram_dtype}"
    )
    res = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    res["forward"] = run_child("forward", n, args)
    res["ours"] = run_child("ours", n, args)
    if not args.skip_torch_cka:
        res["torch_cka"] = run_child("torch_cka", m_tc, args)
        res["torch_cka"]["images"] = m_tc
        for k in ("seconds", "cpu_seconds"):  # its cost is per batch: linear in the number of images
            res["torch_cka"]["extrapolated_" + k] = res["torch_cka"][k] * n / m_tc
    if not args.skip_memory:
        res["ours_2n"] = run_child("ours", 2 * n, args)
    report(res, n, m_tc, args)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
