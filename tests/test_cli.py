"""The command line's own behaviour: resume reads the run folder, deliberate overrides, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from vitlens.cli import main

TINY = [
    "--model", "vit_micro_patch4_32", "--model-args", '{"depth": 1, "embed_dim": 32, "num_heads": 2}',
    "--fraction", "0.02", "--batch-size", "16", "--no-progress",
]  # fmt: skip


def _epochs(run) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_takes_the_run_folder_config_and_overrides_are_recorded(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--stop-after-epochs", "1", "--out", str(run)]) == 0
    assert _epochs(run) == [1]
    # --resume with nothing but the folder: config.json (epochs 2, fraction 0.02, ...) is the truth,
    # not the defaults (epochs 10, fraction 1.0)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 0
    assert "at epoch 1/2" in capsys.readouterr().err
    assert _epochs(run) == [1, 2]
    # a deliberate, safe change is allowed and recorded in config.json
    assert main(["train", "--resume", "--out", str(run), "--override", "epochs=3", "--no-progress"]) == 0
    assert _epochs(run) == [1, 2, 3]
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 3 and config["fraction"] == 0.02
    assert config["overrides"] == [{"at_epoch": 2, "changes": {"epochs": [2, 3]}}]


def test_config_file_then_flags_for_a_new_run(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("epochs: 5\nlr: 0.003\nfraction: 0.02\nbatch_size: 16\n")
    run = tmp_path / "run"
    argv = ["train", "--config", str(cfg), "--epochs", "1", "--out", str(run), "--no-progress"]
    argv += [
        "--model",
        "vit_micro_patch4_32",
        "--model-args",
        '{"depth": 1, "embed_dim": 32, "num_heads": 2}',
    ]
    assert main(argv) == 0
    stored = json.loads((run / "config.json").read_text())
    assert (stored["epochs"], stored["lr"], stored["fraction"], stored["batch_size"]) == (1, 0.003, 0.02, 16)


def test_real_process_bad_input_and_help(tmp_path):
    """Through a real ``vitlens`` process: one line and exit 2 for a user error; help lists flags."""
    proc = subprocess.run(
        [sys.executable, "-m", "vitlens", "lm", "sample", str(tmp_path), "--max-new-tokens", "-5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.count("\n") == 1 and "--max-new-tokens" in proc.stderr and "Traceback" not in proc.stderr
    )
    proc = subprocess.run(
        [sys.executable, "-m", "vitlens", "train", "--help"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps the help at the terminal width
    assert "--override KEY=VALUE" in text and "--grad-clip X|none" in text
    assert "(default: vit_micro_patch4_32)" in text
