"""Bad inputs to the analysis commands (``vitlens cka / attention / probe``), through the real command line.

In the style of tests/test_bad_inputs.py: exit code 2, exactly one stderr line that names the
problem and the fix, no traceback, and nothing written to the working folder.
"""

from __future__ import annotations

import re

import pytest

from vitlens.cli import main


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, shared_data):
    """A two-step character GPT run: a valid run, but of a language model."""
    out = tmp_path_factory.mktemp("runs") / "lm"
    argv = [
        "lm", "train", "--model", "gpt_nano", "--max-steps", "2", "--batch-size", "4", "--block-size", "16",
        "--eval-every", "2", "--eval-iters", "1", "--max-chars", "5000", "--no-progress",
        "--data", str(shared_data / "tinyshakespeare"), "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    return out


def _one_line_error(argv, tmp_path, monkeypatch, capsys) -> str:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("VITLENS_DEBUG", raising=False)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert list(work.iterdir()) == [], "files left behind"
    return lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["cka", "vit_micro_patch4_32", "{lm}"],
        ["cka", "{lm}"],
        ["attention", "{lm}"],
        ["probe", "resnet8_cifar", "{lm}"],
    ],
    ids=["cka-image-vs-lm", "cka-lm-alone", "attention-lm", "probe-lm"],
)
def test_a_language_model_run_is_one_clear_line(argv, lm_run, tmp_path, monkeypatch, capsys):
    argv = [a.format(lm=lm_run) for a in argv] + ["--out", str(tmp_path / "work" / "o"), "--max-images", "8"]
    line = _one_line_error(argv, tmp_path, monkeypatch, capsys)
    verb = argv[0]
    assert line.startswith(f"vitlens {verb}: error: "), line
    assert re.search(r"lm is a causal_lm run, not an image model", line), line  # the problem
    assert f"`vitlens {verb}` analyses image models" in line and "vitlens lm attention" in line  # the fix


@pytest.mark.parametrize("grid", ["0", "-3"])
def test_probe_rejects_a_non_positive_grid(grid, tmp_path, monkeypatch, capsys):
    argv = ["probe", "resnet8_cifar", "--grid", grid, "--out", str(tmp_path / "work" / "o")]
    line = _one_line_error(argv, tmp_path, monkeypatch, capsys)
    want = f"--grid must be a positive number of tokens per side, got {grid}; e.g. --grid 8"
    assert line == f"vitlens probe: error: {want}"
