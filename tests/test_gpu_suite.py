"""benchmarks/gpu_suite.sh must not rot: its dry run (CPU, tiny sizes) runs every part end to end,
and the driver's budget and timeout rules hold (issue 13)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_part_past_its_time_is_stopped_and_the_rest_still_run(tmp_path):
    suite = _suite()
    lines = []
    slow = suite.Part(
        "slow", timeout_s=1.5, min_s=0, commands=[[sys.executable, "-c", "import time; time.sleep(30)"]]
    )
    rec = suite.run_part(slow, time_left=100, log=lines.append, env=dict(os.environ))
    assert rec["status"] == "timeout" and rec["wall_s"] < 10
    failing = suite.Part(
        "bad", timeout_s=30, min_s=0, commands=[[sys.executable, "-c", "raise SystemExit(3)"]]
    )
    rec = suite.run_part(failing, time_left=100, log=lines.append, env=dict(os.environ))
    assert rec["status"] == "failed" and rec["returncodes"] == [3]
    # the budget left caps a part's own timeout
    rec = suite.run_part(slow, time_left=1.0, log=lines.append, env=dict(os.environ))
    assert rec["status"] == "timeout" and rec["limit_s"] == 1.0


def test_parts_that_do_not_fit_the_budget_are_skipped_not_run(tmp_path):
    out = tmp_path / "out"
    res = _suite().main(
        [
            "--dry-run",
            "--out",
            str(out),
            "--work",
            str(tmp_path),
            "--budget-s",
            "5",
            "--parts",
            "setup,resnet_fast",
        ]
    )
    assert {k: v["status"] for k, v in res["parts"].items()} == {"setup": "skipped", "resnet_fast": "skipped"}
    assert "s left <" in json.loads((out / "gpu_suite.json").read_text())["parts"]["setup"]["why"]


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED / "tinyshakespeare").is_dir(), reason="needs ../shared/data (the language parts)"
)
def test_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "TMPDIR": str(tmp_path), "VITLENS_SUITE_DATA": str(SHARED)}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--budget-s", "900"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_suite.json").read_text())
    parts = res["parts"]
    assert list(parts) == ["setup", "throughput", "resnet_fast", "vit_fast", "study", "lm", "translate"]
    assert {k: v["status"] for k, v in parts.items()} == dict.fromkeys(parts, "ok"), (
        out / "gpu_suite.log"
    ).read_text()[-4000:]
    assert parts["setup"]["figures"]["bf16_matmul_tflops"] > 0
    thr = parts["throughput"]["figures"]
    assert set(thr) == {"vit_ti_p4_32_eager", "vit_s_p16_224_eager"}
    assert all(v["vitlens_img_per_s"] > 0 and v["timm_img_per_s"] > 0 for v in thr.values())
    for name in ("resnet_fast", "vit_fast"):
        fig = parts[name]["figures"]
        assert fig["finished"] and 0 <= fig["test_top1"] <= 100 and fig["train_time_s"] > 0
        assert fig["bar"]["met"] in (True, False)
    assert parts["lm"]["figures"]["val_loss"] > 0
    assert parts["translate"]["figures"]["bar"]["test_bleu"] >= 0
    study = parts["study"]["figures"]
    assert study["runs_finished"] == 3 and study["report"]  # 1 fraction x 3 models, then the report
