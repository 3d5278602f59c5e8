"""The run folder: its files, its metrics log, and the resume contract.

    config.json                   the resolved config (+ "overrides": the deliberate changes of resumes)
    model.json                    what rebuilds the model (name, arguments, classes, tokenizer, ...)
    metrics.jsonl, tb/            one record per epoch / evaluation (JSON lines, TensorBoard)
    checkpoints/last.safetensors  weights + optimiser/schedule state + counter (resume)
    summary.json                  written when the run finished

Resume is a contract: config.json is the truth. A resume that would change the run is refused
with every difference listed; only the length of the run and how often it evaluates may change
on purpose (``overrides``), and each such change is recorded in config.json. Where the run executes
(EXECUTION_KEYS: another device, compiled or not, ...) may change without ``--override``: it is said
on stderr and recorded in config.json the same way.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ResumeError
from ..io import atomic_write, remove_stale_temp_files

LAST = "checkpoints/last.safetensors"
BEST = "checkpoints/best.safetensors"

# Keys that only say how this invocation runs (not what the run computes): a resume takes them
# from the caller without a word.
INVOCATION_KEYS = frozenset(
    {"progress", "num_workers", "time_budget_min", "stop_after_epochs", "checkpoint_every"}
)
# Keys a resume may change on purpose (``overrides``, recorded in config.json): the length of the
# run and how often it evaluates. Anything else would make the checkpoint belong to another run.
OVERRIDABLE_KEYS = INVOCATION_KEYS | {"epochs", "max_steps", "eval_every"}
# Keys that say where and how fast the run executes, not what it computes: a resume may take new
# values (a run trained on a GPU goes on on a CPU; "auto" becomes "cpu"), as Hugging Face's Trainer
# and timm allow. Unlike INVOCATION_KEYS they describe the run, so a change is said on stderr and
# recorded in config.json's override history. The same values continue bit for bit; other ones
# compute the same function up to floating-point rounding (other kernels, another memory layout)
# and, for data_path, with other random draws of the same augmentation (as num_workers already does
# under data_path='auto'). Not here on purpose: amp (bf16/fp16 round every matmul: another
# computation) and every evaluation option (tta, eval_iters, eval_bleu, beam_size, ...), whose
# change would mix two definitions of a metric in one metrics.jsonl.
EXECUTION_KEYS = frozenset({"device", "compile", "channels_last", "data_path"})


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint to resume from."""
    return (Path(run_dir) / LAST).is_file()


def is_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "summary.json").exists()


def write_json(path: Path, obj: dict) -> None:
    """Atomically: a kill mid-write leaves the previous file (config.json is what a resume reads)."""
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a kill is dropped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def last_record(path: Path) -> dict:
    records = read_records(path)
    return records[-1] if records else {}


class MetricsLog:
    """metrics.jsonl (one JSON object per line) + TensorBoard, written by the main process only.

    ``keep_upto=(key, n)`` first cuts metrics.jsonl back to the records with ``record[key] <= n``
    (the checkpoint's epoch or step) and tells TensorBoard to drop the later events, so a run
    killed between its metrics line and its checkpoint logs that epoch once after the resume.
    """

    def __init__(self, run_dir: Path, enabled: bool, keep_upto: tuple[str, int] | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        purge_step = None
        if keep_upto is not None:
            key, n = keep_upto
            kept = [r for r in read_records(self.path) if r.get(key, 0) <= n]
            text = "".join(json.dumps(r) + "\n" for r in kept)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))
            purge_step = (kept[-1].get("step", 0) if kept else 0) + 1
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                self.tb.add_scalar(k, v, record.get("step", 0))
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------- resume contract
def stored_config(run_dir: str | Path, cls=None) -> dict:
    """The run's config.json without its override history (``{}`` when there is none); with
    ``cls``, fields the config class gained since the run was made read as their defaults."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResumeError(f"{path} is not valid JSON ({e}); the run folder is damaged") from None
    values.pop("overrides", None)
    if cls is not None:
        values = {**_defaults(cls), **values}
    return values


def _defaults(cls) -> dict:
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = as_json(f.default)
        elif f.default_factory is not MISSING:
            out[f.name] = as_json(f.default_factory())
    return out


def as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, as config.json stores them


def config_differences(stored: dict, cfg_values: dict, ignore=()) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every value of ``cfg_values`` that is not the stored one."""
    new = as_json(cfg_values)
    return {
        k: (stored.get(k), new.get(k))
        for k in sorted(set(stored) | set(new))
        if k not in ignore and stored.get(k) != new.get(k)
    }


def describe(diffs: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diffs.items())


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["epochs=20", "time_budget_min=null"]`` -> ``{"epochs": 20, "time_budget_min": None}``
    (values read as JSON where they are JSON, else as text; ``-`` in keys read as ``_``)."""
    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--override {item!r}: write KEY=VALUE, e.g. --override epochs=20")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out[key.strip().replace("-", "_")] = value
    return out


def resume_config(cls, run_dir: str | Path, given: dict | None = None):
    """The config of the run in ``run_dir`` (its config.json is the truth) for ``--resume``.

    ``given``: the values the user set for this invocation (flags, a --config file). A value that
    differs from the run's is refused (ResumeError listing each difference) unless it only says
    how this invocation runs (INVOCATION_KEYS; taken from ``given`` or the defaults) or where the
    run executes (EXECUTION_KEYS; taken from ``given`` or config.json, and start_run records it).
    """
    require_checkpoint(Path(run_dir))
    if not (Path(run_dir) / "config.json").is_file():
        raise ResumeError(f"{run_dir} has a checkpoint but no config.json; it cannot be resumed safely")
    stored = stored_config(run_dir, cls)
    given = dict(given or {})
    names = {f.name for f in fields(cls)}
    diffs = config_differences(stored, given, ignore=INVOCATION_KEYS | EXECUTION_KEYS | {"out"})
    diffs = {k: d for k, d in diffs.items() if k in given}
    if diffs:
        raise ResumeError(refusal(run_dir, diffs, names))
    values = {k: v for k, v in stored.items() if k in names and k not in INVOCATION_KEYS}
    values.update({k: v for k, v in given.items() if k in INVOCATION_KEYS | EXECUTION_KEYS and k in names})
    values["out"] = str(run_dir)
    try:
        return cls(**values)
    except TypeError as e:
        raise ResumeError(f"{run_dir}/config.json does not fit {cls.__name__}: {e}") from None


def refusal(run_dir, diffs: dict, names: set[str]) -> str:
    safe = sorted(OVERRIDABLE_KEYS & names)
    return (
        f"--resume would change the run in {run_dir} ({describe(diffs)}); its config.json is the "
        f"truth: resume with the same settings, start a new run with another --out, or change one of "
        f"{', '.join(safe)} on purpose with --override KEY=VALUE"
    )


def require_checkpoint(run_dir: Path) -> None:
    if not run_dir.exists():
        raise ResumeError(f"--resume: {run_dir} does not exist; start the run without --resume")
    if not has_checkpoint(run_dir):
        raise ResumeError(
            f"--resume: {run_dir} holds no checkpoint ({LAST}) to continue from; start it again "
            "without --resume"
        )


def remove_interrupted_writes(run_dir: Path) -> None:
    """Temp files of writes a kill interrupted (``.NAME.*.tmp``) would stay forever otherwise."""
    for folder in (run_dir, run_dir / "checkpoints"):
        remove_stale_temp_files(folder)
