"""`vitlens study` end to end on the embedded data (smoke preset), resume, and `vitlens report`."""

from __future__ import annotations

import json

from vitlens.cli import main as cli_main
from vitlens.study.config import StudyConfig, list_presets


def test_presets_load_and_validate():
    assert {"default", "cpu", "full", "smoke"} <= set(list_presets())
    for name in list_presets():
        cfg = StudyConfig.load(preset=name)
        assert cfg.fractions == sorted(cfg.fractions) and {m.label for m in cfg.models} >= {
            "ViT-CLS",
            "ResNet",
        }
    cfg = StudyConfig.load(preset="smoke", fractions=[0.5, 0.2], train={"epochs": 3})
    assert cfg.fractions == [0.2, 0.5] and cfg.train["epochs"] == 3 and cfg.train["batch_size"] == 64


def test_study_end_to_end_resume_and_report(tmp_path, capsys):
    out = tmp_path / "study"
    assert cli_main(["study", "--preset", "smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 6 and {r["label"] for r in results["runs"]} == {
        "ViT-CLS",
        "ViT-GAP",
        "ResNet",
    }
    for r in results["runs"]:
        assert (
            0 <= r["test_top1"] <= 100 and r["params"] > 0 and (out / r["run_dir"] / "summary.json").exists()
        )
    # what each run saw: 1 epoch of 200 / 1,000 images in batches of 64 (a last short batch counts)
    saw = {(r["train_images"], r["epochs"], r["steps"], r["images_seen"]) for r in results["runs"]}
    assert sorted(saw) == [(200, 1, 4, 200), (1000, 1, 16, 1000)]
    within = results["cka"]["within"]["ViT-CLS"]["matrix"]
    assert all(abs(within[i][i] - 1) < 1e-6 for i in range(len(within)))
    assert set(results["attention_distance"]["ViT-GAP"]) == {"0.1", "0.5"}
    layers = results["attention_distance"]["ViT-CLS"]["0.5"]
    assert len(layers) == 2 and len(layers[0]) == 2  # 2 blocks x 2 heads (smoke ViT)
    assert set(results["probes"]["ResNet"]) and all(
        0 <= v["class_acc"] <= 1 for v in results["probes"]["ResNet"].values()
    )
    # The analysis images are a random subset of all classes (folders are stored class by class, so
    # the first images alone would make the class probe trivially perfect).
    assert results["probes"]["ViT-CLS"]["patch_embed"]["class_acc"] < 0.9
    assert (out / "study_config.yaml").exists()
    html = (out / "report.html").read_text()
    for heading in ("Data hunger", "Representation structure", "attention", "pooling", "runs"):
        assert heading.lower() in html.lower()

    # Kill-and-restart: a run without summary.json is resumed from its checkpoint, the others reused.
    (out / "runs" / "ResNet_f0.5_s0" / "summary.json").unlink()
    # a run finished before summary.json counted its steps: they are read from its metrics.jsonl
    old_summary = out / "runs" / "ViT-GAP_f0.5_s0" / "summary.json"
    old_summary.write_text(json.dumps({k: v for k, v in json.loads(old_summary.read_text()).items()
                                       if k not in ("steps", "images_seen")}))
    kept = (out / "runs" / "ViT-CLS_f0.1_s0" / "checkpoints" / "last.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert cli_main(["study", "--preset", "smoke", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("finished earlier, reused") == 5 and "ResNet_f0.5_s0: training (resuming)" in log
    assert "reused" in log.split("analysis: CKA")[1]
    assert (out / "runs" / "ViT-CLS_f0.1_s0" / "checkpoints" / "last.safetensors").stat().st_mtime_ns == kept
    resumed = json.loads((out / "results.json").read_text())
    assert [r["test_top1"] for r in resumed["runs"]] == [r["test_top1"] for r in results["runs"]]
    old_run = next(r for r in resumed["runs"] if r["run_dir"] == "runs/ViT-GAP_f0.5_s0")
    assert (old_run["steps"], old_run["images_seen"]) == (16, None)

    # `vitlens report` rebuilds the page from results.json alone.
    (out / "report.html").unlink()
    assert cli_main(["report", str(out)]) == 0
    assert (out / "report.html").exists()
