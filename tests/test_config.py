"""The one config mechanism: dataclass <-> dict <-> YAML/JSON <-> flags, and the CLI's error policy."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import pytest

from vitlens.config import (
    Config,
    add_arguments,
    config_from_args,
    from_dict,
    from_file,
    read_config_file,
)
from vitlens.errors import ConfigError, MissingFileError, VitlensError


@dataclass
class Toy(Config):
    name: str = "toy"
    steps: int = 10
    lr: float = 1e-3
    clip: float | None = 1.0
    tag: str | None = None
    augment: bool = True
    extra: dict = field(default_factory=dict)
    fractions: list[float] = field(default_factory=lambda: [0.5, 1.0])


def _parser(cls=Toy) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_arguments(p, cls)
    return p


# ------------------------------------------------------------------------------- files and dicts
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_through_a_file(tmp_path, suffix):
    cfg = Toy(
        name="x", steps=3, lr=0.5, clip=None, tag="t", augment=False, extra={"a": [1, 2]}, fractions=[0.1]
    )
    path = tmp_path / f"c{suffix}"
    cfg.save(path)
    text = path.read_text()
    # the file is plain YAML / JSON, readable without vitlens
    import yaml

    raw = yaml.safe_load(text) if suffix == ".yaml" else json.loads(text)
    assert raw == {
        "name": "x", "steps": 3, "lr": 0.5, "clip": None, "tag": "t", "augment": False,
        "extra": {"a": [1, 2]}, "fractions": [0.1],
    }  # fmt: skip
    assert Toy.from_file(path) == cfg


def test_real_configs_round_trip(tmp_path):
    from vitlens.study.config import StudyConfig
    from vitlens.train.config import TrainConfig
    from vitlens.train.lm import LMTrainConfig
    from vitlens.train.tokenizer import TokenizerTrainConfig
    from vitlens.train.translate import TranslateTrainConfig

    for cfg in [
        TrainConfig(model="resnet8_cifar", epochs=2, grad_clip=None, model_args={"pool": "gap"}),
        LMTrainConfig(max_steps=7, block_size=16),
        TranslateTrainConfig(max_steps=3, limit_train=10),
        TokenizerTrainConfig(kind="palette", k=8),
        StudyConfig.load(preset="smoke"),
    ]:
        path = tmp_path / f"{type(cfg).__name__}.yaml"
        cfg.save(path)
        assert type(cfg).from_file(path) == cfg


def test_ints_widen_to_float_and_wrong_types_are_named():
    assert from_dict(Toy, {"lr": 1}).lr == 1.0
    assert isinstance(from_dict(Toy, {"lr": 1}).lr, float)
    with pytest.raises(ConfigError, match=r"steps must be an int, got 'ten'"):
        from_dict(Toy, {"steps": "ten"})
    with pytest.raises(ConfigError, match="augment must be a bool"):
        from_dict(Toy, {"augment": "yes"})
    with pytest.raises(ConfigError, match="steps cannot be empty"):
        from_dict(Toy, {"steps": None})
    with pytest.raises(ConfigError, match=r"fractions\[1\] must be a float"):
        from_dict(Toy, {"fractions": [0.5, "all"]})


def test_unknown_key_suggests_and_lists_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stpes: 3\nname: a\n")
    with pytest.raises(ConfigError) as info:
        Toy.from_file(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "unknown config keys ['stpes']" in msg
    assert "did you mean 'steps'?" in msg
    assert "valid keys: augment, clip, extra, fractions, lr, name, steps, tag" in msg


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: a\nsteps: 3\nextra: {a: 1\nlr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        read_config_file(path)
    msg = str(info.value)
    # PyYAML reports the flow mapping that never closes where the parser gave up: line 4 here
    assert msg.startswith(f"{path}:4:")
    assert "YAML syntax error" in msg and "\n" not in msg


def test_json_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "name": "a",\n  "steps": 3,,\n}\n')
    with pytest.raises(ConfigError, match=rf"^{path}:3:\d+: JSON syntax error"):
        read_config_file(path)


def test_file_that_is_not_a_mapping_or_missing(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_config_file(path)
    with pytest.raises(MissingFileError, match="does not exist"):
        read_config_file(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert from_file(Toy, tmp_path / "empty.yaml") == Toy()


# ------------------------------------------------------------------------------- flags
def test_unset_flags_are_absent_so_the_file_survives(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: fromfile\nsteps: 5\nlr: 0.25\n")
    args = _parser().parse_args(["--config", str(path), "--steps", "9"])
    assert not hasattr(args, "lr") and not hasattr(args, "name")
    cfg = config_from_args(Toy, args)
    assert (cfg.name, cfg.steps, cfg.lr) == ("fromfile", 9, 0.25)  # file, then flags
    assert cfg.clip == 1.0  # neither: the default


def test_bool_none_dict_and_list_flags():
    p = _parser()
    cfg = config_from_args(Toy, p.parse_args(["--no-augment", "--clip", "none", "--extra", '{"k": [1]}']))
    assert cfg.augment is False and cfg.clip is None and cfg.extra == {"k": [1]}
    cfg = config_from_args(Toy, p.parse_args(["--augment", "--clip", "0.5", "--tag", "NULL"]))
    assert cfg.augment is True and cfg.clip == 0.5 and cfg.tag is None
    assert config_from_args(Toy, p.parse_args(["--fractions", "0.1,1"])).fractions == [0.1, 1.0]
    assert config_from_args(Toy, p.parse_args(["--fractions", "[0.2]"])).fractions == [0.2]


def test_bad_flag_values_are_usage_errors(capsys):
    p = _parser()
    for argv in (["--steps", "ten"], ["--steps", "none"], ["--extra", "{x"], ["--extra", "[1]"]):
        with pytest.raises(SystemExit) as info:
            p.parse_args(argv)
        assert info.value.code == 2
        assert argv[0] in capsys.readouterr().err


def test_help_shows_defaults():
    text = _parser().format_help()
    assert "(default: 10)" in text and "(default: None)" in text
    assert "(default: {})" in text and "(default: [0.5, 1.0])" in text
    assert "--no-augment" in text


def test_every_training_verb_takes_the_same_flags_and_config():
    """One mechanism: each config field is a flag of its verb, and --config works for each."""
    from dataclasses import fields

    from vitlens.cli import build_parser
    from vitlens.cli.text import _translate_train_parser
    from vitlens.train.config import TrainConfig
    from vitlens.train.lm import LMTrainConfig
    from vitlens.train.tokenizer import TokenizerTrainConfig
    from vitlens.train.translate import TranslateTrainConfig

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lm = next(a for a in sub.choices["lm"]._actions if isinstance(a, argparse._SubParsersAction))
    verbs = [
        (sub.choices["train"], TrainConfig),
        (lm.choices["train"], LMTrainConfig),
        (_translate_train_parser(TranslateTrainConfig), TranslateTrainConfig),
        (sub.choices["train-tokenizer"], TokenizerTrainConfig),
    ]
    for p, cls in verbs:
        opts = {o for a in p._actions for o in a.option_strings}
        assert "--config" in opts
        for f in fields(cls):
            assert "--" + f.name.replace("_", "-") in opts, (cls.__name__, f.name)


# ------------------------------------------------------------------------------- the CLI's policy
def test_cli_config_errors_are_one_line(tmp_path, capsys):
    from vitlens.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:" in err and "YAML syntax error" in err
    typo = tmp_path / "typo.yaml"
    typo.write_text("epocs: 2\n")
    assert main(["lm", "train", "--config", str(typo), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'eval_every'?" in err or "valid keys:" in err
    assert not (tmp_path / "r").exists()


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user errors become one line; any other exception propagates unchanged."""
    from vitlens.cli import main

    def broken(pattern=None):
        raise RuntimeError("a bug inside vitlens")

    monkeypatch.setattr("vitlens.list_models", broken)
    with pytest.raises(RuntimeError, match="a bug inside vitlens") as info:
        main(["models"])
    assert info.traceback[-1].name == "broken"  # the traceback reaches the raising frame
    for bug in (KeyError("k"), TypeError("t"), ValueError("v")):
        monkeypatch.setattr("vitlens.list_models", lambda pattern=None, bug=bug: (_ for _ in ()).throw(bug))
        with pytest.raises(type(bug)):
            main(["models"])


