# ruff: noqa: E501  (the catalogue is a table: one case per line reads best)
"""A catalogue of bad inputs, one per line below, each through the real command line.

Every case must end with exit code 2, exactly one line on stderr that names the problem, no
traceback, and no file created, changed or deleted (the working folder and the runs it points
at are snapshotted before and after). Most cases call ``vitlens.cli.main`` in-process (the
startup of a fresh Python with torch costs seconds); ``SUBPROCESS`` cases run
``python -m vitlens`` for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vitlens.cli import main

TINY_IMAGE_RUN = [
    "--model", "vit_micro_patch4_32", "--model-args", '{"depth": 1, "embed_dim": 32, "num_heads": 2}',
    "--fraction", "0.02", "--batch-size", "16", "--epochs", "1", "--no-progress",
]  # fmt: skip
TINY_LM_RUN = [
    "--model", "gpt_nano", "--max-steps", "2", "--batch-size", "4", "--block-size", "16",
    "--eval-every", "2", "--eval-iters", "1", "--max-chars", "5000", "--no-progress",
]  # fmt: skip
TINY_TRANSLATE_RUN = [
    "--model", "transformer_nano", "--model-args", '{"max_len": 64}', "--vocab-size", "200",
    "--max-steps", "2", "--max-tokens", "400", "--warmup-steps", "1", "--eval-every", "2",
    "--limit-train", "200", "--limit-eval", "4", "--beam-size", "1", "--no-eval-bleu", "--no-progress",
]  # fmt: skip


# ------------------------------------------------------------------------------- the runs bad inputs point at
@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data) -> Path:
    """One tiny image, LM and translation run, made once; cases copy them before changing them."""
    root = tmp_path_factory.mktemp("runs")
    made = [
        ["train", *TINY_IMAGE_RUN, "--out", str(root / "img")],
        ["lm", "train", *TINY_LM_RUN, "--data", str(shared_data / "tinyshakespeare"), "--out", str(root / "lm")],
        ["translate", "train", *TINY_TRANSLATE_RUN, "--data-dir", str(shared_data / "multi30k"),
         "--out", str(root / "tr")],
    ]  # fmt: skip
    for argv in made:
        assert main(argv) == 0, argv
    return root


@dataclass
class Ctx:
    """The working folder of one case and helpers that put bad inputs into it."""

    tmp: Path
    runs: Path
    data: Path

    def copy(self, run: str) -> Path:
        dst = self.tmp / f"{run}_copy"
        shutil.copytree(self.runs / run, dst)
        return dst

    def write(self, name: str, content: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def weights(self, kind: str, run: str = "img", name: str = "bad.safetensors") -> Path:
        """A weights file that cannot serve: truncated, not safetensors, empty, foreign, huge header."""
        good = (self.runs / run / "checkpoints" / "last.safetensors").read_bytes()
        content = {
            "truncated": good[: len(good) // 2],
            "text": b"this is not a safetensors file\n" * 4,
            "pickle": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.",
            "empty": b"",
            "header": (2**40).to_bytes(8, "little") + b"{}",
        }.get(kind)
        if content is not None:
            return self.write(name, content)
        assert kind == "foreign"
        path = self.tmp / name
        save_file({"encoder.weight": torch.randn(4, 4), "decoder.bias": torch.zeros(4)}, str(path))
        return path

    def run_with(self, kind: str, run: str = "img") -> Path:
        """A copy of a run whose last checkpoint is replaced by a bad one."""
        copy = self.copy(run)
        self.weights(kind, run, name=f"{run}_copy/checkpoints/last.safetensors")
        return copy

    def two_class_folder(self) -> Path:
        from PIL import Image

        root = self.tmp / "two_classes"
        for split in ("train", "test"):
            for i, cls in enumerate(("cat", "dog")):
                (root / split / cls).mkdir(parents=True)
                for j in range(4):
                    Image.new("RGB", (32, 32), (60 * i + 10 * j, 100, 50)).save(
                        root / split / cls / f"{j}.png"
                    )
        return root

    def unwritable(self) -> Path:
        """A folder this process cannot create things in (root ignores permission bits: /sys)."""
        if os.geteuid() == 0:
            return Path("/sys/vitlens_test_out")
        folder = self.tmp / "locked"
        folder.mkdir()
        folder.chmod(0o555)
        return folder / "out"


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list[str]]
    expect: str  # a regular expression the error line must match (case-insensitive)
    subprocess: bool = False


def C(id, argv, expect, subprocess=False) -> Case:  # noqa: N802 - reads as a table row
    return Case(id, argv, expect, subprocess)


IMG, LM, TR = "img", "lm", "tr"
CASES = [
    # ---- train: impossible values, config files, devices, --out, --resume
    C("train-epochs-0", lambda c: ["train", "--epochs", "0"], r"epochs must be at least 1, got 0"),
    C("train-epochs-negative", lambda c: ["train", "--epochs", "-3"], r"epochs must be at least 1"),
    C("train-epochs-not-int", lambda c: ["train", "--epochs", "ten"], r"--epochs: invalid int value: 'ten'"),
    C("train-fraction-2", lambda c: ["train", "--fraction", "2"], r"fraction must be in \(0, 1\], got 2"),
    C("train-lr-negative", lambda c: ["train", "--lr", "-1"], r"lr must be positive"),
    C("train-batch-0", lambda c: ["train", "--batch-size", "0"], r"batch_size must be at least 1"),
    C("train-label-smoothing-1", lambda c: ["train", "--label-smoothing", "1.5"], r"label_smoothing must be in"),
    C("train-model-args-not-json", lambda c: ["train", "--model-args", "{depth: 2}"], r"--model-args: invalid JSON"),
    C("train-model-args-unknown", lambda c: ["train", *TINY_IMAGE_RUN[:2], "--model-args", '{"dept": 2}',
                                             "--out", str(c.tmp / "r")], r"dept.*depth"),
    C("train-model-args-wrong-type", lambda c: ["train", "--model-args", '{"depth": "x"}', "--out", str(c.tmp / "r")], r"depth must be an int, got 'x'"),
    C("train-model-args-heads", lambda c: ["train", "--model-args", '{"num_heads": 3}', "--out", str(c.tmp / "r")], r"not divisible by num_heads 3"),
    C("train-img-size-not-divisible", lambda c: ["train", "--img-size", "7", "--out", str(c.tmp / "r")], r"7x7 is not divisible by patch size"),
    C("train-unknown-model", lambda c: ["train", "--model", "vit_mikro", "--out", str(c.tmp / "r")], r"vit_mikro"),
    C("train-unknown-data", lambda c: ["train", "--data", "imagenet21k", "--out", str(c.tmp / "r")],
      r"unknown dataset 'imagenet21k'"),
    C("train-imagefolder-no-dir", lambda c: ["train", "--data", "imagefolder", "--out", str(c.tmp / "r")],
      r"needs data_dir \(--data-dir\)"),
    C("train-cifar-missing-no-download-flag", lambda c: ["train", "--data", "cifar10", "--data-dir",
                                                         str(c.tmp), "--out", str(c.tmp / "r")],
      r"cifar10 \(train split\) not found(?!.*--download)"),
    C("train-randaugment-bogus", lambda c: ["train", "--randaugment", "strong", "--out", str(c.tmp / "r")],
      r"randaugment='strong'"),
    C("train-yaml-syntax", lambda c: ["train", "--config", str(c.write("exp.yaml", "epochs: 3\nlr: [0.1\n"))],
      r"exp\.yaml:\d+:\d+: YAML syntax error"),
    C("train-json-syntax", lambda c: ["train", "--config", str(c.write("exp.json", '{"epochs": 3,}'))],
      r"exp\.json:1:\d+: JSON syntax error"),
    C("train-config-unknown-key", lambda c: ["train", "--config", str(c.write("exp.yaml", "epocs: 3\n"))],
      r"unknown config keys \['epocs'\].*did you mean 'epochs'.*valid keys:"),
    C("train-config-wrong-type", lambda c: ["train", "--config", str(c.write("exp.yaml", "epochs: many\n"))],
      r"epochs must be an int, got 'many'"),
    C("train-config-not-mapping", lambda c: ["train", "--config", str(c.write("exp.yaml", "- 1\n- 2\n"))],
      r"mapping"),
    C("train-config-missing", lambda c: ["train", "--config", str(c.tmp / "nope.yaml")], r"nope\.yaml does not exist",
      subprocess=True),
    C("train-device-cuda", lambda c: ["train", "--device", "cuda", "--out", str(c.tmp / "r")], r"no CUDA device",
      subprocess=True),
    C("train-device-bogus", lambda c: ["train", "--device", "gpu0", "--out", str(c.tmp / "r")], r"unknown device 'gpu0'"),
    C("train-out-under-file", lambda c: ["train", "--out", str(c.write("afile", "x") / "run")], r"afile.*is a file"),
    C("train-out-is-file", lambda c: ["train", "--out", str(c.write("afile", "x"))], r"afile is a file"),
    C("train-out-unwritable", lambda c: ["train", *TINY_IMAGE_RUN, "--out", str(c.unwritable())],
      r"(not writable|cannot be created|not permitted|permission denied)"),
    C("train-out-holds-a-run", lambda c: ["train", "--out", str(c.copy(IMG))], r"already holds a run.*--resume"),
    C("train-resume-missing", lambda c: ["train", "--resume", "--out", str(c.tmp / "nope")],
      r"--resume: .*nope does not exist"),
    C("train-resume-other-lr", lambda c: ["train", "--resume", "--out", str(c.copy(IMG)), "--lr", "0.5"],
      r"would change the run.*lr: 0\.001 -> 0\.5"),
    C("train-resume-other-fraction", lambda c: ["train", "--resume", "--out", str(c.copy(IMG)), "--fraction", "0.5"],
      r"would change the run.*fraction: 0\.02 -> 0\.5"),
    C("train-resume-other-epochs", lambda c: ["train", "--resume", "--out", str(c.copy(IMG)), "--epochs", "4"],
      r"would change the run.*epochs: 1 -> 4.*--override"),
    C("train-resume-other-model", lambda c: ["train", "--resume", "--out", str(c.copy(IMG)), "--model",
                                             "resnet8_cifar"], r"would change the run.*model"),
    C("train-resume-unsafe-override", lambda c: ["train", "--resume", "--out", str(c.copy(IMG)), "--override",
                                                 "lr=0.5"], r"--override lr"),
    C("train-override-without-resume", lambda c: ["train", "--override", "epochs=3", "--out", str(c.tmp / "r")],
      r"--override .*--resume"),
    C("train-resume-truncated", lambda c: ["train", "--resume", "--out", str(c.run_with("truncated"))],
      r"last\.safetensors"),
    C("train-resume-not-safetensors", lambda c: ["train", "--resume", "--out", str(c.run_with("text"))],
      r"last\.safetensors", subprocess=True),
    # ---- eval
    C("eval-missing", lambda c: ["eval", str(c.tmp / "nope")], r"nope does not exist"),
    C("eval-not-a-run", lambda c: ["eval", str(c.tmp)], r"no checkpoints/last\.safetensors"),
    C("eval-truncated", lambda c: ["eval", str(c.weights("truncated"))], r"bad\.safetensors"),
    C("eval-text-file", lambda c: ["eval", str(c.weights("text"))], r"bad\.safetensors", subprocess=True),
    C("eval-pickle", lambda c: ["eval", str(c.weights("pickle"))], r"bad\.safetensors"),
    C("eval-empty", lambda c: ["eval", str(c.weights("empty"))], r"bad\.safetensors"),
    C("eval-huge-header", lambda c: ["eval", str(c.weights("header"))], r"bad\.safetensors"),
    C("eval-foreign", lambda c: ["eval", str(c.weights("foreign"))], r"bad\.safetensors"),
    C("eval-run-truncated", lambda c: ["eval", str(c.run_with("truncated"))], r"last\.safetensors"),
    C("eval-class-mismatch", lambda c: ["eval", str(c.runs / IMG), "--data", "imagefolder", "--data-dir",
                                        str(c.two_class_folder())],
      r"10 classes but the data has 2.*--allow-class-mismatch"),
    C("eval-lm-run", lambda c: ["eval", str(c.runs / LM)], r"causal_lm run, not an image classifier"),
    C("eval-translation-run", lambda c: ["eval", str(c.runs / TR)], r"translation run, not an image classifier"),
    C("eval-batch-0", lambda c: ["eval", str(c.runs / IMG), "--batch-size", "0"], r"--batch-size"),
    C("eval-device-cuda", lambda c: ["eval", str(c.runs / IMG), "--device", "cuda"], r"no CUDA device"),
    # ---- analyses
    C("cka-truncated", lambda c: ["cka", str(c.weights("truncated")), "--out", str(c.tmp / "o")], r"bad\.safetensors"),
    C("cka-unknown-layer", lambda c: ["cka", str(c.runs / IMG), "--layers-a", "blocks.9", "--out", str(c.tmp / "o"),
                                      "--max-images", "8"], r"blocks\.9"),
    C("attention-text-file", lambda c: ["attention", str(c.weights("text")), "--out", str(c.tmp / "o")],
      r"bad\.safetensors"),
    C("attention-cnn", lambda c: ["attention", "resnet8_cifar", "--out", str(c.tmp / "o"), "--max-images", "8"],
      r"no attention layers"),
    C("probe-empty", lambda c: ["probe", str(c.weights("empty")), "--out", str(c.tmp / "o")], r"bad\.safetensors"),
    C("probe-out-under-file", lambda c: ["probe", str(c.runs / IMG), "--out", str(c.write("afile", "x") / "o")],
      r"afile"),
    # ---- study and report
    C("study-epochs-0", lambda c: ["study", "--epochs", "0", "--out", str(c.tmp / "s")], r"epochs"),
    C("study-fraction-2", lambda c: ["study", "--fractions", "0.5,2", "--out", str(c.tmp / "s")], r"fractions"),
    C("study-unknown-preset", lambda c: ["study", "--preset", "huge", "--out", str(c.tmp / "s")],
      r"unknown study preset 'huge'"),
    C("study-yaml-syntax", lambda c: ["study", "--config", str(c.write("s.yaml", "models: [\n"))], r"s\.yaml:\d+"),
    C("report-missing", lambda c: ["report", str(c.tmp / "nope")], r"nope"),
    C("report-bad-results", lambda c: ["report", str(c.write("st/results.json", "{not json").parent)],
      r"results\.json"),
    # ---- lm
    C("lm-train-no-data", lambda c: ["lm", "train", "--out", str(c.tmp / "r")], r"pass --data"),
    C("lm-train-missing-data", lambda c: ["lm", "train", "--data", str(c.tmp / "nope.txt"), "--out",
                                          str(c.tmp / "r")], r"nope\.txt does not exist"),
    C("lm-train-negative-steps", lambda c: ["lm", "train", "--max-steps", "-5", "--out", str(c.tmp / "r")],
      r"max.steps"),
    C("lm-train-resume-not-safetensors", lambda c: ["lm", "train", "--resume", "--out", str(c.run_with("pickle", LM))],
      r"last\.safetensors"),
    C("lm-train-resume-other-lr", lambda c: ["lm", "train", "--resume", "--out", str(c.copy(LM)), "--lr", "0.1"],
      r"would change the run.*lr"),
    C("lm-sample-truncated", lambda c: ["lm", "sample", str(c.run_with("truncated", LM))], r"last\.safetensors"),
    C("lm-sample-negative-tokens", lambda c: ["lm", "sample", str(c.runs / LM), "--max-new-tokens", "-5"],
      r"--max-new-tokens"),
    C("lm-sample-negative-temperature", lambda c: ["lm", "sample", str(c.runs / LM), "--temperature", "-1"],
      r"--temperature"),
    C("lm-sample-translation-run", lambda c: ["lm", "sample", str(c.runs / TR)], r"chars\.json"),
    C("lm-sample-unknown-characters", lambda c: ["lm", "sample", str(c.runs / LM), "--prompt", "\u2603\u2603"],
      r"not in the model's vocabulary"),
    C("lm-attention-truncated", lambda c: ["lm", "attention", str(c.run_with("truncated", LM)), "To be"],
      r"last\.safetensors"),
    C("lm-attention-empty-text", lambda c: ["lm", "attention", str(c.runs / LM), " "], r"the text is empty"),
    # ---- translate
    C("translate-empty-sentence", lambda c: ["translate", str(c.runs / TR), ""], r"sentence 1 is empty"),
    C("translate-nothing", lambda c: ["translate", str(c.runs / TR)], r"nothing to translate"),
    C("translate-out-exists", lambda c: ["translate", str(c.runs / TR), "--file", str(c.write("in.de", "Ein Hund.\n")),
                                         "--out", str(c.write("out.en", "keep me\n"))], r"out\.en already exists"),
    C("translate-missing-file", lambda c: ["translate", str(c.runs / TR), "--file", str(c.tmp / "nope.de")],
      r"nope\.de does not exist"),
    C("translate-truncated", lambda c: ["translate", str(c.run_with("truncated", TR)), "Ein Hund."],
      r"last\.safetensors", subprocess=True),
    C("translate-attention-folder", lambda c: ["translate", str(c.runs / TR), "Ein Hund.", "--attention", str(c.tmp)], r"--attention .* is a folder"),
    C("translate-lm-run", lambda c: ["translate", str(c.runs / LM), "Ein Hund."], r"tokenizer\.json"),
    C("translate-beam-0", lambda c: ["translate", str(c.runs / TR), "Ein Hund.", "--beam", "0"], r"--beam"),
    C("translate-train-no-data", lambda c: ["translate", "train", "--out", str(c.tmp / "r")], r"--data-dir"),
    C("translate-train-steps-0", lambda c: ["translate", "train", "--max-steps", "0", "--out", str(c.tmp / "r")],
      r"max.steps"),
    C("translate-train-vocab-3", lambda c: ["translate", "train", "--vocab-size", "3", "--out", str(c.tmp / "r")],
      r"--vocab-size 3"),
    C("translate-train-resume-truncated", lambda c: ["translate", "train", "--resume", "--out",
                                                     str(c.run_with("truncated", TR))], r"last\.safetensors"),
    # ---- train-tokenizer and models
    C("tokenizer-kind-bogus", lambda c: ["train-tokenizer", "--kind", "bpe"], r"--kind: invalid choice: 'bpe'"),
    C("tokenizer-fraction-0", lambda c: ["train-tokenizer", "--fraction", "0", "--out", str(c.tmp / "t")],
      r"fraction"),
    C("tokenizer-epochs-0", lambda c: ["train-tokenizer", "--data", "cifar10-mini", "--epochs", "0", "--out", str(c.tmp / "t")], r"epochs"),
    C("tokenizer-init-truncated", lambda c: ["train-tokenizer", "--data", "cifar10-mini", "--init",
                                             str(c.weights("truncated")), "--out", str(c.tmp / "t")],
      r"bad\.safetensors"),
    C("models-no-match", lambda c: ["models", "vit_gigantic*"], r"no registered model matches 'vit_gigantic\*'"),
    C("models-bad-flag", lambda c: ["models", "--parms"], r"unrecognized arguments: --parms"),
]  # fmt: skip


# ------------------------------------------------------------------------------- the checks
def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots`` with its size, mtime and content hash."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            st = path.lstat()
            digest = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else None
            out[str(path)] = (path.is_dir(), st.st_size if path.is_file() else 0, st.st_mtime_ns, digest)
    return out


def invoke(argv: list[str], cwd: Path, in_subprocess: bool, capsys) -> tuple[int, str]:
    if in_subprocess:
        env = {**os.environ, "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": "1"}
        env.pop("VITLENS_DEBUG", None)
        proc = subprocess.run(
            [sys.executable, "-m", "vitlens", *argv],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return proc.returncode, proc.stderr
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    return code, capsys.readouterr().err


def test_catalogue_is_large_and_covers_every_verb():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    verbs = {c.id.split("-")[0] for c in CASES}
    expected = {
        "train",
        "eval",
        "cka",
        "attention",
        "probe",
        "study",
        "report",
        "lm",
        "translate",
        "tokenizer",
    }
    assert expected | {"models"} <= verbs
    assert sum(c.subprocess for c in CASES) >= 4


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line(case: Case, runs, shared_data, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # anything written to a default path would land (and be seen) here
    monkeypatch.delenv("VITLENS_DEBUG", raising=False)
    ctx = Ctx(work, runs, shared_data)
    argv = case.argv(ctx)
    before = snapshot(work, runs)
    code, err = invoke(argv, work, case.subprocess, capsys)
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.search(r"^vitlens( [\w -]+)?: error: ", lines[0]), lines[0]
    assert re.search(case.expect, lines[0], re.IGNORECASE), lines[0]
    assert snapshot(work, runs) == before, "files changed or left behind"
    assert not any(p.name.endswith(".tmp") for p in work.rglob("*"))


def test_eval_class_mismatch_can_be_allowed(runs, tmp_path, capsys):
    """The override exists, says what it overrides, and evaluates."""
    ctx = Ctx(tmp_path, runs, Path())
    folder = ctx.two_class_folder()
    argv = [
        "eval",
        str(runs / IMG),
        "--data",
        "imagefolder",
        "--data-dir",
        str(folder),
        "--allow-class-mismatch",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "10 classes but the data has 2" in captured.err and "--allow-class-mismatch" in captured.err
    result = json.loads(captured.out)
    assert 0.0 <= result["top1"] <= 1.0 or 0.0 <= result["top1"] <= 100.0
