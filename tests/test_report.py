"""The study report: computed findings, saved numbers, and a real browser rendering the page.

results.json is generated here from simple, known curves (no training), so every sentence the
report computes can be checked against numbers the test knows.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitlens.cli import main
from vitlens.study.report import build_report, cka_structure, data_hunger_finding, data_hunger_rows

LABELS = {"ViT-CLS": ("vit_tiny_patch4_32", {"pool": "cls"}),
          "ViT-GAP": ("vit_tiny_patch4_32", {"pool": "gap"}),
          "ResNet": ("resnet20", {})}
FRACTIONS = [0.05, 0.25, 1.0]
SEEDS = [0, 1]
FULL = 2000
HEADINGS = ["1. Data hunger", "2. Representation structure", "3. Local vs global attention",
            "4. [CLS] token vs global average pooling", "5. All runs"]
N_FIGURES = 1 + 3 + 2 + 2 + 1  # data hunger, CKA per model, CKA ViT x ResNet, attention per ViT, probes
CHROMIUM = "/usr/bin/chromium"


def top1_curve(label: str, n: int, vit_gap_at: dict[float, float], fraction: float) -> float:
    """ResNet accuracy grows with log(images); each ViT trails it by vit_gap_at[fraction] (+1 for CLS)."""
    resnet = 40 + 10 * math.log10(n / 100)
    if label == "ResNet":
        return resnet
    return resnet - vit_gap_at[fraction] - (1.0 if label == "ViT-CLS" else 0.0)


def make_results(vit_gap_at: dict[float, float], *, cka=True, attention=True, probes=True) -> dict:
    rng = np.random.default_rng(0)
    runs = []
    for label, (model, args) in LABELS.items():
        for f in FRACTIONS:
            for s in SEEDS:
                n = round(f * FULL)
                runs.append({"label": label, "model": model, "model_args": args, "fraction": f, "seed": s,
                             "train_images": n, "params": 5_400_000 if label != "ResNet" else 270_000,
                             "flops_per_image": 350_000_000, "train_time_s": 10.0 * f + s,
                             "img_per_s": 900.0 + 10 * s, "epochs": 4,
                             "test_top1": top1_curve(label, n, vit_gap_at, f) + float(rng.normal(0, 0.3)),
                             "test_top5": 90.0, "run_dir": f"runs/{label}_f{f:g}_s{s}"})
    results = {"title": "Synthetic study", "created": "2025-01-01T00:00:00",
               "config": {"fractions": FRACTIONS, "seeds": SEEDS, "train": {"epochs": 4, "lr": 0.001}},
               "dataset": {"name": "cifar10-mini", "train_images_full": FULL, "test_images": 500,
                           "num_classes": 10, "img_size": 32},
               "runs": runs}
    vit_layers = [f"blocks.{i}" for i in range(6)]
    cnn_layers = [f"layer{i // 3 + 1}.{i % 3}" for i in range(9)]
    if cka:
        def within(n, decay):  # exp(-decay * |i - j| / n): small decay = uniform representations
            i = np.arange(n)
            return np.exp(-decay * np.abs(i[:, None] - i[None, :]) / n).tolist()
        results["cka"] = {
            "within": {"ViT-CLS": {"matrix": within(6, 1.0), "names": vit_layers},
                       "ViT-GAP": {"matrix": within(6, 1.2), "names": vit_layers},
                       "ResNet": {"matrix": within(9, 4.0), "names": cnn_layers}},
            "cross": [{"a": v, "b": "ResNet", "matrix": rng.uniform(0.2, 0.9, (6, 9)).tolist(),
                       "names_a": vit_layers, "names_b": cnn_layers} for v in ("ViT-CLS", "ViT-GAP")],
            "fraction": 1.0, "images": 256}
    if attention:
        def distances(f):  # (layers, heads): deeper = more global; the lowest head gets local with data
            d = np.array([[4.0 + 2.5 * layer + 3.0 * h for h in range(3)] for layer in range(6)])
            d[:2, 0] = 6.0 - 4.0 * f
            return d.tolist()
        results["attention_distance"] = {label: {f"{f:g}": distances(f) for f in FRACTIONS}
                                         for label in ("ViT-CLS", "ViT-GAP")}
        results["attention_distance"].update(img_size=32, patch_size=4)
    if probes:
        def probe(n, last_pos):  # accuracies in [0, 1], as localization_probes returns them
            return {f"layer{i}": {"class_acc": 0.3 + 0.6 * i / (n - 1),
                                  "position_acc": 0.9 if i < n - 1 else last_pos} for i in range(n)}
        results["probes"] = {"ViT-CLS": probe(6, 0.20), "ViT-GAP": probe(6, 0.70), "ResNet": probe(9, 0.80),
                             "fraction": 1.0}
    results["tokenizers"] = [{"tokenizer": t, "test_top1": 50.0 + i, "tokens_per_image": 64,
                              "flops_per_image": 10**8, "img_per_s": 500.0, "params": 10**6,
                              "run_dir": f"runs/tok-{t}_f1_s0"} for i, t in enumerate(("patch", "pixel"))]
    return results


def write_study(tmp: Path, results: dict) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "results.json").write_text(json.dumps(results))
    return tmp


def finding(page: str, heading: str) -> str:
    """The 'This study.' sentence of the section whose heading starts with ``heading``."""
    section = page[page.index(heading):]
    m = re.search(r'<p class="finding"><b>This study\.</b> (.*?)</p>', section)
    assert m, f"no finding in section {heading}"
    return m.group(1)


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_report_sections_findings_and_numbers(tmp_path):
    narrowing = {0.05: 12.0, 0.25: 8.0, 1.0: 3.0}
    results = make_results(narrowing)
    study = write_study(tmp_path / "narrow", results)
    page = build_report(study).read_text()
    for h in HEADINGS + ["6. Image tokenizers", "Dosovitskiy et al. 2020", "Raghu et al. 2021",
                         "Kornblith et al. 2019"]:
        assert h in page, h
    assert page.count("data:image/png;base64,") == N_FIGURES
    assert not re.search(r"(src|href)=\"https?://", page), "the report must not load from the network"
    assert 'href="runs/ViT-CLS_f0.05_s0"' in page and 'href="runs/tok-pixel_f1_s0"' in page

    # 1. data hunger: the sentence quotes the best ViT's gap at 5% and 100%, and says it narrowed.
    runs = results["runs"]
    top1 = lambda label, f: [r["test_top1"] for r in runs if r["label"] == label and r["fraction"] == f]
    mean = lambda label, f: np.mean(top1(label, f))
    gap = lambda f: mean("ResNet", f) - max(mean("ViT-CLS", f), mean("ViT-GAP", f))
    text = finding(page, HEADINGS[0])
    assert "narrowed" in text and "widened" not in text
    assert f"by {gap(0.05):.1f} points" in text and f"by {gap(1.0):.1f} points" in text
    assert "ViT-GAP" in text and "(100 images)" in text

    # the saved numbers parse back to the inputs
    dh = read_csv(study / "figures" / "data_hunger.csv")
    assert len(dh) == len(LABELS) * len(FRACTIONS)
    for row in dh:
        vals = top1(row["label"], float(row["fraction"]))
        assert float(row["top1_mean"]) == pytest.approx(np.mean(vals), abs=1e-12)
        assert float(row["top1_std"]) == pytest.approx(np.std(vals, ddof=1), abs=1e-12)
    saved_runs = read_csv(study / "figures" / "runs.csv")
    assert [float(r["test_top1"]) for r in saved_runs] == [r["test_top1"] for r in runs]
    assert [json.loads(r["model_args"]) for r in saved_runs] == [r["model_args"] for r in runs]

    # 2. CKA: summary numbers from the matrices; the (constructed) uniform ViTs are reported as such.
    summary = json.loads((study / "figures" / "cka_summary.json").read_text())
    m = np.array(results["cka"]["within"]["ResNet"]["matrix"])
    assert summary["within"]["ResNet"]["adjacent_mean"] == pytest.approx(np.mean(np.diagonal(m, 1)))
    assert summary["within"]["ResNet"]["distant_mean"] == pytest.approx(
        np.mean([m[i, j] for i in range(9) for j in range(9) if j - i >= 5]))
    text = finding(page, HEADINGS[1])
    assert "more uniform" in text and f"{summary['within']['ViT-CLS']['distant_mean']:.2f} (ViT-CLS)" in text

    # 3. attention: every head saved; the lowest head moved from 6 - 4*0.05 to 2 px.
    att = read_csv(study / "figures" / "attention_distance.csv")
    assert len(att) == 2 * len(FRACTIONS) * 6 * 3
    row = next(r for r in att if r["label"] == "ViT-GAP" and r["fraction"] == "0.05" and r["layer"] == "5")
    assert float(row["distance_px"]) == results["attention_distance"]["ViT-GAP"]["0.05"][5][int(row["head"])]
    text = finding(page, HEADINGS[2])
    assert "5.8 to 2.0 px in ViT-CLS" in text and "became more local" in text and " not " not in text

    # 4. probes (stored as fractions, reported in percent): here [CLS] loses position at the last layer,
    # the opposite of Raghu et al. (who find the [CLS] ViT localizes better), and the sentence says so.
    probes = read_csv(study / "figures" / "probes.csv")
    last = {r["label"]: r for r in probes if float(r["relative_depth"]) == 1.0}
    assert {k: float(v["position_acc"]) for k, v in last.items()} == pytest.approx(
        {"ViT-CLS": 20.0, "ViT-GAP": 70.0, "ResNet": 80.0})
    text = finding(page, HEADINGS[3])
    assert "20.0% for ViT-CLS" in text and "less positional information" in text and "unlike" in text

    # the same curves where the gap widens: the sentence follows the numbers.
    rows = data_hunger_rows(make_results({0.05: 2.0, 0.25: 5.0, 1.0: 9.0})["runs"])
    text = data_hunger_finding(rows, vits=["ViT-CLS", "ViT-GAP"])
    assert "did not narrow" in text and "widened" in text and "narrowed" not in text


def test_missing_parts_are_noted_not_fatal(tmp_path, capsys):
    results = make_results({0.05: 5.0, 0.25: 4.0, 1.0: 3.0}, cka=False, attention=False, probes=False)
    results["runs"] = [r for r in results["runs"] if r["seed"] == 0]  # one seed: no std
    study = write_study(tmp_path / "s", results)
    assert main(["report", str(study)]) == 0  # the CLI rebuilds from results.json only
    report = Path(capsys.readouterr().out.strip())
    assert report == study / "report.html"
    page = report.read_text()
    assert all(h in page for h in HEADINGS)
    assert page.count("Not measured in this study") == 3
    assert page.count("data:image/png;base64,") == 1
    assert read_csv(study / "figures" / "data_hunger.csv")[0]["top1_std"] == ""
    assert not (study / "figures" / "probes.csv").exists()


def test_bad_study_dir_gives_one_clear_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "results.json not found" in err and "Traceback" not in err
    (tmp_path / "results.json").write_text(json.dumps({"runs": [{"label": "x"}]}))
    with pytest.raises(ValueError, match="lacks"):
        build_report(tmp_path)


def test_cka_structure_definition():
    m = np.array([[1.0, 0.9, 0.5, 0.2], [0.9, 1.0, 0.8, 0.4], [0.5, 0.8, 1.0, 0.7], [0.2, 0.4, 0.7, 1.0]])
    s = cka_structure(m)
    assert s["adjacent_mean"] == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    assert s["distant_mean"] == pytest.approx((0.5 + 0.4 + 0.2) / 3)  # |i - j| >= 2 = half of 4 layers


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    assert exe, ("headless Chromium is needed to render the report: install it with "
                 "`apt-get install -y chromium` (CI's .ci/run does)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_report_renders_in_headless_chromium(tmp_path):
    study = write_study(tmp_path / "study", make_results({0.05: 12.0, 0.25: 8.0, 1.0: 3.0}))
    url = build_report(study).resolve().as_uri()

    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", url, tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f'data-figures-loaded="{N_FIGURES}/{N_FIGURES}"' in dom.stdout, (
        re.findall(r"data-figures-loaded=\"[^\"]*\"", dom.stdout), dom.stderr[-2000:])
    assert f"Figures loaded: {N_FIGURES}/{N_FIGURES}" in dom.stdout

    shot = tmp_path / "shot.png"
    res = _chromium(f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars", url, tmp=tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2000, 1280)
    assert img.std() > 20 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50, "the screenshot is blank"
