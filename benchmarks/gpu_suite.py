"""The GPU suite (issue 13): every GPU figure of the project from one command, inside one device lease.

    bash benchmarks/gpu_suite.sh                 # on the GPU machine: writes $OUT/gpu_suite.json (+ .log)
    bash benchmarks/gpu_suite.sh --dry-run       # anywhere, CPU, tiny sizes (tests/test_gpu_suite.py)

Parts, in priority order; each runs in its own process with its own timeout, and the JSON is
rewritten after each part, so a part that fails or hangs costs only itself:

    setup        the machine (GPU, torch, timm), the measured bf16 matrix-product peak, and the
                 decoded CIFAR-10 cache every later part reads
    throughput   vitlens vs timm training img/s and MFU: ViT-Ti/4 at 32 px and ViT-S/16 at 224 px,
                 bf16, eager and torch.compile (benchmarks/bench_throughput.py)
    resnet_fast  configs/cifar10_resnet_fast.yaml: bar >= 94% test top-1 in <= 60 s of training
    vit_fast     configs/cifar10_vit_fast.yaml: bar >= 90% in <= 5 min (time-boxed to what is left)
    study        `vitlens study --preset full`, time-boxed: the runs that finish are reported
    lm           Tiny Shakespeare baby GPT (nanoGPT's 5000 x 64 x 256): bar val loss <= 1.50
    translate    Multi30k de-en encoder-decoder: bar test BLEU >= 35

In one 9-minute lease the first four parts take about all of it (the ViT recipe alone has a 5-minute
bar); ``--parts study,lm,translate`` runs the rest in another.

The whole suite keeps to ``--budget-s`` (default 520 s of wall time): each part gets at most its own
timeout and never more than what is left; a part that cannot get its minimum is skipped and says so.
Figures are read from the runs' own summary.json files; nothing is estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(REPO / "src"))  # vitlens runs from the tree: nothing is installed on the device


@dataclass
class Part:
    name: str
    timeout_s: float  # at most this long
    min_s: float  # skipped if less than this is left
    commands: list[list[str]] = field(default_factory=list)
    collect: object = None  # fn(work_dir) -> dict of figures and bars


# ------------------------------------------------------------------------------- helpers
def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def last_metrics(run_dir: Path) -> dict:
    lines = (
        (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    )
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return {"records": len(records), "last": records[-1] if records else {}, "all": records}


def image_run_figures(run_dir: Path, bar_top1: float, bar_seconds: float) -> dict:
    """Accuracy and time of an image run from summary.json (or its metrics when it was cut short)."""
    summary = read_json(run_dir / "summary.json")
    metrics = last_metrics(run_dir)
    evals = [r for r in metrics["all"] if "test_top1" in r]
    last_eval = evals[-1] if evals else {}
    top1 = summary.get("test_top1", last_eval.get("test_top1"))
    ema = summary.get("ema_test_top1", last_eval.get("ema_test_top1"))
    best = max([v for v in (top1, ema) if v is not None], default=None)
    train_time = (
        summary.get("train_time_s") or sum(r.get("epoch_time_s", 0.0) for r in metrics["all"]) or None
    )
    out = {
        "finished": bool(summary.get("finished")),
        "epochs_done": metrics["last"].get("epoch"),
        "test_top1": top1,
        "ema_test_top1": ema,
        "train_time_s": train_time,
        "img_per_s": summary.get("img_per_s", metrics["last"].get("img_per_s")),
        "eval_curve": [(r.get("epoch"), r.get("test_top1"), r.get("ema_test_top1")) for r in evals],
    }
    if best is not None and train_time is not None:
        out["bar"] = {
            "top1": best,
            "target_top1": bar_top1,
            "train_time_s": train_time,
            "target_s": bar_seconds,
            "met": bool(best >= bar_top1 and train_time <= bar_seconds),
        }
    return out


# ------------------------------------------------------------------------------- the parts
def build_parts(args, data: Path, work: Path) -> list[Part]:
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    cifar = [] if dry else ["--data-dir", str(data / "cifar10")]
    tiny_image = ["--data", "cifar10-mini", "--fraction", "0.05", "--epochs", "1", "--batch-size", "16"]
    vitlens = [PY, "-m", "vitlens"]

    # -- setup: machine facts, matmul peak, decode CIFAR-10 once into the cache
    probe = [PY, __file__, "--probe", str(work / "setup.json"), "--probe-device", device]
    probe += (
        ["--probe-dataset", "cifar10-mini"] if dry else ["--probe-dataset", "cifar10", "--data", str(data)]
    )
    setup = Part("setup", 90, 20, [probe], lambda w: read_json(w / "setup.json"))

    # -- throughput: vitlens vs timm, bf16, eager and compiled
    bench = [PY, str(REPO / "benchmarks" / "bench_throughput.py"), "--device", device, "--modes", "bf16"]
    if dry:
        sizes = [
            ("vit_ti_p4_32", ["--img-size", "32", "--patch-size", "4", "--batch-size", "4"]),
            (
                "vit_s_p16_224",
                [  # the same code path as ViT-S/16 at 224, at a size a CI runner does in seconds
                    "--model",
                    "vit_tiny_patch16_224",
                    "--img-size",
                    "64",
                    "--patch-size",
                    "16",
                    "--batch-size",
                    "2",
                ],
            ),
        ]
        reps = ["--steps", "1", "--repeats", "1", "--warmup", "0"]
    else:
        sizes = [
            ("vit_ti_p4_32", ["--img-size", "32", "--patch-size", "4", "--batch-size", "512"]),
            (
                "vit_s_p16_224",
                [
                    "--model",
                    "vit_small_patch16_224",
                    "--img-size",
                    "224",
                    "--patch-size",
                    "16",
                    "--batch-size",
                    "256",
                ],
            ),
        ]
        reps = ["--steps", "5", "--repeats", "3", "--warmup", "2"]
    thr_cmds = []
    compile_modes = [False] if dry else [False, True]
    for compiled in compile_modes:
        for tag, extra in sizes:
            name = f"{tag}_{'compiled' if compiled else 'eager'}"
            thr_cmds.append(
                bench
                + extra
                + reps
                + (["--compile"] if compiled else [])
                + ["--json", str(work / f"throughput_{name}.json")]
            )

    def collect_throughput(w: Path) -> dict:
        out = {}
        for f in sorted(w.glob("throughput_*.json")):
            r = read_json(f).get("modes", {}).get("bf16", {})
            if r:
                out[f.stem.removeprefix("throughput_")] = {
                    "vitlens_img_per_s": r["vitlens"]["median_img_per_s"],
                    "timm_img_per_s": r["timm"]["median_img_per_s"],
                    "vitlens_mfu": r["vitlens"]["median_mfu"],
                    "timm_mfu": r["timm"]["median_mfu"],
                    "vitlens_over_timm": r["median_ratio"],
                    "bf16_matmul_tflops": r["matmul_flops"] / 1e12,
                }
        return out

    throughput = Part("throughput", 150, 30, thr_cmds, collect_throughput)

    # -- the two fast recipes
    def recipe(name, config, bar_top1, bar_s, timeout, tiny_model_args):
        run_dir = work / name
        cmd = vitlens + [
            "train",
            "--config",
            str(REPO / "configs" / config),
            "--out",
            str(run_dir),
            "--device",
            device,
        ]
        if dry:
            cmd += tiny_image + ["--model-args", json.dumps(tiny_model_args), "--eval-every", "1"]
        else:
            cmd += cifar
        return Part(name, timeout, 45, [cmd], lambda w: image_run_figures(run_dir, bar_top1, bar_s))

    resnet_fast = recipe(
        "resnet_fast", "cifar10_resnet_fast.yaml", 94.0, 60.0, 110, {"widths": [8, 8, 16, 16]}
    )
    vit_fast = recipe(
        "vit_fast",
        "cifar10_vit_fast.yaml",
        90.0,
        300.0,
        330,
        {"embed_dim": 32, "depth": 1, "num_heads": 2, "pool": "gap"},
    )

    # -- language models
    shakespeare = data / "tinyshakespeare"
    lm_dir = work / "lm"
    lm_cmd = vitlens + [
        "lm",
        "train",
        "--model",
        "gpt_char_baby",
        "--data",
        str(shakespeare),
        "--out",
        str(lm_dir),
        "--device",
        device,
        "--no-progress",
    ]
    if dry:
        lm_cmd += [
            "--model-args",
            json.dumps({"n_layer": 1, "n_embd": 32, "n_head": 2}),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--block-size",
            "16",
            "--eval-every",
            "2",
            "--eval-iters",
            "1",
            "--max-chars",
            "20000",
        ]
    else:  # nanoGPT's shakespeare-char: 5000 steps of 64 x 256 characters, lr 1e-3, dropout 0.2
        lm_cmd += ["--max-steps", "5000", "--batch-size", "64", "--eval-every", "500", "--eval-iters", "50"]

    def collect_lm(w: Path) -> dict:
        s = read_json(lm_dir / "summary.json")
        m = last_metrics(lm_dir)
        val = s.get("val_loss", m["last"].get("val_loss"))
        out = {
            "finished": bool(s.get("finished")),
            "steps": m["last"].get("step"),
            "val_loss": val,
            "train_time_s": s.get("train_time_s", m["last"].get("train_time_s")),
        }
        if val is not None:
            out["bar"] = {"val_loss": val, "target": 1.50, "met": bool(val <= 1.50)}
        return out

    lm = Part("lm", 150, 60, [lm_cmd], collect_lm)

    mt_dir = work / "translate"
    mt_cmd = vitlens + [
        "translate",
        "train",
        "--data-dir",
        str(data / "multi30k"),
        "--out",
        str(mt_dir),
        "--device",
        device,
        "--no-progress",
    ]
    if dry:
        mt_cmd += [
            "--model",
            "transformer_nano",
            "--max-steps",
            "2",
            "--max-tokens",
            "256",
            "--vocab-size",
            "300",
            "--limit-train",
            "200",
            "--limit-eval",
            "8",
            "--beam-size",
            "2",
            "--eval-every",
            "2",
        ]
    else:  # ~16 epochs of 4,096-token batches (the CPU run reached 34.1 at 4.6 epochs)
        mt_cmd += [
            "--max-steps",
            "2000",
            "--max-tokens",
            "4096",
            "--warmup-steps",
            "400",
            "--lr-factor",
            "0.5",
            "--eval-every",
            "500",
            "--beam-size",
            "4",
        ]

    def collect_mt(w: Path) -> dict:
        s = read_json(mt_dir / "summary.json")
        bleu = {k: v for k, v in s.items() if k.startswith("test_bleu")}
        out = {
            "finished": bool(s.get("finished")),
            "steps": s.get("steps", s.get("step")),
            **bleu,
            "train_time_s": s.get("train_time_s"),
        }
        if bleu:
            best = max(v for v in bleu.values() if isinstance(v, (int, float)))
            out["bar"] = {"test_bleu": best, "target": 35.0, "met": bool(best >= 35.0)}
        return out

    translate = Part("translate", 150, 60, [mt_cmd], collect_mt)

    # -- the full study, time-boxed
    study_dir = work / "study"
    study_cmd = vitlens + ["study", "--out", str(study_dir), "--device", device]
    if dry:
        study_cmd += ["--config", str(tiny_study_config(work))]
    else:
        study_cmd += ["--preset", "full", "--data-dir", str(data / "cifar10")]

    def collect_study(w: Path) -> dict:
        runs = []
        for s in sorted((study_dir / "runs").glob("*/summary.json")):
            r = read_json(s)
            runs.append(
                {
                    "run": s.parent.name,
                    "test_top1": r.get("test_top1"),
                    "train_time_s": r.get("train_time_s"),
                    "train_images": r.get("train_images"),
                    "epochs": r.get("epochs"),
                    "img_per_s": r.get("img_per_s"),
                }
            )
        results = read_json(study_dir / "results.json")
        return {
            "runs_finished": len(runs),
            "runs": runs,
            "report": (study_dir / "report.html").exists(),
            "elapsed_s": results.get("elapsed_s"),
        }

    study = Part("study", 600, 60, [study_cmd], collect_study)
    return [setup, throughput, resnet_fast, vit_fast, study, lm, translate]


def tiny_study_config(work: Path) -> Path:
    """The full preset, shrunk for a dry run (same keys, so a broken preset fails here too)."""
    import yaml

    from vitlens.study.config import load_preset

    cfg = load_preset("full")
    cfg.update(data="cifar10-mini", data_dir=None, fractions=[0.05], seeds=[0], tokenizers=[])
    cfg["train"] = {**cfg.get("train", {}), "epochs": 1, "batch_size": 16, "progress": False}
    for key in [k for k in cfg if k.startswith("min_")] + ["budget"]:
        cfg.pop(key, None)
    tiny = {"vit": {"embed_dim": 32, "depth": 1, "num_heads": 2}, "resnet": {"widths": [8, 8, 16, 16]}}
    for spec in cfg["models"]:
        kind = "vit" if spec["model"].startswith("vit") else "resnet"
        extra = (
            tiny[kind] if kind == "vit" or spec["model"].startswith("resnet9") else {"widths": [8, 8, 8, 8]}
        )
        spec["model_args"] = {**spec.get("model_args", {}), **extra}
    cfg["analysis"] = {
        "cka_images": 16,
        "attention_images": 8,
        "probe_train_images": 16,
        "probe_test_images": 8,
        "batch_size": 8,
    }
    path = work / "study_dry_run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_probe(json_path: str, device: str, dataset: str, data: str | None) -> None:
    """The setup part's body (own process): what the machine is, its bf16 matmul peak, and the decoded
    dataset cache (written to $VITLENS_CACHE, so later parts load it in a second)."""
    import timm
    import torch

    from vitlens.data import build_dataset
    from vitlens.train.precision import matmul_flops

    info = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
    }
    n = 8192 if device == "cuda" else 256
    info["bf16_matmul_tflops"] = matmul_flops(torch.bfloat16, device, n=n) / 1e12
    t0 = time.perf_counter()
    data_dir = None if dataset == "cifar10-mini" else str(Path(data) / "cifar10")
    sizes = {s: len(build_dataset(dataset, s, data_dir)) for s in ("train", "test")}
    info.update(dataset=dataset, dataset_sizes=sizes, decode_s=round(time.perf_counter() - t0, 1))
    Path(json_path).write_text(json.dumps(info, indent=1))
    print(info)


# ------------------------------------------------------------------------------- the driver
def run_part(part: Part, time_left: float, log, env: dict) -> dict:
    limit = min(part.timeout_s, time_left)
    t0 = time.perf_counter()
    status, codes = "ok", []
    for cmd in part.commands:
        remaining = limit - (time.perf_counter() - t0)
        if remaining <= 1:
            status = "timeout"
            break
        log(f"$ {shlex.join(cmd)}   (timeout {remaining:.0f} s)")
        try:
            proc = subprocess.run(
                cmd,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=remaining,
            )
            log(proc.stdout[-20000:])
            codes.append(proc.returncode)
            if proc.returncode != 0:
                status = "failed"
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            log(out[-20000:] + f"\n[timed out after {remaining:.0f} s]")
            status = "timeout"
            break
    return {
        "status": status,
        "returncodes": codes,
        "wall_s": round(time.perf_counter() - t0, 1),
        "limit_s": round(limit, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny sizes: checks that every part still runs"
    )
    p.add_argument("--out", default=os.environ.get("OUT", "out/gpu_suite"), help="where the JSON and log go")
    p.add_argument("--work", default=None, help="scratch folder for runs (default: a temp folder)")
    p.add_argument("--data", default=None, help="folder with cifar10/, multi30k/, tinyshakespeare/")
    p.add_argument("--budget-s", type=float, default=520.0, help="wall-clock budget of the whole suite")
    p.add_argument("--parts", default=None, help="comma-separated subset, run in the order given")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # the setup part's own process
    p.add_argument("--probe-device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--probe-dataset", default="cifar10-mini", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        run_probe(args.probe, args.probe_device, args.probe_dataset, args.data)
        return {}

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or os.environ.get("TMPDIR", "/tmp")) / f"vitlens_gpu_suite_{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else find_data()
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "VITLENS_CACHE": os.environ.get("VITLENS_CACHE", str(work / "cache")),
    }
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU, even on a machine with a GPU
        env.setdefault("OMP_NUM_THREADS", "2")
    log_path = out / "gpu_suite.log"
    json_path = out / "gpu_suite.json"

    def log(text: str) -> None:
        with open(log_path, "a") as f:
            f.write(text.rstrip("\n") + "\n")
        print(text.rstrip("\n")[-4000:], flush=True)

    parts = build_parts(args, data, work)
    if args.parts:
        wanted = [s.strip() for s in args.parts.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {q.name for q in parts})
        if unknown:
            p.error(f"unknown parts {unknown}; choose from {[q.name for q in parts]}")
        by_name = {q.name: q for q in parts}
        parts = [by_name[name] for name in wanted]  # in the order given: first come, first served
    result = {
        "dry_run": args.dry_run,
        "budget_s": args.budget_s,
        "data": str(data),
        "work": str(work),
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "parts": {},
    }

    for part in parts:
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < part.min_s:
            result["parts"][part.name] = {
                "status": "skipped",
                "why": f"{left:.0f} s left < {part.min_s:.0f} s",
            }
            log(f"== {part.name}: skipped ({left:.0f} s left)")
        else:
            at, limit = time.perf_counter() - t_start, min(part.timeout_s, left)
            log(f"== {part.name} (at {at:.0f} s; up to {limit:.0f} s)")
            rec = run_part(part, left, log, env)
            try:
                rec["figures"] = part.collect(work)
            except Exception as e:  # a collector bug must not lose the other parts
                rec["figures"] = {"error": f"{type(e).__name__}: {e}"}
            result["parts"][part.name] = rec
            log(f"== {part.name}: {rec['status']} in {rec['wall_s']} s: {json.dumps(rec['figures'])[:3000]}")
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    log(f"suite done in {result['elapsed_s']} s -> {json_path}")
    return result


def find_data() -> Path:
    """$VITLENS_SUITE_DATA, else shared/data or ../shared/data or .gpudata beside the repo root."""
    candidates = [
        os.environ.get("VITLENS_SUITE_DATA"),
        REPO / "shared" / "data",
        REPO.parent / "shared" / "data",
        REPO / ".gpudata",
    ]
    for c in candidates:
        if c and (Path(c) / "cifar10").is_dir():
            return Path(c)
    return Path(candidates[2])  # the dry run needs only multi30k/tinyshakespeare here, or nothing


if __name__ == "__main__":
    main()