def test_user_errors_and_bad_paths_are_one_line(monkeypatch, capsys):
    from vitlens.cli import main

    cases = [
        (ConfigError("lr must be positive"), "lr must be positive"),
        (PermissionError(13, "Permission denied", "/root/x"), "/root/x: Permission denied"),
        (NotADirectoryError(20, "Not a directory", "/etc/passwd/x"), "/etc/passwd/x: Not a directory"),
        (FileExistsError(17, "File exists", "/tmp"), "/tmp: File exists"),
    ]
    for error, text in cases:
        monkeypatch.setattr("vitlens.list_models", lambda pattern=None, e=error: (_ for _ in ()).throw(e))
        assert main(["models"]) == 2
        err = capsys.readouterr().err
        assert err == f"vitlens models: error: {text}\n"
    assert issubclass(ConfigError, VitlensError) and issubclass(ConfigError, ValueError)


def test_nested_specs_are_checked_like_the_top_level():
    from vitlens.study.config import ModelSpec, StudyConfig

    with pytest.raises(ConfigError, match="ModelSpec needs model"):
        from_dict(ModelSpec, {"label": "ViT"})
    spec = {"label": "ViT", "model": "vit_micro_patch4_32", "modle_args": {}}
    with pytest.raises(ConfigError, match="did you mean 'model_args'"):
        StudyConfig.from_dict({"models": [spec]})
    cfg = StudyConfig.from_dict({"models": [{"label": "R", "model": "resnet8_cifar"}], "fractions": [1]})
    assert cfg.models == [ModelSpec("R", "resnet8_cifar")] and cfg.fractions == [1.0]
    with pytest.raises(ConfigError, match="train.epochs must be a positive integer"):
        StudyConfig.from_dict({"models": [{"label": "R", "model": "resnet8_cifar"}], "train": {"epochs": 0}})
